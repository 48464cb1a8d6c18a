"""Plain records of the storage core: what an output is (:class:`Spec`), a checked output of a
batch (:class:`Output`), a per-token column (:class:`Jagged`), a block of slots as shards and
ranks exchange them (:class:`SlotBlock`) and a finished result (:class:`ColumnTable`)."""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .memory import gather_rows

__all__ = ["SINGLE", "ON_DUPLICATE", "VIEWS", "Spec", "specs_to_meta", "specs_from_meta", "Identity", "Output", "Jagged",
           "SlotBlock", "ColumnTable"]

SINGLE = "prediction"  # the name of a single-tensor output in tables and files
ON_DUPLICATE = ("error", "first", "last", "mean")
VIEWS = ("mean", "vote", "stack", "none")


class Spec(NamedTuple):
    """What one named output is: per token or per example, dtype, and the shape of one row."""

    per_token: bool
    dtype: torch.dtype
    shape: Tuple[int, ...]

    def describe(self) -> str:
        return f"{'per-token' if self.per_token else 'per-example'} {str(self.dtype).replace('torch.', '')} rows of shape {list(self.shape)}"


def specs_to_meta(specs: Dict[str, Spec]) -> List[Dict[str, Any]]:
    """Outputs as plain data (name, per_token, dtype, shape), in order: what files and headers hold."""
    return [{"name": name, "per_token": s.per_token, "dtype": str(s.dtype).replace("torch.", ""), "shape": list(s.shape)}
            for name, s in specs.items()]


def specs_from_meta(meta: List[Dict[str, Any]]) -> Dict[str, Spec]:
    return {o["name"]: Spec(bool(o["per_token"]), getattr(torch, o["dtype"]), tuple(o["shape"])) for o in meta}



class Identity(NamedTuple):
    """Which rows a batch holds, on the host: what ``Recorder.add``, its compiled pass and
    ``Recorder.done`` all take, parsed once.

    ``index`` int64 ``[B]`` (``index_t``: the same as a CPU tensor when it came as one, else
    None); ``views`` int64 ``[B]`` or None (all 0); ``lengths`` the items' real lengths or None;
    ``left`` whether padding is on the left; ``max_len`` the padded length of a Batch (None for a
    plain index); ``jagged`` whether per-token outputs may come as rows ``[total, ...]`` in item
    order (a packed Batch, or ``offsets=``); ``keys`` the rows' keys (an int64 array, or a list of
    checked str / bytes / tuple keys) when they are filed by key, else None; ``prints`` the
    rows' input fingerprints (int64 ``[B]``, ``batch.fingerprint``) or None.
    """

    index_t: Optional[torch.Tensor]
    index: np.ndarray
    views: Optional[np.ndarray]
    lengths: Optional[np.ndarray]
    left: bool
    max_len: Optional[int]
    jagged: bool
    keys: Any = None
    prints: Optional[np.ndarray] = None


class Output(NamedTuple):
    """One checked output of a batch: ``rows`` is ``[B, T, ...]`` padded (``jagged`` False) or
    ``[total, ...]`` in batch order (``jagged`` True) per token, ``[B, ...]`` per example."""

    tensor: torch.Tensor
    per_token: bool
    jagged: bool = False



class Jagged:
    """A per-token column: entry e's rows are global rows ``starts[e] .. starts[e] + lengths[e]`` of ``chunks``."""

    __slots__ = ("chunks", "bases", "starts", "lengths")

    def __init__(self, chunks: List[torch.Tensor], bases: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.chunks, self.bases, self.starts, self.lengths = chunks, bases, starts, lengths

    @classmethod
    def of(cls, values: torch.Tensor, offsets: np.ndarray) -> "Jagged":
        """Rows ``values[offsets[e]:offsets[e+1]]`` of entry e."""
        return cls([values], np.zeros(1, np.int64), offsets[:-1].copy(), np.diff(offsets))

    @property
    def dtype(self) -> torch.dtype:
        return self.chunks[0].dtype

    def segment(self, e: int) -> torch.Tensor:
        start, length = int(self.starts[e]), int(self.lengths[e])
        k = int(np.searchsorted(self.bases, start, side="right")) - 1
        local = start - int(self.bases[k])
        return self.chunks[k][local:local + length]

    def contiguous(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(values [total, ...] in entry order, offsets [E+1]); a view when the rows already are."""
        offsets = np.concatenate(([0], np.cumsum(self.lengths))).astype(np.int64)
        total = int(offsets[-1])
        first = int(self.starts[0]) if len(self.starts) else 0
        k = int(np.searchsorted(self.bases, first, side="right")) - 1
        local = first - int(self.bases[k])
        if np.array_equal(self.starts - first, offsets[:-1]) and local + total <= self.chunks[k].shape[0]:
            values = self.chunks[k][local:local + total]
        else:
            values = gather_rows(self.chunks, self.bases, self.starts, self.lengths)
        return values, torch.from_numpy(offsets)


class SlotBlock:
    """A block of raw slots, as shards hold them and ranks send them.

    ``index`` int64 ``[E]``; ``view`` int64 ``[E]`` or None (all 0); ``count`` int64 ``[E]`` or
    None (all 1): how many records each slot averages (``on_duplicate="mean"``); ``lengths``
    int64 ``[E]`` per-token lengths, or None without per-token outputs; ``columns``
    ``{name: [E, ...]}`` per example and ``{name: [sum(lengths), ...]}`` per token, in slot
    order; ``records``: how many records the block stands for (repeats resolved before it
    was made included), None for one per slot; ``keys``: each slot's key (an int64 array or a
    list) when the slots are filed by key, else None (``index`` then numbers the block's items).
    """

    __slots__ = ("index", "view", "count", "lengths", "columns", "records", "keys", "key_data", "prints")

    def __init__(self, index: np.ndarray, view: Optional[np.ndarray], count: Optional[np.ndarray],
                 lengths: Optional[np.ndarray], columns: Dict[str, torch.Tensor], records: Optional[int] = None,
                 keys: Any = None) -> None:
        self.index, self.view, self.count, self.lengths, self.columns = index, view, count, lengths, columns
        self.records, self.keys = records, keys
        self.key_data = None  # keys as (bytes, offsets) on their way to another rank
        self.prints: Optional[np.ndarray] = None  # each slot's input fingerprint (int64 [E]), when all have one

    def __len__(self) -> int:
        return len(self.index)


class ColumnTable(NamedTuple):
    """A finished result: ``index`` None means the entries are exactly ``range(size)``.

    ``columns`` maps each output to a tensor ``[E, ...]`` or a :class:`Jagged`; ``records``
    counts every record seen (repeats included) and ``slots`` the distinct (index, view) pairs
    they filled (None: one record per entry), ``incomplete`` the items missing some of their
    ``views``, ``ranks`` the processes and ``shards`` the files merged, and ``on_duplicate``
    the policy that resolved repeats (None when unknown). A keyed table's ``keys`` holds each
    entry's key (an int64 array for int keys, else a list), its entries sorted by key (then
    view), its ``index`` the slots the store gave the keys, and ``num_items`` the items expected.
    ``prints`` holds each entry's input fingerprint (int64 ``[E]``) when every entry has one and
    entries are slots (views not combined), else None; ``conflicts`` counts the ids under which
    records of different inputs were filed (``conflicted``: those ids), ``disagreements``
    repeats of one input whose outputs differed, by at most ``max_disagreement``.
    """

    index: Optional[np.ndarray]
    view: Optional[np.ndarray]
    columns: Dict[str, Any]
    single: bool
    num_items: Optional[int]
    stacked_views: Optional[int]
    size: int
    records: Optional[int] = None
    slots: Optional[int] = None
    incomplete: int = 0
    ranks: int = 1
    shards: int = 0
    views: int = 1
    on_duplicate: Optional[str] = None
    keys: Any = None
    prints: Optional[np.ndarray] = None
    conflicts: int = 0
    disagreements: int = 0
    max_disagreement: float = 0.0
    conflicted: Any = ()

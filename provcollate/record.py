"""Recorder and Predictions: model outputs back in dataset order, unpadded.

``Recorder.add(batch, outputs)`` files each row of a batch's outputs under its dataset index;
``Recorder.result()`` hands back a :class:`Predictions`, keyed by dataset index.

How the Recorder stores what it is given:

- Bookkeeping lives on the host, in numpy arrays indexed by *slot* ``index * V + view``
  (``V`` views, 1 without test-time augmentation): how many times each slot was recorded and,
  for per-token outputs, each slot's length and first row. Every size comes from the batch's
  host-side index and lengths, so recording never waits on a GPU.
- A per-example output ``[B, ...]`` goes to a dense tensor ``[num_items * V, ...]``: rows are
  scattered to their slots by :func:`provcollate.ops.unpad_scatter_` (items of length 1). With
  ``num_items`` known it is allocated once; otherwise it grows geometrically.
- A per-token output ``[B, T, ...]`` is unpadded straight into append-only chunks of rows, in
  arrival order (:func:`provcollate.ops.unpad_scatter_` with the batch's lengths). A full chunk
  is never copied: the next one is a quarter of all rows so far, so unused space stays under a
  quarter of the result plus one batch, and host pages never written cost no memory.
- The common batch (CPU outputs shaped as in the first ``add``, host storage, one view, no
  repeats, no reduction, storage already big enough) is checked, its slots claimed and its rows
  written to the same places in one compiled pass, with the GIL released (csrc/record.cpp);
  chunk pages are populated a batch at a time rather than faulted in one by one. Any other
  batch, and every error, takes the Python path.
- Outputs on a GPU with storage on the host (the default) are reduced and unpadded on the GPU,
  copied to pinned host buffers without blocking, and written when the copy has landed, which
  a later ``add`` checks without waiting (``result`` waits). ``device=`` keeps storage on a
  device instead. On the CPU the same code writes at once.

A later ``add`` after ``result()`` never changes the Predictions already returned: storage
they share is copied before it is next written (so ``result()`` itself copies nothing).
"""
from __future__ import annotations

import collections
import operator
from collections.abc import Mapping
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from . import _progress, ops
from .dataset import Sample, _check_int

if ops.HAS_EXTENSION:
    from ._C import record_rows as _record_rows
else:  # no compiled extension, or PROVCOLLATE_EXTENSION=0 (ops.py warns): add() takes the general path only
    _record_rows = None

__all__ = ["Recorder", "Predictions"]

SINGLE = "prediction"  # the name of a single-tensor output in tables and files
_ON_DUPLICATE = ("error", "first", "last", "mean")
_VIEWS = ("mean", "vote", "stack", "none")
_MIN_CHUNK_BYTES = 1 << 20
_MAX_PENDING = 8  # host copies in flight from a GPU before add() waits for the oldest
_GATHER_ROWS = 1 << 20  # rows per step of a jagged gather: bounds its index tensors


# --------------------------------------------------------------------------------------------
# Small host-side helpers
# --------------------------------------------------------------------------------------------

def _host_long(owner: str, name: str, value) -> np.ndarray:
    """``value`` (tensor, ndarray or sequence of ints) as a 1-D int64 numpy array on the host."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.int64 and value.is_cpu and value.dim() == 1:
            return value.numpy()
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{owner}: {name} must hold integers, got a tensor of dtype {value.dtype}")
        if not value.is_cpu:
            value = value.cpu()  # the caller chose a device tensor: this one copy waits for it
        value = value.numpy()
    elif not isinstance(value, np.ndarray):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise TypeError(f"{owner}: {name} must be a 1-D integer tensor, array or sequence, got {type(value).__name__}")
        value = np.asarray(value) if len(value) else np.zeros(0, np.int64)
    if value.dtype.kind not in "iu":
        raise TypeError(f"{owner}: {name} must hold integers, got dtype {value.dtype}")
    if value.ndim != 1:
        raise ValueError(f"{owner}: {name} must be 1-D, got shape {tuple(value.shape)}")
    return value.astype(np.int64, copy=False)


def _index_arrays(owner: str, name: str, value) -> Tuple[Optional[torch.Tensor], np.ndarray]:
    """(the tensor itself when it already is a 1-D int64 CPU tensor, else None; its int64 numpy view)."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.int64 and value.is_cpu and value.dim() == 1:
        return value, value.numpy()
    return None, _host_long(owner, name, value)


def _raise_bad_output(key: Optional[str], t: torch.Tensor, tok: bool, batch_size: int, lens) -> None:
    """The error for an output whose shape does not fit the batch."""
    what = "Recorder.add: " + ("outputs" if key is None else f"outputs[{key!r}]")
    if t.dim() < 1 + tok:
        raise ValueError(f"{what} must be [B, T, ...] per token, got shape {tuple(t.shape)}" if tok
                         else f"{what} must be [B, ...], got a 0-d tensor")
    if t.shape[0] != batch_size:
        raise ValueError(f"{what} has {t.shape[0]} rows but the batch has {batch_size} items")
    if lens is None:
        raise ValueError(f"{what} is per token but the batch has no lengths (pass lengths= with a plain index)")
    raise ValueError(f"{what} has {t.shape[1]} positions, shorter than the batch's longest item ({int(lens.max())})")


def _exclusive_cumsum(lengths: np.ndarray) -> np.ndarray:
    out = np.empty(len(lengths), np.int64)
    if len(lengths):
        out[0] = 0
        np.cumsum(lengths[:-1], out=out[1:])
    return out


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device``; to a GPU through pinned memory, without waiting."""
    t = torch.from_numpy(array)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums of ``dtype`` values are formed: float32 at least."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _first_last(key: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Masks of the first and of the last occurrence of each value of ``key``."""
    order = np.argsort(key, kind="stable")
    sk = key[order]
    change = sk[1:] != sk[:-1]
    first = np.empty(len(key), bool)
    last = np.empty(len(key), bool)
    first[order] = np.concatenate(([True], change))
    last[order] = np.concatenate((change, [True]))
    return first, last


def _row_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Rows ``starts[e] .. starts[e] + lengths[e]`` of every segment, concatenated in order."""
    total = int(lengths.sum())
    shift = np.repeat(starts - _exclusive_cumsum(lengths), lengths)
    return shift + np.arange(total, dtype=np.int64)


def _gather_rows(chunks: List[torch.Tensor], bases: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """Segments of chunked rows (global row ``starts[e]``, ``lengths[e]`` rows) as one tensor, in order.

    Works in steps of about ``_GATHER_ROWS`` rows so that the index tensors stay small; loops
    over steps and chunks only, never over segments.
    """
    out = chunks[0].new_empty((int(lengths.sum()), *chunks[0].shape[1:]))
    ends = np.cumsum(lengths)
    begin, e0 = 0, 0
    while e0 < len(lengths):
        e1 = max(e0 + 1, int(np.searchsorted(ends, begin + _GATHER_ROWS, side="right")))
        end = int(ends[e1 - 1])
        s, ln = starts[e0:e1], lengths[e0:e1]
        which = np.searchsorted(bases, s, side="right") - 1
        dst = out[begin:end]
        for k in np.unique(which):
            sel = which == k
            src_rows = _to_device(_row_positions(s[sel] - bases[k], ln[sel]), chunks[k].device)
            if sel.all():
                torch.index_select(chunks[k], 0, src_rows, out=dst)
            else:
                dst_rows = _to_device(_row_positions(_exclusive_cumsum(ln)[sel], ln[sel]), dst.device)
                dst.index_copy_(0, dst_rows, chunks[k].index_select(0, src_rows))
        begin, e0 = end, e1
    return out


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------

class _Spec:
    """What one named output is: per token or per example, dtype, and the shape of one row."""

    __slots__ = ("per_token", "dtype", "shape")

    def __init__(self, per_token: bool, dtype: torch.dtype, shape: Tuple[int, ...]):
        self.per_token, self.dtype, self.shape = per_token, dtype, tuple(shape)

    def __eq__(self, other) -> bool:
        return (self.per_token, self.dtype, self.shape) == (other.per_token, other.dtype, other.shape)

    def describe(self) -> str:
        return f"{'per-token' if self.per_token else 'per-example'} {str(self.dtype).replace('torch.', '')} rows of shape {list(self.shape)}"


class _Chunks:
    """Append-only rows in chunks that are never copied: global row r lives in chunk k at r - bases[k]."""

    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.chunks: List[torch.Tensor] = []
        self.bases: List[int] = []
        self.used = 0  # rows used in the last chunk
        self.rows = 0  # rows handed out in all chunks

    def room(self, n: int) -> None:
        """Make the last chunk one with room for ``n`` more rows (a new chunk if it has not)."""
        if not self.chunks or self.used + n > self.chunks[-1].shape[0]:
            row_bytes = max(1, self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64)))
            size = max(n, self.rows // 4, _MIN_CHUNK_BYTES // row_bytes)
            self.bases.append(self.bases[-1] + self.chunks[-1].shape[0] if self.chunks else 0)
            self.chunks.append(torch.empty((size, *self.shape), dtype=self.dtype, device=self.device))
            self.used = 0

    def reserve(self, n: int) -> Tuple[torch.Tensor, int, int]:
        """Room for ``n`` consecutive rows: (chunk, first local row, global row of the chunk's row 0)."""
        self.room(n)
        start = self.used
        self.used += n
        self.rows += n
        return self.chunks[-1], start, self.bases[-1]

    def append(self, rows: torch.Tensor) -> int:
        """Copy ``rows`` to fresh rows; returns the global row of the first."""
        chunk, start, base = self.reserve(rows.shape[0])
        chunk[start:start + rows.shape[0]].copy_(rows)
        return base + start

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        return _gather_rows(self.chunks, np.asarray(self.bases, np.int64), starts, lengths)


def _pinned_copy(src: torch.Tensor):
    """Start copying ``src`` from its GPU to pinned host memory: (host tensor, CUDA event of arrival)."""
    staged = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    staged.copy_(src, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(src.device))
    return staged, event


def _combine_views(values: torch.Tensor, present: torch.Tensor, how: str) -> torch.Tensor:
    """``values [N, V, ...]`` with ``present [N, V]`` to ``[N, ...]``: mean of floats, else majority vote.

    The vote takes, per element, the value most present views agree on, ties to the smallest.
    """
    mask = present.reshape(present.shape + (1,) * (values.dim() - 2))
    if how == "mean" and values.is_floating_point():
        acc = _acc_dtype(values.dtype)
        total = torch.where(mask, values.to(acc), 0).sum(1)
        return (total / mask.sum(1).clamp_min(1).to(acc)).to(values.dtype)
    as_int = values.to(torch.uint8) if values.dtype == torch.bool else values
    agree = (as_int.unsqueeze(2) == as_int.unsqueeze(1)) & mask.unsqueeze(1)  # [N, V, V, ...]
    votes = torch.where(mask, agree.sum(2), -1)
    best = votes.amax(1, keepdim=True)
    top = torch.iinfo(as_int.dtype).max
    winner = torch.where(votes == best, as_int, top).amin(1)
    return winner.to(values.dtype)


# --------------------------------------------------------------------------------------------
# Recorder
# --------------------------------------------------------------------------------------------

class Recorder:
    """Collects model outputs batch by batch and files every row under its dataset index.

    Args:
        num_items: the dataset's length. Storage is then allocated once and ``add`` rejects any
            index outside ``range(num_items)``; ``None`` grows storage as indices arrive.
        device: where recorded outputs are kept; ``None`` is the host (CPU) memory. Outputs on a
            GPU are then copied through pinned buffers without blocking the GPU or the caller.
        on_duplicate: what recording an (index, view) pair again does: ``"error"`` raises,
            ``"first"`` keeps the first value, ``"last"`` the latest, ``"mean"`` averages them
            (floating-point outputs only; per-token outputs must repeat the same length).
        views: how :meth:`result` combines the test-time-augmentation views of an example
            (``batch.view``): ``"mean"`` averages floating-point outputs and takes the majority
            vote of integer and bool ones (a mean of class ids means nothing); ``"vote"``
            takes the majority vote (integer and bool outputs only); ties go to the smallest
            value; ``"stack"`` gives ``[V, ...]`` per example (per token: ``[V, L, ...]``) and
            needs every view of every recorded example; ``"none"`` keeps each view as its own
            entry, read as ``preds[i, v]``. With ``"mean"``, ``"vote"`` and ``"stack"``, the
            views of an example must have one length for per-token outputs.
        reduce: applied to every floating-point output over its last dimension before it is
            stored, so full-vocabulary logits never need to be kept: ``"argmax"`` (int64
            class ids), ``"softmax"``, or ``"topk:K"``, which stores two outputs, ``values``
            and ``indices`` (``"<name>.values"`` and ``"<name>.indices"`` for a dict output).
            Integer and bool outputs are stored as they are.
        resume: a directory of shards written by :meth:`write` (on any number of ranks), or one
            still to be made: what its shards hold counts as recorded, so a restarted run can
            skip it (:meth:`done`), ``add`` treats it as recorded under ``on_duplicate``, and
            :meth:`result` / :meth:`gather` include it; later writes go to the same directory.
            The shards must have been written with the same ``num_items``, ``on_duplicate``
            and ``views``. Only their bookkeeping is read now; values stay on disk until needed.

    The first :meth:`add` fixes the outputs' names, which of them are per token, their dtypes
    and their row shapes; later calls may differ in batch size, padded length and device.
    """

    def __init__(self, num_items: Optional[int] = None, device=None, on_duplicate: str = "error",
                 views: str = "mean", reduce: Optional[str] = None, resume=None) -> None:
        if num_items is not None:
            num_items = _check_int("Recorder", "num_items", num_items, minimum=0, what="an int or None")
        if on_duplicate not in _ON_DUPLICATE:
            raise ValueError(f"Recorder: on_duplicate must be one of {', '.join(map(repr, _ON_DUPLICATE))}, got {on_duplicate!r}")
        if views not in _VIEWS:
            raise ValueError(f"Recorder: views must be one of {', '.join(map(repr, _VIEWS))}, got {views!r}")
        try:
            self.device = torch.device("cpu" if device is None else device)
        except (TypeError, RuntimeError) as exc:
            raise TypeError(f"Recorder: device must be None, a torch.device or a device string, got {device!r}") from exc
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # outputs say cuda:0, not cuda
        self.num_items = num_items
        self.on_duplicate = on_duplicate
        self.views = views
        self.reduce = reduce
        self._reduce = _parse_reduce(reduce)
        self._specs: Optional[Dict[str, _Spec]] = None
        self._single = False
        # Host bookkeeping per slot index * V + view, laid out [capacity, V]. Counts above 1 only
        # matter for averaging: one byte per slot otherwise keeps the array in cache.
        self._count_dtype = np.int32 if on_duplicate == "mean" else np.uint8
        self._count = np.zeros((0, 1), self._count_dtype)
        self._count_flat = self._count.reshape(-1)
        self._token_len = np.zeros((0, 1), np.int64)
        self._starts: Dict[str, np.ndarray] = {}
        self._dense: Dict[str, torch.Tensor] = {}
        self._chunks: Dict[str, _Chunks] = {}
        self._pending: collections.deque = collections.deque()
        self._shared = False  # the dense tensors are also held by a returned Predictions
        self._ones_cache: Dict[int, torch.Tensor] = {}
        self._on_host = self.device.type == "cpu"
        # add() writes in one compiled pass what needs neither a reduction nor a GPU copy.
        self._fast = _record_rows is not None and self._reduce is None and self._on_host
        self._plan_of: Optional[Dict[str, _Spec]] = None  # the specs _plan_cache was made from
        self._plan_cache = None
        self._stream = None  # the shard directory of write() / resume=, see shards.py
        if resume is not None:
            from . import shards
            shards.resume(self, resume)

    def __repr__(self) -> str:
        recorded = int(np.count_nonzero(self._count))
        return (f"Recorder(num_items={self.num_items}, device={str(self.device)!r}, on_duplicate={self.on_duplicate!r}, "
                f"views={self.views!r}, reduce={self.reduce!r}, recorded={recorded})")

    # ---------------------------------------------------------------------------- add

    def add(self, batch, outputs, *, per_token=False, lengths=None, view=None, padding_side: Optional[str] = None) -> None:
        """Record one batch's outputs under the batch's dataset indices.

        Args:
            batch: a :class:`provcollate.Batch` (its ``host_index``, ``host_lengths``, views and
                ``padding_side`` are used; they live on the host, so nothing waits on a GPU), or
                a plain index tensor / array ``[B]`` of dataset indices (on the host, to avoid
                a device sync) for users with their own collate function.
            outputs: a tensor ``[B, ...]`` (per example) or ``[B, T, ...]`` (per token), or a
                dict of such tensors. Kept on their device until stored.
            per_token: ``True`` if the outputs have a position dimension to unpad with the
                batch's lengths; for a dict, ``True`` for every key or a set of the keys that do.
            lengths: with a plain index only: the real length of each item ``[B]``, needed for
                per-token outputs.
            view: with a plain index only: the view id of each item ``[B]`` (or one int).
            padding_side: with a plain index only: ``"right"`` (default) or ``"left"``.

        Raises TypeError or ValueError, with nothing recorded changed, if an index lies outside
        ``range(num_items)``, an (index, view) pair repeats with ``on_duplicate="error"``, the
        outputs' batch size differs from the index's, a per-token output is shorter than the
        batch's longest item, or the outputs differ from the first ``add``'s in names, dtype or
        row shape.
        """
        if self._pending:
            self._drain(wait=False)
        if self._fast and self._specs is not None and not (self._pending or self._shared):
            if self._add_fast(batch, outputs, per_token, lengths, view, padding_side):
                return
        index_t, index, views, lens, left = self._entries(batch, lengths, view, padding_side)
        named, specs, single = self._named_outputs(outputs, per_token, len(index), lens)
        keep, prev, merge, top, vmax = self._claim(index, views, lens, named)
        if self._specs is None:
            self._specs, self._single = specs, single
            self._chunks = {n: _Chunks(s.shape, s.dtype, self.device) for n, s in specs.items() if s.per_token}
            self._grow(max(top, 0), vmax)
        if len(index):
            self._commit(index_t, index, views, lens, left, named, keep, prev, merge, top, vmax)
        if self._stream is not None:
            self._stream.added(self, len(index))

    def _add_fast(self, batch, outputs, per_token, lengths, view, padding_side) -> bool:
        """Record a batch in one compiled pass (csrc/record.cpp) if it needs nothing more: CPU
        tensors shaped as in the first add, one view, no repeats, storage already big enough.

        Returns False, having changed nothing, for anything else: the general path then does
        the work or raises the error.
        """
        if type(batch) is torch.Tensor:
            if view is not None or not (lengths is None or type(lengths) is torch.Tensor):
                return False
            if padding_side is None or padding_side == "right":
                left = False
            elif padding_side == "left":
                left = True
            else:
                return False
            index, views, lens = batch, None, lengths
        elif lengths is None and view is None and padding_side is None and hasattr(batch, "host_index"):
            index, lens, left = batch.host_index, batch.host_lengths, batch.padding_side == "left"
            views = getattr(batch, "host_view", None)
            if views is None:
                views = batch.view
            if not (type(index) is torch.Tensor and type(views) is torch.Tensor and (lens is None or type(lens) is torch.Tensor)):
                return False
        else:
            return False
        names, token, token_names = self._plan()
        if isinstance(outputs, torch.Tensor):
            if names != (SINGLE,) or per_token is not token[0]:
                return False
            sources = [outputs]
        elif type(outputs) is dict and len(outputs) == len(names):
            if per_token is True or per_token is False:
                if token_names != (frozenset(names) if per_token else frozenset()):
                    return False
            elif not (type(per_token) in (set, frozenset) and per_token == token_names):
                return False
            try:
                sources = [outputs[name] for name in names]
            except KeyError:
                return False
        else:
            return False
        rows = _record_rows(index, views, lens, left, self._count, self._token_len, sources, self._targets(names, token))
        if rows < -1:  # a per-token output's last chunk is full: a new one, then the same pass again
            for name in token_names:
                self._chunks[name].room(-2 - rows)
            rows = _record_rows(index, views, lens, left, self._count, self._token_len, sources, self._targets(names, token))
        if rows < 0:
            return False
        for name in token_names:
            self._chunks[name].reserve(rows)  # the rows the pass just wrote: bookkeeping only
        if self._stream is not None:
            self._stream.added(self, len(index))
        return True

    def _plan(self) -> Tuple[Tuple[str, ...], Tuple[bool, ...], frozenset]:
        """(output names, whether each is per token, the per-token names), as the first add fixed them."""
        if self._plan_of is not self._specs:
            names = tuple(self._specs)
            token = tuple(spec.per_token for spec in self._specs.values())
            self._plan_cache = (names, token, frozenset(n for n, tok in zip(names, token) if tok))
            self._plan_of = self._specs
        return self._plan_cache

    def _targets(self, names, token) -> list:
        """Where record_rows writes each output: the dense storage, or (last chunk or None, its
        first free row, its global first row, starts) for a per-token output."""
        targets = []
        for name, tok in zip(names, token):
            if not tok:
                targets.append(self._dense[name])
                continue
            store = self._chunks[name]
            if store.chunks:
                targets.append((store.chunks[-1], store.used, store.bases[-1], self._starts[name]))
            else:
                targets.append((None, 0, 0, self._starts[name]))
        return targets

    def _entries(self, batch, lengths, view, padding_side):
        """(index tensor or None, index, views or None, lengths or None, left): host int64 arrays, checked."""
        owner = "Recorder.add"
        if isinstance(batch, Sample) or (isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Sample)):
            raise TypeError(
                f"{owner}: batch must be a pc.Collator batch or an index tensor [B], got "
                f"{'a Sample of collated fields' if isinstance(batch, Sample) else type(batch).__name__ + ' of Samples'}: "
                "the DataLoader used its default collate; pass DataLoader(..., collate_fn=pc.Collator(...))"
            )
        if isinstance(batch, (torch.Tensor, np.ndarray, list, tuple, range)):
            index_t, index = _index_arrays(owner, "index", batch)
            lens = None
            if lengths is not None:
                lens = _host_long(owner, "lengths", lengths)
                if len(lens) != len(index):
                    raise ValueError(f"{owner}: lengths must have one entry per index ({len(index)}), got {len(lens)}")
                if len(lens) and lens.min() < 0:
                    raise ValueError(f"{owner}: lengths must be >= 0, got lengths[{int(np.argmin(lens))}] = {lens.min()}")
            if view is None:
                views = None
            elif isinstance(view, (int, np.integer)) and not isinstance(view, bool):
                views = np.full(len(index), view, np.int64)
            else:
                views = _host_long(owner, "view", view)
            if padding_side not in (None, "right", "left"):
                raise ValueError(f"{owner}: padding_side must be 'right' or 'left', got {padding_side!r}")
            left = padding_side == "left"
        elif hasattr(batch, "host_index"):
            for name, value in (("lengths", lengths), ("view", view), ("padding_side", padding_side)):
                if value is not None:
                    raise TypeError(f"{owner}: {name}= is only for a plain index; a Batch carries its own, got {name}={value!r}")
            index_t, index = _index_arrays(owner, "batch.host_index", batch.host_index)
            lens = None if batch.host_lengths is None else _host_long(owner, "batch.host_lengths", batch.host_lengths)
            # A Collator batch keeps its view ids on the host too; batch.view may sit on a GPU.
            host_view = getattr(batch, "host_view", None)
            views = _host_long(owner, "batch.view", batch.view if host_view is None else host_view)
            left = batch.padding_side == "left"
        else:
            raise TypeError(f"{owner}: batch must be a provcollate.Batch or an index tensor [B], got {type(batch).__name__}")
        if lens is not None and len(lens) != len(index):
            raise ValueError(f"{owner}: the batch has {len(index)} indices but {len(lens)} lengths")
        if views is not None:
            if len(views) != len(index):
                raise ValueError(f"{owner}: the batch has {len(index)} indices but {len(views)} view ids")
            if not np.count_nonzero(views):
                views = None
            elif views.min() < 0:
                raise ValueError(f"{owner}: view ids must be >= 0, got view {views.min()} at position {int(np.argmin(views))}")
        return index_t, index, views, lens, left

    def _named_outputs(self, outputs, per_token, batch_size: int, lens):
        """({name: (tensor, per_token)} after the reduction, {name: _Spec} on the first add, single),
        checked against the batch and against the first add."""
        owner = "Recorder.add"
        if isinstance(outputs, torch.Tensor):
            if per_token is not True and per_token is not False:
                raise TypeError(f"{owner}: per_token must be a bool for a single tensor output, got {per_token!r}")
            raw = ((SINGLE, outputs, per_token),)
            single = True
        elif isinstance(outputs, Mapping):
            if not outputs:
                raise ValueError(f"{owner}: outputs must hold at least one tensor, got an empty dict")
            for key, value in outputs.items():
                if not isinstance(key, str):
                    raise TypeError(f"{owner}: output names must be str, got {key!r}")
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"{owner}: outputs[{key!r}] must be a tensor, got {type(value).__name__}")
            if per_token is True or per_token is False:
                token_keys = set(outputs) if per_token else set()
            elif isinstance(per_token, (set, frozenset, list, tuple)):
                token_keys = set(per_token)
                unknown = token_keys - set(outputs)
                if unknown:
                    raise ValueError(f"{owner}: per_token names {sorted(map(str, unknown))} are not outputs; the outputs are {sorted(outputs)}")
            else:
                raise TypeError(f"{owner}: per_token must be a bool or a set of output names, got {type(per_token).__name__}")
            raw = tuple((key, value, key in token_keys) for key, value in outputs.items())
            single = False
        else:
            raise TypeError(f"{owner}: outputs must be a tensor or a dict of tensors, got {type(outputs).__name__}")

        named: Dict[str, Tuple[torch.Tensor, bool]] = {}
        for key, t, tok in raw:
            if t.dim() < 1 + tok or t.shape[0] != batch_size or (tok and (lens is None or t.shape[1] < (lens.max() if len(lens) else 0))):
                _raise_bad_output(key if not single else None, t, tok, batch_size, lens)
            if t.requires_grad:
                t = t.detach()
            if self._reduce is None:
                named[key] = (t, tok)
                continue
            reduced = self._reduced(key, t, tok, single)
            clash = (reduced.keys() - {key}) & (named.keys() | set(outputs if not single else ()))
            if clash:
                raise ValueError(f"{owner}: reduce={self.reduce!r} names its outputs {sorted(reduced)}, but {sorted(clash)} already exist")
            named.update(reduced)
        if single and len(named) > 1:  # topk turned one output into values and indices
            single = False

        if self._specs is None:
            specs = {k: _Spec(tok, t.dtype, t.shape[1 + tok:]) for k, (t, tok) in named.items()}
            for k, spec in specs.items():
                if self.on_duplicate == "mean" and not spec.dtype.is_floating_point:
                    raise TypeError(f"{owner}: on_duplicate='mean' averages floating-point outputs, got {k!r} of dtype {spec.dtype}")
                if self.views == "vote" and (spec.dtype.is_floating_point or spec.dtype.is_complex):
                    raise TypeError(f"{owner}: views='vote' needs integer or bool outputs, got {k!r} of dtype {spec.dtype}; use views='mean'")
            return named, specs, single
        if len(named) != len(self._specs) or not all(k in self._specs for k in named):
            raise ValueError(f"{owner}: outputs must have the names of the first add, {sorted(self._specs)}, got {sorted(named)}")
        for k, (t, tok) in named.items():
            spec = self._specs[k]
            if spec.per_token != tok or spec.dtype != t.dtype or spec.shape != t.shape[1 + tok:]:
                got = _Spec(tok, t.dtype, t.shape[1 + tok:])
                hint = ""
                if spec.per_token != tok:
                    arg = spec.per_token if single else (f"{{{k!r}}}" if spec.per_token else "a set without it")
                    hint = (f"; the first add recorded it {'per token' if spec.per_token else 'per example'}: "
                            f"pass per_token={arg} as there")
                raise (TypeError if t.dtype != spec.dtype else ValueError)(
                    f"{owner}: output {k!r} must be {spec.describe()} as in the first add, got {got.describe()}{hint}")
        return named, None, single

    def _reduced(self, key: str, t: torch.Tensor, tok: bool, single: bool):
        what = "outputs" if single else f"outputs[{key!r}]"
        if not t.is_floating_point():
            return {key: (t, tok)}
        kind, k = self._reduce
        if t.dim() < 2 + tok:
            raise ValueError(f"Recorder.add: reduce={self.reduce!r} works over a last class dimension; {what} has shape {tuple(t.shape)}")
        if kind == "argmax":
            return {key: (t.argmax(-1), tok)}
        if kind == "softmax":
            return {key: (t.softmax(-1), tok)}
        if k > t.shape[-1]:
            raise ValueError(f"Recorder.add: reduce={self.reduce!r} keeps {k} of the last dimension, but {what} has only {t.shape[-1]}")
        values, indices = t.topk(k, -1)
        prefix = "" if single else f"{key}."
        return {f"{prefix}values": (values, tok), f"{prefix}indices": (indices, tok)}

    def _claim(self, index: np.ndarray, views: Optional[np.ndarray], lens, named):
        """Check the batch's (index, view) pairs against what is recorded; decide what to keep.

        Returns (keep, prev, merge, top, vmax): ``keep`` masks the rows to write (None: all),
        ``prev`` holds the slots' counts before this batch, ``merge`` says whether rows average
        into entries, ``top`` and ``vmax`` are the largest index and view. Changes nothing.
        """
        if not len(index):
            return None, None, False, -1, 0
        vmax = 0 if views is None else int(views.max())
        width = vmax + 1
        key = index if views is None else index * width + views
        ordered = np.sort(key)
        low, top = int(ordered[0]) // width, int(ordered[-1]) // width
        n = self.num_items
        if low < 0 or (n is not None and top >= n):
            b = int(np.flatnonzero((index < 0) | (index >= (n if n is not None else np.iinfo(np.int64).max)))[0])
            if n is None:
                raise ValueError(f"Recorder.add: indices must be >= 0, got index[{b}] = {index[b]}")
            raise ValueError(f"Recorder.add: index[{b}] = {index[b]} is outside range(num_items) = range({n})")
        cap, vcap = self._count.shape
        if top < cap and vmax < vcap:
            prev = self._count_flat[index if vcap == 1 else index * vcap + (0 if views is None else views)]
        else:
            v = np.zeros(len(index), np.int64) if views is None else views
            inside = (index < cap) & (v < vcap)
            prev = np.zeros(len(index), np.int32)
            prev[inside] = self._count[index[inside], v[inside]]
        seen = np.count_nonzero(prev)
        repeats = np.count_nonzero(ordered[1:] == ordered[:-1])

        if (seen or repeats) and self.on_duplicate == "error":
            b = int(np.flatnonzero(prev)[0]) if seen else int(np.flatnonzero(~_first_last(key)[0])[0])
            what = f"item {index[b]}" + ("" if views is None else f" view {views[b]}")
            where = "is already recorded (batch position" if seen else "appears more than once in this batch (again at position"
            raise ValueError(f"Recorder.add: {what} {where} {b}); pass on_duplicate='first', 'last' or 'mean' to allow repeats")
        if lens is not None and any(tok for _, tok in named.values()):
            self._check_token_lengths(index, views, lens, key)

        if not (seen or repeats) or self.on_duplicate == "mean":
            return None, prev, bool(seen or repeats), top, vmax
        first, last = _first_last(key) if repeats else (None, None)
        if self.on_duplicate == "first":
            keep = prev == 0
            return (keep & first if repeats else keep), prev, False, top, vmax
        return last, prev, False, top, vmax

    def _check_token_lengths(self, index, views, lens, key) -> None:
        """Entries that will be combined (views of one example, or averaged repeats) share one length."""
        combine_views = self.views != "none" and (views is not None or self._count.shape[1] > 1)
        merge = self.on_duplicate == "mean"
        if not (combine_views or merge):
            return
        group = index if combine_views else key
        order = np.argsort(group, kind="stable")
        sg, sl = group[order], lens[order]
        clash = (sg[1:] == sg[:-1]) & (sl[1:] != sl[:-1])
        if clash.any():
            b = int(order[np.flatnonzero(clash)[0] + 1])
            raise ValueError(f"Recorder.add: item {index[b]} appears in this batch with lengths {sorted(set(lens[index == index[b]].tolist()))}; "
                             + ("its views must have one length to be combined (or use views='none')" if combine_views
                                else "repeats of an entry must have one length to be averaged"))
        cap, vcap = self._count.shape
        inside = index < cap
        if not inside.any():
            return
        rows = index[inside]
        recorded = self._count[rows] > 0  # [n, vcap]
        if not combine_views:
            v = np.zeros(len(rows), np.int64) if views is None else views[inside]
            cols = np.arange(vcap)[None, :] == v[:, None]
            recorded &= cols
        elif not merge:
            v = np.zeros(len(rows), np.int64) if views is None else views[inside]
            recorded &= np.arange(vcap)[None, :] != v[:, None]  # one's own entry is replaced or ignored
        bad = recorded & (self._token_len[rows] != lens[inside][:, None])
        if bad.any():
            r, c = np.argwhere(bad)[0]
            b = int(np.flatnonzero(inside)[r])
            raise ValueError(f"Recorder.add: item {index[b]} has length {lens[b]} in this batch but {self._token_len[rows[r], c]} "
                             f"in its recorded view {c}; " + ("its views must have one length to be combined (or use views='none')"
                                                              if combine_views else "repeats must have one length to be averaged"))

    # ---------------------------------------------------------------------------- storage

    def _commit(self, index_t, index, views, lens, left, named, keep, prev, merge, top: int, vmax: int) -> None:
        """Write the checked batch: bookkeeping on the host now, data now or when its copy lands."""
        cap, vcap = self._count.shape
        if top >= cap or vmax >= vcap:
            self._grow(top, vmax)
            vcap = self._count.shape[1]
        if self._shared:
            self._unshare()
        if vcap == 1:
            slots = index
        else:
            slots, index_t = index * vcap + (0 if views is None else views), None
        if merge:
            return self._commit_mean(slots, lens, left, named, prev)
        kept = slots if keep is None else slots[keep]
        self._count_flat[kept] = 1
        if lens is not None:
            self._token_len.reshape(-1)[kept] = lens if keep is None else lens[keep]
        for name, (src, tok) in named.items():
            if tok:
                self._write_tokens(name, src, slots, keep, lens, left)
            else:
                self._write_examples(name, src, slots, index_t, keep)

    def _ones(self, size: int) -> torch.Tensor:
        ones = self._ones_cache.get(size)
        if ones is None:
            ones = self._ones_cache[size] = torch.ones(size, dtype=torch.int64, device=self.device)
        return ones

    def _needs_staging(self, src: torch.Tensor) -> bool:
        """Outputs on a GPU with storage on the host go through pinned buffers, written once landed."""
        return src.is_cuda and self._on_host

    def _deliver(self, src: torch.Tensor, work) -> None:
        """``work(src on the storage device)``: now, or once its copy from a GPU has landed."""
        if self._needs_staging(src):
            staged, event = _pinned_copy(src)
            self._defer(event, lambda: work(staged))
        else:
            work(src if (src.is_cpu and self._on_host) or src.device == self.device else src.to(self.device, non_blocking=True))

    def _write_examples(self, name: str, src: torch.Tensor, slots: np.ndarray, slots_t, keep) -> None:
        """Rows of a per-example output to their slots: items of length 1 (0 for rows not kept)."""
        dst = self._dense[name]
        lengths = self._ones(len(slots)) if keep is None else _to_device(keep.astype(np.int64), self.device)
        if slots_t is None or not self._on_host or src.is_cuda:
            # A private copy: the caller may refill its index tensor before a deferred write runs.
            slots_t = _to_device(slots.copy(), self.device)
        self._deliver(src, lambda rows: ops.unpad_scatter_(dst, rows.unsqueeze(1), lengths, slots_t))

    def _write_tokens(self, name: str, src: torch.Tensor, slots, keep, lens, left: bool) -> None:
        """Real rows of a per-token output to fresh rows of its chunks, in batch order."""
        written = lens if keep is None else np.where(keep, lens, 0)
        ends = np.cumsum(written)
        total = int(ends[-1])
        chunk, start, base = self._chunks[name].reserve(total)
        local = ends - written + start
        self._starts[name].reshape(-1)[slots if keep is None else slots[keep]] = base + (local if keep is None else local[keep])
        if self._needs_staging(src):
            # Unpad on the GPU so that only real rows cross to the host.
            rows = ops.unpad(src, _to_device(np.concatenate(([0], ends)), src.device), total, left)
            self._deliver(rows, lambda landed: chunk[start:start + total].copy_(landed))
        else:
            lengths_t, local_t = _to_device(written, self.device), _to_device(local, self.device)
            self._deliver(src, lambda padded: ops.unpad_scatter_(chunk, padded, lengths_t, local_t, left))

    def _commit_mean(self, slots, lens, left, named, prev) -> None:
        """Average this batch's rows into their entries (repeats within the batch included)."""
        unique, first, inverse, repeats = np.unique(slots, return_index=True, return_inverse=True, return_counts=True)
        before = prev[first].astype(np.int64)
        self._count_flat[unique] = before + repeats
        if lens is not None:
            self._token_len.reshape(-1)[unique] = lens[first]
        for name, (src, tok) in named.items():
            if tok:
                offsets = np.concatenate(([0], np.cumsum(lens)))
                src = ops.unpad(src, _to_device(offsets, src.device), int(offsets[-1]), left)
                self._deliver(src, self._mean_tokens_work(name, unique, inverse, before, repeats, lens[first], lens))
            else:
                self._deliver(src, self._mean_examples_work(name, unique, inverse, before, repeats))

    def _mean_examples_work(self, name, unique, inverse, before, repeats):
        dst = self._dense[name]

        def work(src):
            dev, acc = dst.device, _acc_dtype(dst.dtype)
            u = _to_device(unique, dev)
            shape = (-1,) + (1,) * (dst.dim() - 1)
            old_n = _to_device(before, dev).to(acc).view(shape)
            total = torch.zeros((len(unique), *dst.shape[1:]), dtype=acc, device=dev)
            total.index_add_(0, _to_device(inverse, dev), src.to(acc))
            total += torch.where(old_n > 0, dst.index_select(0, u).to(acc) * old_n, 0)
            total /= old_n + _to_device(repeats, dev).to(acc).view(shape)
            dst.index_copy_(0, u, total.to(dst.dtype))
        return work

    def _mean_tokens_work(self, name, unique, inverse, before, repeats, unique_lens, lens):
        store, starts = self._chunks[name], self._starts[name].reshape(-1)
        acc_offsets = _exclusive_cumsum(unique_lens)

        def work(src_rows):
            # Runs after every earlier batch has landed, so starts[] is current.
            dev, acc = src_rows.device, _acc_dtype(store.dtype)
            shape = (-1,) + (1,) * len(store.shape)
            total = torch.zeros((int(unique_lens.sum()), *store.shape), dtype=acc, device=dev)
            to_acc = _row_positions(acc_offsets[inverse], lens)
            total.index_add_(0, _to_device(to_acc, dev), src_rows.to(acc))
            had = before > 0
            if had.any():
                old = store.gather(starts[unique[had]], unique_lens[had]).to(acc)
                weight = _to_device(np.repeat(before[had], unique_lens[had]), dev).to(acc).view(shape)
                rows = _to_device(_row_positions(acc_offsets[had], unique_lens[had]), dev)
                total.index_add_(0, rows, old * weight)
            total /= _to_device(np.repeat(before + repeats, unique_lens), dev).to(acc).view(shape)
            # Fresh rows for the averages: chunks stay append-only, the old rows are dropped.
            starts[unique] = store.append(total.to(store.dtype)) + acc_offsets
        return work

    def _defer(self, event, work) -> None:
        """Queue ``work`` until ``event`` fires; with too many copies in flight, wait for the oldest."""
        self._pending.append((event, work))
        if len(self._pending) > _MAX_PENDING:
            oldest, oldest_work = self._pending.popleft()
            oldest.synchronize()
            oldest_work()

    def _drain(self, wait: bool) -> None:
        """Write every pending copy that has landed (all of them, waiting, if ``wait``)."""
        while self._pending:
            event, work = self._pending[0]
            if wait:
                event.synchronize()
            elif not event.query():
                return
            self._pending.popleft()
            work()

    def _grow(self, top: int, vmax: int) -> None:
        """Room for index ``top`` and view ``vmax``: all of num_items at once when known, else
        at least twice the items; views exactly (they are few and known early)."""
        self._drain(wait=True)
        cap, vcap = self._count.shape
        if self.num_items is not None:
            new_cap = self.num_items
        else:
            new_cap = cap if top < cap else max(top + 1, 2 * cap, 1024)
        new_v = max(vcap, vmax + 1)
        count = np.zeros((new_cap, new_v), self._count_dtype)
        count[:cap, :vcap] = self._count
        token_len = np.zeros((new_cap, new_v), np.int64)
        token_len[:cap, :vcap] = self._token_len
        self._count, self._count_flat, self._token_len = count, count.reshape(-1), token_len
        for name, spec in self._specs.items():
            if spec.per_token:
                starts = np.zeros((new_cap, new_v), np.int64)
                if name in self._starts:
                    starts[:cap, :vcap] = self._starts[name]
                self._starts[name] = starts
            else:
                dense = torch.empty((new_cap * new_v, *spec.shape), dtype=spec.dtype, device=self.device)
                if name in self._dense and cap:
                    dense.view(new_cap, new_v, *spec.shape)[:cap, :vcap] = self._dense[name].view(cap, vcap, *spec.shape)
                self._dense[name] = dense
        self._shared = False

    def _unshare(self) -> None:
        self._drain(wait=True)
        self._dense = {name: t.clone() for name, t in self._dense.items()}
        self._shared = False

    # ---------------------------------------------------------------------------- result

    def result(self) -> "Predictions":
        """Everything recorded so far, as :class:`Predictions` in dataset order.

        Waits for outputs still being copied from a GPU. Copies nothing when each example was
        recorded once per view and the views are kept as they are; later ``add`` calls never
        change the returned object. After :meth:`write`, or with ``resume=``, the written
        shards are read back (this rank's), so the result is still everything recorded.
        """
        if self._stream is not None:
            from . import shards
            return shards.result(self)
        self._drain(wait=True)
        if self._specs is None:
            return Predictions._from_parts(np.zeros(0, np.int64), None, {}, single=False, num_items=self.num_items)
        cap, vcap = self._count.shape
        bases = {name: np.asarray(c.bases, np.int64) for name, c in self._chunks.items()}
        columns: Dict[str, Any] = {}
        if vcap == 1 or self.views == "none":
            everything = np.count_nonzero(self._count_flat) == cap * vcap
            # Every item recorded once, views combined: the entries are range(cap), left implicit
            # (an index array would add 8 bytes per item to a result of maybe 40).
            implicit = everything and self.views != "none"
            flat = None if implicit else np.flatnonzero(self._count_flat)
            for name, spec in self._specs.items():
                if spec.per_token:
                    store = self._chunks[name]
                    chunks = store.chunks or [torch.empty((0, *spec.shape), dtype=spec.dtype, device=self.device)]
                    starts, lengths = self._starts[name].reshape(-1), self._token_len.reshape(-1)
                    starts, lengths = (starts.copy(), lengths.copy()) if implicit else (starts[flat], lengths[flat])
                    columns[name] = _Jagged(list(chunks), bases[name] if store.chunks else np.zeros(1, np.int64), starts, lengths)
                else:
                    dense = self._dense[name]
                    columns[name] = dense if everything else dense.index_select(0, _to_device(flat, self.device))
            self._shared = self._shared or everything
            if implicit:
                return Predictions._from_parts(None, None, columns, single=self._single, num_items=self.num_items, size=cap)
            view = flat % vcap if self.views == "none" else None
            return Predictions._from_parts(flat // vcap, view, columns, single=self._single, num_items=self.num_items)

        present = self._count > 0
        items = np.flatnonzero(present.any(1))
        mask = present[items]
        if self.views == "stack" and not mask.all():
            r = int(np.flatnonzero(~mask.all(1))[0])
            raise ValueError(f"Recorder.result: views='stack' needs all {vcap} views of every recorded item; "
                             f"item {items[r]} has views {np.flatnonzero(mask[r]).tolist()}")
        items_t = _to_device(items, self.device)
        mask_t = _to_device(mask, self.device)
        for name, spec in self._specs.items():
            if spec.per_token:
                # Views of an item share one length (checked by add): rows [total, V, ...].
                lengths = np.where(mask, self._token_len[items], 0).max(1)
                offsets = _exclusive_cumsum(lengths)
                rows = torch.empty((int(lengths.sum()), vcap, *spec.shape), dtype=spec.dtype, device=self.device)
                starts = self._starts[name][items]
                for v in range(vcap):
                    has = mask[:, v]
                    part = _gather_rows(self._chunks[name].chunks, bases[name], starts[has, v], lengths[has])
                    if has.all():
                        rows[:, v] = part
                    else:
                        where = _to_device(_row_positions(offsets[has], lengths[has]), self.device)
                        rows[:, v].index_copy_(0, where, part)
                if self.views != "stack":
                    token_mask = torch.repeat_interleave(mask_t, _to_device(lengths, self.device), dim=0)
                    rows = _combine_views(rows, token_mask, self.views)
                columns[name] = _Jagged([rows], np.zeros(1, np.int64), offsets, lengths)
            else:
                values = self._dense[name].view(cap, vcap, *spec.shape).index_select(0, items_t)
                columns[name] = values if self.views == "stack" else _combine_views(values, mask_t, self.views)
        return Predictions._from_parts(items, None, columns, single=self._single, num_items=self.num_items,
                                       stacked_views=vcap if self.views == "stack" else None)

    # ---------------------------------------------------------------------------- many ranks, disk

    def gather(self, dst: Optional[int] = None, group=None) -> Optional["Predictions"]:
        """Every rank's recorded outputs as one :class:`Predictions`, on every rank (or on ``dst`` only).

        A collective over ``group`` (default: the whole world): every rank must call it. Sizes
        are exchanged first, then the outputs move as tensors (``all_gather``, or ``gather`` to
        the global rank ``dst``, which others answer with None); with NCCL they stay on the GPU.
        Items recorded on several ranks (``DistributedSampler`` pads ranks with repeats) are
        merged under ``on_duplicate``: ``"first"`` keeps the lowest rank's, ``"last"`` the
        highest's, ``"mean"`` averages all records, ``"error"`` raises ValueError. Views are then
        combined as by :meth:`result`. Without an initialized process group, :meth:`result`.
        """
        from . import distributed
        return distributed.gather(self, dst, group)

    def write(self, path, every: Optional[int] = None) -> None:
        """Write what was recorded since the last write to a new Parquet shard in directory ``path``.

        The shard (``part-r<rank>-<seq>.parquet``, rank from torch.distributed) appears whole
        or not at all, even if the process is killed; the rows written are then dropped from
        memory, so memory stays bounded by what is recorded between writes. The Recorder still
        knows what it wrote: ``add`` applies ``on_duplicate`` to it, :meth:`done` reports it,
        and :meth:`result` / :meth:`gather` read it back. ``every=N`` also writes a shard by
        itself whenever ``N`` rows have been added since the last one, from now on; call
        ``write(path)`` once more at the end for the rest. :meth:`Predictions.read` merges the
        shards of all ranks. See docs/distributed.md.
        """
        from . import shards
        shards.write(self, path, every)

    def done(self, index, view=None) -> torch.Tensor:
        """BoolTensor: which of ``index`` are recorded, in memory or in shards (written or resumed).

        ``index`` is a Batch (its own (index, view) pairs are checked), an int, or a 1-D
        sequence of dataset indices; ``view`` (an int or one per index) asks about those views,
        None about any view. A restarted run skips what is done: ``rec.done(range(N))``.
        """
        from . import shards
        return shards.done(self, index, view)


def _parse_reduce(reduce):
    if reduce is None:
        return None
    if not isinstance(reduce, str):
        raise TypeError(f"Recorder: reduce must be None or a str ('argmax', 'softmax', 'topk:K'), got {type(reduce).__name__}")
    if reduce in ("argmax", "softmax"):
        return reduce, None
    k = reduce[5:] if reduce.startswith("topk:") else ""
    if k.isdigit() and int(k) >= 1:
        return "topk", int(k)
    raise ValueError(f"Recorder: reduce must be None, 'argmax', 'softmax' or 'topk:K' with K >= 1, got {reduce!r}")


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------

class _Jagged:
    """Per-token rows of each entry e: global rows ``starts[e] .. starts[e] + lengths[e]`` of ``chunks``."""

    __slots__ = ("chunks", "bases", "starts", "lengths")

    def __init__(self, chunks: List[torch.Tensor], bases: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.chunks, self.bases, self.starts, self.lengths = chunks, bases, starts, lengths

    def segment(self, e: int) -> torch.Tensor:
        start, length = int(self.starts[e]), int(self.lengths[e])
        k = int(np.searchsorted(self.bases, start, side="right")) - 1
        local = start - int(self.bases[k])
        return self.chunks[k][local:local + length]

    def contiguous(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(values [total, ...] in entry order, offsets [E+1]); a view when the rows already are."""
        offsets = np.concatenate(([0], np.cumsum(self.lengths)))
        total = int(offsets[-1])
        first = int(self.starts[0]) if len(self.starts) else 0
        k = int(np.searchsorted(self.bases, first, side="right")) - 1
        local = first - int(self.bases[k])
        if np.array_equal(self.starts - first, offsets[:-1]) and local + total <= self.chunks[k].shape[0]:
            values = self.chunks[k][local:local + total]
        else:
            values = _gather_rows(self.chunks, self.bases, self.starts, self.lengths)
        return values, torch.from_numpy(offsets)


def _not_recorded(key) -> KeyError:
    return KeyError(f"Predictions: item {key!r} was not recorded; preds.missing() lists the items never recorded")


class Predictions:
    """Recorded outputs in dataset order: ``preds[i]`` is item ``i``'s prediction.

    A read-only mapping from dataset index to prediction (a tensor, or a dict of tensors for
    dict outputs; per-token outputs unpadded to the item's length). With ``views="none"`` every
    view is its own entry and the key is ``(index, view)``: ``preds[i, v]``.

    - ``preds.index``: LongTensor of the recorded items, sorted (with ``views="none"``, one per
      entry, and ``preds.view`` holds the views);
    - ``len(preds)``, ``i in preds``, iteration over the keys, :meth:`items`;
    - :meth:`tensor` / :meth:`jagged`: one output for all entries at once;
    - :meth:`missing`: the items of ``range(num_items)`` never recorded;
    - :meth:`to_arrow`, :meth:`to_pandas`, :meth:`to_parquet` and :meth:`read` (exact round trip:
      dtypes, shapes and per-token outputs as list columns).

    Normally made by :meth:`Recorder.result`. To build one directly, ``outputs`` is a tensor
    ``[E, ...]`` (per example), a pair ``(values [total, ...], offsets [E+1])`` (per token, item
    e's rows being ``values[offsets[e]:offsets[e+1]]``) or a dict of those, for the entries
    ``index`` (strictly increasing; with ``view``, increasing by ``(index, view)``).
    ``stacked_views=V`` marks per-token rows that are ``[V, ...]`` (``preds[i]`` then gives
    ``[V, L, ...]``), as ``views="stack"`` records them.
    """

    def __init__(self, index, outputs, *, view=None, num_items: Optional[int] = None,
                 stacked_views: Optional[int] = None) -> None:
        index = _host_long("Predictions", "index", index)
        view = None if view is None else _host_long("Predictions", "view", view)
        if view is not None and len(view) != len(index):
            raise ValueError(f"Predictions: view must have one entry per index ({len(index)}), got {len(view)}")
        if len(index) and (index.min() < 0 or (view is not None and view.min() < 0)):
            raise ValueError("Predictions: index and view must be >= 0")
        if num_items is not None and len(index) and index.max() >= num_items:
            raise ValueError(f"Predictions: index {index.max()} is outside range(num_items) = range({num_items})")
        single = not isinstance(outputs, Mapping)
        named = {SINGLE: outputs} if single else dict(outputs)
        columns: Dict[str, Any] = {}
        for name, value in named.items():
            what = "outputs" if single else f"outputs[{name!r}]"
            if isinstance(value, torch.Tensor):
                if value.dim() < 1 or value.shape[0] != len(index):
                    raise ValueError(f"Predictions: {what} must be [E, ...] with E = {len(index)} entries, got shape {tuple(value.shape)}")
                columns[name] = value
            elif isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value):
                values, offsets = value
                offsets = _host_long("Predictions", f"offsets of {what}", offsets)
                lengths = np.diff(offsets)
                if len(offsets) != len(index) + 1 or offsets[0] != 0 or (lengths < 0).any() or offsets[-1] != values.shape[0] or values.dim() < 1:
                    raise ValueError(f"Predictions: {what} must be (values [total, ...], offsets [E+1]) with offsets increasing from 0 "
                                     f"to total and E = {len(index)}; got values {tuple(values.shape)} and {len(offsets)} offsets")
                if stacked_views is not None and (values.dim() < 2 or values.shape[1] != stacked_views):
                    raise ValueError(f"Predictions: with stacked_views={stacked_views}, {what} rows must be [{stacked_views}, ...], got {tuple(values.shape[1:])}")
                columns[name] = _Jagged([values], np.zeros(1, np.int64), offsets[:-1].copy(), lengths)
            else:
                raise TypeError(f"Predictions: {what} must be a tensor or a (values, offsets) pair of tensors, got {type(value).__name__}")
        self._init(index, view, columns, single, num_items, stacked_views)
        if len(self._keys) > 1 and not (self._keys[1:] > self._keys[:-1]).all():
            raise ValueError("Predictions: entries must be strictly increasing by (index, view), without repeats")

    @classmethod
    def _from_parts(cls, index, view, columns, *, single, num_items, stacked_views=None, size=None) -> "Predictions":
        """Internal: ``index`` None means the entries are exactly ``range(size)`` (views combined)."""
        self = cls.__new__(cls)
        self._init(index, view, columns, single, num_items, stacked_views, size)
        return self

    def _init(self, index, view, columns, single, num_items, stacked_views, size=None) -> None:
        self._index, self._view, self._columns = index, view, columns
        self._single, self.num_items, self.stacked_views = single, num_items, stacked_views
        self._size = len(index) if index is not None else size
        # Entries are looked up by key index * width + view (width: views seen, 1 when combined).
        self._width = int(view.max()) + 1 if view is not None and len(view) else 1
        self._keys = None if index is None else (index if view is None else index * self._width + view)

    def _host_index(self) -> np.ndarray:
        """The entries' dataset indices as a numpy array (made on demand when implicit)."""
        return np.arange(self._size, dtype=np.int64) if self._index is None else self._index

    # ---------------------------------------------------------------------------- mapping

    @property
    def index(self) -> torch.Tensor:
        """LongTensor [E] of the recorded items, sorted (repeated per view with ``views="none"``)."""
        return torch.from_numpy(self._host_index())

    @property
    def view(self) -> Optional[torch.Tensor]:
        """LongTensor [E] of each entry's view with ``views="none"``; None when views were combined."""
        return None if self._view is None else torch.from_numpy(self._view)

    @property
    def names(self) -> Tuple[str, ...]:
        """The output names (``("prediction",)`` for a single-tensor output)."""
        return tuple(self._columns)

    @property
    def per_token(self) -> frozenset:
        """The names of the per-token outputs."""
        return frozenset(n for n, c in self._columns.items() if isinstance(c, _Jagged))

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator:
        """The keys: dataset indices, or ``(index, view)`` pairs with ``views="none"``."""
        if self._index is None:
            return iter(range(self._size))
        if self._view is None:
            return iter(self._index.tolist())
        return iter(zip(self._index.tolist(), self._view.tolist()))

    def keys(self) -> Iterator:
        """Same as ``iter(preds)``."""
        return iter(self)

    def items(self) -> Iterator[Tuple[Any, Any]]:
        """``(key, prediction)`` pairs in dataset order."""
        for e, key in enumerate(self):
            yield key, self._entry(e)

    def __contains__(self, key) -> bool:
        try:
            self._position(key)
        except (KeyError, TypeError):
            return False
        return True

    def __getitem__(self, key):
        return self._entry(self._position(key))

    def _position(self, key) -> int:
        if self._view is None:
            if isinstance(key, tuple):
                raise TypeError(f"Predictions: views were combined, index with preds[i], got preds[{key!r}]")
            i, v = _key_int(key), 0
        else:
            if not (isinstance(key, tuple) and len(key) == 2):
                raise TypeError(f"Predictions: each view is its own entry (views='none'), index with preds[i, v], got preds[{key!r}]")
            i, v = _key_int(key[0]), _key_int(key[1])
        if i < 0:
            raise KeyError(
                f"Predictions: keys are dataset indices (>= 0), not positions, got preds[{key!r}]; "
                "iterate preds.items() or use preds.index for positions")
        if v < 0 or (self._view is not None and v >= self._width):
            raise KeyError(f"Predictions: view must be in [0, {self._width}), got preds[{key!r}]")
        if self._index is None:
            if i >= self._size:
                raise _not_recorded(key)
            return i
        k = i * self._width + v if self._view is not None else i
        e = int(np.searchsorted(self._keys, k))
        if e == len(self._keys) or self._keys[e] != k:
            raise _not_recorded(key)
        return e

    def _entry(self, e: int):
        out = {}
        for name, col in self._columns.items():
            if isinstance(col, _Jagged):
                seg = col.segment(e)
                out[name] = seg.movedim(1, 0) if self.stacked_views is not None else seg
            else:
                out[name] = col[e]
        return out[SINGLE] if self._single else out

    def tensor(self, name: Optional[str] = None) -> torch.Tensor:
        """A per-example output for every entry, ``[E, ...]`` in ``index`` order."""
        col = self._column(name)
        if isinstance(col, _Jagged):
            raise ValueError(f"Predictions.tensor: output {self._name(name)!r} is per token; use jagged()")
        return col

    def jagged(self, name: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """A per-token output for every entry: ``(values [total, ...], offsets [E+1])`` in ``index`` order.

        Entry e's rows are ``values[offsets[e]:offsets[e+1]]``; ``pc.ops.pad(values, offsets,
        max_len)`` pads them back. A view when the rows are stored in that order, else a copy.
        """
        col = self._column(name)
        if not isinstance(col, _Jagged):
            raise ValueError(f"Predictions.jagged: output {self._name(name)!r} is per example; use tensor()")
        return col.contiguous()

    def _name(self, name: Optional[str]) -> str:
        if name is None:
            if len(self._columns) != 1:
                raise ValueError(f"Predictions: name one of the outputs {list(self._columns)}")
            return next(iter(self._columns))
        if name not in self._columns:
            raise KeyError(f"Predictions: no output {name!r}; the outputs are {list(self._columns)}")
        return name

    def _column(self, name: Optional[str]):
        return self._columns[self._name(name)]

    def missing(self, num_items: Optional[int] = None) -> torch.Tensor:
        """LongTensor of the items of ``range(num_items)`` never recorded (in any view).

        ``num_items`` defaults to the Recorder's; one of the two must be known.
        """
        n = self.num_items if num_items is None else num_items
        if n is None:
            raise ValueError("Predictions.missing: num_items is unknown (the Recorder had none); pass missing(num_items=N)")
        if self._index is None:
            return torch.arange(self._size, max(n, self._size))
        seen = np.zeros(n, bool)
        seen[self._index[self._index < n]] = True
        return torch.from_numpy(np.flatnonzero(~seen))

    def __repr__(self) -> str:
        cols = ", ".join(
            f"{n}: {'per-token' if isinstance(c, _Jagged) else 'per-example'} "
            f"{str((c.chunks[0] if isinstance(c, _Jagged) else c).dtype).replace('torch.', '')}"
            for n, c in self._columns.items())
        missing = "" if self.num_items is None else f", missing={len(self.missing())}"
        return f"Predictions({len(self)} entries, num_items={self.num_items}{missing}, outputs {{{cols}}})"

    # ---------------------------------------------------------------------------- export

    def to_arrow(self):
        """A ``pyarrow.Table``: ``index`` (and ``view``), then one column per output.

        Per-example outputs are primitive columns (fixed-size lists for row shapes), per-token
        ones list columns. Dtypes and shapes are kept in the schema metadata, so
        :meth:`from_arrow` rebuilds these Predictions exactly.
        """
        from . import io
        return io.to_arrow(self)

    @classmethod
    def from_arrow(cls, table) -> "Predictions":
        """The Predictions that :meth:`to_arrow` made ``table`` from."""
        from . import io
        return io.from_arrow(table)

    def to_pandas(self, dataset=None):
        """A ``pandas.DataFrame``, one row per entry: ``index`` (and ``view``), one column per output.

        Per-example outputs with a row shape, and per-token outputs, are numpy arrays per row
        (bfloat16 as float32). With ``dataset``, each recorded item's fields become columns too:
        a dict sample's keys, a tuple's positions as ``input_0``, ``input_1``..., anything else
        as ``input``; ``provcollate.Sample`` and ``Indexed`` wrappers are looked through. Fields
        whose names clash with a prediction column get the suffix ``_input``.
        """
        from . import io
        return io.to_pandas(self, dataset)

    def to_parquet(self, path) -> None:
        """Write :meth:`to_arrow` to one Parquet file; :meth:`read` gives these Predictions back."""
        from . import io
        io.write_parquet(self, path)

    @classmethod
    def read(cls, path, on_duplicate: Optional[str] = None) -> "Predictions":
        """The Predictions in a Parquet file written by :meth:`to_parquet`, or in a directory of
        shards written by :meth:`Recorder.write` on any number of ranks, merged in dataset order
        under the shards' ``on_duplicate`` (or this one), a row group at a time. What was read
        (entries, source) is logged on the ``provcollate`` logger at INFO."""
        import os
        if os.path.isdir(path):
            from . import shards
            preds = shards.read(path, on_duplicate)
        else:
            if on_duplicate is not None:
                raise ValueError(f"Predictions.read: on_duplicate= applies to a directory of shards, got the file {path!r}")
            from . import io
            preds = io.read_parquet(path)
        _progress.logger.info("Predictions.read: %d entries from %s", len(preds), path)
        return preds


def _key_int(value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"Predictions: keys are dataset indices (ints), got bool {value}")
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"Predictions: keys are dataset indices (ints), got {type(value).__name__}") from None

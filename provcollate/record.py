"""Recorder and Predictions: model outputs back in dataset order, unpadded.

``Recorder.add(batch, outputs)`` files each row of a batch's outputs under its dataset index;
``Recorder.result()`` hands back a :class:`Predictions`, keyed by dataset index.

Both are thin public classes over the storage core (``provcollate/store/``), which keeps
the books on the host per *slot* ``index * V + view``, so recording never waits on a GPU:

- a per-example output ``[B, ...]`` is scattered to a dense tensor ``[num_items * V, ...]``
  (allocated once when ``num_items`` is known, else grown geometrically);
- a per-token output (``[B, T, ...]`` padded, rows ``[total, ...]`` of a packed batch, or a
  nested jagged tensor) is unpadded into append-only chunks of rows, in arrival order;
- the common batch (CPU outputs shaped as in the first ``add``, host storage, one view, no
  repeats, no reduction) takes one compiled pass that checks, claims and copies, with the GIL
  released when it copies 64 KiB or more or first writes new storage (csrc/record.cpp); every
  other batch, and every error, takes the Python path;
- outputs on a GPU with storage on the host are reduced and unpadded on the GPU, copied to
  pinned host buffers without blocking, and written when the copy has landed (``result``
  waits). ``device=`` keeps storage on a device instead.

Every ``add`` is validate-then-commit: indices, duplicates, shapes, dtypes, lengths and layouts
are all checked before anything is written, so a rejected ``add`` leaves the Recorder as it was.
A later ``add`` after ``result()`` never changes the Predictions already returned.
"""
from __future__ import annotations

import bisect
import dataclasses
import operator
import os
import threading
import warnings
from collections.abc import Mapping
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from . import _inputs, _progress, distributed, io, shards
from ._keys import check_key, describe_key
from ._checks import check_int
from .dataset import Indexed
from .store import ON_DUPLICATE, SINGLE, VIEWS, ColumnTable, Jagged, Store
from .verify import Verification, verify_resumed
from .verify import verify as _verify

__all__ = ["Recorder", "Predictions", "Summary", "Verification"]

_Tensor, _ndarray = torch.Tensor, np.ndarray  # add()'s type checks, one lookup each

_RESOLUTION = {"error": "refused (on_duplicate='error')", "first": "kept the first record (on_duplicate='first')",
               "last": "kept the latest record (on_duplicate='last')", "mean": "averaged (on_duplicate='mean')"}


@dataclasses.dataclass(frozen=True)
class Summary:
    """Where a :class:`Predictions` came from: proof that every item was recorded exactly once.

    Attributes:
        expected: ``num_items`` (None when unknown).
        recorded: items with at least one recorded view.
        missing: items of ``range(expected)`` never recorded (None when ``expected`` is).
        records: every record taken in (batch rows, shard rows, ranks' rows), repeats included.
        repeats: records of an (index, view) pair beyond its first: ``DistributedSampler``
            padding, a retried task, a rerun, test-time views added twice.
        on_duplicate: the policy that resolved the repeats (None when unknown).
        views: view ids per item (1 without test-time augmentation).
        incomplete: recorded items missing some of their views.
        ranks: processes merged (1 unless gathered or read from several ranks' shards).
        shards: shard files merged (0 unless read or resumed from a directory).
        fingerprinted: whether records carried input fingerprints (``batch.fingerprint``); the
            three fields below are checks only they make possible.
        conflicts: ids under which records of different inputs (different fingerprints) were
            filed: a misaligned index, data changed before a resume, two examples with one key.
            Counted whatever ``on_duplicate`` kept; ``conflicted`` lists those ids.
        disagreements: repeats of one input (same id, same fingerprint: a ``DistributedSampler``
            pad, accelerate's ``even_batches``, a retried task) whose outputs differ from the
            record they repeat; ``max_disagreement`` is the largest absolute difference (0.0 when
            none): a nondeterminism probe for free.

    ``str(summary)`` is a small table; ``dataclasses.asdict(summary)`` the same as a dict.
    """

    expected: Optional[int]
    recorded: int
    missing: Optional[int]
    records: int
    repeats: int
    on_duplicate: Optional[str]
    views: int
    incomplete: int
    ranks: int
    shards: int
    fingerprinted: bool = False
    conflicts: int = 0
    disagreements: int = 0
    max_disagreement: float = 0.0
    conflicted: tuple = ()

    @property
    def resolution(self) -> str:
        """How the repeats were resolved, in words."""
        if not self.repeats:
            return "none seen"
        return _RESOLUTION.get(self.on_duplicate, "unknown policy")

    @property
    def exactly_once(self) -> bool:
        """True when every expected item is recorded and nothing was recorded twice."""
        return self.missing == 0 and self.repeats == 0 and self.incomplete == 0

    def __str__(self) -> str:
        rows = [
            ("items expected", "unknown" if self.expected is None else str(self.expected)),
            ("items recorded", str(self.recorded)),
            ("items missing", "unknown" if self.missing is None else str(self.missing)),
            ("records", str(self.records)),
            ("repeats", f"{self.repeats}: {self.resolution}" if self.repeats else "0"),
            ("views per item", str(self.views) + (f" ({self.incomplete} items missing some)" if self.incomplete else "")),
            ("ranks merged", str(self.ranks)),
        ]
        if self.shards:
            rows.append(("shards merged", str(self.shards)))
        if self.fingerprinted or self.conflicts or self.disagreements:
            shown = ", ".join(map(repr, self.conflicted[:5])) + (", ..." if len(self.conflicted) > 5 else "")
            rows.append(("conflicts", f"{self.conflicts}: another input under ids {shown}" if self.conflicts else "0"))
            rows.append(("disagreements", f"{self.disagreements} (max |difference| {self.max_disagreement:.3g})"
                         if self.disagreements else "0"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _num_items(value) -> Optional[int]:
    """``num_items=``: an int, None, or an Indexed dataset (its base length: views are not items)."""
    if value is None:
        return None
    if isinstance(value, Indexed):
        return len(value.dataset)
    return check_int("Recorder", "num_items", value, minimum=0, what="an int, an Indexed dataset or None")


class Recorder:
    """Collects model outputs batch by batch and files every row under its dataset index.

    Args:
        num_items: the dataset's length, or the :class:`provcollate.Indexed` dataset itself (its
            base length: with ``views=V`` its ``len()`` counts every view, ``num_items`` only the
            items). Storage is then allocated once and ``add`` rejects any index outside
            ``range(num_items)``; ``None`` grows storage as indices arrive.
        device: where recorded outputs are kept; ``None`` is the host (CPU) memory. Outputs on a
            GPU are then copied through pinned buffers without blocking the GPU or the caller.
        on_duplicate: what recording an (index, view) pair again does: ``"error"`` raises,
            ``"first"`` keeps the first value, ``"last"`` the latest, ``"mean"`` averages them
            (floating-point outputs only; per-token outputs must repeat the same length). It
            can be changed later (``rec.on_duplicate = "first"``), e.g. to call :meth:`gather`
            again after it refused the repeats that ``DistributedSampler`` pads ranks with.
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
        verify: with ``resume`` and ``num_items=`` a :class:`provcollate.Indexed`: re-read this
            many of the items the shards hold (all when larger), fingerprint them again and raise
            ValueError, before anything is recorded, naming those whose input changed since it
            was written (records made with ``fingerprint=False`` are not checked).

    The first :meth:`add` fixes the outputs' names, which of them are per token, their dtypes
    and their row shapes; later calls may differ in batch size, padded length and device.
    Under torch.distributed with ``on_duplicate="error"``, a ``num_items`` that the world size
    does not divide warns at once: ``DistributedSampler`` will pad the ranks with repeats.

    Threads may share a Recorder: ``add``, ``result``, ``gather``, ``write`` and ``done`` run one
    at a time (a lock per Recorder), so adds from several threads land whole and a ``result``
    sees each of them entirely or not at all.
    """

    def __init__(self, num_items=None, device=None, on_duplicate: str = "error",
                 views: str = "mean", reduce: Optional[str] = None, resume=None, keys: bool = False,
                 verify: Optional[int] = None) -> None:
        dataset = num_items
        num_items = _num_items(num_items)
        if on_duplicate not in ON_DUPLICATE:
            raise ValueError(f"Recorder: on_duplicate must be one of {', '.join(map(repr, ON_DUPLICATE))}, got {on_duplicate!r}")
        if views not in VIEWS:
            raise ValueError(f"Recorder: views must be one of {', '.join(map(repr, VIEWS))}, got {views!r}")
        try:
            device = torch.device("cpu" if device is None else device)
        except (TypeError, RuntimeError) as exc:
            raise TypeError(f"Recorder: device must be None, a torch.device or a device string, got {device!r}") from exc
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # outputs say cuda:0, not cuda
        self._reduce = _inputs.parse_reduce(reduce)
        self.device = device
        self.num_items = num_items
        self.views = views
        self.reduce = reduce
        if not isinstance(keys, bool):
            raise TypeError(f"Recorder: keys must be a bool, got {type(keys).__name__}")
        # add() writes in one compiled pass what needs no reduction (the store decides the rest).
        self._store = Store(num_items, device, on_duplicate, views, compiled=self._reduce is None, keyed=keys)
        self._lock = threading.RLock()  # add, result, gather, write, done, on_duplicate=: one thread at a time
        self._stream: Optional[shards.Stream] = None
        if verify is not None:
            if resume is None:
                raise ValueError("Recorder: verify= checks the items that resume= finds written; pass resume= too")
            if not isinstance(dataset, Indexed):
                raise TypeError("Recorder: verify= re-reads resumed items from the dataset: pass num_items=<the pc.Indexed "
                                f"dataset>, got num_items of type {type(dataset).__name__}")
        if resume is not None:
            self._stream = shards.resume(self._store, resume)
            if verify is not None:
                found = verify_resumed(self._store, dataset, verify)
                if not found.ok:
                    shown = ", ".join(map(repr, found.mismatched[:5])) + (", ..." if len(found.mismatched) > 5 else "")
                    raise ValueError(f"Recorder: resume={resume!r}: {len(found.mismatched)} of {found.checked} written items "
                                     f"checked are no longer the inputs they were recorded from (ids {shown}): the data "
                                     "changed since, or was misfiled; resume against the data the shards were written "
                                     "from, or write to a new directory")
        _warn_distributed_padding(num_items, on_duplicate)

    @property
    def on_duplicate(self) -> str:
        """The duplicate policy (see the class docs); assigning one applies it from then on."""
        return self._store.on_duplicate

    @on_duplicate.setter
    def on_duplicate(self, policy: str) -> None:
        with self._lock:
            if policy not in ON_DUPLICATE:
                raise ValueError(f"Recorder: on_duplicate must be one of {', '.join(map(repr, ON_DUPLICATE))}, got {policy!r}")
            if self._stream is not None and policy != self._store.on_duplicate:
                raise ValueError(f"Recorder: on_duplicate cannot change once shards are written or resumed ({self._stream.path}): "
                                 "their bookkeeping follows the policy they were written with; pass on_duplicate= to Predictions.read")
            self._store.set_on_duplicate(policy)

    def __repr__(self) -> str:
        with self._lock:
            held = self._store.table.held()  # [capacity, V]: slots recorded in memory or in a shard
            items = int(np.count_nonzero(held.any(1)))
            records = self._store.records
            repeats = records - int(np.count_nonzero(held))
            missing = "" if self.num_items is None else f", missing={self.num_items - items}"
            again = f", repeats={repeats}" if repeats > 0 else ""
            return (f"Recorder(num_items={self.num_items}, device={str(self.device)!r}, on_duplicate={self.on_duplicate!r}, "
                    f"views={self.views!r}, reduce={self.reduce!r}, recorded={items}{missing}, records={records}{again})")

    # ---------------------------------------------------------------------------- add

    def add(self, batch, outputs, *, per_token=False, lengths=None, view=None, padding_side: Optional[str] = None,
            offsets=None, fingerprint=None) -> None:
        """Record one batch's outputs under the batch's dataset indices.

        Args:
            batch: a :class:`provcollate.Batch` (its ``host_index``, ``host_lengths``, views,
                ``max_len``, ``offsets`` and ``padding_side`` are used; they live on the host, so
                nothing waits on a GPU), or a plain index tensor / array ``[B]`` of dataset
                indices (on the host, to avoid a device sync) for users with their own collate.
            outputs: a tensor or a dict of tensors, kept on their device until stored:
                ``[B, ...]`` per example; per token, ``[B, max_len, ...]`` padded as the batch
                is, rows ``[total, ...]`` or ``[1, total, ...]`` in ``batch.offsets`` order (a
                packed batch, or a plain index with ``offsets=``), or a ``torch.nested`` jagged
                tensor ``[B, j, ...]`` with its ragged dimension at 1 (any batch; a view such as
                ``torch.nested.narrow`` of a padded output too: its items' own rows are read).
            per_token: ``True`` if the outputs have a position dimension to unpad with the
                batch's lengths; for a dict, ``True`` for every key or a set of the keys that do.
            lengths: with a plain index only: the real length of each item ``[B]``, needed for
                per-token outputs.
            offsets: with a plain index only: ``[B+1]`` row offsets (cu_seqlens) of per-token rows
                ``[total, ...]``; lengths are their differences.
            view: with a plain index only: the view id of each item ``[B]`` (or one int).
            padding_side: with a plain index only: ``"right"`` (default) or ``"left"``.
            fingerprint: with a plain index only: each item's input fingerprint ``[B]`` (int64,
                :func:`provcollate.fingerprint` of its data); a Batch carries its own.

        Raises TypeError or ValueError, with nothing recorded changed, if an index lies outside
        ``range(num_items)``, an (index, view) pair repeats with ``on_duplicate="error"``, the
        outputs' batch size differs from the index's, a per-token output of a padded Batch does
        not have ``batch.max_len`` positions (or, with a plain index, is shorter than its longest
        item), an output is sparse, quantized or on the meta device, or the outputs differ from
        the first ``add``'s in names, dtype or row shape.
        """
        lock = self._lock
        lock.acquire()  # one add at a time: a second thread waits its turn (acquire/release cost half a `with`)
        try:
            store = self._store
            fast = store.fast
            if (fast is not None and fast.plain and type(outputs) is _Tensor and (type(batch) is _Tensor or type(batch) is _ndarray)
                    and per_token is False and lengths is None and view is None and padding_side is None and offsets is None):
                # The seed article's call, a plain index and one per-example tensor (and perhaps
                # each item's fingerprint), straight to the compiled pass.
                n = fast.add_plain(batch, outputs) if fingerprint is None else fast.add_plain(batch, outputs, fingerprint)
                if n < 0:  # handed back: the general path takes it
                    n = self._add(batch, outputs, per_token, lengths, view, padding_side, offsets, fingerprint, compiled=False)
            else:
                n = self._add(batch, outputs, per_token, lengths, view, padding_side, offsets, fingerprint,
                              compiled=fast is not None)
            if self._stream is not None:
                self._stream.added(n)
        finally:
            lock.release()

    def _add(self, batch, outputs, per_token, lengths, view, padding_side, offsets, fingerprint, compiled: bool) -> int:
        """``add`` for any batch: identify its rows, try the compiled pass (if ``compiled``), check
        the outputs, record. Returns the batch size."""
        owner = "Recorder.add"
        store = self._store
        ids = _inputs.identify(owner, batch, lengths, view, padding_side, offsets, int_keys=bool(store.keyed),
                               fingerprint=fingerprint)
        if compiled:
            n = store.add_compiled(ids, outputs, per_token)
            if n >= 0:
                return n
        ids = _inputs.checked(owner, ids)
        named, specs, single = _inputs.batch_outputs(outputs, per_token, ids, self._reduce, self.reduce, store.specs,
                                                     store.on_duplicate, self.views)
        store.record(ids, named, specs, single, combine_views=self.views != "none")
        return len(ids.index)

    # ---------------------------------------------------------------------------- result

    def _collected(self) -> Store:
        """A store holding everything recorded: the shards read back, then what is in memory."""
        if self._stream is None:
            return self._store
        return self._stream.collected()

    def result(self) -> "Predictions":
        """Everything recorded so far, as :class:`Predictions` in dataset order.

        Waits for outputs still being copied from a GPU. Copies nothing when each example was
        recorded once per view and the views are kept as they are; later ``add`` calls never
        change the returned object. After :meth:`write`, or with ``resume=``, the written
        shards are read back (this rank's), so the result is still everything recorded.
        """
        with self._lock:
            source = self._collected()
            shards_read = len(self._stream.owned) if self._stream is not None else 0
            return Predictions._from_table(source.columns("Recorder.result", shards=shards_read))

    def summary(self) -> Summary:
        """The :class:`Summary` of :meth:`result` (what was recorded, missing, repeated)."""
        return self.result().summary()

    # ---------------------------------------------------------------------------- many ranks, disk

    def gather(self, dst: Optional[int] = None, group=None, *, progress: bool = False) -> Optional["Predictions"]:
        """Every rank's recorded outputs as one :class:`Predictions`, on every rank (or on ``dst`` only).

        A collective over ``group`` (default: the whole world): every rank must call it. Sizes
        are exchanged first, then the outputs move as tensors (``all_gather``, or ``gather`` to
        the global rank ``dst``, which others answer with None); with NCCL they stay on the GPU.
        Items recorded on several ranks (``DistributedSampler`` pads ranks with repeats) are
        merged under ``on_duplicate``: ``"first"`` keeps the lowest rank's, ``"last"`` the
        highest's, ``"mean"`` averages all records, ``"error"`` raises ValueError on every rank
        (set ``rec.on_duplicate = "first"`` and call ``gather()`` again to keep one). Views are
        then combined as by :meth:`result`. Without an initialized process group, :meth:`result`.
        ``progress=True`` shows a tqdm bar over the ranks merged.
        """
        with self._lock:
            source = self._collected()
            merged = distributed.gather(source, dst, group, progress=progress)
            if merged is None:
                return None
            store, ranks = merged
            shards_read = len(self._stream.owned) if self._stream is not None else 0
            return Predictions._from_table(store.columns("Recorder.gather", ranks=ranks, shards=shards_read))

    def write(self, path, every: Optional[int] = None, *, progress: bool = False) -> None:
        """Write what was recorded since the last write to a new Parquet shard in directory ``path``.

        The shard (``part-r<rank>-<seq>.parquet``, rank from torch.distributed) appears whole
        or not at all, even if the process is killed; the rows written are then dropped from
        memory, so memory stays bounded by what is recorded between writes. The Recorder still
        knows what it wrote: ``add`` applies ``on_duplicate`` to it, :meth:`done` reports it,
        and :meth:`result` / :meth:`gather` read it back. ``every=N`` also writes a shard by
        itself whenever ``N`` rows have been added since the last one, from now on; call
        ``write(path)`` once more at the end for the rest. :meth:`Predictions.read` merges the
        shards of all ranks. See docs/distributed.md. ``progress=True`` shows a tqdm bar over
        the row groups written.
        """
        with self._lock:
            self._stream = shards.write(self._store, self._stream, path, every, progress=progress)

    def done(self, index, view=None) -> torch.Tensor:
        """BoolTensor: which of ``index`` are recorded, in memory or in shards (written or resumed).

        ``index`` is a Batch (its own (index, view) pairs, or keys, are checked), an int, or a 1-D
        sequence of dataset indices; for a Recorder that files by key, a key or a list of keys
        (a tuple is one key when the keys are tuples). ``view`` (an int or one per index) asks
        about those views, None about any view. A restarted run skips what is done:
        ``rec.done(range(N))``.
        """
        with self._lock:
            owner = "Recorder.done"
            store = self._store
            keyed = bool(store.keyed)
            one = (isinstance(index, (int, np.integer)) and not isinstance(index, bool)) or isinstance(index, (str, bytes)) \
                or (isinstance(index, tuple) and keyed and store.keys.kind == "tuple")
            if one:
                index = [index] if keyed or not isinstance(index, (int, np.integer)) else np.array([index], np.int64)
            elif not (hasattr(index, "host_index") or keyed or _inputs.looks_like_keys(index)):
                index = _inputs.host_long(owner, "index", index)
            ids = _inputs.identify(owner, index, view=view, int_keys=keyed)
            store.check_mode(owner, ids)
            if ids.views is not None:
                _inputs.check_views(owner, ids.views)
            idx = ids.index
            if ids.keys is None and len(idx) and (idx.min() < 0 or (self.num_items is not None and idx.max() >= self.num_items)):
                bad = idx.min() if idx.min() < 0 else idx.max()
                raise ValueError(f"{owner}: index must lie in range(num_items) = range({self.num_items}), got {bad}")
            out = torch.from_numpy(store.held(ids))
            return out[0] if one else out


def _warn_distributed_padding(num_items: Optional[int], on_duplicate: str) -> None:
    if on_duplicate != "error" or num_items is None or not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if world > 1 and num_items % world:
        warnings.warn(
            f"Recorder: num_items={num_items} is not a multiple of the world size {world}, so a DistributedSampler "
            f"pads the ranks with {world - num_items % world} repeated items, and gather() will refuse them under "
            "on_duplicate='error'. Pass on_duplicate='first' (or set rec.on_duplicate = 'first' before gather()) "
            "to keep one record of each; a LengthBucketSampler(num_replicas=, rank=) shards without repeats.",
            RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------

def _not_recorded(key) -> KeyError:
    return KeyError(f"Predictions: item {key!r} was not recorded; preds.missing() lists the items never recorded")


def _key_not_recorded(key) -> KeyError:
    return KeyError(f"Predictions: key {describe_key(key)} was not recorded; preds.missing(expected) lists the expected "
                    "keys never recorded")


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
        index = _inputs.host_long("Predictions", "index", index)
        view = None if view is None else _inputs.host_long("Predictions", "view", view)
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
                offsets = _inputs.host_long("Predictions", f"offsets of {what}", offsets)
                lengths = np.diff(offsets)
                if len(offsets) != len(index) + 1 or offsets[0] != 0 or (lengths < 0).any() or offsets[-1] != values.shape[0] or values.dim() < 1:
                    raise ValueError(f"Predictions: {what} must be (values [total, ...], offsets [E+1]) with offsets increasing from 0 "
                                     f"to total and E = {len(index)}; got values {tuple(values.shape)} and {len(offsets)} offsets")
                if stacked_views is not None and (values.dim() < 2 or values.shape[1] != stacked_views):
                    raise ValueError(f"Predictions: with stacked_views={stacked_views}, {what} rows must be [{stacked_views}, ...], got {tuple(values.shape[1:])}")
                columns[name] = Jagged.of(values, offsets)
            else:
                raise TypeError(f"Predictions: {what} must be a tensor or a (values, offsets) pair of tensors, got {type(value).__name__}")
        self._init(ColumnTable(index, view, columns, single, num_items, stacked_views, len(index),
                               views=1 if view is None or not len(view) else int(view.max()) + 1))
        if len(self._lookup) > 1 and not (self._lookup[1:] > self._lookup[:-1]).all():
            raise ValueError("Predictions: entries must be strictly increasing by (index, view), without repeats")

    @classmethod
    def _from_table(cls, table: ColumnTable) -> "Predictions":
        """Internal: Predictions over a finished :class:`provcollate.store.ColumnTable`."""
        self = cls.__new__(cls)
        self._init(table)
        return self

    def _init(self, table: ColumnTable) -> None:
        self._table = table
        index, view = table.index, table.view
        self._index, self._view, self._columns = index, view, table.columns
        self._single, self.num_items, self.stacked_views = table.single, table.num_items, table.stacked_views
        self._size = table.size
        # Entries are looked up by key index * width + view (width: views seen, 1 when combined).
        self._width = int(view.max()) + 1 if view is not None and len(view) else 1
        self._lookup = None if index is None else (index if view is None else index * self._width + view)
        self._keyed = table.keys is not None  # entries sorted by key (then view); ``_entry_keys`` holds them
        self._entry_keys = table.keys

    def _host_index(self) -> np.ndarray:
        """The entries' dataset indices as a numpy array (made on demand when implicit)."""
        return np.arange(self._size, dtype=np.int64) if self._index is None else self._index

    # ---------------------------------------------------------------------------- mapping

    @property
    def index(self) -> torch.Tensor:
        """LongTensor [E] of the recorded items, sorted (repeated per view with ``views="none"``).

        Filed by int keys: those keys, sorted. Filed by str, bytes or tuple keys there is no index:
        :meth:`keys` lists them (TypeError here)."""
        if self._keyed:
            if isinstance(self._entry_keys, np.ndarray):
                return torch.from_numpy(self._entry_keys)
            raise TypeError("Predictions.index: these predictions are filed by key (str, bytes or tuples), not by "
                            "dataset index; preds.keys() lists the keys in sorted order")
        return torch.from_numpy(self._host_index())

    @property
    def keyed(self) -> bool:
        """True when the entries are filed by key (``Recorder(keys=True)``, or keyed batches)."""
        return self._keyed

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
        return frozenset(n for n, c in self._columns.items() if isinstance(c, Jagged))

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator:
        """The keys: dataset indices (or the keys of keyed predictions, sorted), or ``(index, view)``
        pairs with ``views="none"``."""
        if self._keyed:
            keys = self._entry_keys.tolist() if isinstance(self._entry_keys, np.ndarray) else self._entry_keys
            return iter(keys) if self._view is None else iter(zip(keys, self._view.tolist()))
        if self._index is None:
            return iter(range(self._size))
        if self._view is None:
            return iter(self._index.tolist())
        return iter(zip(self._index.tolist(), self._view.tolist()))

    def keys(self):
        """Same as ``iter(preds)``; keyed predictions: a list of every recorded key, sorted (ints
        numerically, str and bytes by their UTF-8 bytes, tuples element by element), the same
        whatever the order they were recorded in."""
        return list(self) if self._keyed else iter(self)

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
        if self._keyed:
            return self._key_position(key)
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
        e = int(np.searchsorted(self._lookup, k))
        if e == len(self._lookup) or self._lookup[e] != k:
            raise _not_recorded(key)
        return e

    def _key_position(self, key) -> int:
        """The entry of a key (``(key, view)`` with ``views="none"``) of keyed predictions."""
        view = 0
        if self._view is not None:
            if not (isinstance(key, tuple) and len(key) == 2):
                raise TypeError(f"Predictions: each view is its own entry (views='none'), look up preds[key, v], got preds[{key!r}]")
            key, view = key[0], _key_int(key[1])
        key = check_key("Predictions", key, "the key looked up")
        keys = self._entry_keys
        try:
            if isinstance(keys, np.ndarray):
                if not isinstance(key, int):
                    raise _key_not_recorded(key)
                e = int(np.searchsorted(keys, key))
            else:
                e = bisect.bisect_left(keys, key)
        except TypeError:  # a key of another kind than these predictions': never recorded
            raise _key_not_recorded(key) from None
        while e < len(keys) and keys[e] == key:
            if self._view is None or self._view[e] == view:
                return e
            e += 1
        raise _key_not_recorded(key)

    def _entry(self, e: int):
        out = {}
        for name, col in self._columns.items():
            if isinstance(col, Jagged):
                seg = col.segment(e)
                out[name] = seg.movedim(1, 0) if self.stacked_views is not None else seg
            else:
                out[name] = col[e]
        return out[SINGLE] if self._single else out

    def tensor(self, name: Optional[str] = None) -> torch.Tensor:
        """A per-example output for every entry, ``[E, ...]`` in ``index`` order."""
        col = self._column(name)
        if isinstance(col, Jagged):
            raise ValueError(f"Predictions.tensor: output {self._name(name)!r} is per token; use jagged()")
        return col

    def jagged(self, name: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """A per-token output for every entry: ``(values [total, ...], offsets [E+1])`` in ``index`` order.

        Entry e's rows are ``values[offsets[e]:offsets[e+1]]``; ``pc.ops.pad(values, offsets,
        max_len)`` pads them back. A view when the rows are stored in that order, else a copy.
        """
        col = self._column(name)
        if not isinstance(col, Jagged):
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

    def missing(self, expected=None, *, num_items: Optional[int] = None):
        """What was expected and never recorded (in any view).

        By position: a LongTensor of the items of ``range(num_items)`` never recorded;
        ``expected`` (or ``num_items=``) is that number, by default the Recorder's; one of them
        must be known. Keyed predictions: the keys of ``expected`` (a list, tuple, array, tensor,
        or an Arrow or pandas column of keys) never recorded, in ``expected``'s order: a
        LongTensor for int keys, else a list.
        """
        if self._keyed:
            if expected is None:
                raise TypeError("Predictions.missing: these predictions are filed by key; pass the expected keys, "
                                "e.g. preds.missing(df['id'])")
            return self._missing_keys(expected)
        n = expected if expected is not None else self.num_items if num_items is None else num_items
        if n is None:
            raise ValueError("Predictions.missing: num_items is unknown (the Recorder had none); pass missing(num_items=N)")
        n = check_int("Predictions.missing", "num_items", n, minimum=0)
        if self._index is None:
            return torch.arange(self._size, max(n, self._size))
        seen = np.zeros(n, bool)
        seen[self._index[self._index < n]] = True
        return torch.from_numpy(np.flatnonzero(~seen))

    def _missing_keys(self, expected):
        owner = "Predictions.missing"
        if hasattr(expected, "to_pylist"):  # an Arrow array or chunked array
            expected = expected.to_pylist()
        elif hasattr(expected, "tolist"):  # numpy, torch, pandas
            expected = expected.tolist()
        if isinstance(expected, (str, bytes)) or not hasattr(expected, "__iter__"):
            raise TypeError(f"{owner}: expected must be a collection of keys, got {type(expected).__name__}")
        keys = [check_key(owner, k, f"expected key {i}") for i, k in enumerate(expected)]
        recorded = set(self._entry_keys.tolist() if isinstance(self._entry_keys, np.ndarray) else self._entry_keys)
        absent = [k for k in keys if k not in recorded]
        if isinstance(self._entry_keys, np.ndarray) or (not self._entry_keys and all(isinstance(k, int) for k in keys)):
            return torch.tensor(absent, dtype=torch.int64)
        return absent

    def summary(self) -> Summary:
        """A :class:`Summary`: items expected, recorded and missing, records and repeats (and how
        ``on_duplicate`` resolved them), views per item, ranks and shards merged. ``print()`` it."""
        t = self._table
        recorded = self._size if self._view is None else len(np.unique(self._host_index()))
        if self.num_items is None:
            missing = None
        else:  # keyed: the items expected (num_items) beyond those recorded
            missing = max(0, self.num_items - recorded) if self._keyed else len(self.missing())
        entries = self._size
        slots = entries if t.slots is None else t.slots
        records = slots if t.records is None else t.records
        return Summary(expected=self.num_items, recorded=recorded, missing=missing, records=records,
                       repeats=records - slots, on_duplicate=t.on_duplicate, views=t.views, incomplete=t.incomplete,
                       ranks=t.ranks, shards=t.shards, fingerprinted=t.prints is not None or bool(t.conflicts),
                       conflicts=t.conflicts, disagreements=t.disagreements, max_disagreement=t.max_disagreement,
                       conflicted=tuple(t.conflicted))

    @property
    def fingerprints(self) -> Optional[torch.Tensor]:
        """LongTensor [E]: each entry's input fingerprint (``batch.fingerprint`` of the record
        kept), in entry order; None when some record carried none, or views were combined."""
        prints = self._table.prints
        return None if prints is None else torch.from_numpy(prints)

    def verify(self, dataset, k: int = 64, seed: int = 0, *, index=None) -> "Verification":
        """Re-read ``k`` recorded items (every one when ``k >= len(self)``) from ``dataset``,
        fingerprint them again and compare with the fingerprints recorded.

        ``dataset`` is an :class:`provcollate.Indexed` (a view's input is ``ds.replay(index,
        view)``; keyed predictions find each key's position through its ``key``) or the dataset
        it wraps. The items are drawn with ``numpy.random.default_rng(seed)``. Returns a
        :class:`Verification`: ``checked`` items, ``mismatched`` ids (dataset indices, or keys):
        inputs that changed since they were recorded, or outputs filed under the wrong id.
        ``index``: for raw samples collated with ``Collator(index=K)``, the same K (their
        fingerprints leave the index out). Raises ValueError when no fingerprints were recorded.
        """
        return _verify(self, dataset, k, seed, index)

    def column_info(self, name: Optional[str] = None) -> Tuple[bool, torch.dtype, Tuple[int, ...]]:
        """(per_token, dtype, row shape) of one output (the only one when ``name`` is None)."""
        col = self._column(name)
        if isinstance(col, Jagged):
            return True, col.dtype, tuple(col.chunks[0].shape[1:])
        return False, col.dtype, tuple(col.shape[1:])

    def __repr__(self) -> str:
        cols = ", ".join(
            f"{n}: {'per-token' if isinstance(c, Jagged) else 'per-example'} {str(c.dtype).replace('torch.', '')}"
            for n, c in self._columns.items())
        s = self.summary()
        missing = "" if s.missing is None else f", missing={s.missing}"
        repeats = f", repeats={s.repeats}" if s.repeats else ""
        keyed = ""
        if self._keyed:
            kind = "int" if isinstance(self._entry_keys, np.ndarray) else type(self._entry_keys[0]).__name__ if self._entry_keys else "no"
            keyed = f" keyed by {kind} keys"
        return f"Predictions({len(self)} entries{keyed}, num_items={self.num_items}{missing}{repeats}, outputs {{{cols}}})"

    # ---------------------------------------------------------------------------- export

    def to_arrow(self):
        """A ``pyarrow.Table``: ``index`` (and ``view``), then one column per output.

        Per-example outputs are primitive columns (fixed-size lists for row shapes), per-token
        ones list columns. Dtypes and shapes are kept in the schema metadata, so
        :meth:`from_arrow` rebuilds these Predictions exactly.
        """
        return io.to_arrow(self._table)

    @classmethod
    def from_arrow(cls, table) -> "Predictions":
        """The Predictions that :meth:`to_arrow` made ``table`` from.

        Raises ValueError for a table whose entries are not strictly increasing by (index, view)
        (e.g. several tables concatenated): lookups would miss items that are there.
        """
        preds = cls._from_table(io.from_arrow(table))
        keys = preds._lookup
        if keys is not None and len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
            e = int(np.flatnonzero(keys[1:] <= keys[:-1])[0]) + 1
            raise ValueError(f"Predictions.from_arrow: entries must be strictly increasing by (index, view), but entry {e} "
                             f"(index {preds._index[e]}) follows index {preds._index[e - 1]}; a table of several to_arrow() "
                             "tables concatenated must be sorted by index (and view) first, its repeats merged")
        return preds

    def to_pandas(self, dataset=None):
        """A ``pandas.DataFrame``, one row per entry: ``index`` (and ``view``), one column per output.

        Per-example outputs with a row shape, and per-token outputs, are numpy arrays per row
        (bfloat16 as float32). With ``dataset``, each recorded item's fields become columns too:
        a dict sample's keys, a tuple's positions as ``input_0``, ``input_1``..., anything else
        as ``input``; ``provcollate.Sample`` and ``Indexed`` wrappers are looked through. Fields
        whose names clash with a prediction column get the suffix ``_input``.
        """
        return io.to_pandas(self._table, dataset)

    def join(self, source, on: Optional[str] = None):
        """``source`` with these predictions beside its rows: a pandas DataFrame, a pyarrow Table or
        a ``datasets.Dataset``, returned as the same type, every source row in source order with one
        column per output (per-token outputs as list columns), null where a row's item was never
        recorded. The seed article's last step, original data beside its prediction, in one call.

        ``on=None`` joins by position: source row i is item i. ``on="id"`` joins by that column:
        its values are the keys of predictions filed by key, or the dataset indices of positional
        ones. Output names that a source column already has get the suffix ``_prediction``.
        Predictions with ``views="none"`` (several entries per item) are refused: combine views first.
        """
        kind = io.source_kind(source)
        if self._view is not None:
            raise ValueError("Predictions.join: each view is its own entry here (views='none'), so a source row has several "
                             "predictions; record with views='mean', 'vote' or 'stack' to join")
        if on is None:
            if self._keyed:
                raise TypeError("Predictions.join: these predictions are filed by key; name the source column that holds "
                                "the keys, e.g. preds.join(df, on='id')")
            positions = self._item_positions(np.arange(io.source_rows(source, kind), dtype=np.int64))
        else:
            if not isinstance(on, str):
                raise TypeError(f"Predictions.join: on must be None or a column name (str), got {type(on).__name__}")
            positions = self._positions(io.source_column(source, kind, on), on)
        return io.join(self._table, positions, source, kind)

    def _item_positions(self, items: np.ndarray) -> np.ndarray:
        """The entry of each dataset index (-1 where not recorded) of positional predictions."""
        if self._index is None:
            return np.where((items >= 0) & (items < self._size), items, -1)
        at = np.minimum(np.searchsorted(self._lookup, items), max(len(self._lookup) - 1, 0))
        found = (len(self._lookup) > 0) & (self._lookup[at] == items) if len(self._lookup) else np.zeros(len(items), bool)
        return np.where(found, at, -1)

    def _positions(self, values: list, on: str) -> np.ndarray:
        """The entry of each value of a source column (-1 where not recorded, or null)."""
        if not self._keyed:
            if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) for v in values if v is not None):
                raise TypeError(f"Predictions.join: column {on!r} must hold dataset indices (ints) to join positional predictions")
            items = np.array([-1 if v is None else v for v in values], np.int64)
            return self._item_positions(items)
        if isinstance(self._entry_keys, np.ndarray):
            keys = np.array([v if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else np.iinfo(np.int64).min
                             for v in values], np.int64)
            real = np.array([isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values], bool)
            at = np.minimum(np.searchsorted(self._entry_keys, keys), max(len(self._entry_keys) - 1, 0))
            found = real & (self._entry_keys[at] == keys) if len(self._entry_keys) else np.zeros(len(keys), bool)
            return np.where(found, at, -1)
        entry = {k: e for e, k in enumerate(self._entry_keys)}
        return np.fromiter((entry.get(tuple(v) if isinstance(v, list) else v, -1) if v is not None else -1 for v in values),
                           np.int64, len(values))

    def to_parquet(self, path) -> None:
        """Write :meth:`to_arrow` to one Parquet file; :meth:`read` gives these Predictions back."""
        io.write_parquet(self._table, path)

    @classmethod
    def read(cls, path, on_duplicate: Optional[str] = None, *, progress: bool = False) -> "Predictions":
        """The Predictions in a Parquet file written by :meth:`to_parquet`, or in a directory of
        shards written by :meth:`Recorder.write` on any number of ranks, merged in dataset order
        under the shards' ``on_duplicate`` (or this one), a row group at a time. What was read
        (entries, source) is logged on the ``provcollate`` logger at INFO; ``progress=True``
        shows a tqdm bar over the row groups read.

        Reading holds the result and about one row group (4 MiB as written) besides. Where no
        item repeats across the shards, each per-token output is read into one block in dataset
        order (planned from the shards' index and length columns first), so :meth:`jagged`
        returns it without a copy."""
        if os.path.isdir(path):
            store, ranks, files = shards.read(path, on_duplicate, progress=progress)
            preds = cls._from_table(store.columns("Predictions.read", ranks=ranks, shards=files))
        else:
            if on_duplicate is not None:
                raise ValueError(f"Predictions.read: on_duplicate= applies to a directory of shards, got the file {path!r}")
            preds = cls._from_table(io.read_parquet(path))
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

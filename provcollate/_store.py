"""The recording side's storage core: slots, rows and their staging, knowing nothing of Recorder.

Everything recorded is filed under a *slot*, ``index * V + view`` (``V`` views, 1 without
test-time augmentation). The pieces, bottom up:

- :class:`SlotTable`: host bookkeeping per slot, laid out ``[capacity, V]``: how many records
  each slot holds, its per-token length, whether a shard on disk holds it; growth; and
  :meth:`SlotTable.claim`, the one place where the duplicate policy (``on_duplicate``) is
  applied, to a batch and to a block of slots from a shard or a rank alike. It only reads.
- Row stores: :class:`DenseRows` (per-example rows ``[capacity * V, ...]``, scattered to their
  slots) and :class:`TokenRows` (per-token rows in append-only chunks, with each slot's first
  row); :func:`weighted_mean` is the one mean of repeats, records and blocks alike.
- :class:`Staging`: outputs on a GPU with storage on the host are copied to pinned buffers
  without blocking, and written when their event says the copy has landed.
- :class:`Store`: the above for one set of outputs (:class:`Spec`), with the three ways data
  comes in and goes out: :meth:`Store.record` (a checked batch), :meth:`Store.absorb` and
  :meth:`Store.extract` (a :class:`SlotBlock`: what shards and ranks exchange), and
  :meth:`Store.columns` (a :class:`ColumnTable`, the finished result).

Sizes always come from host arrays: nothing here waits on a GPU except :meth:`Staging.drain`
with ``wait=True``. Every method that changes state first checks everything it can, so that
an error leaves the store as it was.
"""
from __future__ import annotations

import collections
import ctypes
import mmap
import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from . import ops

__all__ = [
    "SINGLE", "ON_DUPLICATE", "VIEWS", "Spec", "specs_from_meta", "specs_to_meta", "Jagged", "SlotBlock", "ColumnTable",
    "Claim", "SlotTable", "DenseRows", "TokenRows", "Staging", "Store", "weighted_mean", "exclusive_cumsum",
    "first_last", "row_positions", "to_device", "huge_pages", "host_empty", "row_storage", "acc_dtype", "gather_rows",
    "combine_views", "Output",
]

SINGLE = "prediction"  # the name of a single-tensor output in tables and files
ON_DUPLICATE = ("error", "first", "last", "mean")
VIEWS = ("mean", "vote", "stack", "none")
MIN_CHUNK_BYTES = 1 << 20
MAX_PENDING = 8  # host copies in flight from a GPU before a new one waits for the oldest
GATHER_ROWS = 1 << 20  # rows per step of a jagged gather: bounds its index tensors


# --------------------------------------------------------------------------------------------
# Host-side helpers
# --------------------------------------------------------------------------------------------

_HUGE = 1 << 21
_MADV_HUGEPAGE = 14
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def huge_pages(t: torch.Tensor) -> torch.Tensor:
    """Ask Linux for transparent huge pages under a fresh host tensor of several MiB, before its
    first write. Rows land at random slots: with 4 KiB pages every write of a large result is a
    TLB miss and each page a fault of its own; 2 MiB pages take both away. Advice only: where the
    kernel declines (THP off, another OS), nothing changes."""
    if _libc is None or t.device.type != "cpu":
        return t
    addr = t.data_ptr()
    start = (addr + _HUGE - 1) & ~(_HUGE - 1)
    end = (addr + t.numel() * t.element_size()) & ~(_HUGE - 1)
    if end - start >= 2 * _HUGE:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    return t


_MAPPED_BYTES = 1 << 20


def host_empty(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, except that host storage of 1 MiB or more is an anonymous mapping of its
    own, unmapped when the last tensor on it goes.

    glibc serves such sizes from mmap too, but freeing one raises its mmap threshold to that size
    (up to 32 MiB): from then on a model's activations of up to that size come from the heap,
    whose freed holes stay resident. A Recorder that writes shards frees its storage after each
    one; through glibc, the resident set of a streaming transformers predict grew by 2.6x the
    result above what the model alone needs."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if device.type != "cpu" or nbytes < _MAPPED_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    # Private, as malloc's are (mmap's default, MAP_SHARED, is shmem: no huge pages, slower faults,
    # and shared with forked children). torch.frombuffer holds a reference to the mapping: it
    # lives exactly as long as its tensors.
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


def row_storage(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Storage a store writes rows into at random: :func:`host_empty` under :func:`huge_pages`."""
    return huge_pages(host_empty(shape, dtype, device))


def exclusive_cumsum(lengths: np.ndarray) -> np.ndarray:
    out = np.empty(len(lengths), np.int64)
    if len(lengths):
        out[0] = 0
        np.cumsum(lengths[:-1], out=out[1:])
    return out


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device``; to a GPU through pinned memory, without waiting."""
    t = torch.from_numpy(array)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums of ``dtype`` values are formed: float32 at least."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def first_last(key: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Masks of the first and of the last occurrence of each value of ``key``."""
    order = np.argsort(key, kind="stable")
    sk = key[order]
    change = sk[1:] != sk[:-1]
    first = np.empty(len(key), bool)
    last = np.empty(len(key), bool)
    first[order] = np.concatenate(([True], change))
    last[order] = np.concatenate((change, [True]))
    return first, last


def row_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Rows ``starts[e] .. starts[e] + lengths[e]`` of every segment, concatenated in order."""
    total = int(lengths.sum())
    shift = np.repeat(starts - exclusive_cumsum(lengths), lengths)
    return shift + np.arange(total, dtype=np.int64)


def gather_rows(chunks: List[torch.Tensor], bases: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """Segments of chunked rows (global row ``starts[e]``, ``lengths[e]`` rows) as one tensor, in order.

    Works in steps of about ``GATHER_ROWS`` rows so that the index tensors stay small; loops
    over steps and chunks only, never over segments.
    """
    out = host_empty((int(lengths.sum()), *chunks[0].shape[1:]), chunks[0].dtype, chunks[0].device)
    ends = np.cumsum(lengths)
    begin, e0 = 0, 0
    while e0 < len(lengths):
        e1 = max(e0 + 1, int(np.searchsorted(ends, begin + GATHER_ROWS, side="right")))
        end = int(ends[e1 - 1])
        s, ln = starts[e0:e1], lengths[e0:e1]
        which = np.searchsorted(bases, s, side="right") - 1
        dst = out[begin:end]
        for k in np.unique(which):
            sel = which == k
            src_rows = to_device(row_positions(s[sel] - bases[k], ln[sel]), chunks[k].device)
            if sel.all():
                torch.index_select(chunks[k], 0, src_rows, out=dst)
            else:
                dst_rows = to_device(row_positions(exclusive_cumsum(ln)[sel], ln[sel]), dst.device)
                dst.index_copy_(0, dst_rows, chunks[k].index_select(0, src_rows))
        begin, e0 = end, e1
    return out


# --------------------------------------------------------------------------------------------
# Plain records: what an output is, a block of slots, a finished table
# --------------------------------------------------------------------------------------------

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
    was made included), None for one per slot.
    """

    __slots__ = ("index", "view", "count", "lengths", "columns", "records")

    def __init__(self, index: np.ndarray, view: Optional[np.ndarray], count: Optional[np.ndarray],
                 lengths: Optional[np.ndarray], columns: Dict[str, torch.Tensor], records: Optional[int] = None) -> None:
        self.index, self.view, self.count, self.lengths, self.columns = index, view, count, lengths, columns
        self.records = records

    def __len__(self) -> int:
        return len(self.index)


class ColumnTable(NamedTuple):
    """A finished result: ``index`` None means the entries are exactly ``range(size)``.

    ``columns`` maps each output to a tensor ``[E, ...]`` or a :class:`Jagged`; ``records``
    counts every record seen (repeats included) and ``slots`` the distinct (index, view) pairs
    they filled (None: one record per entry), ``incomplete`` the items missing some of their
    ``views``, ``ranks`` the processes and ``shards`` the files merged, and ``on_duplicate``
    the policy that resolved repeats (None when unknown).
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


# --------------------------------------------------------------------------------------------
# The slot table
# --------------------------------------------------------------------------------------------

class Claim(NamedTuple):
    """What :meth:`SlotTable.claim` decided for a block of n slots (nothing is changed yet).

    ``keep`` masks the rows to write (None: all); ``prev`` holds the slots' record counts before
    (None for an empty block); ``merge`` says rows are averaged into their slots; ``top`` and
    ``vmax`` are the largest index and view.
    """

    keep: Optional[np.ndarray]
    prev: Optional[np.ndarray]
    merge: bool
    top: int
    vmax: int


_KEEP_ONE = "; pass on_duplicate='first', 'last' or 'mean' to keep one"


def _what(index, views, b: int) -> str:
    return f"item {index[b]}" + ("" if views is None or not views[b] else f" view {views[b]}")


class SlotTable:
    """Host bookkeeping of every slot: ``count``, ``token_len`` and ``disk`` arrays ``[capacity, V]``."""

    def __init__(self, num_items: Optional[int], on_duplicate: str) -> None:
        self.num_items = num_items
        self.on_duplicate = on_duplicate
        # Counts above 1 only matter for averaging: one byte per slot otherwise keeps it in cache.
        self.count = np.zeros((0, 1), self.count_dtype(on_duplicate))
        self.flat = self.count.reshape(-1)
        self.token_len = np.zeros((0, 1), np.int64)
        self.disk: Optional[np.ndarray] = None  # slots a shard on disk holds, once a directory is linked

    @staticmethod
    def count_dtype(on_duplicate: str):
        return np.int32 if on_duplicate == "mean" else np.uint8

    @property
    def shape(self) -> Tuple[int, int]:
        return self.count.shape

    def slots(self, index: np.ndarray, views: Optional[np.ndarray]) -> np.ndarray:
        vcap = self.count.shape[1]
        return index if vcap == 1 else index * vcap + (0 if views is None else views)

    def new_shape(self, top: int, vmax: int) -> Optional[Tuple[int, int]]:
        """The shape that holds index ``top`` and view ``vmax``, None if this one does: all of
        num_items at once when known, else at least twice the items; views exactly."""
        cap, vcap = self.count.shape
        if top < cap and vmax < vcap:
            return None
        new_cap = self.num_items if self.num_items is not None else (cap if top < cap else max(top + 1, 2 * cap, 1024))
        return new_cap, max(vcap, vmax + 1)

    def grow(self, shape: Tuple[int, int]) -> None:
        cap, vcap = self.count.shape
        count = np.zeros(shape, self.count.dtype)
        count[:cap, :vcap] = self.count
        token_len = np.zeros(shape, np.int64)
        token_len[:cap, :vcap] = self.token_len
        if self.disk is not None:
            disk = np.zeros(shape, bool)
            disk[:cap, :vcap] = self.disk
            self.disk = disk
        self.count, self.flat, self.token_len = count, count.reshape(-1), token_len

    def link_disk(self) -> np.ndarray:
        if self.disk is None:
            self.disk = np.zeros(self.count.shape, bool)
        return self.disk

    def recorded(self, index: np.ndarray, views: Optional[np.ndarray], table: Optional[np.ndarray] = None) -> np.ndarray:
        """Per (index, view): recorded in memory (or in ``table``), in any view when ``views`` is None."""
        table = self.count if table is None else table
        cap, vcap = table.shape
        inside = index < cap
        if views is not None:
            inside &= views < vcap
        found = np.zeros(len(index), bool)
        rows = index[inside]
        found[inside] = (table[rows] != 0).any(1) if views is None else table[rows, views[inside]] != 0
        return found

    def _prev(self, index: np.ndarray, views: Optional[np.ndarray]) -> np.ndarray:
        cap, vcap = self.count.shape
        if len(index) and int(index.max()) < cap and (views is None or int(views.max()) < vcap):
            return self.flat[index if vcap == 1 else index * vcap + (0 if views is None else views)]
        v = np.zeros(len(index), np.int64) if views is None else views
        inside = (index < cap) & (v < vcap)
        prev = np.zeros(len(index), np.int32)
        prev[inside] = self.count[index[inside], v[inside]]
        return prev

    def claim(self, index: np.ndarray, views: Optional[np.ndarray], lengths: Optional[np.ndarray], per_token: bool,
              combine_views: bool, source: Optional[str] = None, repeat_hint: str = "") -> Claim:
        """Check a block of (index, view) pairs against what is recorded and apply ``on_duplicate``.

        ``source`` None means a batch of ``Recorder.add`` (its messages name batch positions),
        else it names the shard or rank the block came from; ``repeat_hint`` ends the message of a
        repeat under ``"error"`` in a block (how its sender recovers). ``combine_views`` checks that the
        views of an item agree in per-token length. Raises ValueError, changing nothing, for an
        index outside ``range(num_items)``, a repeat under ``"error"`` or lengths that clash.
        """
        if not len(index):
            return Claim(None, None, False, -1, 0)
        vmax = 0 if views is None else int(views.max())
        width = vmax + 1
        slot = index if views is None else index * width + views  # this block's own slot numbering
        low, top = int(index.min()), int(index.max())
        n = self.num_items
        if low < 0 or (n is not None and top >= n):
            b = int(np.flatnonzero((index < 0) | (index >= (n if n is not None else np.iinfo(np.int64).max)))[0])
            if source is not None:
                raise ValueError(f"{source}: indices must lie in range(num_items) = range({n}), got {index[b]}")
            if n is None:
                raise ValueError(f"Recorder.add: indices must be >= 0, got index[{b}] = {index[b]}")
            raise ValueError(f"Recorder.add: index[{b}] = {index[b]} is outside range(num_items) = range({n})")
        prev = self._prev(index, views)
        seen = bool(np.count_nonzero(prev))
        # Blocks from a shard or a rank come in slot order, each slot once: no sort needed then.
        repeats = len(slot) > 1 and not (slot[1:] > slot[:-1]).all() and bool(np.count_nonzero(np.diff(np.sort(slot)) == 0))
        if (seen or repeats) and self.on_duplicate == "error":
            if source is not None:
                again = prev > 0
                if repeats:
                    again |= ~first_last(slot)[0]
                b = int(np.flatnonzero(again)[0])
                raise ValueError(f"{source}: {_what(index, views, b)} is recorded more than once "
                                 f"(on_duplicate='error'){repeat_hint or _KEEP_ONE}")
            b = int(np.flatnonzero(prev)[0]) if seen else int(np.flatnonzero(~first_last(slot)[0])[0])
            where = "is already recorded (batch position" if seen else "appears more than once in this batch (again at position"
            raise ValueError(f"Recorder.add: {_what(index, views, b)} {where} {b}); "
                             "pass on_duplicate='first', 'last' or 'mean' to allow repeats")
        if lengths is not None and per_token:
            self._check_lengths(index, views, lengths, slot, combine_views, source)
        if not (seen or repeats) or self.on_duplicate == "mean":
            return Claim(None, prev, seen or repeats, top, vmax)
        first, last = first_last(slot) if repeats else (None, None)
        if self.on_duplicate == "first":
            keep = prev == 0
            if repeats:
                keep &= first
        else:
            keep = last
        return Claim(None if keep is None or keep.all() else keep, prev, False, top, vmax)

    def _check_lengths(self, index, views, lengths, slot, combine_views: bool, source: Optional[str]) -> None:
        """Slots that will be combined (views of one item, or averaged repeats) share one length."""
        merge = self.on_duplicate == "mean"
        combine_views = combine_views and (views is not None or self.count.shape[1] > 1)
        if not (combine_views or merge):
            return
        if source is not None:  # a block: the views of an item are checked once all blocks are in
            combine_views = False
            if not merge:
                return
        group = index if combine_views else slot
        order = np.argsort(group, kind="stable")
        sg, sl = group[order], lengths[order]
        clash = (sg[1:] == sg[:-1]) & (sl[1:] != sl[:-1])
        where = "in this batch" if source is None else "here"
        if clash.any():
            b = int(order[np.flatnonzero(clash)[0] + 1])
            if source is not None:
                raise ValueError(f"{source}: {_what(index, views, b)} has length {lengths[b]} {where} and another length elsewhere; "
                                 "repeats must have one length to be averaged (on_duplicate='mean')")
            raise ValueError(f"Recorder.add: item {index[b]} appears in this batch with lengths {sorted(set(lengths[index == index[b]].tolist()))}; "
                             + ("its views must have one length to be combined (or use views='none')" if combine_views
                                else "repeats of a slot must have one length to be averaged"))
        cap, vcap = self.count.shape
        inside = index < cap
        if not inside.any():
            return
        rows = index[inside]
        recorded = self.count[rows] > 0  # [n, vcap]
        v = np.zeros(len(rows), np.int64) if views is None else views[inside]
        if not combine_views:
            recorded &= np.arange(vcap)[None, :] == v[:, None]
        elif not merge:
            recorded &= np.arange(vcap)[None, :] != v[:, None]  # one's own slot is replaced or ignored
        bad = recorded & (self.token_len[rows] != lengths[inside][:, None])
        if bad.any():
            r, c = np.argwhere(bad)[0]
            b = int(np.flatnonzero(inside)[r])
            if source is not None:
                raise ValueError(f"{source}: {_what(index, views, b)} has length {lengths[b]} {where} and another length elsewhere; "
                                 "repeats must have one length to be averaged (on_duplicate='mean')")
            raise ValueError(f"Recorder.add: item {index[b]} has length {lengths[b]} in this batch but {self.token_len[rows[r], c]} "
                             f"in its recorded view {c}; " + ("its views must have one length to be combined (or use views='none')"
                                                              if combine_views else "repeats must have one length to be averaged"))

    def check_view_lengths(self, owner: str, views_mode: str) -> None:
        """Raise ValueError if combining the views of an item would meet two per-token lengths."""
        if views_mode == "none" or self.count.shape[1] == 1:
            return
        present = self.count > 0
        low = np.where(present, self.token_len, np.iinfo(np.int64).max).min(1)
        high = np.where(present, self.token_len, -1).max(1)
        bad = np.flatnonzero(present.any(1) & (low != high))
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{owner}: item {i} has views of lengths {sorted(set(self.token_len[i][present[i]].tolist()))}; "
                             f"its views must have one length to be combined (views={views_mode!r}), or use views='none'")


# --------------------------------------------------------------------------------------------
# Row stores
# --------------------------------------------------------------------------------------------

def weighted_mean(old: Optional[torch.Tensor], old_weight: np.ndarray, rows: torch.Tensor, row_weight: np.ndarray,
                  into: np.ndarray, groups: int) -> torch.Tensor:
    """Per group g: (old[g] * old_weight[g] + sum of rows r with into[r] == g, times row_weight[r])
    / (old_weight[g] + the sum of those row weights), formed in float32 at least.

    ``old`` holds a row per group with ``old_weight > 0`` only, in group order (None if none
    has). Averages of averages weighed by their counts are the average of every record.
    """
    dev, acc = rows.device, acc_dtype(rows.dtype)
    shape = (-1,) + (1,) * (rows.dim() - 1)
    total = torch.zeros((groups, *rows.shape[1:]), dtype=acc, device=dev)
    weights = to_device(np.ascontiguousarray(row_weight, np.int64), dev).to(acc).view(shape)
    total.index_add_(0, to_device(np.ascontiguousarray(into, np.int64), dev), rows.to(acc) * weights)
    had = np.flatnonzero(old_weight > 0)
    if len(had):
        w = to_device(np.ascontiguousarray(old_weight[had], np.int64), dev).to(acc).view(shape)
        total.index_add_(0, to_device(had.astype(np.int64), dev), old.to(dev, acc) * w)
    norm = np.bincount(into, weights=row_weight, minlength=groups) + old_weight
    total /= to_device(norm.astype(np.int64), dev).to(acc).view(shape)
    return total.to(rows.dtype)


class DenseRows:
    """Per-example rows ``[capacity * V, *shape]``: slot s's row is row s."""

    def __init__(self, spec: Spec, device: torch.device) -> None:
        self.spec, self.device = spec, device
        self.rows = torch.empty((0, *spec.shape), dtype=spec.dtype, device=device)

    def grown(self, old: Tuple[int, int], new: Tuple[int, int]) -> torch.Tensor:
        """New storage for table shape ``new`` holding the rows of shape ``old`` (not yet in use)."""
        rows = row_storage((new[0] * new[1], *self.spec.shape), self.spec.dtype, self.device)
        if old[0]:
            rows.view(*new, *self.spec.shape)[:old[0], :old[1]] = self.rows.view(*old, *self.spec.shape)
        return rows

    def mean_into(self, slots: np.ndarray, into: np.ndarray, before: np.ndarray, rows: torch.Tensor, weight: np.ndarray) -> None:
        """Average ``rows`` (row r into ``slots[into[r]]``, weighed ``weight[r]``) with what the slots hold."""
        had = before > 0
        old = self.rows.index_select(0, to_device(slots[had], self.device)) if had.any() else None
        mean = weighted_mean(old, before, rows.to(self.device), weight, into, len(slots))
        self.rows.index_copy_(0, to_device(slots, self.device), mean)


class TokenRows:
    """Per-token rows in append-only chunks that are never copied, and the first row of each slot.

    Global row r lives in chunk k at ``r - bases[k]``; a full chunk is followed by one of a
    quarter of all rows so far, so unused space stays under a quarter of the result plus a
    batch, and host pages never written cost no memory.
    """

    def __init__(self, spec: Spec, device: torch.device) -> None:
        self.spec, self.device = spec, device
        self.chunks: List[torch.Tensor] = []
        self.bases: List[int] = []
        self.used = 0  # rows used in the last chunk
        self.rows = 0  # rows handed out in all chunks
        self.starts = np.zeros((0, 1), np.int64)  # [capacity, V]: each slot's first global row
        # lay_out's plan: slots in increasing order and their row offsets in chunk 0 ([E + 1]).
        self.plan: Optional[Tuple[np.ndarray, np.ndarray]] = None

    def grown(self, old: Tuple[int, int], new: Tuple[int, int]) -> np.ndarray:
        starts = np.zeros(new, np.int64)
        starts[:old[0], :old[1]] = self.starts
        return starts

    def room(self, n: int) -> None:
        """Make the last chunk one with room for ``n`` more rows (a new chunk if it has not)."""
        if not self.chunks or self.used + n > self.chunks[-1].shape[0]:
            row_bytes = max(1, self.spec.dtype.itemsize * int(np.prod(self.spec.shape, dtype=np.int64)))
            size = max(n, self.rows // 4, MIN_CHUNK_BYTES // row_bytes)
            chunk = row_storage((size, *self.spec.shape), self.spec.dtype, self.device)
            self.bases.append(self.bases[-1] + self.chunks[-1].shape[0] if self.chunks else 0)
            self.chunks.append(chunk)
            self.used = 0

    def reserve(self, n: int) -> Tuple[torch.Tensor, int, int]:
        """Room for ``n`` consecutive rows: (chunk, first local row, global row of the chunk's row 0)."""
        self.room(n)
        start = self.used
        self.used += n
        self.rows += n
        return self.chunks[-1], start, self.bases[-1]

    def unreserve(self, n: int) -> None:
        """Give back the last ``n`` rows reserved (a write into them failed)."""
        self.used -= n
        self.rows -= n

    def append(self, rows: torch.Tensor) -> int:
        """Copy ``rows`` to fresh rows; returns the global row of the first."""
        chunk, start, base = self.reserve(rows.shape[0])
        chunk[start:start + rows.shape[0]].copy_(rows)
        return base + start

    def lay_out(self, slots: np.ndarray, lengths: np.ndarray) -> None:
        """Plan one chunk of exactly these slots' rows, in slot order (the order a result lists
        them), for :meth:`place` to fill in any order: a store read back from shards then holds
        each per-token column as a result takes it, with no copy and no spare rows.
        ``slots`` distinct, increasing; only for a TokenRows that holds no rows yet."""
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        total = int(offsets[-1])
        chunk = row_storage((total, *self.spec.shape), self.spec.dtype, self.device)
        self.chunks, self.bases, self.used, self.rows = [chunk], [0], total, total
        self.plan = (slots, offsets)

    def place(self, slots: np.ndarray, rows: torch.Tensor, lengths: np.ndarray) -> np.ndarray:
        """Copy jagged ``rows`` (entry e: ``lengths[e]`` rows, for ``slots[e]``) to the rows the plan
        gave those slots, or to fresh rows where it gave them none or other lengths (shards that
        changed since they were planned from); returns each entry's first global row."""
        if self.plan is not None and len(slots) and len(self.plan[0]):
            planned, offsets = self.plan
            at = np.minimum(np.searchsorted(planned, slots), len(planned) - 1)
            if np.array_equal(planned[at], slots) and np.array_equal(offsets[at + 1] - offsets[at], lengths):
                starts = offsets[at]
                where = to_device(row_positions(starts, lengths), self.device)
                self.chunks[0].index_copy_(0, where, rows)
                return starts
        return self.append(rows) + exclusive_cumsum(lengths)

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        if not self.chunks or not len(starts):
            return torch.empty((int(lengths.sum()) if len(lengths) else 0, *self.spec.shape), dtype=self.spec.dtype, device=self.device)
        return gather_rows(self.chunks, np.asarray(self.bases, np.int64), starts, lengths)

    def column(self, starts: np.ndarray, lengths: np.ndarray) -> Jagged:
        chunks = self.chunks or [torch.empty((0, *self.spec.shape), dtype=self.spec.dtype, device=self.device)]
        bases = np.asarray(self.bases, np.int64) if self.chunks else np.zeros(1, np.int64)
        return Jagged(list(chunks), bases, starts, lengths)

    def mean_into(self, slots: np.ndarray, slot_lengths: np.ndarray, into: np.ndarray, before: np.ndarray,
                  rows: torch.Tensor, lengths: np.ndarray, weight: np.ndarray) -> None:
        """Average jagged ``rows`` (entry r, ``lengths[r]`` rows, into ``slots[into[r]]``) with what the
        slots hold; the means go to fresh rows (chunks stay append-only, the old rows are dropped)."""
        flat = self.starts.reshape(-1)
        offsets = exclusive_cumsum(slot_lengths)
        had = before > 0
        old = self.gather(flat[slots[had]], slot_lengths[had]) if had.any() else None
        mean = weighted_mean(old, np.repeat(before, slot_lengths), rows.to(self.device), np.repeat(weight, lengths),
                             row_positions(offsets[into], lengths), int(slot_lengths.sum()))
        flat[slots] = self.append(mean) + offsets


# --------------------------------------------------------------------------------------------
# Staging of GPU outputs
# --------------------------------------------------------------------------------------------

class Staging:
    """Writes that wait for a copy from a GPU to land in pinned host memory, in order."""

    def __init__(self) -> None:
        self.pending: collections.deque = collections.deque()

    def __bool__(self) -> bool:
        return bool(self.pending)

    @staticmethod
    def pinned_copy(src: torch.Tensor):
        """Start copying ``src`` from its GPU to pinned host memory: (host tensor, CUDA event of arrival)."""
        staged = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        staged.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(src.device))
        return staged, event

    def defer(self, event, work: Callable[[], None]) -> None:
        """Queue ``work`` until ``event`` fires; with too many copies in flight, wait for the oldest."""
        self.pending.append((event, work))
        if len(self.pending) > MAX_PENDING:
            oldest, oldest_work = self.pending.popleft()
            oldest.synchronize()
            oldest_work()

    def drain(self, wait: bool) -> None:
        """Write every pending copy that has landed (all of them, waiting, if ``wait``)."""
        while self.pending:
            event, work = self.pending[0]
            if wait:
                event.synchronize()
            elif not event.query():
                return
            self.pending.popleft()
            work()


def combine_views(values: torch.Tensor, present: torch.Tensor, how: str) -> torch.Tensor:
    """``values [N, V, ...]`` with ``present [N, V]`` to ``[N, ...]``: mean of floats, else majority vote.

    The vote takes, per element, the value most present views agree on, ties to the smallest.
    """
    mask = present.reshape(present.shape + (1,) * (values.dim() - 2))
    if how == "mean" and values.is_floating_point():
        acc = acc_dtype(values.dtype)
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
# The store
# --------------------------------------------------------------------------------------------

class Output(NamedTuple):
    """One checked output of a batch: ``rows`` is ``[B, T, ...]`` padded (``jagged`` False) or
    ``[total, ...]`` in batch order (``jagged`` True) per token, ``[B, ...]`` per example."""

    tensor: torch.Tensor
    per_token: bool
    jagged: bool = False


class Store:
    """Slots, rows and staging for one Recorder's outputs (set by :meth:`setup` or the first record)."""

    def __init__(self, num_items: Optional[int], device: torch.device, on_duplicate: str, views: str) -> None:
        self.device = device
        self.views = views
        self.table = SlotTable(num_items, on_duplicate)
        self.specs: Optional[Dict[str, Spec]] = None
        self.single = False
        self.dense: Dict[str, DenseRows] = {}
        self.tokens: Dict[str, TokenRows] = {}
        self.staging = Staging()
        self.on_host = device.type == "cpu"
        self.shared = False  # the dense rows are also held by a returned result
        self.records = 0  # every record taken in, repeats included
        self.version = 0  # bumped whenever storage is replaced: the compiled fast path rebuilds its view
        self._ones: Dict[int, torch.Tensor] = {}

    @property
    def num_items(self) -> Optional[int]:
        return self.table.num_items

    @property
    def on_duplicate(self) -> str:
        return self.table.on_duplicate

    def set_on_duplicate(self, policy: str) -> None:
        """Change the duplicate policy (counts widen or narrow with it); checked before anything changes."""
        if policy == "mean" and self.specs is not None:
            bad = [n for n, s in self.specs.items() if not s.dtype.is_floating_point]
            if bad:
                raise TypeError(f"Recorder: on_duplicate='mean' averages floating-point outputs, got {bad[0]!r} of dtype {self.specs[bad[0]].dtype}")
        dtype = SlotTable.count_dtype(policy)
        if dtype != self.table.count.dtype:
            self.staging.drain(wait=True)
            count = self.table.count
            count = (np.minimum(count, np.iinfo(dtype).max) if np.iinfo(dtype).max < np.iinfo(count.dtype).max else count).astype(dtype)
            self.table.count, self.table.flat = count, count.reshape(-1)
            self.version += 1
        self.table.on_duplicate = policy

    # ---------------------------------------------------------------------------- outputs

    def describe(self) -> str:
        return "; ".join(f"{n}: {s.describe()}" for n, s in (self.specs or {}).items())

    def setup(self, specs: Dict[str, Spec], single: bool, owner: str) -> None:
        """Fix the outputs (as a first record does), or check that they are these."""
        if self.specs is not None:
            if list(self.specs) != list(specs) or any(self.specs[n] != s for n, s in specs.items()):
                got = "; ".join(f"{n}: {s.describe()}" for n, s in specs.items())
                raise ValueError(f"{owner}: the outputs must be the Recorder's {{{self.describe()}}}, got {{{got}}}")
            return
        dense = {n: DenseRows(s, self.device) for n, s in specs.items() if not s.per_token}
        tokens = {n: TokenRows(s, self.device) for n, s in specs.items() if s.per_token}
        shape = self.table.shape
        for rows in dense.values():
            rows.rows = rows.grown((0, 0), shape) if shape[0] else rows.rows
        for rows in tokens.values():
            rows.starts = np.zeros(shape, np.int64)
        self.specs, self.single, self.dense, self.tokens = specs, single, dense, tokens
        self.version += 1

    def forget_outputs(self) -> None:
        """Undo :meth:`setup` (a first record that failed): the outputs are not fixed after all."""
        self.specs, self.single, self.dense, self.tokens = None, False, {}, {}
        self.version += 1

    def ensure(self, top: int, vmax: int) -> None:
        """Room for index ``top`` and view ``vmax``: every new array is made before any replaces the old."""
        new = self.table.new_shape(top, vmax)
        if new is None:
            return
        self.staging.drain(wait=True)
        old = self.table.shape
        dense = {n: r.grown(old, new) for n, r in self.dense.items()}
        starts = {n: r.grown(old, new) for n, r in self.tokens.items()}
        self.table.grow(new)
        for n, rows in dense.items():
            self.dense[n].rows = rows
        for n, s in starts.items():
            self.tokens[n].starts = s
        self.shared = False
        self.version += 1

    def unshare(self) -> None:
        if self.shared:
            self.staging.drain(wait=True)
            for rows in self.dense.values():
                rows.rows = rows.rows.clone()
            self.shared = False
            self.version += 1

    def drop_rows(self) -> None:
        """Fresh row storage (after a shard holds the rows): pages never written again cost no memory."""
        for rows in self.dense.values():
            rows.rows = host_empty(tuple(rows.rows.shape), rows.rows.dtype, rows.rows.device)  # no huge pages: sparse writes
        for name, rows in self.tokens.items():
            fresh = TokenRows(rows.spec, self.device)
            fresh.starts = rows.starts
            self.tokens[name] = fresh
        self.shared = False
        self.version += 1

    def empty_like(self) -> "Store":
        """A store with these settings and outputs and storage of this size, nothing recorded."""
        fresh = Store(self.num_items, self.device, self.on_duplicate, self.views)
        if self.specs is not None:
            fresh.setup(self.specs, self.single, "Recorder")
            cap, vcap = self.table.shape
            if cap:
                fresh.ensure(cap - 1, vcap - 1)
        return fresh

    # ---------------------------------------------------------------------------- record

    def record(self, index: np.ndarray, index_t: Optional[torch.Tensor], views: Optional[np.ndarray],
               lengths: Optional[np.ndarray], left: bool, outputs: Dict[str, Output], claim: Claim) -> None:
        """Write a checked batch (``claim`` from :meth:`SlotTable.claim`): rows first, bookkeeping last.

        Nothing is written to the slot table until every row has been written or staged, so an
        error in a copy leaves the slots as they were (a per-token reservation is given back).
        """
        if not len(index):
            return
        self.ensure(claim.top, claim.vmax)
        self.unshare()
        slots = self.table.slots(index, views)
        if self.table.shape[1] != 1:
            index_t = None
        if claim.merge:
            self._record_mean(slots, lengths, left, outputs, claim.prev)
            self.records += len(index)
            return
        keep = claim.keep
        kept = slots if keep is None else slots[keep]
        starts: Dict[str, np.ndarray] = {}
        for name, out in outputs.items():
            if out.per_token:
                starts[name] = self._write_tokens(name, out, slots, keep, lengths, left)
            else:
                self._write_examples(name, out.tensor, slots, index_t, keep)
        self.table.flat[kept] = 1
        if lengths is not None:
            self.table.token_len.reshape(-1)[kept] = lengths if keep is None else lengths[keep]
        for name, s in starts.items():
            self.tokens[name].starts.reshape(-1)[kept] = s
        self.records += len(index)

    def _ones_of(self, size: int) -> torch.Tensor:
        ones = self._ones.get(size)
        if ones is None:
            ones = self._ones[size] = torch.ones(size, dtype=torch.int64, device=self.device)
        return ones

    def needs_staging(self, src: torch.Tensor) -> bool:
        """Outputs on a GPU with storage on the host go through pinned buffers, written once landed."""
        return src.is_cuda and self.on_host

    def _deliver(self, src: torch.Tensor, work) -> None:
        """``work(src on the storage device)``: now, or once its copy from a GPU has landed."""
        if self.needs_staging(src):
            staged, event = Staging.pinned_copy(src)
            self.staging.defer(event, lambda: work(staged))
        else:
            work(src if (src.is_cpu and self.on_host) or src.device == self.device else src.to(self.device, non_blocking=True))

    def _write_examples(self, name: str, src: torch.Tensor, slots: np.ndarray, slots_t, keep) -> None:
        """Rows of a per-example output to their slots: items of length 1 (0 for rows not kept)."""
        dst = self.dense[name].rows
        lengths = self._ones_of(len(slots)) if keep is None else to_device(keep.astype(np.int64), self.device)
        if slots_t is None or not self.on_host or src.is_cuda:
            # A private copy: the caller may refill its index tensor before a deferred write runs.
            slots_t = to_device(slots.copy(), self.device)
        self._deliver(src, lambda rows: ops.unpad_scatter_(dst, rows.unsqueeze(1), lengths, slots_t))

    def _write_tokens(self, name: str, out: Output, slots, keep, lengths, left: bool) -> np.ndarray:
        """Real rows of a per-token output to fresh rows of its chunks, in batch order; returns the
        kept slots' first global rows."""
        written = lengths if keep is None else np.where(keep, lengths, 0)
        ends = np.cumsum(written)
        total = int(ends[-1])
        store = self.tokens[name]
        chunk, start, base = store.reserve(total)
        local = ends - written + start
        try:
            src = out.tensor
            if out.jagged:
                if keep is not None:
                    pick = row_positions(exclusive_cumsum(lengths)[keep], lengths[keep])
                    src = src.index_select(0, to_device(pick, src.device))
                self._deliver(src, lambda rows: chunk[start:start + total].copy_(rows))
            elif self.needs_staging(src):
                # Unpad on the GPU so that only real rows cross to the host.
                rows = ops.unpad(src, to_device(np.concatenate(([0], ends)), src.device), total, left)
                self._deliver(rows, lambda landed: chunk[start:start + total].copy_(landed))
            else:
                lengths_t, local_t = to_device(written, self.device), to_device(local, self.device)
                self._deliver(src, lambda padded: ops.unpad_scatter_(chunk, padded, lengths_t, local_t, left))
        except BaseException:
            store.unreserve(total)
            raise
        return base + (local if keep is None else local[keep])

    def _record_mean(self, slots, lengths, left, outputs: Dict[str, Output], prev) -> None:
        """Average this batch's rows into their slots (repeats within the batch included)."""
        unique, first, inverse = np.unique(slots, return_index=True, return_inverse=True)
        before = prev[first].astype(np.int64)
        ones = np.ones(len(slots), np.int64)
        works = []
        for name, out in outputs.items():
            src = out.tensor
            if out.per_token:
                if not out.jagged:
                    offsets = np.concatenate(([0], np.cumsum(lengths)))
                    src = ops.unpad(src, to_device(offsets, src.device), int(offsets[-1]), left)
                store = self.tokens[name]
                works.append((src, lambda rows, store=store: store.mean_into(unique, lengths[first], inverse, before, rows, lengths, ones)))
            else:
                rows = self.dense[name]
                works.append((src, lambda src_rows, rows=rows: rows.mean_into(unique, inverse, before, src_rows, ones)))
        for src, work in works:
            self._deliver(src, work)
        self.table.flat[unique] = before + np.bincount(inverse, minlength=len(unique))
        if lengths is not None:
            self.table.token_len.reshape(-1)[unique] = lengths[first]

    # ---------------------------------------------------------------------------- blocks

    def extract(self, flat: Optional[np.ndarray] = None) -> SlotBlock:
        """The slots ``flat`` (sorted; default: every recorded slot) as a block, in slot order.

        Waits for outputs still being copied from a GPU. Per-example rows are the store's own,
        not a copy, when every slot is taken.
        """
        self.staging.drain(wait=True)
        cap, vcap = self.table.shape
        if flat is None:
            flat = np.flatnonzero(self.table.flat)
        index, view = (flat, None) if vcap == 1 else (flat // vcap, flat % vcap)
        count = self.table.flat[flat].astype(np.int64) if self.on_duplicate == "mean" else None
        lengths = self.table.token_len.reshape(-1)[flat] if self.tokens else None
        everything = len(flat) == cap * vcap
        flat_t = None if everything else to_device(flat, self.device)
        columns: Dict[str, torch.Tensor] = {}
        for name, spec in self.specs.items():
            if spec.per_token:
                columns[name] = self.tokens[name].gather(self.tokens[name].starts.reshape(-1)[flat], lengths)
            else:
                rows = self.dense[name].rows
                columns[name] = rows if everything else torch.index_select(
                    rows, 0, flat_t, out=host_empty((len(flat), *rows.shape[1:]), rows.dtype, rows.device))
        return SlotBlock(index, view, count, lengths, columns)

    def lay_out(self, slots: np.ndarray, lengths: np.ndarray) -> bool:
        """Plan every per-token column of a store that holds no rows yet for exactly these slots
        (see :meth:`TokenRows.lay_out`), if no slot repeats in ``slots`` (``lengths``: their
        token lengths); False, planning nothing, if one does or there is nothing to plan."""
        if not self.tokens or any(rows.chunks for rows in self.tokens.values()) or not len(slots):
            return False
        order = np.argsort(slots, kind="stable")
        slots, lengths = slots[order], lengths[order]
        if np.any(slots[1:] == slots[:-1]):
            return False
        for rows in self.tokens.values():
            rows.lay_out(slots, lengths)
        return True

    def absorb(self, block: SlotBlock, source: str, repeat_hint: str = "") -> None:
        """Merge ``block`` under ``on_duplicate``, as a batch added now would be; ``source`` names it in errors.

        Raises ValueError, changing nothing, for an index outside ``range(num_items)``, a repeated
        slot under ``"error"``, or averaged per-token slots of different lengths.
        """
        claim = self.table.claim(block.index, block.view, block.lengths, block.lengths is not None, False, source, repeat_hint)
        records = len(block) if block.records is None else block.records
        if not len(block):
            self.records += records
            return
        self.ensure(claim.top, claim.vmax)
        self.unshare()
        slots = self.table.slots(block.index, block.view)
        self.records += records
        if claim.merge:
            self._absorb_mean(block, slots, claim.prev)
            return
        keep = claim.keep
        kept = slots if keep is None else slots[keep]
        lengths = block.lengths if keep is None or block.lengths is None else block.lengths[keep]
        if not len(kept):
            return
        kept_t = to_device(kept, self.device)
        keep_rows = None if keep is None else to_device(np.flatnonzero(keep), self.device)
        starts = {}
        for name, spec in self.specs.items():
            col = block.columns[name]
            if spec.per_token:
                if keep is not None:
                    offsets = exclusive_cumsum(block.lengths)
                    col = col.index_select(0, to_device(row_positions(offsets[keep], lengths), col.device))
                starts[name] = self.tokens[name].place(kept, col.to(self.device), lengths)
            else:
                rows = col if keep_rows is None else col.index_select(0, keep_rows.to(col.device))
                self.dense[name].rows.index_copy_(0, kept_t, rows.to(self.device))
        self.table.flat[kept] = 1
        if lengths is not None:
            self.table.token_len.reshape(-1)[kept] = lengths
        for name, s in starts.items():
            self.tokens[name].starts.reshape(-1)[kept] = s

    def _absorb_mean(self, block: SlotBlock, slots: np.ndarray, prev: np.ndarray) -> None:
        unique, first, inverse = np.unique(slots, return_index=True, return_inverse=True)
        weight = np.ones(len(slots), np.int64) if block.count is None else block.count
        before = prev[first].astype(np.int64)
        lengths = block.lengths
        for name, spec in self.specs.items():
            col = block.columns[name]
            if spec.per_token:
                self.tokens[name].mean_into(unique, lengths[first], inverse, before, col, lengths, weight)
            else:
                self.dense[name].mean_into(unique, inverse, before, col, weight)
        self.table.flat[unique] = before + np.bincount(inverse, weights=weight, minlength=len(unique)).astype(np.int64)
        if lengths is not None:
            self.table.token_len.reshape(-1)[unique] = lengths[first]

    # ---------------------------------------------------------------------------- result

    def columns(self, owner: str, ranks: int = 1, shards: int = 0) -> ColumnTable:
        """Everything recorded, views combined as ``views`` says, as a finished table.

        Copies nothing when every slot was recorded once and views are kept as they are; the
        dense rows are then shared with the table (and copied before they are next written).
        """
        self.staging.drain(wait=True)
        count = self.table.flat
        cap, vcap = self.table.shape
        slots = int(np.count_nonzero(count))
        incomplete = 0
        if vcap > 1:
            present = self.table.count > 0
            views_present = present.sum(1)
            incomplete = int(np.count_nonzero((views_present > 0) & (views_present < vcap)))
        common = dict(num_items=self.num_items, records=self.records, slots=slots, incomplete=incomplete,
                      ranks=ranks, shards=shards, views=vcap, on_duplicate=self.on_duplicate)
        if self.specs is None:
            return ColumnTable(np.zeros(0, np.int64), None, {}, False, stacked_views=None, size=0, **common)
        self.table.check_view_lengths(owner, self.views)
        columns: Dict[str, Any] = {}
        if vcap == 1 or self.views == "none":
            everything = slots == cap * vcap
            # Every item recorded once, views combined: the entries are range(cap), left implicit
            # (an index array would add 8 bytes per item to a result of maybe 40).
            implicit = everything and self.views != "none"
            flat = None if implicit else np.flatnonzero(count)
            lengths = self.table.token_len.reshape(-1)
            for name, spec in self.specs.items():
                if spec.per_token:
                    starts = self.tokens[name].starts.reshape(-1)
                    s, ln = (starts.copy(), lengths.copy()) if implicit else (starts[flat], lengths[flat])
                    columns[name] = self.tokens[name].column(s, ln)
                else:
                    rows = self.dense[name].rows
                    columns[name] = rows if everything else rows.index_select(0, to_device(flat, self.device))
            self.shared = self.shared or everything
            if implicit:
                return ColumnTable(None, None, columns, self.single, stacked_views=None, size=cap, **common)
            view = flat % vcap if self.views == "none" else None
            return ColumnTable(flat // vcap, view, columns, self.single, stacked_views=None, size=len(flat), **common)

        items = np.flatnonzero(present.any(1))
        mask = present[items]
        if self.views == "stack" and not mask.all():
            r = int(np.flatnonzero(~mask.all(1))[0])
            raise ValueError(f"{owner}: views='stack' needs all {vcap} views of every recorded item; "
                             f"item {items[r]} has views {np.flatnonzero(mask[r]).tolist()}")
        items_t = to_device(items, self.device)
        mask_t = to_device(mask, self.device)
        for name, spec in self.specs.items():
            if spec.per_token:
                # Views of an item share one length (checked): rows [total, V, ...].
                lengths = np.where(mask, self.table.token_len[items], 0).max(1)
                offsets = exclusive_cumsum(lengths)
                rows = torch.empty((int(lengths.sum()), vcap, *spec.shape), dtype=spec.dtype, device=self.device)
                starts = self.tokens[name].starts[items]
                for v in range(vcap):
                    has = mask[:, v]
                    part = self.tokens[name].gather(starts[has, v], lengths[has])
                    if has.all():
                        rows[:, v] = part
                    else:
                        where = to_device(row_positions(offsets[has], lengths[has]), self.device)
                        rows[:, v].index_copy_(0, where, part)
                if self.views != "stack":
                    token_mask = torch.repeat_interleave(mask_t, to_device(lengths, self.device), dim=0)
                    rows = combine_views(rows, token_mask, self.views)
                columns[name] = Jagged([rows], np.zeros(1, np.int64), offsets, lengths)
            else:
                values = self.dense[name].rows.view(cap, vcap, *spec.shape).index_select(0, items_t)
                columns[name] = values if self.views == "stack" else combine_views(values, mask_t, self.views)
        return ColumnTable(items, None, columns, self.single, stacked_views=vcap if self.views == "stack" else None,
                           size=len(items), **common)


# --------------------------------------------------------------------------------------------
# The compiled fast path
# --------------------------------------------------------------------------------------------

class FastPath:
    """``record_rows`` of csrc/record.cpp over a Store's host arrays: one compiled pass that checks,
    claims and copies a plain batch, with the GIL released when it copies 64 KiB or more or is
    the first pass of its targets (fresh storage: page faults); a smaller pass keeps it, since
    released it could wait a switch interval to come back.

    It takes CPU tensors shaped as the first record fixed them, one view, no repeats, storage
    big enough and no reduction; for anything else :meth:`record` returns False having changed
    nothing, and the general path does the work or raises the error.

    ``plain_rows(index, output, targets)`` (``record_plain``) is the same pass for the seed
    article's call, which ``Recorder.add`` makes directly: a plain index and one per-example
    tensor, when ``plain`` holds, ``version`` is the store's and the store is neither shared nor
    staging. It returns the batch size, or -1 having changed nothing; the caller counts the records.
    """

    def __init__(self, store: Store, record_rows, targets_type, record_plain) -> None:
        self.store, self.record_rows, self.Targets, self.plain_rows = store, record_rows, targets_type, record_plain
        self.version = -1
        self.names: Tuple[str, ...] = ()
        self.token_names: frozenset = frozenset()
        self.targets = None
        self.plain = False  # the outputs are one per-example tensor (and the plan is current)

    def plan(self) -> Tuple[Tuple[str, ...], frozenset]:
        """(the output names, the per-token ones), for a store whose outputs are fixed."""
        store = self.store
        if self.version != store.version:
            self.names = tuple(store.specs)
            self.token_names = frozenset(n for n, s in store.specs.items() if s.per_token)
            self.targets = self.Targets([store.dense[n].rows if n in store.dense else store.tokens[n].starts for n in self.names],
                                        store.table.count, store.table.token_len)
            self.version = store.version
            self.plain = self.names == (SINGLE,) and not self.token_names
        return self.names, self.token_names

    def record(self, index, views: Optional[torch.Tensor], lengths: Optional[torch.Tensor], left: bool,
               sources: List[torch.Tensor]) -> bool:
        """One pass over a batch (``index`` an int64 CPU tensor or numpy array); False: handed back, nothing changed."""
        store = self.store
        targets = self.targets
        chunks = [store.tokens[n] for n in self.token_names] if self.token_names else ()
        if chunks:
            targets.set_chunks([(c.chunks[-1] if c.chunks else None, c.used, c.bases[-1] if c.bases else 0) for c in
                                (store.tokens[n] for n in self.names if n in self.token_names)])
        outcome = self.record_rows(index, views, lengths, left, sources, targets)
        if outcome.needs_rows:  # a per-token output's last chunk is full: a new one, then the same pass again
            for c in chunks:
                c.room(outcome.needs_rows)
            targets.set_chunks([(c.chunks[-1], c.used, c.bases[-1]) for c in (store.tokens[n] for n in self.names if n in self.token_names)])
            outcome = self.record_rows(index, views, lengths, left, sources, targets)
        if not outcome.recorded:
            return False
        for c in chunks:
            c.reserve(outcome.rows)  # the rows the pass just wrote: bookkeeping only
        store.records += index.shape[0]
        return True

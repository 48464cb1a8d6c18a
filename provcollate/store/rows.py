"""Row stores: per-example rows scattered to their slots (:class:`DenseRows`), per-token rows in
append-only chunks (:class:`TokenRows`), the one mean of repeats (:func:`weighted_mean`) and the
combination of test-time views (:func:`combine_views`)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from .memory import acc_dtype, exclusive_cumsum, gather_rows, row_positions, row_storage, to_device
from .records import Jagged, Spec

__all__ = ["weighted_mean", "DenseRows", "TokenRows", "combine_views", "MIN_CHUNK_BYTES"]

MIN_CHUNK_BYTES = 1 << 20

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
        # [rows used in the last chunk, rows handed out in all chunks]: an array, so that the
        # compiled pass claims the rows it is about to write in the same place (csrc/record.cpp).
        self.cursor = np.zeros(2, np.int64)
        self.starts = np.zeros((0, 1), np.int64)  # [capacity, V]: each slot's first global row
        # lay_out's plan: slots in increasing order and their row offsets in chunk 0 ([E + 1]).
        self.plan: Optional[Tuple[np.ndarray, np.ndarray]] = None

    @property
    def used(self) -> int:
        """Rows used in the last chunk."""
        return int(self.cursor[0])

    @property
    def rows(self) -> int:
        """Rows handed out in all chunks."""
        return int(self.cursor[1])

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
            self.cursor[0] = 0

    def reserve(self, n: int) -> Tuple[torch.Tensor, int, int]:
        """Room for ``n`` consecutive rows: (chunk, first local row, global row of the chunk's row 0)."""
        self.room(n)
        start = self.used
        self.cursor += n
        return self.chunks[-1], start, self.bases[-1]

    def unreserve(self, n: int) -> None:
        """Give back the last ``n`` rows reserved (a write into them failed)."""
        self.cursor -= n

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
        self.chunks, self.bases = [chunk], [0]
        self.cursor[:] = total
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


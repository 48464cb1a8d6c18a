"""How a store writes rows: per-example rows scattered to their slots, per-token rows into reserved
rows of their chunks, averages of repeats, each now or, for outputs on a GPU with storage on the
host, once its copy to pinned memory has landed. :class:`RowWriter` is the part of
:class:`provcollate.store.Store` that does it; the store claims the slots and keeps the books."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .. import ops
from .memory import exclusive_cumsum, row_positions, to_device
from .records import Identity, Output
from .slots import Claim
from .staging import Staging

__all__ = ["RowWriter"]


class RowWriter:
    """Row writes of a :class:`provcollate.store.Store` (its ``device``, ``on_host``, ``staging``,
    ``dense``, ``tokens``, ``table`` and ``_ones``)."""

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
            self._storage_changed()  # a compiled pass must not write before the staged rows land
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
        """Real rows of a per-token output to rows of its chunks, in batch order; returns the kept
        slots' first global rows. Rows are reserved before they are written."""
        store = self.tokens[name]
        src = out.tensor
        if out.jagged and keep is not None:
            src = src.index_select(0, to_device(row_positions(exclusive_cumsum(lengths)[keep], lengths[keep]), src.device))
        if out.jagged and store.plan is not None and not self.needs_staging(src):
            kept = slots if keep is None else slots[keep]
            return store.place(kept, src.to(self.device), lengths if keep is None else lengths[keep])
        written = lengths if keep is None else np.where(keep, lengths, 0)
        ends = np.cumsum(written)
        total = int(ends[-1])
        chunk, start, base = store.reserve(total)
        local = ends - written + start
        try:
            if out.jagged:
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

    def disagreement(self, ids: Identity, outputs: Dict[str, Output], claim: Claim):
        """(how many, the largest absolute difference) of the rows that repeat an input (same
        fingerprint, ``claim.same``) and differ from what they repeat: an earlier row of this
        block, or the row the store holds (its average so far under ``"mean"``); a slot held only
        in a shard is not read back, nor one that met another input (a conflict: what it holds is
        not this input's output). Read before the rows are written."""
        if claim.same is None or not claim.same.any():
            return 0, 0.0
        self.staging.drain(wait=True)  # the rows held must have landed
        rows = np.flatnonzero(claim.same)
        ref = claim.ref[rows]
        if (ref == -1).any():  # held rows: those in memory only
            held = ref == -1
            flat = self.table.slots(ids.index[rows], None if ids.views is None else ids.views[rows])
            in_memory = ~held | (self.table.flat[np.where(held, flat, 0)] > 0)
            rows, ref = rows[in_memory], ref[in_memory]
        flat = self.table.slots(ids.index[rows], None if ids.views is None else ids.views[rows])
        conflicted = set(self.table.conflicted)
        if claim.conflict is not None and claim.conflict.any():
            hit = np.flatnonzero(claim.conflict)
            conflicted.update(self.table.slots(ids.index[hit], None if ids.views is None else ids.views[hit]).tolist())
        if conflicted:
            clean = ~np.isin(flat, np.fromiter(conflicted, np.int64, len(conflicted)))
            rows, ref, flat = rows[clean], ref[clean], flat[clean]
        if not len(rows):
            return 0, 0.0
        lengths = ids.lengths
        starts = exclusive_cumsum(lengths) if lengths is not None else None
        worst = np.zeros(len(rows))
        gaps, where = [], []  # each row's largest difference, on the outputs' device: read back once
        for name, out in outputs.items():
            for r, (b, a) in enumerate(zip(rows.tolist(), ref.tolist())):
                mine = self._batch_row(out, b, lengths, starts, ids.left)
                if a >= 0:
                    theirs = self._batch_row(out, a, lengths, starts, ids.left)
                elif out.per_token:
                    store = self.tokens[name]
                    theirs = store.gather(store.starts.reshape(-1)[flat[r:r + 1]], self.table.token_len.reshape(-1)[flat[r:r + 1]])
                else:
                    theirs = self.dense[name].rows[int(flat[r])]
                if mine.shape != theirs.shape:
                    worst[r] = float("inf")
                elif mine.numel():
                    gaps.append((mine.double() - theirs.to(mine.device).double()).abs().max())
                    where.append(r)
        if gaps:
            device = gaps[0].device
            np.maximum.at(worst, where, torch.stack([g.to(device) for g in gaps]).cpu().numpy())
        differ = worst > 0
        return int(np.count_nonzero(differ)), float(worst.max()) if len(worst) else 0.0

    @staticmethod
    def _batch_row(out: Output, b: int, lengths, starts, left: bool) -> torch.Tensor:
        """Row ``b``'s output in a batch: its real rows when per token."""
        src = out.tensor
        if not out.per_token:
            return src[b]
        n = int(lengths[b])
        if out.jagged:
            return src[int(starts[b]):int(starts[b]) + n]
        begin = src.shape[1] - n if left else 0
        return src[b, begin:begin + n]

    def _take_mean(self, slots, ids: Identity, outputs: Dict[str, Output], prev, weight: Optional[np.ndarray]) -> None:
        """Average rows into their slots (repeats among them included), each weighed by ``weight``
        (the records it stands for; 1 each when None)."""
        unique, first, inverse = np.unique(slots, return_index=True, return_inverse=True)
        before = prev[first].astype(np.int64)
        weight = np.ones(len(slots), np.int64) if weight is None else weight
        lengths = ids.lengths
        works = []
        for name, out in outputs.items():
            src = out.tensor
            if out.per_token:
                if not out.jagged:
                    offsets = np.concatenate(([0], np.cumsum(lengths)))
                    src = ops.unpad(src, to_device(offsets, src.device), int(offsets[-1]), ids.left)
                rows = self.tokens[name]
                works.append((src, lambda r, rows=rows: rows.mean_into(unique, lengths[first], inverse, before, r, lengths, weight)))
            else:
                rows = self.dense[name]
                works.append((src, lambda r, rows=rows: rows.mean_into(unique, inverse, before, r, weight)))
        for src, work in works:
            self._deliver(src, work)
        added = np.bincount(inverse, weights=weight, minlength=len(unique)).astype(np.int64)
        per_token = any(o.per_token for o in outputs.values())
        self.table.mark(unique, lengths[first] if lengths is not None and per_token else None, count=before + added)

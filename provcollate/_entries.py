"""A Recorder's raw entries: what ``gather()`` sends, what shards hold, and how blocks of them merge.

An *entry* is one recorded ``(index, view)`` slot before the views of an example are combined:
how many records were averaged into it (``on_duplicate="mean"``), its per-token length, and
its row of every output (per token: ``length`` rows, the same for every per-token output).
:func:`extract` takes entries out of a Recorder's storage; :func:`absorb` merges a block of
them into a Recorder's storage under that Recorder's ``on_duplicate`` policy, so that
``Recorder.result()`` then combines views exactly as it does for recorded batches.

Blocks absorbed one after another behave like batches added in that order: ``"error"`` raises
on a slot seen twice, ``"first"`` keeps the earliest block's row, ``"last"`` the latest's, and
``"mean"`` weighs every entry by its count, so a mean of means is the mean of all records.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .record import Recorder, _Chunks, _Spec, _acc_dtype, _exclusive_cumsum, _first_last, _row_positions, _to_device

__all__ = ["Entries", "outputs_meta", "setup", "extract", "absorb", "check_view_lengths", "empty_like"]


class Entries:
    """A block of raw entries.

    ``index`` int64 ``[E]``; ``view`` int64 ``[E]`` or None (all 0); ``count`` int64 ``[E]`` or
    None (all 1); ``lengths`` int64 ``[E]`` per-token lengths, or None without per-token outputs;
    ``columns`` ``{name: [E, ...]}`` per example and ``{name: [sum(lengths), ...]}`` per token,
    rows in entry order.
    """

    __slots__ = ("index", "view", "count", "lengths", "columns")

    def __init__(self, index: np.ndarray, view: Optional[np.ndarray], count: Optional[np.ndarray],
                 lengths: Optional[np.ndarray], columns: Dict[str, torch.Tensor]) -> None:
        self.index, self.view, self.count, self.lengths, self.columns = index, view, count, lengths, columns

    def __len__(self) -> int:
        return len(self.index)


def outputs_meta(rec: Recorder) -> List[Dict[str, Any]]:
    """The outputs a Recorder has fixed, as plain data (name, per_token, dtype, shape), in order."""
    return [{"name": name, "per_token": s.per_token, "dtype": str(s.dtype).replace("torch.", ""), "shape": list(s.shape)}
            for name, s in rec._specs.items()]


def _specs(meta: List[Dict[str, Any]]) -> Dict[str, _Spec]:
    return {o["name"]: _Spec(bool(o["per_token"]), getattr(torch, o["dtype"]), tuple(o["shape"])) for o in meta}


def setup(rec: Recorder, meta: List[Dict[str, Any]], single: bool, owner: str) -> None:
    """Give ``rec`` the outputs described by ``meta`` (as its first ``add`` would), or check that it has them."""
    specs = _specs(meta)
    if rec._specs is None:
        rec._specs, rec._single = specs, single
        rec._chunks = {n: _Chunks(s.shape, s.dtype, rec.device) for n, s in specs.items() if s.per_token}
        rec._grow(0, 0)
    elif list(rec._specs) != list(specs) or any(rec._specs[n] != s for n, s in specs.items()):
        have = "; ".join(f"{n}: {s.describe()}" for n, s in rec._specs.items())
        got = "; ".join(f"{n}: {s.describe()}" for n, s in specs.items())
        raise ValueError(f"{owner}: the outputs must be the Recorder's {{{have}}}, got {{{got}}}")


def empty_like(rec: Recorder, owner: str) -> Recorder:
    """A fresh Recorder with ``rec``'s settings and outputs, storage sized like ``rec``'s, nothing recorded."""
    fresh = Recorder(num_items=rec.num_items, device=rec.device, on_duplicate=rec.on_duplicate, views=rec.views)
    if rec._specs is not None:
        setup(fresh, outputs_meta(rec), rec._single, owner)
        cap, vcap = rec._count.shape
        if cap:
            fresh._grow(cap - 1, vcap - 1)
    return fresh


def extract(rec: Recorder, flat: Optional[np.ndarray] = None) -> Entries:
    """The entries of ``rec`` at slots ``flat`` (sorted; default: every recorded slot), in slot order.

    Waits for outputs still being copied from a GPU. Per-example rows are ``rec``'s own storage,
    not a copy, when every slot is taken.
    """
    rec._drain(wait=True)
    cap, vcap = rec._count.shape
    if flat is None:
        flat = np.flatnonzero(rec._count_flat)
    index, view = (flat, None) if vcap == 1 else (flat // vcap, flat % vcap)
    count = rec._count_flat[flat].astype(np.int64) if rec.on_duplicate == "mean" else None
    per_token = any(s.per_token for s in rec._specs.values())
    lengths = rec._token_len.reshape(-1)[flat] if per_token else None
    everything = len(flat) == cap * vcap
    flat_t = None if everything else _to_device(flat, rec.device)
    columns: Dict[str, torch.Tensor] = {}
    for name, spec in rec._specs.items():
        if spec.per_token:
            store = rec._chunks[name]
            if store.chunks and len(flat):
                columns[name] = store.gather(rec._starts[name].reshape(-1)[flat], lengths)
            else:
                columns[name] = torch.empty((0, *spec.shape), dtype=spec.dtype, device=rec.device)
        else:
            dense = rec._dense[name]
            columns[name] = dense if everything else dense.index_select(0, flat_t)
    return Entries(index, view, count, lengths, columns)


def _describe(index: int, view: Optional[np.ndarray], b: int) -> str:
    return f"item {index}" + ("" if view is None or not view[b] else f" view {view[b]}")


def absorb(rec: Recorder, block: Entries, source: str) -> None:
    """Merge ``block`` into ``rec``'s storage under ``rec.on_duplicate``; ``source`` names the block in errors.

    ``rec`` must already have the block's outputs (:func:`setup`). Raises ValueError, with
    ``rec`` unchanged, for an index outside ``range(num_items)``, a repeated slot under
    ``"error"``, or averaged per-token entries of different lengths.
    """
    n = len(block)
    if not n:
        return
    top = int(block.index.max())
    vmax = 0 if block.view is None else int(block.view.max())
    if block.index.min() < 0 or (rec.num_items is not None and top >= rec.num_items):
        raise ValueError(f"{source}: indices must lie in range(num_items) = range({rec.num_items}), "
                         f"got {int(block.index.min()) if block.index.min() < 0 else top}")
    cap, vcap = rec._count.shape
    if top >= cap or vmax >= vcap:
        rec._grow(top, vmax)
        cap, vcap = rec._count.shape
    slots = block.index if vcap == 1 else block.index * vcap + (0 if block.view is None else block.view)
    prev = rec._count_flat[slots]
    policy = rec.on_duplicate
    if policy == "mean":
        _absorb_mean(rec, block, slots, prev, source)
        return
    # Blocks from a Recorder or a shard come in slot order, each slot once: no sort needed.
    repeats = n > 1 and not (slots[1:] > slots[:-1]).all()
    first, last = _first_last(slots) if repeats else (None, None)
    if policy == "error":
        again = prev > 0
        if repeats:
            again |= ~first
        if again.any():
            b = int(np.flatnonzero(again)[0])
            raise ValueError(f"{source}: {_describe(int(block.index[b]), block.view, b)} is recorded more than once "
                             f"(on_duplicate='error'); pass on_duplicate='first', 'last' or 'mean' to keep one")
        keep = None
    elif policy == "first":
        keep = prev == 0
        if repeats:
            keep &= first
    else:
        keep = last
    if keep is not None and keep.all():
        keep = None
    if rec._shared:
        rec._unshare()
    kept = slots if keep is None else slots[keep]
    rec._count_flat[kept] = 1
    lengths = block.lengths if keep is None or block.lengths is None else block.lengths[keep]
    if lengths is not None:
        rec._token_len.reshape(-1)[kept] = lengths
    if not len(kept):
        return
    kept_t = _to_device(kept, rec.device)
    keep_rows = None if keep is None else _to_device(np.flatnonzero(keep), rec.device)
    for name, spec in rec._specs.items():
        col = block.columns[name]
        if spec.per_token:
            if keep is not None:
                offsets = _exclusive_cumsum(block.lengths)
                col = col.index_select(0, _to_device(_row_positions(offsets[keep], lengths), col.device))
            start = rec._chunks[name].append(col.to(rec.device))
            rec._starts[name].reshape(-1)[kept] = start + _exclusive_cumsum(lengths)
        else:
            rows = col if keep_rows is None else col.index_select(0, keep_rows.to(col.device))
            rec._dense[name].index_copy_(0, kept_t, rows.to(rec.device))


def _absorb_mean(rec: Recorder, block: Entries, slots: np.ndarray, prev: np.ndarray, source: str) -> None:
    """Weighted means: every slot's value becomes (sum of count * value) / (sum of counts), old value included."""
    unique, first, inverse = np.unique(slots, return_index=True, return_inverse=True)
    weight = np.ones(len(slots), np.int64) if block.count is None else block.count
    added = np.bincount(inverse, weights=weight, minlength=len(unique)).astype(np.int64)
    before = prev[first].astype(np.int64)
    lengths = block.lengths
    if lengths is not None:
        unique_lens = lengths[first]
        token_len = rec._token_len.reshape(-1)
        bad = np.flatnonzero((lengths != unique_lens[inverse]) | ((prev > 0) & (token_len[slots] != lengths)))
        if len(bad):
            b = int(bad[0])
            raise ValueError(f"{source}: {_describe(int(block.index[b]), block.view, b)} has length {lengths[b]} here and "
                             f"another length elsewhere; repeats must have one length to be averaged (on_duplicate='mean')")
    if rec._shared:
        rec._unshare()
    rec._count_flat[unique] = before + added
    if lengths is not None:
        token_len[unique] = unique_lens
    dev = rec.device
    for name, spec in rec._specs.items():
        col = block.columns[name].to(dev)
        acc = _acc_dtype(spec.dtype)
        shape = (-1,) + (1,) * len(spec.shape)
        if spec.per_token:
            store, starts = rec._chunks[name], rec._starts[name].reshape(-1)
            acc_offsets = _exclusive_cumsum(unique_lens)
            total = torch.zeros((int(unique_lens.sum()), *spec.shape), dtype=acc, device=dev)
            row_weight = _to_device(np.repeat(weight, lengths), dev).to(acc).view(shape)
            total.index_add_(0, _to_device(_row_positions(acc_offsets[inverse], lengths), dev), col.to(acc) * row_weight)
            had = before > 0
            if had.any():
                old = store.gather(starts[unique[had]], unique_lens[had]).to(acc)
                old_weight = _to_device(np.repeat(before[had], unique_lens[had]), dev).to(acc).view(shape)
                total.index_add_(0, _to_device(_row_positions(acc_offsets[had], unique_lens[had]), dev), old * old_weight)
            total /= _to_device(np.repeat(before + added, unique_lens), dev).to(acc).view(shape)
            # Fresh rows for the means: chunks stay append-only.
            starts[unique] = store.append(total.to(spec.dtype)) + acc_offsets
        else:
            dst = rec._dense[name]
            u = _to_device(unique, dev)
            total = torch.zeros((len(unique), *spec.shape), dtype=acc, device=dev)
            total.index_add_(0, _to_device(inverse, dev), col.to(acc) * _to_device(weight, dev).to(acc).view(shape))
            old_n = _to_device(before, dev).to(acc).view(shape)
            total += torch.where(old_n > 0, dst.index_select(0, u).to(acc) * old_n, 0)
            total /= _to_device(before + added, dev).to(acc).view(shape)
            dst.index_copy_(0, u, total.to(spec.dtype))


def check_view_lengths(rec: Recorder, owner: str) -> None:
    """Raise ValueError if ``rec`` would combine views of one item that differ in per-token length."""
    if rec._specs is None or rec.views == "none" or not any(s.per_token for s in rec._specs.values()):
        return
    if rec._count.shape[1] == 1:
        return
    present = rec._count > 0
    token_len = rec._token_len
    low = np.where(present, token_len, np.iinfo(np.int64).max).min(1)
    high = np.where(present, token_len, -1).max(1)
    bad = np.flatnonzero(present.any(1) & (low != high))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{owner}: item {i} has views of lengths {sorted(set(token_len[i][present[i]].tolist()))}; "
                         f"its views must have one length to be combined (views={rec.views!r}), or use views='none'")

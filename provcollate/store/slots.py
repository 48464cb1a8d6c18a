"""The slot table: host bookkeeping of every slot ``index * V + view`` (how many records it
holds, its per-token length, whether a shard holds it), and :meth:`SlotTable.claim`, the one
place where the duplicate policy is applied, to a batch, a shard, a rank or a resumed index."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np

from .._keys import decode_id
from .memory import first_last

__all__ = ["Claim", "SlotTable"]

class Claim(NamedTuple):
    """What :meth:`SlotTable.claim` decided for a block of n slots (nothing is changed yet).

    ``keep`` masks the rows to write (None: all); ``prev`` holds the slots' record counts before
    (None for an empty block); ``merge`` says rows are averaged into their slots; ``top`` and
    ``vmax`` are the largest index and view. With fingerprints, ``conflict`` masks the rows whose
    input differs from the one their slot already holds (or an earlier row of this block gave it),
    ``same`` the rows that repeat that input, and ``ref`` says for each ``same`` row what it
    repeats: an earlier row of this block, or -1 for the row in the store (None without fingerprints).
    """

    keep: Optional[np.ndarray]
    prev: Optional[np.ndarray]
    merge: bool
    top: int
    vmax: int
    conflict: Optional[np.ndarray] = None
    same: Optional[np.ndarray] = None
    ref: Optional[np.ndarray] = None


_KEEP_ONE = "; pass on_duplicate='first', 'last' or 'mean' to keep one"


def _what(item: str, views, b: int) -> str:
    return item + ("" if views is None or not views[b] else f" view {views[b]}")


class SlotTable:
    """Host bookkeeping of every slot: ``count``, ``token_len`` and ``disk`` arrays ``[capacity, V]``;
    with fingerprints also ``prints`` (int64) and ``printed`` (bool), and the conflicts and
    disagreements seen so far."""

    def __init__(self, num_items: Optional[int], on_duplicate: str) -> None:
        self.num_items = num_items
        self.on_duplicate = on_duplicate
        # Counts above 1 only matter for averaging: one byte per slot otherwise keeps it in cache.
        self.count = np.zeros((0, 1), self.count_dtype(on_duplicate))
        self.flat = self.count.reshape(-1)
        self.token_len = np.zeros((0, 1), np.int64)
        self.disk: Optional[np.ndarray] = None  # slots a shard on disk holds, once a directory is linked
        self.prints: Optional[np.ndarray] = None  # each slot's input fingerprint, once one is recorded
        self.printed: Optional[np.ndarray] = None
        self.conflicted: list = []  # flat slots of every conflict, in order seen
        self.carried_ids: list = []  # ids of conflicts seen elsewhere (shards written, other ranks)
        self.disagreements = 0
        self.max_disagreement = 0.0

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
        if self.prints is not None:
            prints, printed = np.zeros(shape, np.int64), np.zeros(shape, bool)
            prints[:cap, :vcap], printed[:cap, :vcap] = self.prints, self.printed
            self.prints, self.printed = prints, printed
        self.count, self.flat, self.token_len = count, count.reshape(-1), token_len

    def carry(self, books: Optional[dict]) -> None:
        """Count the checks of records resolved elsewhere (a shard's, another rank's books)."""
        if not books:
            return
        self.carried_ids += [decode_id(i) for i in books.get("conflicted", ())]
        self.disagreements += int(books.get("disagreements", 0))
        self.max_disagreement = max(self.max_disagreement, float(books.get("max_disagreement", 0.0)))

    def book_prints(self, slots: np.ndarray, prints: np.ndarray, claim: Optional["Claim"], disagreements: int = 0,
                    max_disagreement: float = 0.0) -> None:
        """After the rows are written: ``slots`` (flat) hold inputs of fingerprints ``prints``
        (a slot keeps the print of the record it keeps: its first under ``"first"`` and
        ``"mean"``, its last under ``"last"``), and the claim's conflicts and disagreements count."""
        if self.prints is None:
            self.prints, self.printed = np.zeros(self.count.shape, np.int64), np.zeros(self.count.shape, bool)
        flat_prints, flat_printed = self.prints.reshape(-1), self.printed.reshape(-1)
        if claim is None:  # the compiled pass: slots with no record and no print (FastPath hands back others)
            flat_prints[slots] = prints
            flat_printed[slots] = True
            return
        if claim.conflict is not None and claim.conflict.any():
            self.conflicted.extend(slots[claim.conflict].tolist())
        if self.on_duplicate == "last":
            take = np.ones(len(slots), bool)
        else:  # the first record of a slot: nothing printed there before, and first in this block
            take = ~flat_printed[slots]
            if len(slots) > 1:
                take &= first_last(slots)[0]
        if claim.keep is not None and self.on_duplicate != "mean":
            take &= claim.keep
        flat_prints[slots[take]] = prints[take]
        flat_printed[slots[take]] = True
        self.disagreements += disagreements
        self.max_disagreement = max(self.max_disagreement, max_disagreement)

    def any_printed(self, index: np.ndarray, views: Optional[np.ndarray]) -> bool:
        """Whether any (index, view) already has a print (recorded in memory or in a shard)."""
        return self.printed is not None and bool(self.recorded(index, views, self.printed).any())

    def compare_prints(self, index: np.ndarray, views: Optional[np.ndarray], slots: np.ndarray, prints: np.ndarray):
        """(conflict, same, ref) of a block's rows against the prints held and each other: see
        :class:`Claim`. ``slots`` numbers the block's (index, view) pairs among themselves."""
        n = len(slots)
        ref = np.full(n, -2, np.int64)  # -2: nothing to compare with
        held = np.zeros(n, np.int64)
        if self.printed is not None:
            known = self.recorded(index, views, self.printed)
            rows = np.flatnonzero(known)
            ref[rows] = -1
            held[rows] = self.prints[index[rows], 0 if views is None else views[rows]]
        if n > 1:
            order = np.argsort(slots, kind="stable")
            s = slots[order]
            again = np.flatnonzero(s[1:] == s[:-1]) + 1  # sorted positions that repeat the one before
            if len(again):
                start = np.maximum.accumulate(np.where(np.concatenate(([True], s[1:] != s[:-1])), np.arange(n), 0))
                rows, firsts = order[again], order[start[again]]
                fresh = ref[rows] == -2  # no print held: the block's first row of the slot is the reference
                ref[rows[fresh]] = firsts[fresh]
                held[rows[fresh]] = prints[firsts[fresh]]
        compared = ref != -2
        conflict = compared & (held != prints)
        same = compared & (held == prints)
        return conflict, same, ref

    def recount(self, on_duplicate: str) -> None:
        """Counts in the width ``on_duplicate`` needs (narrowed counts saturate)."""
        dtype = self.count_dtype(on_duplicate)
        count = self.count
        if np.iinfo(dtype).max < np.iinfo(count.dtype).max:
            count = np.minimum(count, np.iinfo(dtype).max)
        self.count = count.astype(dtype)
        self.flat = self.count.reshape(-1)

    def mark(self, slots: np.ndarray, lengths: Optional[np.ndarray], count=None, disk: bool = False) -> None:
        """Book ``slots`` (flat) as recorded: their ``count`` (one value or one per slot; None leaves
        it), per-token ``lengths`` (None: none) and, with ``disk``, as held by a shard."""
        if count is not None:
            self.flat[slots] = count
        if lengths is not None:
            self.token_len.reshape(-1)[slots] = lengths
        if disk:
            if self.disk is None:
                self.disk = np.zeros(self.count.shape, bool)
            self.disk.reshape(-1)[slots] = True

    def mark_written(self, slots: np.ndarray) -> None:
        """``slots`` are now in a shard; under ``"last"`` and ``"mean"`` they hold no record in memory."""
        self.mark(slots, None, count=None if self.on_duplicate in ("error", "first") else 0, disk=True)

    def unwritten(self) -> np.ndarray:
        """The slots recorded in memory and not in a shard (under ``"last"`` and ``"mean"``, a
        written slot recorded again is a new record: it is unwritten too), sorted."""
        recorded = self.flat > 0
        if self.disk is not None and self.on_duplicate in ("error", "first"):
            recorded &= ~self.disk.reshape(-1)
        return np.flatnonzero(recorded)

    def held_at(self, index: np.ndarray, views: Optional[np.ndarray]) -> np.ndarray:
        """Per (index, view): recorded in memory or in a shard, in any view when ``views`` is None."""
        found = self.recorded(index, views)
        if self.disk is not None:
            found |= self.recorded(index, views, self.disk)
        return found

    def held(self) -> np.ndarray:
        """Bool ``[capacity, V]``: slots recorded in memory or in a shard."""
        held = self.count > 0
        return held if self.disk is None else held | self.disk

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
              combine_views: bool, source: Optional[str] = None, repeat_hint: str = "",
              names: Optional[Callable[[int], str]] = None, prints: Optional[np.ndarray] = None) -> Claim:
        """Check a block of (index, view) pairs against what is recorded and apply ``on_duplicate``.

        ``source`` None means a batch of ``Recorder.add`` (its messages name batch positions),
        else it names the shard or rank the block came from; ``repeat_hint`` ends the message of a
        repeat under ``"error"`` in a block (how its sender recovers). ``combine_views`` checks that the
        views of an item agree in per-token length. ``names(b)`` names the item of row b in
        messages (default "item 5"; a keyed store's "key 'doc-3'"). Raises ValueError, changing
        nothing, for an index outside ``range(num_items)``, a repeat under ``"error"`` or lengths
        that clash. ``prints``: the rows' input fingerprints, compared with those held (see :class:`Claim`).
        """
        item = names if names is not None else (lambda b: f"item {index[b]}")
        def what(b: int) -> str:
            return _what(item(b), views, b)

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
                raise ValueError(f"{source}: {what(b)} is recorded more than once "
                                 f"(on_duplicate='error'){repeat_hint or _KEEP_ONE}")
            b = int(np.flatnonzero(prev)[0]) if seen else int(np.flatnonzero(~first_last(slot)[0])[0])
            where = "is already recorded (batch position" if seen else "appears more than once in this batch (again at position"
            raise ValueError(f"Recorder.add: {what(b)} {where} {b}); "
                             "pass on_duplicate='first', 'last' or 'mean' to allow repeats")
        if lengths is not None and per_token:
            self._check_lengths(index, views, lengths, slot, combine_views, source, what, item)
        printed = {}
        # Compared with any print held: under "last" and "mean" a slot written to a shard holds no
        # record in memory, but its print is still the input it was recorded from.
        if prints is not None and (seen or repeats or self.any_printed(index, views)):
            printed = dict(zip(("conflict", "same", "ref"), self.compare_prints(index, views, slot, prints)))
        if not (seen or repeats) or self.on_duplicate == "mean":
            return Claim(None, prev, seen or repeats, top, vmax, **printed)
        first, last = first_last(slot) if repeats else (None, None)
        if self.on_duplicate == "first":
            keep = prev == 0
            if repeats:
                keep &= first
        else:
            keep = last
        return Claim(None if keep is None or keep.all() else keep, prev, False, top, vmax, **printed)

    def _check_lengths(self, index, views, lengths, slot, combine_views: bool, source: Optional[str], what, item) -> None:
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
                raise ValueError(f"{source}: {what(b)} has length {lengths[b]} {where} and another length elsewhere; "
                                 "repeats must have one length to be averaged (on_duplicate='mean')")
            raise ValueError(f"Recorder.add: {item(b)} appears in this batch with lengths {sorted(set(lengths[index == index[b]].tolist()))}; "
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
                raise ValueError(f"{source}: {what(b)} has length {lengths[b]} {where} and another length elsewhere; "
                                 "repeats must have one length to be averaged (on_duplicate='mean')")
            raise ValueError(f"Recorder.add: {item(b)} has length {lengths[b]} in this batch but {self.token_len[rows[r], c]} "
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

"""The store: slots, rows and staging for one set of outputs, and the only writer of them.

Records come in three ways and all take the same steps (claim, make room, write the rows,
then the books): :meth:`Store.record` (a checked batch of ``Recorder.add``),
:meth:`Store.absorb` (a :class:`SlotBlock` from a shard or a rank) and
:meth:`Store.load_index` (a shard's bookkeeping on resume, rows left on disk). They go out as a
block (:meth:`Store.extract`) or as a finished table (:meth:`Store.columns`). Every change is
checked first, so an error leaves the store as it was, and every replacement of storage goes
through :meth:`Store._storage_changed`, so the compiled view (:class:`FastPath`) is never stale.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .._keys import describe_key
from .fast import FastPath
from .keys import KeyTable
from .memory import host_empty, to_device
from .records import ColumnTable, Identity, Output, SlotBlock, Spec
from .result import finished_table
from .room import check_room, room_message
from .rows import DenseRows, TokenRows
from .slots import Claim, SlotTable
from .staging import Staging
from .writes import RowWriter

__all__ = ["Store"]


class Store(RowWriter):
    """Slots, rows and staging for one Recorder's outputs (fixed by :meth:`setup` or the first record).

    ``compiled=True`` gives a store on the host a :class:`FastPath` (``self.fast``) where the
    compiled extension is built; it is None otherwise.

    A store files by position (slot ``index * V + view``) or by key (``keys``: a
    :class:`KeyTable` gives each key a slot in the order first seen); ``keyed`` is None until the
    first record decides, or True from the start when asked (``keyed=True``). A keyed store's
    ``expected`` is the number of items the caller expects (for the summary), never a bound.
    """

    def __init__(self, num_items: Optional[int], device: torch.device, on_duplicate: str, views: str,
                 compiled: bool = False, keyed: bool = False) -> None:
        self.device = device
        self.views = views
        self.expected = num_items
        self.keyed: Optional[bool] = True if keyed else None
        self.keys: Optional[KeyTable] = KeyTable() if keyed else None
        self.table = SlotTable(None if keyed else num_items, on_duplicate)
        self.specs: Optional[Dict[str, Spec]] = None
        self.single = False
        self.dense: Dict[str, DenseRows] = {}
        self.tokens: Dict[str, TokenRows] = {}
        self.staging = Staging()
        self.on_host = device.type == "cpu"
        self.shared = False  # the dense rows are also held by a returned result
        self._records = 0  # records taken in by the Python paths (see records)
        self._ones: Dict[int, torch.Tensor] = {}
        self.fast = FastPath(self) if compiled and self.on_host and FastPath.available() else None

    @property
    def records(self) -> int:
        """Every record taken in, repeats included (those of the compiled plain add too)."""
        return self._records + (self.fast.pending_records() if self.fast is not None else 0)

    @property
    def num_items(self) -> Optional[int]:
        return self.table.num_items

    @property
    def on_duplicate(self) -> str:
        return self.table.on_duplicate

    def _storage_changed(self) -> None:
        """Storage was replaced or handed out: the compiled view is rebuilt before its next pass."""
        if self.fast is not None:
            self.fast.invalidate()

    def set_on_duplicate(self, policy: str) -> None:
        """Change the duplicate policy (counts widen or narrow with it); checked before anything changes."""
        if policy == "mean" and self.specs is not None:
            bad = [n for n, s in self.specs.items() if not s.dtype.is_floating_point]
            if bad:
                raise TypeError(f"Recorder: on_duplicate='mean' averages floating-point outputs, got {bad[0]!r} of dtype {self.specs[bad[0]].dtype}")
        if SlotTable.count_dtype(policy) != self.table.count.dtype:
            self.staging.drain(wait=True)
            self.table.recount(policy)
            self._storage_changed()
        self.table.on_duplicate = policy

    # ---------------------------------------------------------------------------- outputs and room

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
        self._storage_changed()

    def _forget_outputs(self) -> None:
        """Undo :meth:`setup` (a first record that failed): the outputs are not fixed after all."""
        self.specs, self.single, self.dense, self.tokens = None, False, {}, {}
        self._storage_changed()

    def ensure(self, top: int, vmax: int) -> None:
        """Room for index ``top`` and view ``vmax``: every new array is made before any replaces the old."""
        new = self.table.new_shape(top, vmax)
        if new is None:
            return
        check_room(self, top, new)
        self.staging.drain(wait=True)
        old = self.table.shape
        try:
            dense = {n: r.grown(old, new) for n, r in self.dense.items()}
            starts = {n: r.grown(old, new) for n, r in self.tokens.items()}
            self.table.grow(new)
        except (MemoryError, OSError, RuntimeError) as exc:
            raise ValueError(room_message(self, top, new, f"could not be allocated ({type(exc).__name__}: {exc})")) from exc
        for n, rows in dense.items():
            self.dense[n].rows = rows
        for n, s in starts.items():
            self.tokens[n].starts = s
        self.shared = False
        self._storage_changed()

    def unshare(self) -> None:
        """Copy the dense rows a returned result holds before they are written again."""
        if self.shared:
            self.staging.drain(wait=True)
            for rows in self.dense.values():
                rows.rows = rows.rows.clone()
            self.shared = False
            self._storage_changed()

    def empty_like(self) -> "Store":
        """A store with these settings and outputs and storage of this size, nothing recorded."""
        fresh = Store(self.expected, self.device, self.on_duplicate, self.views, keyed=bool(self.keyed))
        if self.specs is not None:
            fresh.setup(self.specs, self.single, "Recorder")
            cap, vcap = self.table.shape
            if cap:
                fresh.ensure(cap - 1, vcap - 1)
        return fresh

    # ---------------------------------------------------------------------------- records in

    def record(self, ids: Identity, outputs: Dict[str, Output], specs: Optional[Dict[str, Spec]], single: bool,
               combine_views: bool) -> None:
        """Claim and write a checked batch; ``specs`` fixes the outputs on a first record (else None).

        Raises ValueError, changing nothing, for an index outside ``range(num_items)``, a repeat
        under ``"error"`` or lengths that clash with what is recorded.
        """
        per_token = any(o.per_token for o in outputs.values())
        lengths = ids.lengths if per_token else None

        def write(ids: Identity, names) -> None:
            claim = self.table.claim(ids.index, ids.views, lengths, per_token, combine_views, names=names, prints=ids.prints)
            first = self.specs is None
            if first:
                self.setup(specs, single, "Recorder.add")
            try:
                differ = self.disagreement(ids, outputs, claim)
                self._take(ids, outputs, claim, len(ids.index))
            except BaseException:
                if first:
                    self._forget_outputs()
                raise
            self._book_prints(ids, claim, differ)

        self._filed("Recorder.add", ids, write)

    def add_compiled(self, ids: Identity, outputs, per_token) -> int:
        """The compiled pass for a batch whose outputs are as the first record fixed them (keyed
        rows under their keys' slots); the batch size, or -1, having changed nothing."""
        if self.fast is None:
            return -1
        if ids.keys is None:
            if self.keyed:
                return -1
            n = self.fast.add(ids, outputs, per_token)
            if n >= 0 and not self.fast.booked_prints:
                self._book_prints(ids, None)
            return n
        if not self.keyed:
            return -1  # the first keyed record, or keys given to a positional store: the general path
        keys = ids.keys.tolist() if isinstance(ids.keys, np.ndarray) else ids.keys
        try:
            slots, new_keys = self.keys.plan("Recorder.add", keys)
        except (TypeError, ValueError):
            return -1  # the general path names the bad key
        n = self.fast.add(ids._replace(index=slots, index_t=None), outputs, per_token)
        if n >= 0:
            self.keys.commit(new_keys)
            if not self.fast.booked_prints:
                self._book_prints(ids._replace(index=slots), None)
        return n

    def _book_prints(self, ids: Identity, claim, differ=(0, 0.0)) -> None:
        """The fingerprints of rows just written (nothing without them)."""
        if ids.prints is not None and len(ids.index):
            first = self.table.prints is None
            self.table.book_prints(self.table.slots(ids.index, ids.views), ids.prints, claim, *differ)
            if first:
                self._storage_changed()  # the compiled view books fingerprints from now on

    def absorb(self, block: SlotBlock, source: str, repeat_hint: str = "") -> None:
        """Merge ``block`` under ``on_duplicate``, as a batch added now would be; ``source`` names it in errors.

        Raises ValueError, changing nothing, for an index outside ``range(num_items)``, a repeated
        slot under ``"error"``, or averaged per-token slots of different lengths.
        """
        records = len(block) if block.records is None else block.records
        if not len(block):
            self._records += records
            return
        outputs = {name: Output(block.columns[name], spec.per_token, jagged=spec.per_token) for name, spec in self.specs.items()}

        def write(ids: Identity, names) -> None:
            claim = self.table.claim(ids.index, ids.views, ids.lengths, ids.lengths is not None, False, source, repeat_hint,
                                     names=names, prints=ids.prints)
            differ = self.disagreement(ids, outputs, claim)
            self._take(ids, outputs, claim, records, block.count)
            self._book_prints(ids, claim, differ)

        self._filed(source, Identity(None, block.index, block.view, block.lengths, False, None, True, block.keys,
                                     block.prints), write)

    def load_index(self, block: SlotBlock, source: str) -> None:
        """Count the slots of a shard on disk as recorded (``block`` holds bookkeeping only).

        Under ``"error"`` and ``"first"`` they keep their counts, so that ``add`` rejects or
        ignores them; under ``"last"`` and ``"mean"`` a later record is a slot of its own that
        reading merges with the shard's. Raises ValueError, changing nothing, as :meth:`absorb` does.
        """
        keep_counts = self.on_duplicate in ("error", "first")

        def write(ids: Identity, names) -> None:
            claim = self.table.claim(ids.index, ids.views, ids.lengths, ids.lengths is not None, False, source,
                                     "; shards written under on_duplicate='error' hold each item once", names=names)
            if len(ids.index):
                self.ensure(claim.top, claim.vmax)
                slots = self.table.slots(ids.index, ids.views)
                keep = claim.keep if keep_counts else None
                kept = slots if keep is None else slots[keep]
                lengths = ids.lengths if keep is None or ids.lengths is None else ids.lengths[keep]
                self.table.mark(kept, lengths, count=1 if keep_counts else None, disk=True)
                # What the shards hold, for later records to be compared with (their own checks
                # were counted when they were written, and again when they are read).
                self._book_prints(ids, claim._replace(conflict=None))
            self._records += len(ids.index) if block.records is None else block.records

        self._filed(source, Identity(None, block.index, block.view, block.lengths, False, None, True, block.keys,
                                     block.prints), write)

    def _filed(self, owner: str, ids: Identity, write) -> None:
        """``write(ids, names)`` with the rows filed the way this store files them: by position, or
        by key (``ids.index`` then the keys' slots, and ``names(b)`` naming row b's key); the keys
        new to the store are kept only once ``write`` succeeded, so that a failure changes nothing.
        The first record decides whether the store files by key."""
        keyed = self._mode(owner, ids.keys is not None)
        if not keyed:
            write(ids, None)
            self.keyed = False
            return
        keys = ids.keys.tolist() if isinstance(ids.keys, np.ndarray) else ids.keys
        deciding = self.keys is None
        if deciding:  # slots grow with the keys seen, never with their values
            self.keys, bound, self.table.num_items = KeyTable(), self.table.num_items, None
        try:
            slots, new_keys = self.keys.plan(owner, keys)
            write(ids._replace(index=slots, index_t=None), lambda b: f"key {describe_key(keys[b])}")
        except BaseException:
            if deciding:
                self.keys, self.table.num_items = None, bound
            raise
        self.keys.commit(new_keys)
        self.keyed = True

    def carry(self, books: Optional[Dict]) -> None:
        """Count the fingerprint checks of records resolved elsewhere: a shard's or another rank's
        books (:func:`provcollate.store.result.books`)."""
        self.table.carry(books)

    def check_mode(self, owner: str, ids: Identity) -> None:
        """ValueError if ``ids`` does not name rows the way this store files them (by key or by position)."""
        self._mode(owner, ids.keys is not None)

    def _mode(self, owner: str, keyed: bool) -> bool:
        """Whether a record files by key; ValueError if that is not the way this store files."""
        if self.keyed is None:
            return keyed
        if keyed and not self.keyed:
            raise ValueError(f"{owner}: this Recorder files by position (its first add gave dataset indices); rows "
                             "with keys need a Recorder of their own that files by key (pc.Recorder(keys=True))")
        if self.keyed and not keyed:
            raise ValueError(f"{owner}: this Recorder files by key; give keys here too (a keyed batch, a list of "
                             "str/bytes/tuples, or int ids with pc.Recorder(keys=True))")
        return keyed

    def _take(self, ids: Identity, outputs: Dict[str, Output], claim: Claim, records: int,
              weight: Optional[np.ndarray] = None) -> None:
        """Write claimed rows: rows first, bookkeeping last, so that an error in a copy leaves the
        slots as they were (a per-token reservation is given back)."""
        index = ids.index
        if len(index):
            self.ensure(claim.top, claim.vmax)
            self.unshare()
            slots = self.table.slots(index, ids.views)
            if claim.merge:
                self._take_mean(slots, ids, outputs, claim.prev, weight)
            else:
                self._take_rows(slots, ids, outputs, claim.keep)
        self._records += records

    def _take_rows(self, slots: np.ndarray, ids: Identity, outputs: Dict[str, Output], keep: Optional[np.ndarray]) -> None:
        kept = slots if keep is None else slots[keep]
        if not len(kept):
            return
        index_t = ids.index_t if self.table.shape[1] == 1 else None
        starts: Dict[str, np.ndarray] = {}
        for name, out in outputs.items():
            if out.per_token:
                starts[name] = self._write_tokens(name, out, slots, keep, ids.lengths, ids.left)
            else:
                self._write_examples(name, out.tensor, slots, index_t, keep)
        lengths = None
        if ids.lengths is not None and any(o.per_token for o in outputs.values()):
            lengths = ids.lengths if keep is None else ids.lengths[keep]
        self.table.mark(kept, lengths, count=1)
        for name, s in starts.items():
            self.tokens[name].starts.reshape(-1)[kept] = s

    def held(self, ids: Identity) -> np.ndarray:
        """Per row of ``ids``: recorded, in memory or in a shard (in any view when it gives none)."""
        if ids.keys is None:
            return self.table.held_at(ids.index, ids.views)
        found = np.zeros(len(ids.index), bool)
        if self.keys is None:
            return found
        slots = self.keys.lookup(ids.keys.tolist() if isinstance(ids.keys, np.ndarray) else ids.keys)
        known = slots >= 0
        if known.any():
            found[known] = self.table.held_at(slots[known], None if ids.views is None else ids.views[known])
        return found

    # ---------------------------------------------------------------------------- shards

    def unwritten(self) -> np.ndarray:
        """The slots recorded in memory and not yet in a shard, sorted."""
        self.staging.drain(wait=True)
        return self.table.unwritten()

    def mark_written(self, flat: np.ndarray) -> None:
        """The slots ``flat`` are now in a shard: drop their rows from memory (every row, as the
        shard holds all that was unwritten). Under ``"error"`` and ``"first"`` they stay counted,
        so that ``add`` rejects or ignores them again; under ``"last"`` and ``"mean"`` a later
        record of one is a new slot that reading merges with the written one."""
        self.table.mark_written(flat)
        for rows in self.dense.values():
            rows.rows = host_empty(tuple(rows.rows.shape), rows.rows.dtype, rows.rows.device)  # no huge pages: sparse writes
        for name, rows in self.tokens.items():
            fresh = TokenRows(rows.spec, self.device)
            fresh.starts = rows.starts
            self.tokens[name] = fresh
        self.shared = False
        self._storage_changed()

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

    # ---------------------------------------------------------------------------- records out

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
        keys = None
        if self.keys is not None:
            slot_keys = self.keys.keys
            keys = [slot_keys[i] for i in index.tolist()]
            keys = np.asarray(keys, np.int64) if self.keys.kind == "int" else keys
        block = SlotBlock(index, view, count, lengths, columns, keys=keys)
        if self.table.printed is not None and self.table.printed.reshape(-1)[flat].all():
            block.prints = self.table.prints.reshape(-1)[flat]
        return block

    def columns(self, owner: str, ranks: int = 1, shards: int = 0) -> ColumnTable:
        """Everything recorded, views combined as ``views`` says, as a finished table.

        Copies nothing when every slot was recorded once and views are kept as they are; the
        dense rows are then shared with the table (and copied before they are next written).
        """
        self.staging.drain(wait=True)
        table, shared = finished_table(self, owner, ranks, shards)
        if shared and not self.shared:
            self.shared = True
            self._storage_changed()
        return table

"""The compiled pass of ``Recorder.add``: ``record_rows`` / ``RecordTargets.add_plain`` of csrc/record.cpp over
a :class:`Store`'s host arrays, checking, claiming and copying a batch in one pass.

It takes CPU tensors shaped as the first record fixed them, one view, no repeats, storage big
enough and no reduction; for anything else it hands the batch back having changed nothing, and
the general path does the work or raises the error (the messages live there only). The GIL is
released when a pass copies 64 KiB or more or is the first pass into new storage (page faults);
a smaller pass keeps it, since released it could wait a switch interval to come back.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from .. import ops
from .records import SINGLE, Identity

if ops.HAS_EXTENSION:
    from .._C import RecordTargets, record_rows
else:  # no compiled extension, or PROVCOLLATE_EXTENSION=0 (ops.py warns): the general path only
    RecordTargets = record_rows = None

__all__ = ["FastPath"]


class FastPath:
    """A store's compiled view: where each output's rows go, rebuilt whenever the store says its
    storage changed (:meth:`invalidate`).

    ``plain`` is True while the seed article's call, a plain index and one per-example tensor,
    can go straight to ``add_plain(index, output)``: the view is current, the outputs are one
    per-example tensor, and the store's rows are neither shared with a result nor waiting on a
    GPU copy. ``add_plain(index, output[, fingerprint])`` is then the compiled view's own method
    (no Python step between the caller and C++): it returns the batch size, or -1 having changed
    nothing, and counts the rows it records, which the store adds to its own count
    (:meth:`pending_records`). Given fingerprints, it books them in the slot table's prints once
    the table has them (the first fingerprinted record takes the general path and makes them).
    """

    def __init__(self, store) -> None:
        self.store = store
        self.targets = None
        self.names: Tuple[str, ...] = ()
        self.token_names: frozenset = frozenset()
        self.plain = False
        self.add_plain = None
        self.books_prints = False  # the Targets hold the slot table's prints
        self.booked_prints = False  # the last pass booked its batch's fingerprints

    @staticmethod
    def available() -> bool:
        """Whether the compiled extension is there to run the pass."""
        return record_rows is not None

    def invalidate(self) -> None:
        """The store replaced or handed out storage, or has copies in flight."""
        if self.targets is not None:
            self.store._records += self.targets.records  # what add_plain recorded through these
        self.targets = self.add_plain = None
        self.plain = self.books_prints = False

    def pending_records(self) -> int:
        """Rows recorded by ``add_plain`` that the store has not counted yet."""
        return self.targets.records if self.targets is not None else 0

    def refresh(self) -> bool:
        """Make the view current; False when the store cannot take a compiled pass now (no outputs
        fixed yet, or copies from a GPU still in flight)."""
        store = self.store
        if store.staging:
            store.staging.drain(wait=False)
        if store.specs is None or store.staging:
            return False
        if store.shared:
            store.unshare()  # a pass writes the rows: a returned result keeps its own
        if self.targets is None:
            self.names = tuple(store.specs)
            self.token_names = frozenset(n for n, s in store.specs.items() if s.per_token)
            storage = [store.dense[n].rows if n in store.dense else store.tokens[n].starts for n in self.names]
            table = store.table
            self.targets = RecordTargets(storage, table.count, table.token_len)
            if table.prints is not None and table.count.shape[1] == 1:
                # add_plain books the fingerprints it is given into slots that have none yet
                self.targets.set_prints(table.prints, table.printed)
                self.books_prints = True
            self.add_plain = self.targets.add_plain
        # The plain call's index is positions: never for a store that files by key.
        self.plain = self.names == (SINGLE,) and not self.token_names and not store.keyed
        return True

    def add(self, ids: Identity, outputs, per_token) -> int:
        """One pass over a batch whose outputs are as the first record fixed them; the batch size,
        or -1, having changed nothing (the general path then takes the batch)."""
        if not self.refresh():
            return -1
        sources = self._sources(outputs, per_token)
        if sources is None:
            return -1
        names, token_names = self.names, self.token_names
        if token_names and ids.max_len is not None:
            if any(s.dim() < 2 or s.shape[1] != ids.max_len for n, s in zip(names, sources) if n in token_names):
                return -1  # the general path names the mismatch
        if ids.jagged and token_names:
            return -1  # rows of a packed batch: the general path copies them as they are
        lengths = ids.lengths if token_names else None  # lengths only matter to per-token outputs
        index = ids.index_t if ids.index_t is not None else ids.index
        store = self.store
        chunks = [store.tokens[n] for n in names if n in token_names]
        self._set_chunks(chunks)
        prints = ids.prints if self.books_prints else None  # (a pass takes view 0 only, as the Targets have)
        if ids.prints is not None and prints is None and store.table.any_printed(np.asarray(ids.index, np.int64), ids.views):
            return -1  # inputs to compare with prints held (the pass itself hands those back when it books them)
        outcome = record_rows(index, ids.views, lengths, ids.left, sources, self.targets, prints)
        if outcome.needs_rows:  # a per-token output's last chunk is full: a new one, then the same pass again
            for c in chunks:
                c.room(outcome.needs_rows)
            self._set_chunks(chunks)
            outcome = record_rows(index, ids.views, lengths, ids.left, sources, self.targets, prints)
        if not outcome.recorded:
            return -1
        self.booked_prints = prints is not None
        n = len(ids.index)
        store._records += n
        return n

    def _sources(self, outputs, per_token) -> Optional[List[torch.Tensor]]:
        """The output tensors in the view's order, if they are the outputs it was made for."""
        names, token_names = self.names, self.token_names
        if type(outputs) is torch.Tensor:
            if names != (SINGLE,) or per_token is not bool(token_names):
                return None
            return [outputs]
        if type(outputs) is not dict or len(outputs) != len(names):
            return None
        if per_token is True or per_token is False:
            if token_names != (frozenset(names) if per_token else frozenset()):
                return None
        elif not (type(per_token) in (set, frozenset) and per_token == token_names):
            return None
        try:
            return [outputs[name] for name in names]
        except KeyError:
            return None

    def _set_chunks(self, chunks) -> None:
        if chunks:
            self.targets.set_chunks([(c.chunks[-1] if c.chunks else None, c.cursor, c.bases[-1] if c.bases else 0)
                                     for c in chunks])

"""A store's records as a finished :class:`ColumnTable`: each slot's rows in slot order, the
test-time views of an item combined as the store's ``views`` says. Reads the store, never
writes it."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from .._keys import encode_id
from .memory import exclusive_cumsum, row_positions, to_device
from .keys import sorted_order
from .records import ColumnTable, Jagged
from .rows import combine_views

__all__ = ["finished_table", "conflicted_ids", "books"]


def finished_table(store, owner: str, ranks: int, shards: int) -> Tuple[ColumnTable, bool]:
    """(the table, whether it holds the store's own dense rows: then they must be copied before
    they are next written). Copies nothing when every slot was recorded once and views are kept
    as they are."""
    table = store.table
    cap, vcap = table.shape
    slots = int(np.count_nonzero(table.flat))
    incomplete = 0
    if vcap > 1:
        views_present = (table.count > 0).sum(1)
        incomplete = int(np.count_nonzero((views_present > 0) & (views_present < vcap)))
    keyed = store.keys is not None
    common = dict(num_items=store.expected if keyed else store.num_items, records=store.records, slots=slots,
                  incomplete=incomplete, ranks=ranks, shards=shards, views=vcap, on_duplicate=store.on_duplicate,
                  disagreements=table.disagreements, max_disagreement=table.max_disagreement)
    conflicted = _conflicted(store)
    common.update(conflicts=len(conflicted), conflicted=conflicted)
    if store.specs is None:
        empty = ([] if keyed else None)
        return ColumnTable(np.zeros(0, np.int64), None, {}, False, stacked_views=None, size=0, keys=empty, **common), False
    table.check_view_lengths(owner, store.views)
    if vcap == 1 or store.views == "none":
        out, shared = _slot_columns(store, slots == cap * vcap, common)
    else:
        out, shared = _combined_views(store, owner, common), False
    return (_by_key(store, out), False) if keyed else (out, shared)


def conflicted_ids(store, start: int = 0) -> list:
    """The ids (dataset indices, or keys) of the conflicts this store saw, from its ``start``-th on."""
    vcap = store.table.shape[1]
    items = [s // vcap for s in store.table.conflicted[start:]]
    if store.keys is not None:
        return [store.keys.keys[i] for i in items]
    return [int(i) for i in items]


def books(store, since: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The fingerprint checks' books of ``store`` as JSON data, what shards and ranks carry: the ids
    of conflicts, disagreements and the largest; ``since`` (an earlier ``books()``) leaves out what
    it held. :meth:`SlotTable.carry` counts them in another store."""
    t = store.table
    before = since or {"seen": 0, "carried": 0, "total_disagreements": 0}
    ids = t.carried_ids[before["carried"]:] + conflicted_ids(store, before["seen"])
    return {"conflicted": [encode_id(i) for i in dict.fromkeys(ids)],
            "disagreements": t.disagreements - before["total_disagreements"], "max_disagreement": t.max_disagreement,
            "seen": len(t.conflicted), "carried": len(t.carried_ids), "total_disagreements": t.disagreements}


def _conflicted(store) -> tuple:
    """The ids of every conflict, seen here or carried, each once, in the order first seen."""
    return tuple(dict.fromkeys(store.table.carried_ids + conflicted_ids(store)))


def _prints(store, flat) -> "np.ndarray | None":
    """The fingerprints of the slots ``flat`` (None: every slot), when each of them has one."""
    table = store.table
    if table.printed is None:
        return None
    printed, prints = table.printed.reshape(-1), table.prints.reshape(-1)
    if flat is None:
        return prints.copy() if printed.all() else None
    return prints[flat] if printed[flat].all() else None


def _by_key(store, table: ColumnTable) -> ColumnTable:
    """A keyed store's table: its entries in sorted key order (then view), each with its key."""
    index = np.arange(table.size, dtype=np.int64) if table.index is None else table.index
    slot_keys = store.keys.keys
    keys = [slot_keys[i] for i in index.tolist()]
    order = sorted_order(keys, store.keys.kind)
    order_t = to_device(order, store.device)
    columns: Dict[str, Any] = {}
    for name, col in table.columns.items():
        if isinstance(col, Jagged):
            columns[name] = Jagged(col.chunks, col.bases, col.starts[order], col.lengths[order])
        else:
            columns[name] = col.index_select(0, order_t)
    keys = np.asarray(keys, np.int64)[order] if store.keys.kind == "int" else [keys[e] for e in order.tolist()]
    view = None if table.view is None else table.view[order]
    prints = None if table.prints is None else table.prints[order]
    return table._replace(index=index[order], view=view, columns=columns, keys=keys, prints=prints)


def _slot_columns(store, everything: bool, common: Dict[str, Any]) -> Tuple[ColumnTable, bool]:
    """One entry per recorded slot."""
    table = store.table
    cap, vcap = table.shape
    # Every item recorded once, views combined: the entries are range(cap), left implicit
    # (an index array would add 8 bytes per item to a result of maybe 40).
    implicit = everything and store.views != "none"
    flat = None if implicit else np.flatnonzero(table.flat)
    lengths = table.token_len.reshape(-1)
    columns: Dict[str, Any] = {}
    for name, spec in store.specs.items():
        if spec.per_token:
            starts = store.tokens[name].starts.reshape(-1)
            s, ln = (starts.copy(), lengths.copy()) if implicit else (starts[flat], lengths[flat])
            columns[name] = store.tokens[name].column(s, ln)
        else:
            rows = store.dense[name].rows
            columns[name] = rows if everything else rows.index_select(0, to_device(flat, store.device))
    if implicit:
        return ColumnTable(None, None, columns, store.single, stacked_views=None, size=cap, prints=_prints(store, None),
                           **common), everything
    view = flat % vcap if store.views == "none" else None
    return ColumnTable(flat // vcap, view, columns, store.single, stacked_views=None, size=len(flat),
                       prints=_prints(store, flat), **common), everything


def _combined_views(store, owner: str, common: Dict[str, Any]) -> ColumnTable:
    """One entry per recorded item, its views combined (or stacked)."""
    table = store.table
    cap, vcap = table.shape
    present = table.count > 0
    items = np.flatnonzero(present.any(1))
    mask = present[items]
    if store.views == "stack" and not mask.all():
        r = int(np.flatnonzero(~mask.all(1))[0])
        raise ValueError(f"{owner}: views='stack' needs all {vcap} views of every recorded item; "
                         f"item {items[r]} has views {np.flatnonzero(mask[r]).tolist()}")
    items_t = to_device(items, store.device)
    mask_t = to_device(mask, store.device)
    columns: Dict[str, Any] = {}
    for name, spec in store.specs.items():
        if spec.per_token:
            # Views of an item share one length (checked): rows [total, V, ...].
            lengths = np.where(mask, table.token_len[items], 0).max(1)
            offsets = exclusive_cumsum(lengths)
            rows = torch.empty((int(lengths.sum()), vcap, *spec.shape), dtype=spec.dtype, device=store.device)
            starts = store.tokens[name].starts[items]
            for v in range(vcap):
                has = mask[:, v]
                part = store.tokens[name].gather(starts[has, v], lengths[has])
                if has.all():
                    rows[:, v] = part
                else:
                    where = to_device(row_positions(offsets[has], lengths[has]), store.device)
                    rows[:, v].index_copy_(0, where, part)
            if store.views != "stack":
                token_mask = torch.repeat_interleave(mask_t, to_device(lengths, store.device), dim=0)
                rows = combine_views(rows, token_mask, store.views)
            columns[name] = Jagged([rows], np.zeros(1, np.int64), offsets, lengths)
        else:
            values = store.dense[name].rows.view(cap, vcap, *spec.shape).index_select(0, items_t)
            columns[name] = values if store.views == "stack" else combine_views(values, mask_t, store.views)
    return ColumnTable(items, None, columns, store.single, stacked_views=vcap if store.views == "stack" else None,
                       size=len(items), **common)

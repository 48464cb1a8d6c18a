"""``Predictions.verify``: recorded fingerprints checked against the dataset read again."""
from __future__ import annotations

import dataclasses
from typing import Any, List

import numpy as np

from ._checks import check_int
from .dataset import Indexed
from .fingerprints import fingerprint, without_index

__all__ = ["Verification", "verify"]


@dataclasses.dataclass(frozen=True)
class Verification:
    """What :meth:`provcollate.Predictions.verify` found.

    Attributes:
        checked: items read again and fingerprinted.
        mismatched: the ids (dataset indices, ``(index, view)`` pairs for test-time views, or
            keys) whose input now fingerprints differently from the one recorded: the data changed
            since, or the output was filed under the wrong id.
    """

    checked: int
    mismatched: List[Any]

    @property
    def ok(self) -> bool:
        """True when every item checked still matches its recorded input."""
        return not self.mismatched

    def __str__(self) -> str:
        if self.ok:
            return f"verified: {self.checked} items checked, every one the input recorded"
        shown = ", ".join(map(repr, self.mismatched[:5])) + (", ..." if len(self.mismatched) > 5 else "")
        return f"MISMATCHED: {len(self.mismatched)} of {self.checked} items checked differ from their recorded input: {shown}"


def _key_positions(indexed: Indexed, wanted: set) -> dict:
    """{key: position} for the keys in ``wanted``, reading the dataset until all are found."""
    found = {}
    for i in range(len(indexed.dataset)):
        key = indexed[i * indexed.views].key
        if key in wanted and key not in found:
            found[key] = i
            if len(found) == len(wanted):
                break
    return found


def check(owner: str, dataset, entries: list, k: int, seed: int, index=None) -> Verification:
    """Fingerprint again ``k`` of ``entries`` (``(id, item, view, recorded print)``; ``item``
    None for a key to find through the Indexed's ``key``), drawn with ``default_rng(seed)``."""
    k = check_int(owner, "k", k)
    if k < 0:
        raise ValueError(f"{owner}: k must be >= 0, got {k}")
    n = len(entries)
    chosen = range(n) if k >= n else np.sort(np.random.default_rng(seed).choice(n, k, replace=False)).tolist()
    picked = [entries[e] for e in chosen]
    indexed = dataset if isinstance(dataset, Indexed) else None
    if any(item is None for _, item, _, _ in picked):
        if indexed is None:
            raise TypeError(f"{owner}: keyed records need the pc.Indexed dataset that gave the keys (its key= finds "
                            f"each key's example), got {type(dataset).__name__}")
        where = _key_positions(indexed, {ident for ident, item, _, _ in picked if item is None})
        picked = [(ident, where.get(ident) if item is None else item, view, p) for ident, item, view, p in picked]
    size = len(dataset if indexed is None else indexed.dataset)
    mismatched = []
    for ident, item, view, recorded in picked:
        if item is None or item >= size:
            mismatched.append(ident)
            continue
        if indexed is not None:
            data = (indexed.replay(item, view) if indexed.seed is not None else indexed[item * indexed.views + view]).data
        else:
            data = dataset[item]
        if (fingerprint(data) if index is None else without_index(data, index)) != int(recorded):
            mismatched.append(ident)
    return Verification(len(picked), mismatched)


def verify(preds, dataset, k: int = 64, seed: int = 0, index=None) -> Verification:
    """See :meth:`provcollate.Predictions.verify`."""
    owner = "Predictions.verify"
    table = preds._table
    if table.prints is None:
        raise ValueError(f"{owner}: these predictions hold no fingerprints (record batches of a pc.Collator with "
                         "fingerprint=True, the default, with views kept apart: views='none' or one view)")
    views = table.view
    if preds.keyed:
        entries = [(key, None, 0 if views is None else int(views[e]), table.prints[e]) for e, key in enumerate(table.keys)]
    else:
        positions = preds._host_index().tolist()
        entries = [(i if views is None else (i, int(views[e])), i, 0 if views is None else int(views[e]), table.prints[e])
                   for e, i in enumerate(positions)]
    return check(owner, dataset, entries, k, seed, index)


def verify_resumed(store, dataset, k: int, seed: int = 0) -> Verification:
    """``Recorder(resume=..., verify=k)``: ``k`` of the items the shards hold, fingerprinted again."""
    table = store.table
    if table.printed is None:
        return Verification(0, [])
    flat = np.flatnonzero(table.printed.reshape(-1))
    vcap = table.shape[1]
    prints = table.prints.reshape(-1)[flat]
    entries = []
    for slot, recorded in zip(flat.tolist(), prints.tolist()):
        item, view = divmod(slot, vcap)
        if store.keys is not None:
            entries.append((store.keys.keys[item], None, view, recorded))
        else:
            entries.append((item if vcap == 1 else (item, view), item, view, recorded))
    return check("Recorder: verify", dataset, entries, k, seed)

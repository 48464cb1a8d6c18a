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


def _key_positions(owner: str, indexed: Indexed, wanted: set) -> dict:
    """{key: position} for the keys in ``wanted``, reading the dataset until all are found."""
    found = {}
    for i in range(len(indexed.dataset)):
        key = indexed[i * indexed.views].key
        if key in wanted and key not in found:
            found[key] = i
            if len(found) == len(wanted):
                break
    return found


def verify(preds, dataset, k: int = 64, seed: int = 0, index=None) -> Verification:
    """See :meth:`provcollate.Predictions.verify`."""
    owner = "Predictions.verify"
    table = preds._table
    if table.prints is None:
        raise ValueError(f"{owner}: these predictions hold no fingerprints (record batches of a pc.Collator with "
                         "fingerprint=True, the default, with views kept apart: views='none' or one view)")
    k = check_int(owner, "k", k)
    if k < 0:
        raise ValueError(f"{owner}: k must be >= 0, got {k}")
    n = table.size
    entries = np.arange(n) if k >= n else np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
    indexed = dataset if isinstance(dataset, Indexed) else None
    if preds.keyed and indexed is None:
        raise TypeError(f"{owner}: keyed predictions need the pc.Indexed dataset that gave the keys (its key= finds "
                        f"each key's example), got {type(dataset).__name__}")
    positions = preds._host_index()
    views = table.view
    keys = table.keys
    if preds.keyed:
        wanted = [keys[e] for e in entries.tolist()]
        where = _key_positions(owner, indexed, set(wanted))
    mismatched = []
    for e in entries.tolist():
        view = 0 if views is None else int(views[e])
        if preds.keyed:
            ident = keys[e]
            if ident not in where:
                mismatched.append(ident)
                continue
            item = where[ident]
        else:
            item = int(positions[e])
            ident = item if views is None else (item, view)
            if item >= len(dataset if indexed is None else indexed.dataset):
                mismatched.append(ident)
                continue
        if indexed is not None:
            sample = indexed.replay(item, view) if indexed.seed is not None else indexed[item * indexed.views + view]
            data = sample.data
        else:
            data = dataset[item]
        print_now = fingerprint(data) if index is None else without_index(data, index)
        if print_now != int(table.prints[e]):
            mismatched.append(ident)
    return Verification(len(entries), mismatched)

"""The key table of a keyed store: users' keys (ints of any int64 value, str, bytes, tuples) to
slots ``0, 1, 2, ...`` in the order they were first seen, so that storage grows with the records,
never with the key values.

A batch's keys are planned first (:meth:`KeyTable.plan`: their slots, new keys given the next
free ones, nothing changed) and committed only once the batch is recorded
(:meth:`KeyTable.commit`): a rejected add leaves the table as it was.
"""
from __future__ import annotations

from itertools import repeat
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._keys import describe_key, key_kind, tuple_shape

__all__ = ["KeyTable", "sorted_order"]

_TYPES = {"int": int, "str": str, "bytes": bytes}


class KeyTable:
    """Keys to slots, one kind of key per table (fixed by the first key, as outputs are by the first add)."""

    def __init__(self) -> None:
        self.kind: Optional[str] = None
        self.shape: Optional[tuple] = None  # the element kinds of tuple keys
        self.slots: Dict[Any, int] = {}
        self.keys: List[Any] = []  # slot -> key

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self) -> str:
        if self.kind == "tuple":
            return f"tuples of ({', '.join(self.shape)})"
        return f"{self.kind} keys"

    def _check_kind(self, owner: str, keys: Sequence[Any]) -> None:
        kind = self.kind if self.kind is not None else key_kind(keys[0])
        shape = self.shape if self.kind is not None else (tuple_shape(keys[0]) if kind == "tuple" else None)
        if kind != "tuple" and set(map(type, keys)) == {_TYPES[kind]}:
            return
        for b, k in enumerate(keys):
            if key_kind(k) != kind or (shape is not None and tuple_shape(k) != shape):
                have = "tuples of (" + ", ".join(shape) + ")" if kind == "tuple" else f"{kind} keys"
                raise TypeError(f"{owner}: key {b} is {describe_key(k)}, but this Recorder files {have}; "
                                "one Recorder holds keys of one kind, so that they sort")

    def plan(self, owner: str, keys: Sequence[Any]) -> Tuple[np.ndarray, List[Any]]:
        """(the slot of each key, the new keys in the order they get the next free slots); changes nothing.

        ``keys`` are checked keys (see :func:`provcollate._keys.check_key`); a repeat of a new key
        within ``keys`` gets the same slot.
        """
        if not len(keys):
            return np.zeros(0, np.int64), []
        self._check_kind(owner, keys)
        slots = list(map(self.slots.get, keys, repeat(-1)))
        missing = slots.count(-1)
        if not missing:
            return np.array(slots, np.int64), []
        top = len(self.keys)
        if missing == len(keys) and len(dict.fromkeys(keys)) == len(keys):  # the usual batch: every key new, once
            return np.arange(top, top + len(keys), dtype=np.int64), list(keys)
        # New keys, each once, in the order first seen, take the next free slots.
        fresh = dict.fromkeys(k for k, s in zip(keys, slots) if s == -1)
        new = dict(zip(fresh, range(top, top + len(fresh))))
        slots = [new[k] if s == -1 else s for k, s in zip(keys, slots)]
        return np.array(slots, np.int64), list(new)

    def commit(self, new: List[Any]) -> None:
        """Add the new keys of a plan, in its order (their slots are the next free ones)."""
        if not new:
            return
        if self.kind is None:
            self.kind = key_kind(new[0])
            self.shape = tuple_shape(new[0]) if self.kind == "tuple" else None
        top = len(self.keys)
        self.slots.update(zip(new, range(top, top + len(new))))
        self.keys.extend(new)

    def lookup(self, keys: Sequence[Any]) -> np.ndarray:
        """The slot of each key, -1 for a key never seen."""
        return np.array(list(map(self.slots.get, keys, repeat(-1))), np.int64)


def sorted_order(keys: List[Any], kind: Optional[str]) -> np.ndarray:
    """Positions of ``keys`` in sorted key order: ints numerically, str and bytes by their UTF-8
    bytes (Python's order of str is that of code points, which UTF-8 keeps), tuples element by
    element."""
    if kind == "int":
        return np.argsort(np.asarray(keys, np.int64), kind="stable")
    return np.asarray(sorted(range(len(keys)), key=keys.__getitem__), np.int64)

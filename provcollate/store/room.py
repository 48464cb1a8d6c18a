"""Room for an index: a store that files by position grows with the largest index it is given.
An index whose room would exceed this machine's memory is refused before anything is allocated
(sparse ids belong in a store that files by key); one far past what is recorded warns."""
from __future__ import annotations

import os
import warnings
from typing import Tuple

import numpy as np

__all__ = ["check_room", "room_message"]


def slot_bytes(store) -> int:
    """Host bytes of one slot: its count, its per-token length, each dense row and token start."""
    specs = (store.specs or {}).values()
    dense = sum(s.dtype.itemsize * int(np.prod(s.shape, dtype=np.int64)) for s in specs if not s.per_token)
    return store.table.count.itemsize + 8 + dense + 8 * len(store.tokens)


def check_room(store, top: int, new: Tuple[int, int]) -> None:
    """ValueError when room for index ``top`` (table shape ``new``) exceeds this machine's memory;
    a RuntimeWarning when it makes more than a GiB for far fewer slots recorded."""
    need = new[0] * new[1] * slot_bytes(store)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: the allocation itself will tell
        memory = None
    if memory is not None and need > memory:
        raise ValueError(room_message(store, top, new, f"exceeds this machine's memory ({memory / 2**30:.1f} GiB)"))
    held = int(np.count_nonzero(store.table.flat))
    if store.keys is None and need > (1 << 30) and new[0] > 64 * (held + 1024):
        warnings.warn(room_message(store, top, new, f"is made for {held:,} slots recorded so far"), RuntimeWarning, stacklevel=6)


def room_message(store, top: int, new: Tuple[int, int], problem: str) -> str:
    need = new[0] * new[1] * slot_bytes(store)
    text = f"Recorder.add: room for index {top} ({new[0]:,} items, {need / 2**30:.1f} GiB) {problem}"
    if store.keys is not None:
        return text
    return (text + ": a Recorder that files by position grows with the largest index; sparse ids (database ids, "
            "hashes, timestamps) belong in pc.Recorder(keys=True), which files by key and grows with the records")

"""Outputs on a GPU with storage on the host: copied to pinned buffers without blocking, and
written once their event says the copy has landed, in order."""
from __future__ import annotations

import collections
from typing import Callable

import torch

__all__ = ["Staging", "MAX_PENDING"]

MAX_PENDING = 8  # host copies in flight from a GPU before a new one waits for the oldest

class Staging:
    """Writes that wait for a copy from a GPU to land in pinned host memory, in order."""

    def __init__(self) -> None:
        self.pending: collections.deque = collections.deque()

    def __bool__(self) -> bool:
        return bool(self.pending)

    @staticmethod
    def pinned_copy(src: torch.Tensor):
        """Start copying ``src`` from its GPU to pinned host memory: (host tensor, CUDA event of arrival)."""
        staged = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        staged.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(src.device))
        return staged, event

    def defer(self, event, work: Callable[[], None]) -> None:
        """Queue ``work`` until ``event`` fires; with too many copies in flight, wait for the oldest."""
        self.pending.append((event, work))
        if len(self.pending) > MAX_PENDING:
            oldest, oldest_work = self.pending.popleft()
            oldest.synchronize()
            oldest_work()

    def drain(self, wait: bool) -> None:
        """Write every pending copy that has landed (all of them, waiting, if ``wait``)."""
        while self.pending:
            event, work = self.pending[0]
            if wait:
                event.synchronize()
            elif not event.query():
                return
            self.pending.popleft()
            work()

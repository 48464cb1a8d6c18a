"""Indexed and Sample: attach each example's identity without touching the user's Dataset."""
from __future__ import annotations

from typing import Any, NamedTuple

from torch.utils.data import Dataset

__all__ = ["Sample", "Indexed"]


class Sample(NamedTuple):
    """One example with its identity: ``index`` in the dataset, ``view`` (augmentation view id)."""

    index: int
    view: int
    data: Any


class Indexed(Dataset):
    """Wrap a map-style dataset so that ``ds[i]`` is ``Sample(index=i, view=0, data=dataset[i])``.

    The wrapped dataset is not changed; ``len(ds) == len(dataset)``. Picklable, so it works in
    DataLoader worker processes.
    """

    def __init__(self, dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"Indexed: dataset must be map-style (define __getitem__ and __len__), got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Sample:
        n = len(self.dataset)
        if not -n <= i < n:
            raise IndexError(f"Indexed: index {i} out of range for a dataset of {n} items")
        i = int(i) % n if n else int(i)
        return Sample(i, 0, self.dataset[i])

"""Indexed and Sample: attach each example's identity without touching the user's Dataset.

``Indexed(dataset)`` numbers a map-style dataset by position; ``Indexed(dataset, views=V, seed=S)``
adds test-time-augmentation views whose random transforms are reproducible, so that
``replay(index, view)`` rebuilds any augmented input on demand; ``Indexed(iterable, key=fn)``
takes the identity of a streamed example from the example itself.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ._checks import check_int, is_iterable_only

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None

__all__ = ["Sample", "Indexed", "IndexedIterable"]


class Sample(NamedTuple):
    """One example with its identity: ``index`` in the dataset, ``view`` (augmentation view id)."""

    index: int
    view: int
    data: Any


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from a tuple of ints, the same in every process and Python version.

    ``hash()`` is salted per process, so DataLoader workers and a later ``replay`` would disagree.
    """
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, ``random`` and numpy's global RNG; restore the caller's states after.

    CUDA generators are left alone: seeding them would initialise CUDA in DataLoader workers.
    """
    torch_state = torch.default_generator.get_state()
    random_state = random.getstate()
    numpy_state = np.random.get_state() if np is not None else None
    try:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        if np is not None:
            np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
        yield
    finally:
        torch.default_generator.set_state(torch_state)
        random.setstate(random_state)
        if np is not None:
            np.random.set_state(numpy_state)


class Indexed(Dataset):
    """Wrap a dataset so that every item carries its identity as a :class:`Sample`.

    Map-style datasets:

    - ``Indexed(dataset)``: ``ds[i]`` is ``Sample(index=i, view=0, data=dataset[i])`` and
      ``len(ds) == len(dataset)``. Random transforms in ``dataset`` behave exactly as without
      the wrapper (a fresh draw on every access).
    - ``Indexed(dataset, views=V, seed=S)``: test-time augmentation. ``len(ds) == V * len(dataset)``;
      item ``j`` is example ``j // V``, view ``j % V``. Around each ``dataset[index]`` call, torch's
      CPU generator, ``random`` and numpy's global RNG (when numpy is installed) are seeded from
      ``(S, index, view)``, and the caller's RNG states are restored afterwards. Any transform that
      draws from those RNGs is therefore a pure function of ``(S, index, view)``: the same in every
      DataLoader worker, run and epoch, and :meth:`replay` rebuilds it bitwise without storing it.
      Transforms with their own generators (``numpy.random.default_rng()``, a CUDA generator) are
      not covered. ``views=V`` without a seed gives V independent, non-replayable draws. Saving
      and restoring the three RNG states costs tens of microseconds per item.

    ``Indexed(iterable, key=fn)`` with an IterableDataset (or any iterable without
    ``__getitem__``/``__len__``) returns an :class:`IndexedIterable` instead; see there.

    The wrapped dataset is not changed. Picklable, so it works in DataLoader worker processes.
    """

    def __new__(cls, dataset=None, views: int = 1, seed: int | None = None, key: Callable | None = None):
        if cls is Indexed and dataset is not None and is_iterable_only(dataset):
            return IndexedIterable(dataset, views=views, seed=seed, key=key)
        return super().__new__(cls)

    def __init__(self, dataset, views: int = 1, seed: int | None = None, key: Callable | None = None) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"Indexed: dataset must be map-style (define __getitem__ and __len__) or iterable, "
                f"got {type(dataset).__name__}"
            )
        if key is not None:
            raise ValueError(
                "Indexed: key applies to iterable datasets only; a map-style dataset's items are "
                f"numbered by position, got key={key!r}"
            )
        self.dataset = dataset
        self.views = check_int("Indexed", "views", views, minimum=1)
        self.seed = None if seed is None else check_int("Indexed", "seed", seed)

    def __len__(self) -> int:
        return self.views * len(self.dataset)

    def __repr__(self) -> str:
        seed = "" if self.seed is None else f", seed={self.seed}"
        return f"Indexed({type(self.dataset).__name__} of {len(self.dataset)} items, views={self.views}{seed})"

    def __getitem__(self, i: int) -> Sample:
        n = len(self)
        if isinstance(i, (list, tuple)):
            raise TypeError(
                f"Indexed: index must be an int, got {type(i).__name__} (a whole batch of indices): a "
                "sampler that yields batches, such as pc.LengthBucketSampler, goes to "
                "DataLoader(..., batch_sampler=sampler), not sampler="
            )
        i = check_int("Indexed", "index", i)
        if not -n <= i < n:
            raise IndexError(f"Indexed: index {i} out of range for a dataset of {n} items")
        index, view = divmod(i % n, self.views)
        return Sample(index, view, self._load(index, view))

    def replay(self, index: int, view: int = 0) -> Sample:
        """The exact ``Sample`` that item ``index * views + view`` produced, rebuilt from the seed.

        ``index`` is the example's position in the wrapped dataset (``batch.index``), ``view``
        its view (``batch.view``). Needs ``seed``: without it augmentations are not reproducible.
        """
        if self.seed is None:
            raise ValueError("Indexed.replay: needs a seed to rebuild augmented samples, got seed=None; wrap with Indexed(dataset, views=V, seed=S)")
        n = len(self.dataset)
        index = check_int("Indexed.replay", "index", index)
        view = check_int("Indexed.replay", "view", view)
        if not 0 <= index < n:
            raise IndexError(f"Indexed.replay: index must be in [0, {n}), got {index}")
        if not 0 <= view < self.views:
            raise IndexError(f"Indexed.replay: view must be in [0, {self.views}), got {view}")
        return Sample(index, view, self._load(index, view))

    def _load(self, index: int, view: int):
        if self.seed is None:
            return self.dataset[index]
        with seeded_rngs(derive_seed(self.seed, index, view)):
            return self.dataset[index]


class IndexedIterable(IterableDataset):
    """An iterable dataset whose examples come out as ``Sample(index, 0, example)``.

    Built by ``Indexed(iterable, key=fn)``. With ``key``, ``index = key(example)`` (an int id
    the example carries), which is right however the stream is split among DataLoader workers or
    ranks. Without ``key`` the examples are numbered 0, 1, 2, ... in the order this process
    iterates them. That numbering is stable only when one process iterates the whole,
    deterministic stream: ``num_workers`` 0 or 1, and no sharding over distributed ranks. With
    several DataLoader workers each worker would number its own share from 0, so iterating
    raises a RuntimeError there; for a dataset that shards by worker or by rank, give it a key
    (the dataset knows each example's global position when it shards).

    Views and seeds need to call the dataset again for the same example, which a stream cannot
    do: they are rejected.
    """

    def __init__(self, dataset, views: int = 1, seed: int | None = None, key: Callable | None = None) -> None:
        if not hasattr(dataset, "__iter__"):
            raise TypeError(f"Indexed: dataset must be map-style or iterable, got {type(dataset).__name__}")
        if views != 1 or seed is not None:
            raise ValueError(
                "Indexed: views and seed need a map-style dataset (an example must be loadable again by "
                f"index), got an iterable {type(dataset).__name__} with views={views!r}, seed={seed!r}"
            )
        if key is not None and not callable(key):
            raise TypeError(f"Indexed: key must be a callable returning each example's int id, got {type(key).__name__}")
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        key = "position" if self.key is None else getattr(self.key, "__name__", repr(self.key))
        return f"Indexed({type(self.dataset).__name__}, key={key})"

    def __iter__(self) -> Iterator[Sample]:
        if self.key is None:
            info = get_worker_info()
            if info is not None and info.num_workers > 1:
                raise RuntimeError(
                    f"Indexed: numbering an iterable dataset in order needs a single process, got DataLoader "
                    f"num_workers={info.num_workers}: each worker would number its own examples from 0. "
                    "Pass key=fn returning each example's int id, or use num_workers <= 1."
                )
            for i, example in enumerate(self.dataset):
                yield Sample(i, 0, example)
            return
        for example in self.dataset:
            yield Sample(check_int("Indexed", "key(example)", self.key(example)), 0, example)

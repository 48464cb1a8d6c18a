"""Indexed and Sample: attach each example's identity without touching the user's Dataset.

``Indexed(dataset)`` numbers a map-style dataset by position; ``Indexed(dataset, views=V, seed=S)``
adds test-time-augmentation views whose random transforms are reproducible, so that
``replay(index, view)`` rebuilds any augmented input on demand; ``Indexed(dataset, key=...)``
takes each example's own identity (an id field, a WebDataset ``__key__``) from the example.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ._checks import check_int, is_iterable_only
from ._keys import check_key

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None

__all__ = ["Sample", "Indexed", "IndexedIterable"]


class Sample(tuple):
    """One example with its identity: ``index`` in the dataset, ``view`` (augmentation view id),
    and ``key``, the identity the example carries itself (None without one: see ``Indexed(key=)``).

    A named tuple of ``(index, view, data)``, or ``(index, view, data, key)`` when it has a key:
    torch's default collate, which cannot collate None, then still takes either.
    """

    __slots__ = ()
    _fields = ("index", "view", "data", "key")  # what namedtuple-aware code (default_collate) looks for

    def __new__(cls, index: int, view: int, data: Any, key: Any = None):
        return tuple.__new__(cls, (index, view, data) if key is None else (index, view, data, key))

    def __getnewargs__(self):
        return tuple(self)

    @property
    def index(self) -> int:
        return self[0]

    @property
    def view(self) -> int:
        return self[1]

    @property
    def data(self) -> Any:
        return self[2]

    @property
    def key(self) -> Any:
        return self[3] if len(self) > 3 else None

    def _asdict(self) -> dict:
        return {"index": self[0], "view": self[1], "data": self[2], "key": self.key}

    def _replace(self, **changes) -> "Sample":
        return Sample(**{**self._asdict(), **changes})

    def __repr__(self) -> str:
        key = "" if len(self) < 4 else f", key={self[3]!r}"
        return f"Sample(index={self[0]!r}, view={self[1]!r}, data={self[2]!r}{key})"


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

    ``Indexed(dataset, key="id")`` (a field name) or ``key=fn`` (a callable of the example):
    every Sample also carries the example's own key, ``Sample.key`` (an int of any int64 value,
    a str, bytes, or a tuple of those), which becomes ``batch.key`` and makes a Recorder file the
    outputs by it; ``ds[i].index`` stays the position ``i``, so replay and bucketing still work.

    ``Indexed(iterable, key=...)`` with an IterableDataset (or any iterable without
    ``__getitem__``/``__len__``) returns an :class:`IndexedIterable` instead; see there.

    The wrapped dataset is not changed. Picklable, so it works in DataLoader worker processes
    (a ``key`` function too, as long as it pickles: a module-level function, not a lambda, under
    the spawn start method).
    """

    def __new__(cls, dataset=None, views: int = 1, seed: int | None = None, key=None):
        if cls is Indexed and dataset is not None and is_iterable_only(dataset):
            return IndexedIterable(dataset, views=views, seed=seed, key=key)
        return super().__new__(cls)

    def __init__(self, dataset, views: int = 1, seed: int | None = None, key=None) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"Indexed: dataset must be map-style (define __getitem__ and __len__) or iterable, "
                f"got {type(dataset).__name__}"
            )
        self.dataset = dataset
        self.views = check_int("Indexed", "views", views, minimum=1)
        self.seed = None if seed is None else check_int("Indexed", "seed", seed)
        self.key = _key_getter(key)

    def __len__(self) -> int:
        return self.views * len(self.dataset)

    def __repr__(self) -> str:
        seed = "" if self.seed is None else f", seed={self.seed}"
        key = "" if self.key is None else f", key={_key_name(self.key)}"
        return f"Indexed({type(self.dataset).__name__} of {len(self.dataset)} items, views={self.views}{seed}{key})"

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
        return self._sample(index, view)

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
        return self._sample(index, view)

    def _sample(self, index: int, view: int) -> Sample:
        data = self._load(index, view)
        return Sample(index, view, data, None if self.key is None else _key_of(self.key, data, f"example {index}"))

    def _load(self, index: int, view: int):
        if self.seed is None:
            return self.dataset[index]
        with seeded_rngs(derive_seed(self.seed, index, view)):
            return self.dataset[index]


class IndexedIterable(IterableDataset):
    """An iterable dataset whose examples come out as ``Sample(index, 0, example)``.

    Built by ``Indexed(iterable, key=...)``. With ``key`` (a callable of the example, or the name
    of its id field), every Sample carries ``key`` = the example's own key (an int of any int64
    value, a str such as WebDataset's ``__key__``, bytes, or a tuple of those), which is right
    however the stream is split among DataLoader workers or ranks; ``index`` is then the key
    itself when it is an int, else the example's position in this process's share of the
    stream (not an identity). Without ``key`` the examples are numbered 0, 1, 2, ... in the
    order this process iterates them. That numbering is stable only when one process iterates the whole,
    deterministic stream: ``num_workers`` 0 or 1, and no sharding over distributed ranks. With
    several DataLoader workers each worker would number its own share from 0, so iterating
    raises a RuntimeError there; for a dataset that shards by worker or by rank, give it a key
    (the dataset knows each example's global position when it shards).

    Views and seeds need to call the dataset again for the same example, which a stream cannot
    do: they are rejected.
    """

    def __init__(self, dataset, views: int = 1, seed: int | None = None, key=None) -> None:
        if not hasattr(dataset, "__iter__"):
            raise TypeError(f"Indexed: dataset must be map-style or iterable, got {type(dataset).__name__}")
        if views != 1 or seed is not None:
            raise ValueError(
                "Indexed: views and seed need a map-style dataset (an example must be loadable again by "
                f"index), got an iterable {type(dataset).__name__} with views={views!r}, seed={seed!r}"
            )
        self.dataset = dataset
        self.key = _key_getter(key)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        key = "position" if self.key is None else _key_name(self.key)
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
        for i, example in enumerate(self.dataset):
            key = _key_of(self.key, example, f"example {i} of this process's stream")
            yield Sample(key if isinstance(key, int) else i, 0, example, key)


class _Field:
    """``key="id"``: an example's key is its field ``id`` (a mapping's item, else an attribute)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, example):
        if isinstance(example, Mapping):
            return example[self.name]
        return getattr(example, self.name)


def _key_getter(key) -> Optional[Callable]:
    if key is None or callable(key):
        return key
    if isinstance(key, str):
        return _Field(key)
    raise TypeError(f"Indexed: key must be None, a field name (str) or a callable of the example, got {type(key).__name__}")


def _key_name(key: Callable) -> str:
    return repr(key.name) if isinstance(key, _Field) else getattr(key, "__name__", repr(key))


def _key_of(key: Callable, example, what: str):
    """``key(example)``, checked; errors name the example and the key."""
    try:
        value = key(example)
    except Exception as exc:
        message = f"Indexed: key={_key_name(key)} raised {type(exc).__name__} on {what}: {exc}"
        # The usual failures keep their type (a missing field is still a KeyError); others say what raised.
        raise (type(exc) if type(exc) in (KeyError, AttributeError, TypeError, ValueError) else RuntimeError)(message) from exc
    return check_key("Indexed", value, f"the key of {what}")

"""LengthBucketSampler and lengths_of: batches of examples of similar length, sharded exactly once.

Padding costs compute in proportion to ``batch_size * max_len``; grouping examples of similar
length removes most of it. The batches hold dataset positions, and the Collator carries each
example's identity, so predictions land in dataset order whatever order the batches ran in.
"""
from __future__ import annotations

import heapq
from typing import Iterator, List

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from . import _progress
from ._checks import check_int, is_iterable_only
from .dataset import Sample, derive_seed

__all__ = ["LengthBucketSampler", "lengths_of"]


def _as_lengths(lengths) -> torch.Tensor:
    owner = "LengthBucketSampler"
    try:
        t = torch.as_tensor(lengths).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{owner}: lengths must be a 1-D sequence, numpy array or tensor of ints, got {type(lengths).__name__} ({exc})") from None
    if t.numel() == 0 and t.dim() == 1:
        return t.long()
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{owner}: lengths must hold integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{owner}: lengths must be 1-D (one length per example), got shape {tuple(t.shape)}")
    t = t.long()
    if t.numel() and t.min().item() < 0:
        i = int((t < 0).nonzero()[0])
        raise ValueError(f"{owner}: lengths must be >= 0, got lengths[{i}] = {t[i].item()}")
    return t


def _positions(sampler, n: int) -> torch.Tensor:
    """The dataset positions ``sampler`` yields (all of ``range(n)`` without one), each at most once."""
    if sampler is None:
        return torch.arange(n)
    owner = "LengthBucketSampler"
    if not hasattr(sampler, "__iter__"):
        raise TypeError(f"{owner}: sampler must be None or a Sampler (an iterable of dataset positions), got {type(sampler).__name__}")
    positions = torch.as_tensor(list(sampler), dtype=torch.long)
    if positions.dim() != 1 or (positions.numel() and not (0 <= int(positions.min()) and int(positions.max()) < n)):
        raise ValueError(f"{owner}: sampler must yield positions in [0, {n}) (one per example of lengths), got {positions.tolist()[:8]}")
    if positions.unique().numel() != positions.numel():
        raise ValueError(f"{owner}: sampler must yield each position at most once, got {positions.numel() - positions.unique().numel()} repeats")
    return positions


def _world(num_replicas, rank) -> tuple:
    owner = "LengthBucketSampler"
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    num_replicas = check_int(owner, "num_replicas", num_replicas, minimum=1)
    if rank is None:
        if initialized:
            rank = dist.get_rank()
        elif num_replicas == 1:
            rank = 0
        else:
            raise ValueError(f"{owner}: rank must be given with num_replicas={num_replicas} when torch.distributed is not initialized, got rank=None")
    rank = check_int(owner, "rank", rank)
    if not 0 <= rank < num_replicas:
        raise ValueError(f"{owner}: rank must be in [0, {num_replicas}) (num_replicas={num_replicas}), got {rank}")
    return num_replicas, rank


def _token_budget_ends(sorted_lengths: torch.Tensor, max_tokens: int) -> List[int]:
    """Greedy batch ends over ascending lengths: each batch takes as many examples as fit.

    Batch ``[s, e)`` fits when ``(e - s) * sorted_lengths[e - 1] <= max_tokens``, i.e. when
    ``s >= first_start[e - 1] = e - max_tokens // sorted_lengths[e - 1]``; ``first_start`` never
    decreases, so the longest batch from ``s`` ends at ``searchsorted(first_start, s, right)``.
    """
    n = sorted_lengths.numel()
    # A batch of empty sequences holds at most max_tokens of them, the cap of length-1 ones.
    cap = max_tokens // sorted_lengths.clamp(min=1)
    first_start = torch.arange(1, n + 1) - cap
    end_from = torch.searchsorted(first_start, torch.arange(n), right=True).tolist()
    ends, s = [], 0
    while s < n:
        s = end_from[s]
        ends.append(s)
    return ends


def _packed_batches(lengths: torch.Tensor, max_tokens: int) -> List[List[int]]:
    """Batches whose lengths add up to at most ``max_tokens`` (an item longer than that alone):
    worst-fit decreasing, each item, longest first, into the batch with the most room left, so
    that batches come out full and with similar token totals."""
    sizes = lengths.tolist()
    heap: List[tuple] = []  # (-room, batch): the roomiest batch on top
    batches: List[List[int]] = []
    for i in torch.argsort(lengths, descending=True, stable=True).tolist():
        size = sizes[i]
        if heap and -heap[0][0] >= size:
            room, b = heapq.heappop(heap)
            batches[b].append(i)
            room = -room - size
        else:
            b, room = len(batches), max_tokens - size
            batches.append([i])
        if room > 0:
            heapq.heappush(heap, (-room, b))
    return batches


def _split_batches_to_multiple(batches: List[List[int]], multiple: int) -> List[List[int]]:
    """Halve the batches of most examples until their number is a multiple of ``multiple`` (each
    half stays where its batch was)."""
    heap = [(-len(b), (k,), b) for k, b in enumerate(batches)]
    heapq.heapify(heap)
    for _ in range(-len(batches) % multiple):
        _, place, b = heapq.heappop(heap)
        half = (len(b) + 1) // 2
        heapq.heappush(heap, (-half, place + (0,), b[:half]))
        heapq.heappush(heap, (half - len(b), place + (1,), b[half:]))
    return [b for _, _, b in sorted(heap, key=lambda entry: entry[1])]


def _split_to_multiple(starts: List[int], ends: List[int], multiple: int) -> tuple:
    """Halve the largest batches until their number is a multiple of ``multiple`` (order kept)."""
    need = -len(starts) % multiple
    heap = [(s - e, s, e) for s, e in zip(starts, ends)]
    heapq.heapify(heap)
    for _ in range(need):
        _, s, e = heapq.heappop(heap)
        mid = s + (e - s + 1) // 2
        heapq.heappush(heap, (s - mid, s, mid))
        heapq.heappush(heap, (mid - e, mid, e))
    spans = sorted((s, e) for _, s, e in heap)
    return [s for s, _ in spans], [e for _, e in spans]


class LengthBucketSampler(Sampler[List[int]]):
    """A ``batch_sampler`` whose batches hold examples of similar length.

    Use it as ``DataLoader(dataset, batch_sampler=LengthBucketSampler(lengths, ...), collate_fn=...)``;
    it yields lists of dataset positions. ``lengths[i]`` is the length of example ``i`` (a list,
    numpy array or tensor of ints; :func:`lengths_of` computes it from a dataset once).

    Batching, set by exactly one of:

    - ``batch_size``: examples sorted by length, cut into batches of ``batch_size``.
      ``drop_last=True`` drops ``len(lengths) % batch_size`` examples so that every batch is
      full: the longest ones without shuffle (as ``BatchSampler`` drops the last batch), a
      random choice per epoch with shuffle (so no example is always left out).
    - ``max_tokens``: dynamic batch size. Over the examples sorted by length, each batch takes
      as many examples as keep ``len(batch) * max(length in batch) <= max_tokens`` (the padded
      size, before any ``pad_to_multiple_of``). An example longer than ``max_tokens`` is an error.
      With ``packed=True`` (for ``Collator(packed=True)``) the budget counts real tokens: a
      batch's lengths add up to at most ``max_tokens``, so packed batches are full, and an
      example longer than that goes alone in its batch. Long and short examples are mixed (each,
      longest first, into the batch with the most room left), so that batches hold similar token
      totals.

    ``shuffle=True`` varies the batches per epoch, reproducibly from ``seed`` and
    :meth:`set_epoch`: examples of equal length are tied at random, and the batch order is
    shuffled. Without shuffle, batches come from the shortest to the longest. The batch
    boundaries, hence ``len()``, do not depend on the epoch.

    Sharding (``num_replicas``/``rank``, read from ``torch.distributed`` when it is initialized
    and they are None): every rank builds the same batches, and rank ``r`` takes batches
    ``r, r + num_replicas, ...``. Every example is yielded exactly once across all ranks (no
    padding with duplicates, unlike ``DistributedSampler``), and no rank is idle unless there
    are fewer batches than ranks: then ranks ``>= num_batches`` get empty iterators. Ranks may
    therefore get numbers of batches that differ by one, which is fine for inference but hangs
    collective operations that every rank must join on every step (DDP training, SyncBatchNorm).
    ``even_batches=True`` halves the largest batches until the number of batches is a multiple
    of ``num_replicas``, so that every rank gets the same number, still each example exactly
    once; it needs at least that many examples.

    ``sampler`` (a Sampler of dataset positions) restricts the batches to the positions it
    yields; a ``DistributedSampler`` among them (what Lightning injects) is taken as this rank's
    shard, so ``num_replicas``/``rank`` are not applied again. Lightning's ``Trainer`` rebuilds the
    sampler that way, with every other argument kept, in ``fit``, ``validate`` and ``predict``
    (single process or DDP, with or without ``use_distributed_sampler``).

    ``len(sampler)`` is this rank's number of batches, exactly. Picklable.

    Bucketed batches often hold examples of one length; the Collator still gives each of them
    lengths and a mask (a batch's schema never depends on its lengths).
    """

    def __init__(
        self,
        lengths,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        even_batches: bool = False,
        sampler=None,
        packed: bool = False,
    ) -> None:
        owner = "LengthBucketSampler"
        # Lightning rebuilds a batch sampler from these (replacing ``sampler`` and, to predict,
        # ``drop_last``) instead of calling cls(sampler, batch_size=..., drop_last=...), which loses the lengths.
        setattr(self, "__pl_saved_args", ())
        setattr(self, "__pl_saved_kwargs", dict(
            lengths=lengths, batch_size=batch_size, max_tokens=max_tokens, shuffle=shuffle, seed=seed, drop_last=drop_last,
            num_replicas=num_replicas, rank=rank, even_batches=even_batches, sampler=sampler, packed=packed,
        ))
        setattr(self, "__pl_saved_default_kwargs", {})
        setattr(self, "__pl_saved_arg_names", ())
        self.lengths = _as_lengths(lengths)
        self.positions = _positions(sampler, self.lengths.numel())
        if isinstance(sampler, DistributedSampler):
            num_replicas, rank = 1, 0  # the sampler already holds this rank's shard
        if (batch_size is None) == (max_tokens is None):
            raise ValueError(f"{owner}: give exactly one of batch_size and max_tokens, got batch_size={batch_size!r}, max_tokens={max_tokens!r}")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last), ("even_batches", even_batches), ("packed", packed)):
            if not isinstance(flag, bool):
                raise TypeError(f"{owner}: {name} must be a bool, got {type(flag).__name__}")
        self.batch_size = None if batch_size is None else check_int(owner, "batch_size", batch_size, minimum=1)
        self.max_tokens = None if max_tokens is None else check_int(owner, "max_tokens", max_tokens, minimum=1)
        if packed and self.max_tokens is None:
            raise ValueError(f"{owner}: packed=True counts real tokens against a budget: give max_tokens, got batch_size={batch_size!r}")
        if drop_last and self.max_tokens is not None:
            raise ValueError(f"{owner}: drop_last applies to batch_size (it drops examples that would make a partial batch); with max_tokens every batch is sized by its budget, got drop_last=True")
        self.shuffle = shuffle
        self.seed = check_int(owner, "seed", seed)
        self.drop_last = drop_last
        self.even_batches = even_batches
        self.packed = packed
        self.num_replicas, self.rank = _world(num_replicas, rank)
        self.epoch = 0

        lengths = self.lengths[self.positions]
        n = lengths.numel()
        self._sorted = torch.argsort(lengths, stable=True)
        self._packed: List[List[int]] = []
        if packed:
            self.num_examples = n
            self._packed = _packed_batches(lengths, self.max_tokens)
            if even_batches:
                if n < len(self._packed) + (-len(self._packed) % self.num_replicas):
                    raise ValueError(f"{owner}: even_batches needs a number of batches that num_replicas={self.num_replicas} "
                                     f"divides, more than the {n} examples; use even_batches=False")
                self._packed = _split_batches_to_multiple(self._packed, self.num_replicas)
            self._starts = self._ends = [0] * len(self._packed)
            return
        if self.batch_size is not None:
            self.num_examples = n - n % self.batch_size if drop_last else n
            starts = list(range(0, self.num_examples, self.batch_size))
            ends = [min(s + self.batch_size, self.num_examples) for s in starts]
        else:
            self.num_examples = n
            if n and lengths[self._sorted[-1]].item() > self.max_tokens:
                longest = int(self.positions[self._sorted[-1]])
                raise ValueError(f"{owner}: example {longest} has length {self.lengths[longest].item()}, more than max_tokens = {self.max_tokens}")
            ends = _token_budget_ends(lengths[self._sorted], self.max_tokens)
            starts = [0, *ends[:-1]] if ends else []
        if even_batches:
            target = len(starts) + (-len(starts) % self.num_replicas)
            if target > self.num_examples:
                raise ValueError(
                    f"{owner}: even_batches needs {target} batches (a multiple of num_replicas={self.num_replicas}) "
                    f"but there are only {self.num_examples} examples; use even_batches=False (ranks >= the number of batches get none)"
                )
            starts, ends = _split_to_multiple(starts, ends, self.num_replicas)
        self._starts, self._ends = starts, ends

    @property
    def num_batches(self) -> int:
        """Number of batches over all ranks, in every epoch."""
        return len(self._starts)

    def __repr__(self) -> str:
        budget = f"batch_size={self.batch_size}" if self.batch_size is not None else f"max_tokens={self.max_tokens}"
        if self.packed:
            budget += ", packed"
        return (
            f"LengthBucketSampler({self.lengths.numel()} examples, {budget}, {self.num_batches} batches, "
            f"shuffle={self.shuffle}, rank {self.rank} of {self.num_replicas}, epoch={self.epoch})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle :meth:`__iter__` yields (no effect without shuffle)."""
        self.epoch = check_int("LengthBucketSampler", "epoch", epoch)

    def __len__(self) -> int:
        return len(range(self.rank, self.num_batches, self.num_replicas))

    def _order(self) -> tuple:
        """This epoch's example order (by length) and batch order, identical on every rank."""
        if not self.shuffle:
            return self._sorted[: self.num_examples], torch.arange(self.num_batches)
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        lengths = self.lengths[self.positions]
        kept = torch.randperm(lengths.numel(), generator=g)[: self.num_examples]
        order = kept[torch.argsort(lengths[kept], stable=True)]
        return order, torch.randperm(self.num_batches, generator=g)

    def __iter__(self) -> Iterator[List[int]]:
        if self.packed:
            batch_order = torch.arange(self.num_batches)
            if self.shuffle:
                batch_order = torch.randperm(self.num_batches, generator=torch.Generator().manual_seed(derive_seed(self.seed, self.epoch)))
            positions = self.positions.tolist()
            for b in batch_order[self.rank :: self.num_replicas].tolist():
                yield [positions[i] for i in self._packed[b]]
            return
        order, batch_order = self._order()
        order = self.positions[order].tolist()
        for b in batch_order[self.rank :: self.num_replicas].tolist():
            yield order[self._starts[b] : self._ends[b]]


class _LengthOfItem(Dataset):
    """``dataset[i]`` mapped to the length of its ``field``: lets lengths_of run in DataLoader workers."""

    def __init__(self, dataset, field) -> None:
        self.dataset = dataset
        self.field = field

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> int:
        data = self.dataset[i]
        if isinstance(data, Sample):
            data = data.data
        if self.field is not None:
            try:
                data = data[self.field]
            except (KeyError, IndexError, TypeError) as exc:
                raise ValueError(f"lengths_of: item {i} has no field {self.field!r} ({type(exc).__name__}: {exc})") from None
        shape = getattr(data, "shape", None)
        if shape is not None:
            if len(shape) == 0:
                raise TypeError(f"lengths_of: field {self.field!r} of item {i} must have a leading length dimension, got a 0-d {type(data).__name__}")
            return int(shape[0])
        try:
            return len(data)
        except TypeError:
            raise TypeError(f"lengths_of: field {self.field!r} of item {i} must be a sequence, got {type(data).__name__}") from None


def lengths_of(dataset, field=None, num_workers: int = 0, progress: bool = False) -> torch.Tensor:
    """Length of one field of every example, as an int64 tensor ``[len(dataset)]``, computed once.

    ``dataset`` is map-style: a plain dataset, or a :class:`~provcollate.Indexed` one (its
    :class:`~provcollate.Sample` wrappers are looked through; with views, every view is loaded,
    so lengths are right even when a seeded augmentation changes them; an unseeded one that
    changes lengths gives lengths that later loads need not match). ``field`` is a key or position
    into each example (``"input_ids"``, ``0``), or None when the example is the sequence itself.
    A length is ``value.shape[0]`` for tensors and arrays, ``len(value)`` for other sequences.
    ``num_workers > 0`` loads the examples in DataLoader worker processes. The result indexes
    like ``dataset``, ready for :class:`LengthBucketSampler`. ``progress=True`` shows a tqdm bar
    (tqdm must be installed); the count and longest length are logged on the ``provcollate``
    logger at INFO.
    """
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__") or is_iterable_only(dataset):
        raise TypeError(f"lengths_of: dataset must be map-style (define __getitem__ and __len__), got {type(dataset).__name__}")
    num_workers = check_int("lengths_of", "num_workers", num_workers, minimum=0)
    loader = DataLoader(_LengthOfItem(dataset, field), batch_size=1024, num_workers=num_workers, collate_fn=torch.tensor)
    parts = list(_progress.bar("lengths_of", progress, loader, len(loader), "lengths_of", "batch"))
    lengths = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    _progress.logger.info("lengths_of: %d items, longest %d", len(lengths), int(lengths.max()) if len(lengths) else 0)
    return lengths

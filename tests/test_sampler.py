"""LengthBucketSampler and lengths_of: exactly-once sharding, token budgets, reproducible shuffles."""
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import provcollate as pc

lengths_lists = st.lists(st.integers(0, 40), max_size=120)


def all_ranks(lengths, num_replicas, **kwargs):
    """Batches of every rank, in rank order, and the samplers that made them."""
    samplers = [pc.LengthBucketSampler(lengths, num_replicas=num_replicas, rank=r, **kwargs) for r in range(num_replicas)]
    return [list(s) for s in samplers], samplers


def check_partition(lengths, per_rank, samplers, expected_examples):
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert all(c == 1 for c in seen.values()), "an example was yielded twice"
    assert len(seen) == expected_examples
    assert set(seen) <= set(range(len(lengths)))
    for batches, s in zip(per_rank, samplers):
        assert len(s) == len(batches)
        assert all(len(b) > 0 for b in batches)
    num_batches = sum(len(b) for b in per_rank)
    assert all(s.num_batches == num_batches for s in samplers)
    # No rank idle unless there are fewer batches than ranks.
    for r, batches in enumerate(per_rank):
        assert (len(batches) == 0) == (r >= num_batches)
    counts = [len(b) for b in per_rank]
    assert max(counts) - min(counts) <= 1


def check_buckets(lengths, per_rank):
    """Batches never interleave in length: each one is a run of the sorted lengths."""
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for batches in per_rank for b in batches)
    for (_, hi), (lo, _) in zip(spans, spans[1:]):
        assert hi <= lo


@settings(max_examples=120, deadline=None)
@given(lengths=lengths_lists, batch_size=st.integers(1, 9), world=st.integers(1, 4), shuffle=st.booleans(),
       drop_last=st.booleans(), seed=st.integers(0, 2**40), epoch=st.integers(0, 5))
def test_batch_size_every_example_once(lengths, batch_size, world, shuffle, drop_last, seed, epoch):
    per_rank, samplers = [], []
    for r in range(world):
        s = pc.LengthBucketSampler(lengths, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, num_replicas=world, rank=r)
        s.set_epoch(epoch)
        per_rank.append(list(s))
        samplers.append(s)
    n = len(lengths)
    kept = n - n % batch_size if drop_last else n
    check_partition(lengths, per_rank, samplers, kept)
    check_buckets(lengths, per_rank)
    sizes = sorted(len(b) for batches in per_rank for b in batches)
    if drop_last:
        assert all(size == batch_size for size in sizes)
    else:
        assert all(size == batch_size for size in sizes[1:]) and (not sizes or sizes[0] == (n % batch_size or batch_size))


@settings(max_examples=120, deadline=None)
@given(lengths=lengths_lists, slack=st.integers(0, 60), world=st.integers(1, 4), shuffle=st.booleans(), seed=st.integers(0, 99))
def test_max_tokens_every_example_once_and_budget(lengths, slack, world, shuffle, seed):
    max_tokens = max(lengths, default=0) + slack + 1
    per_rank, samplers = all_ranks(lengths, world, max_tokens=max_tokens, shuffle=shuffle, seed=seed)
    check_partition(lengths, per_rank, samplers, len(lengths))
    check_buckets(lengths, per_rank)
    for batches in per_rank:
        for b in batches:
            assert len(b) * max(lengths[i] for i in b) <= max_tokens
            assert len(b) <= max_tokens


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), max_size=120), slack=st.integers(0, 60))
def test_max_tokens_batches_are_greedy(lengths, slack):
    """Each batch (in sorted order) is as large as the budget allows: the next example would not fit."""
    max_tokens = max(lengths, default=1) + slack
    batches = list(pc.LengthBucketSampler(lengths, max_tokens=max_tokens))
    for b, nxt in zip(batches, batches[1:]):
        longest_next = lengths[nxt[0]]
        assert (len(b) + 1) * longest_next > max_tokens


def test_unshuffled_order_is_ascending_and_stable():
    lengths = [5, 3, 8, 1, 1, 9, 2, 7]
    batches = list(pc.LengthBucketSampler(lengths, batch_size=3))
    assert batches == [[3, 4, 6], [1, 0, 7], [2, 5]]
    assert list(pc.LengthBucketSampler(torch.tensor(lengths), max_tokens=10)) == [[3, 4, 6], [1, 0], [7], [2], [5]]


def test_shuffle_reproducible_per_seed_and_epoch():
    lengths = torch.randint(0, 20, (500,), generator=torch.Generator().manual_seed(0))

    def run(seed, epoch, **kwargs):
        s = pc.LengthBucketSampler(lengths, batch_size=16, shuffle=True, seed=seed, **kwargs)
        s.set_epoch(epoch)
        return list(s)

    assert run(3, 2) == run(3, 2)
    assert run(3, 2, max_tokens=None) == run(3, 2)
    assert run(3, 1) != run(3, 2)
    assert run(4, 2) != run(3, 2)
    # Seed and epoch are mixed, not added: (seed 1, epoch 0) is not (seed 0, epoch 1).
    assert run(1, 0) != run(0, 1)
    # Epochs also break length ties differently, not only reorder the batches.
    assert sorted(map(sorted, run(3, 1))) != sorted(map(sorted, run(3, 2)))
    unshuffled = pc.LengthBucketSampler(lengths, batch_size=16)
    first = list(unshuffled)
    unshuffled.set_epoch(7)
    assert list(unshuffled) == first


def test_drop_last_with_shuffle_varies_the_dropped_examples():
    lengths = [4] * 10 + [9] * 3
    dropped = set()
    for epoch in range(20):
        s = pc.LengthBucketSampler(lengths, batch_size=4, shuffle=True, drop_last=True)
        s.set_epoch(epoch)
        kept = {i for b in s for i in b}
        assert len(kept) == 12
        dropped |= set(range(13)) - kept
    assert len(dropped) > 1
    unshuffled = list(pc.LengthBucketSampler(lengths, batch_size=4, drop_last=True))
    assert {i for b in unshuffled for i in b} == set(range(12))


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=4, max_size=80), world=st.integers(1, 4),
       size=st.integers(1, 12), by_tokens=st.booleans(), shuffle=st.booleans())
def test_even_batches(lengths, world, size, by_tokens, shuffle):
    """Every rank gets the same number of batches, each example still exactly once, within the budget."""
    budget = dict(max_tokens=max(lengths) + size) if by_tokens else dict(batch_size=size)
    batches = pc.LengthBucketSampler(lengths, **budget).num_batches
    if batches + (-batches % world) > len(lengths):
        with pytest.raises(ValueError, match="even_batches needs"):
            pc.LengthBucketSampler(lengths, **budget, num_replicas=world, rank=0, even_batches=True)
        return
    per_rank, samplers = all_ranks(lengths, world, **budget, shuffle=shuffle, even_batches=True)
    check_partition(lengths, per_rank, samplers, len(lengths))
    check_buckets(lengths, per_rank)
    assert len({len(b) for b in per_rank}) == 1
    for b in (b for batches in per_rank for b in batches):
        assert len(b) <= budget["batch_size"] if not by_tokens else len(b) * max(lengths[i] for i in b) <= budget["max_tokens"]


def test_fewer_batches_than_ranks_leaves_the_rest_empty():
    per_rank, samplers = all_ranks([3, 1, 2], 4, batch_size=2)
    assert per_rank == [[[1, 2]], [[0]], [], []]
    assert [len(s) for s in samplers] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="even_batches needs 4 batches .* only 3 examples"):
        pc.LengthBucketSampler([3, 1, 2], batch_size=2, num_replicas=4, rank=0, even_batches=True)


def test_empty_lengths():
    s = pc.LengthBucketSampler([], max_tokens=8, shuffle=True)
    assert list(s) == [] and len(s) == 0


def test_lengths_inputs_agree():
    lengths = [4, 0, 7, 7, 2]
    expect = list(pc.LengthBucketSampler(lengths, batch_size=2))
    for form in (tuple(lengths), np.array(lengths, dtype=np.int32), torch.tensor(lengths, dtype=torch.int16)):
        assert list(pc.LengthBucketSampler(form, batch_size=2)) == expect


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(lengths=[1, 2]), ValueError, "exactly one of batch_size and max_tokens"),
    (dict(lengths=[1, 2], batch_size=2, max_tokens=8), ValueError, "exactly one of batch_size and max_tokens"),
    (dict(lengths=[1, 2], batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
    (dict(lengths=[1, 2], batch_size=True), TypeError, "batch_size must be an int, got bool"),
    (dict(lengths=[1, 2], batch_size=2.0), TypeError, "batch_size must be an int, got float"),
    (dict(lengths=[1, 9, 2], max_tokens=8), ValueError, "example 1 has length 9, more than max_tokens = 8"),
    (dict(lengths=[1, 2], max_tokens=8, drop_last=True), ValueError, "drop_last applies to batch_size"),
    (dict(lengths=[1.5, 2.0], batch_size=2), TypeError, "lengths must hold integers, got dtype torch.float"),
    (dict(lengths=[[1, 2]], batch_size=2), ValueError, r"lengths must be 1-D .* got shape \(1, 2\)"),
    (dict(lengths=[1, -2], batch_size=2), ValueError, r"lengths must be >= 0, got lengths\[1\] = -2"),
    (dict(lengths="abc", batch_size=2), TypeError, "lengths must be a 1-D sequence"),
    (dict(lengths=[1, 2], batch_size=2, num_replicas=0, rank=0), ValueError, "num_replicas must be >= 1, got 0"),
    (dict(lengths=[1, 2], batch_size=2, num_replicas=2, rank=2), ValueError, r"rank must be in \[0, 2\) .* got 2"),
    (dict(lengths=[1, 2], batch_size=2, num_replicas=2), ValueError, "rank must be given with num_replicas=2"),
    (dict(lengths=[1, 2], batch_size=2, shuffle=1), TypeError, "shuffle must be a bool, got int"),
])
def test_invalid_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pc.LengthBucketSampler(**kwargs)


def test_set_epoch_validates():
    s = pc.LengthBucketSampler([1, 2], batch_size=1)
    with pytest.raises(TypeError, match="epoch must be an int, got str"):
        s.set_epoch("1")


def test_defaults_without_distributed():
    s = pc.LengthBucketSampler([1, 2, 3], batch_size=1)
    assert (s.num_replicas, s.rank) == (1, 0)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return {"input_ids": torch.full((self.lengths[i],), i), "label": i}


def indices_of(samples):
    return [s.index for s in samples]


def test_dataloader_with_workers_and_pickle():
    lengths = [int(x) for x in torch.randint(1, 30, (200,), generator=torch.Generator().manual_seed(1))]
    ds = pc.Indexed(Tokens(lengths))
    sampler = pc.LengthBucketSampler(pc.lengths_of(ds, "input_ids"), max_tokens=64, shuffle=True, seed=5)
    sampler.set_epoch(3)
    clone = pickle.loads(pickle.dumps(sampler))
    assert list(clone) == list(sampler)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=indices_of)
    got = list(loader)
    assert got == list(sampler)
    assert sorted(i for b in got for i in b) == list(range(200))


def test_lengths_of_fields_and_wrappers():
    lengths = [3, 0, 5, 1]
    plain = Tokens(lengths)
    assert pc.lengths_of(plain, "input_ids").tolist() == lengths
    assert pc.lengths_of(pc.Indexed(plain), "input_ids").dtype == torch.long
    assert pc.lengths_of(pc.Indexed(plain), "input_ids").tolist() == lengths
    assert pc.lengths_of([(np.zeros(n), n) for n in lengths], 0).tolist() == lengths
    assert pc.lengths_of([list(range(n)) for n in lengths]).tolist() == lengths
    assert pc.lengths_of(plain, "input_ids", num_workers=2).tolist() == lengths
    assert pc.lengths_of([], "x").tolist() == []
    # With views every view is loaded, so the result indexes like the views dataset.
    assert pc.lengths_of(pc.Indexed(plain, views=2, seed=0), "input_ids").tolist() == [3, 3, 0, 0, 5, 5, 1, 1]


def test_lengths_of_errors():
    with pytest.raises(ValueError, match="item 0 has no field 'ids'"):
        pc.lengths_of(Tokens([1]), "ids")
    with pytest.raises(TypeError, match="field 'label' of item 0 must be a sequence, got int"):
        pc.lengths_of(Tokens([1]), "label")
    with pytest.raises(TypeError, match="must have a leading length dimension, got a 0-d Tensor"):
        pc.lengths_of([torch.tensor(3)])
    with pytest.raises(TypeError, match="dataset must be map-style"):
        pc.lengths_of(iter([[1]]))
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        pc.lengths_of([[1]], num_workers=-1)


# --------------------------------------------------------------------------------------------
# packed=True: the budget counts real tokens


def test_packed_budget_counts_real_tokens_and_fills_batches():
    lengths = torch.randint(1, 300, (3000,), generator=torch.Generator().manual_seed(0))
    lengths[7] = 5000  # longer than the budget: alone in its batch
    sampler = pc.LengthBucketSampler(lengths, max_tokens=1024, packed=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == sampler.num_batches and "packed" in repr(sampler)
    assert sorted(i for b in batches for i in b) == list(range(3000))  # every example exactly once
    assert [7] in batches
    totals = sorted(int(lengths[b].sum()) for b in batches if b != [7])
    assert totals[-1] <= 1024  # within the budget, in real tokens
    assert sum(totals) / (1024 * len(totals)) > 0.98 and totals[1] >= 0.95 * 1024  # full, and similar totals
    padded = pc.LengthBucketSampler(lengths.clamp(max=1024), max_tokens=1024)  # the padded budget: len * max
    assert len(batches) < padded.num_batches


def test_packed_batches_shuffle_per_epoch_and_shard_exactly_once():
    lengths = torch.randint(0, 60, (500,), generator=torch.Generator().manual_seed(1))
    sampler = pc.LengthBucketSampler(lengths, max_tokens=200, packed=True, shuffle=True, seed=4)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second and sorted(map(sorted, first)) == sorted(map(sorted, second))  # same batches, new order
    for even in (False, True):
        ranks = [list(pc.LengthBucketSampler(lengths, max_tokens=200, packed=True, num_replicas=3, rank=r, even_batches=even))
                 for r in range(3)]
        assert sorted(i for part in ranks for b in part for i in b) == list(range(500))
        if even:
            assert len({len(part) for part in ranks}) == 1


def test_packed_needs_max_tokens():
    with pytest.raises(ValueError, match="packed=True counts real tokens against a budget: give max_tokens"):
        pc.LengthBucketSampler([1, 2, 3], batch_size=2, packed=True)
    with pytest.raises(TypeError, match="packed must be a bool"):
        pc.LengthBucketSampler([1, 2, 3], max_tokens=4, packed=1)

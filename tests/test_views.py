"""Indexed views: seeded augmentations, bitwise replay, caller RNG untouched; IndexedIterable."""
import operator
import pickle
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

import provcollate as pc


class Augmented(Dataset):
    """A random transform that draws from all three global RNGs: torch, random and numpy."""

    def __init__(self, n):
        self.base = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        scale = random.uniform(0.5, 1.5)
        shift = np.random.rand(4)
        x = (self.base[i] + torch.randn(4)) * scale + torch.from_numpy(shift).float()
        return {"x": x, "scale": scale, "shift": shift, "crop": torch.randint(0, 1000, (3,))}


def assert_same_sample(a, b):
    assert (a.index, a.view) == (b.index, b.view)
    assert a.data.keys() == b.data.keys()
    assert torch.equal(a.data["x"], b.data["x"]) and a.data["x"].dtype == b.data["x"].dtype
    assert torch.equal(a.data["crop"], b.data["crop"])
    assert a.data["scale"] == b.data["scale"]
    assert np.array_equal(a.data["shift"], b.data["shift"])


def unbatched(samples):
    return samples


def rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def assert_states_equal(before, after):
    assert torch.equal(before[0], after[0])
    assert before[1] == after[1]
    assert all(np.array_equal(x, y) for x, y in zip(before[2], after[2]))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 12), views=st.integers(1, 5), seed=st.none() | st.integers(-2**70, 2**70))
def test_item_j_is_example_j_div_views(n, views, seed):
    ds = pc.Indexed(list(range(100, 100 + n)), views=views, seed=seed)
    assert len(ds) == n * views
    for j in range(-len(ds), len(ds)):
        s = ds[j]
        k = j % len(ds)
        assert (s.index, s.view, s.data) == (k // views, k % views, 100 + k // views)
    with pytest.raises(IndexError, match=f"index {len(ds)} out of range"):
        ds[len(ds)]


def test_replay_equals_dataloader_with_two_workers():
    ds = pc.Indexed(Augmented(9), views=3, seed=11)
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, collate_fn=unbatched,
                        generator=torch.Generator().manual_seed(0))
    produced = [s for batch in loader for s in batch]
    assert sorted((s.index, s.view) for s in produced) == [(i, v) for i in range(9) for v in range(3)]
    for s in produced:
        assert_same_sample(ds.replay(s.index, s.view), s)
        assert_same_sample(ds[s.index * 3 + s.view], s)
    # Views of one example differ; a different seed gives different augmentations.
    assert not torch.equal(ds.replay(0, 0).data["x"], ds.replay(0, 1).data["x"])
    other = pc.Indexed(Augmented(9), views=3, seed=12)
    assert not torch.equal(ds.replay(4, 2).data["x"], other.replay(4, 2).data["x"])


class RandomCrops(Dataset):
    """Random crops of a random length: the augmentation changes each view's length."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        length = random.randint(1, 9)
        return {"x": torch.randn(length) + i, "flip": int(np.random.randint(2))}


def test_views_through_bucketing_collator_and_workers():
    ds = pc.Indexed(RandomCrops(20), views=4, seed=3)
    lengths = pc.lengths_of(ds, "x")
    assert lengths.tolist() == [len(ds.replay(j // 4, j % 4).data["x"]) for j in range(80)]
    sampler = pc.LengthBucketSampler(lengths, max_tokens=24, shuffle=True, seed=1)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=pc.Collator(primary="x"))
    seen = []
    for batch in loader:
        assert len(batch) * batch.max_len <= 24
        for k, (index, view) in enumerate(zip(batch.index.tolist(), batch.view.tolist())):
            again = ds.replay(index, view).data
            n = batch.lengths[k].item()
            assert torch.equal(batch["x"][k, :n], again["x"]) and batch["flip"][k].item() == again["flip"]
            seen.append((index, view))
    assert sorted(seen) == [(i, v) for i in range(20) for v in range(4)]


def test_replay_accepts_tensor_ids_from_a_batch():
    ds = pc.Indexed(Augmented(3), views=2, seed=0)
    assert_same_sample(ds.replay(torch.tensor(2), np.int64(1)), ds[5])


def test_caller_rng_state_unchanged():
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    before = rng_states()
    ds = pc.Indexed(Augmented(4), views=2, seed=0)
    ds[3]
    ds.replay(1, 1)
    assert_states_equal(before, rng_states())


class Failing(Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        torch.rand(3), random.random(), np.random.rand()
        raise RuntimeError("transform failed")


def test_caller_rng_state_restored_when_the_dataset_raises():
    before = rng_states()
    with pytest.raises(RuntimeError, match="transform failed"):
        pc.Indexed(Failing(), views=2, seed=0)[0]
    assert_states_equal(before, rng_states())


def test_without_seed_behaviour_is_unchanged():
    base = Augmented(3)
    ds = pc.Indexed(base)
    assert len(ds) == 3
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    wrapped = ds[2]
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    direct = base[2]
    assert (wrapped.index, wrapped.view) == (2, 0)
    assert torch.equal(wrapped.data["x"], direct["x"])
    # No seeding: every access is a fresh draw, and replay has nothing to rebuild from.
    assert not torch.equal(ds[2].data["x"], ds[2].data["x"])
    with pytest.raises(ValueError, match="replay: needs a seed"):
        pc.Indexed(base, views=2).replay(0, 0)


def test_pickle_roundtrip():
    ds = pc.Indexed(Augmented(3), views=2, seed=5)
    clone = pickle.loads(pickle.dumps(ds))
    assert type(clone) is pc.Indexed and (clone.views, clone.seed) == (2, 5)
    assert_same_sample(clone[3], ds[3])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(views=0), ValueError, "views must be >= 1, got 0"),
    (dict(views=True), TypeError, "views must be an int, got bool"),
    (dict(views=2.0), TypeError, "views must be an int, got float"),
    (dict(seed="0"), TypeError, "seed must be an int, got str"),
    (dict(key=3), TypeError, "key must be None, a field name \\(str\\) or a callable of the example, got int"),
])
def test_invalid_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pc.Indexed([1, 2], **kwargs)


def test_replay_argument_errors():
    ds = pc.Indexed([1, 2], views=2, seed=0)
    with pytest.raises(IndexError, match=r"index must be in \[0, 2\), got 2"):
        ds.replay(2, 0)
    with pytest.raises(IndexError, match=r"view must be in \[0, 2\), got 2"):
        ds.replay(0, 2)
    with pytest.raises(TypeError, match="index must be an int, got float"):
        ds.replay(0.0, 0)
    with pytest.raises(TypeError, match="dataset must be map-style"):
        pc.Indexed(3)


class Stream(IterableDataset):
    """Yields {"id", "x"} and, under a DataLoader with workers, shards by worker id."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k in range(worker, self.n, workers):
            yield {"id": 1000 + k, "x": torch.full((k % 5 + 1,), k)}


def ids_of(samples):
    return [s.index for s in samples]


def test_iterable_with_key_under_two_workers():
    ds = pc.Indexed(Stream(23), key=operator.itemgetter("id"))
    assert isinstance(ds, pc.IndexedIterable) and isinstance(ds, IterableDataset)
    got = [i for b in DataLoader(ds, batch_size=4, num_workers=2, collate_fn=ids_of) for i in b]
    assert sorted(got) == list(range(1000, 1023))
    for s in ds:
        assert s.index == s.data["id"] and s.view == 0


def test_iterable_numbered_in_order_in_one_process():
    ds = pc.Indexed(Stream(7))
    assert [s.index for s in ds] == list(range(7))
    assert [s.data["id"] for s in ds] == list(range(1000, 1007))
    got = [i for b in DataLoader(ds, batch_size=3, num_workers=1, collate_fn=ids_of) for i in b]
    assert got == list(range(7))
    assert [s.index for s in pc.Indexed(iter("abc"))] == [0, 1, 2]
    clone = pickle.loads(pickle.dumps(ds))
    assert [s.index for s in clone] == list(range(7))


def test_iterable_without_key_refuses_several_workers():
    ds = pc.Indexed(Stream(8))
    with pytest.raises(RuntimeError, match="num_workers=2: each worker would number its own examples from 0"):
        list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=ids_of))


def test_iterable_errors():
    with pytest.raises(TypeError, match="the key of example 0 of this process's stream is None"):
        list(pc.Indexed(Stream(2), key=lambda ex: None))
    with pytest.raises(ValueError, match="views and seed need a map-style dataset"):
        pc.Indexed(Stream(2), views=2, seed=0)
    with pytest.raises(TypeError, match="key must be None, a field name"):
        pc.Indexed(Stream(2), key=2.5)

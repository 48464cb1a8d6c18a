"""Recorder and Predictions: dataset order, unpadding, duplicates, views, reductions, errors, export."""
import math
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import provcollate as pc
from provcollate import _inputs, record
from provcollate.store import SINGLE, FastPath, Store, memory, staging, rows as store_rows

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def host_batch(index, lengths=None, view=None, padding_side="right"):
    """A stand-in with the Batch contract's host-side fields (index, view, lengths, padding side)."""
    index = torch.as_tensor(index, dtype=torch.long)
    return types.SimpleNamespace(
        host_index=index, index=index,
        view=torch.zeros_like(index) if view is None else torch.as_tensor(view, dtype=torch.long),
        host_lengths=None if lengths is None else torch.as_tensor(lengths, dtype=torch.long),
        padding_side=padding_side,
    )


def pad_rows(rows, left=False, pad=0, extra=0):
    """Pad a list of [L_i, ...] tensors to [B, max_len + extra, ...] on the right or the left."""
    max_len = max((r.shape[0] for r in rows), default=0) + extra
    out = rows[0].new_full((len(rows), max_len, *rows[0].shape[1:]), pad)
    for b, r in enumerate(rows):
        if left:
            out[b, max_len - r.shape[0]:] = r
        else:
            out[b, :r.shape[0]] = r
    return out


def snapshot(rec):
    """Everything a Recorder has recorded, as plain Python, to prove that a failed add changed nothing."""
    preds = rec.result()
    state = {"keys": list(preds), "count": rec._store.table.count.copy()}
    for key, value in preds.items():
        state[key] = {k: v.clone() for k, v in value.items()} if isinstance(value, dict) else value.clone()
    return state


def assert_same_state(a, b):
    assert a["keys"] == b["keys"]
    assert np.array_equal(a["count"], b["count"])
    for key in a["keys"]:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        else:
            assert torch.equal(x, y)


def assert_preds_equal(p, q):
    assert list(p) == list(q)
    assert p.names == q.names and p.per_token == q.per_token
    assert p.num_items == q.num_items and p.stacked_views == q.stacked_views
    for (k1, v1), (k2, v2) in zip(p.items(), q.items()):
        assert k1 == k2
        if isinstance(v1, dict):
            assert v1.keys() == v2.keys()
            for k in v1:
                assert v1[k].dtype == v2[k].dtype and v1[k].shape == v2[k].shape
                assert torch.equal(v1[k], v2[k]), (k1, k)
        else:
            assert v1.dtype == v2.dtype and v1.shape == v2.shape and torch.equal(v1, v2)


# --------------------------------------------------------------------------------------------
# dataset order and unpadding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_items", [50, None])
def test_per_example_rows_land_in_dataset_order(num_items):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(50, 3, 2, generator=gen)
    order = torch.randperm(50, generator=gen)
    rec = pc.Recorder(num_items=num_items)
    for chunk in order.split(7):
        rec.add(chunk, values[chunk])
    preds = rec.result()
    assert len(preds) == 50 and torch.equal(preds.index, torch.arange(50))
    assert list(preds) == list(range(50))
    for i in range(50):
        assert torch.equal(preds[i], values[i])
    assert torch.equal(preds.tensor(), values)
    assert preds.missing(num_items=50).numel() == 0 and preds.missing(num_items=60).tolist() == list(range(50, 60))
    assert 49 in preds and 50 not in preds
    with pytest.raises(KeyError):
        preds[50]


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bfloat16, torch.bool])
def test_per_token_rows_unpadded(left, dtype):
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 9, (40,), generator=gen)
    rows = [torch.randn(int(n), 2, generator=gen).to(dtype) for n in lengths]
    order = torch.randperm(40, generator=gen)
    rec = pc.Recorder(num_items=40)
    for chunk in order.split(6):
        padded = pad_rows([rows[i] for i in chunk], left=left, pad=7, extra=2)  # longer than needed
        rec.add(host_batch(chunk, lengths[chunk], padding_side="left" if left else "right"), padded, per_token=True)
    preds = rec.result()
    for i in range(40):
        assert preds[i].dtype == dtype and torch.equal(preds[i], rows[i])
    values, offsets = preds.jagged()
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
    assert torch.equal(values, torch.cat(rows))


def test_plain_index_forms_and_lengths_keyword():
    rec = pc.Recorder(num_items=10)
    tokens = torch.arange(12).view(3, 4)
    rec.add([4, 1, 7], tokens, per_token=True, lengths=[2, 4, 0])
    rec.add(np.array([0], dtype=np.int32), tokens[:1], per_token=True, lengths=torch.tensor([3], dtype=torch.int32), padding_side="left")
    rec.add(torch.tensor([9], dtype=torch.int16), tokens[2:], per_token=True, lengths=np.array([1]))
    preds = rec.result()
    assert torch.equal(preds[4], torch.tensor([0, 1]))
    assert torch.equal(preds[1], torch.tensor([4, 5, 6, 7]))
    assert preds[7].shape == (0,)
    assert torch.equal(preds[0], torch.tensor([1, 2, 3]))
    assert torch.equal(preds[9], torch.tensor([8]))
    assert preds.missing().tolist() == [2, 3, 5, 6, 8]


def test_dict_outputs_with_per_token_keys():
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([3, 1, 4, 2])
    tags = torch.randint(0, 9, (4, 5), generator=gen)
    scores = torch.randn(4, 5, 2, generator=gen)
    label = torch.tensor([1, 0, 1, 1])
    rec = pc.Recorder()
    rec.add(host_batch([3, 0, 2, 1], lengths), {"tags": tags, "scores": scores, "label": label}, per_token={"tags", "scores"})
    preds = rec.result()
    assert preds.names == ("tags", "scores", "label") and preds.per_token == {"tags", "scores"}
    for b, i in enumerate([3, 0, 2, 1]):
        p = preds[i]
        assert torch.equal(p["tags"], tags[b, :lengths[b]])
        assert torch.equal(p["scores"], scores[b, :lengths[b]])
        assert torch.equal(p["label"], label[b])
    with pytest.raises(ValueError, match="per token; use jagged"):
        preds.tensor("tags")
    with pytest.raises(ValueError, match="per example; use tensor"):
        preds.jagged("label")
    with pytest.raises(ValueError, match="name one of the outputs"):
        preds.tensor()
    with pytest.raises(KeyError, match="no output 'nope'"):
        preds.tensor("nope")


def test_outputs_requiring_grad_are_detached():
    w = torch.randn(3, requires_grad=True)
    rec = pc.Recorder(num_items=2)
    rec.add([1, 0], torch.stack([w, 2 * w]))
    preds = rec.result()
    assert not preds[1].requires_grad and torch.equal(preds[1], w.detach())


def test_empty_batches_and_empty_recorder():
    rec = pc.Recorder(num_items=3)
    preds = rec.result()
    assert len(preds) == 0 and preds.missing().tolist() == [0, 1, 2] and list(preds) == []
    rec.add([], torch.zeros(0, 2))
    rec.add(torch.tensor([2]), torch.ones(1, 2))
    rec.add([], torch.zeros(0, 2))
    assert rec.result().index.tolist() == [2]


# --------------------------------------------------------------------------------------------
# storage: preallocation, amortised growth, chunks never copied, snapshots
# --------------------------------------------------------------------------------------------


def test_known_num_items_allocates_once():
    rec = pc.Recorder(num_items=1000, on_duplicate="last")
    rec.add([5], torch.ones(1, 4))
    ptr = rec._store.dense[SINGLE].rows.data_ptr()
    for start in range(0, 1000, 50):
        rec.add(torch.arange(start, start + 50).flip(0), torch.randn(50, 4))
    assert rec._store.dense[SINGLE].rows.data_ptr() == ptr


def test_unknown_num_items_grows_geometrically():
    rec = pc.Recorder()
    reallocations, ptr = 0, None
    for start in range(0, 20000, 100):
        rec.add(torch.arange(start, start + 100), torch.full((100, 2), float(start)))
        if rec._store.dense[SINGLE].rows.data_ptr() != ptr:
            reallocations, ptr = reallocations + 1, rec._store.dense[SINGLE].rows.data_ptr()
    assert reallocations <= 2 + math.log2(20000 / 1024)
    preds = rec.result()
    assert len(preds) == 20000 and torch.equal(preds[12345], torch.full((2,), 12300.0))


def test_token_chunks_grow_geometrically_and_are_never_copied(monkeypatch):
    monkeypatch.setattr(store_rows, "MIN_CHUNK_BYTES", 64)
    monkeypatch.setattr(memory, "GATHER_ROWS", 37)  # many gather steps, segments across chunks
    gen = torch.Generator().manual_seed(3)
    rec = pc.Recorder()
    rows, seen = {}, {}
    order = torch.randperm(600, generator=gen)
    for chunk in order.split(8):
        lengths = torch.randint(1, 20, (len(chunk),), generator=gen)
        items = [torch.randint(0, 1000, (int(n),), generator=gen) for n in lengths]
        rows.update({int(i): r for i, r in zip(chunk, items)})
        rec.add(chunk, pad_rows(items), per_token=True, lengths=lengths)
        for c in rec._store.tokens[SINGLE].chunks:
            seen.setdefault(id(c), c.data_ptr())
    chunks = rec._store.tokens[SINGLE].chunks
    assert all(seen[id(c)] == c.data_ptr() for c in chunks)
    total = sum(r.numel() for r in rows.values())
    assert 3 < len(chunks) <= 3 + math.log(total / 8) / math.log(1.25)
    capacity = sum(c.shape[0] for c in chunks)
    assert capacity <= 1.25 * total + 8 * 20 + 64 // 8  # a quarter's slack plus one batch
    preds = rec.result()
    values, offsets = preds.jagged()
    assert torch.equal(values, torch.cat([rows[i] for i in range(600)]))
    assert all(torch.equal(preds[i], rows[i]) for i in range(600))


def test_result_copies_nothing_and_later_adds_leave_it_unchanged():
    rec = pc.Recorder(num_items=4, on_duplicate="last")
    rec.add([0, 1, 2, 3], torch.arange(4.0).view(4, 1))
    first = rec.result()
    assert first.tensor().data_ptr() == rec._store.dense[SINGLE].rows.data_ptr()  # zero-copy
    rec.add([2], torch.tensor([[9.0]]))
    assert first[2].item() == 2.0 and rec.result()[2].item() == 9.0

    tok = pc.Recorder(on_duplicate="mean")
    tok.add([0], torch.tensor([[1.0, 2.0]]), per_token=True, lengths=[2])
    before = tok.result()
    tok.add([0], torch.tensor([[3.0, 4.0]]), per_token=True, lengths=[2])
    assert before[0].tolist() == [1.0, 2.0] and tok.result()[0].tolist() == [2.0, 3.0]


# --------------------------------------------------------------------------------------------
# duplicates
# --------------------------------------------------------------------------------------------


def test_on_duplicate_first_last_mean_per_example():
    batches = [([0, 1], [[1.0], [10.0]]), ([1, 1, 2], [[20.0], [30.0], [5.0]]), ([0], [[4.0]])]
    expect = {"first": [1.0, 10.0, 5.0], "last": [4.0, 30.0, 5.0], "mean": [2.5, 20.0, 5.0]}
    for policy, values in expect.items():
        rec = pc.Recorder(num_items=3, on_duplicate=policy)
        for index, outputs in batches:
            rec.add(index, torch.tensor(outputs))
        preds = rec.result()
        assert preds.tensor().flatten().tolist() == values, policy


def test_on_duplicate_mean_keeps_half_precision_dtype():
    rec = pc.Recorder(num_items=1, on_duplicate="mean")
    for v in (1.0, 2.0, 4.0):
        rec.add([0], torch.tensor([[v]], dtype=torch.float16))
    assert rec.result()[0].dtype == torch.float16
    assert rec.result()[0].item() == pytest.approx(7 / 3, rel=1e-3)


@pytest.mark.parametrize("policy", ["first", "last", "mean"])
def test_on_duplicate_per_token(policy):
    rec = pc.Recorder(on_duplicate=policy)
    rec.add([5], torch.tensor([[1.0, 2.0, 0.0]]), per_token=True, lengths=[2])
    rec.add([5, 5], torch.tensor([[3.0, 4.0], [5.0, 6.0]]), per_token=True, lengths=[2, 2])
    expect = {"first": [1.0, 2.0], "last": [5.0, 6.0], "mean": [3.0, 4.0]}[policy]
    assert rec.result()[5].tolist() == expect


def test_duplicate_errors_change_nothing():
    rec = pc.Recorder(num_items=5)
    rec.add([1, 3], torch.tensor([[1.0], [3.0]]))
    before = snapshot(rec)
    with pytest.raises(ValueError, match=r"item 3 is already recorded \(batch position 1\).*on_duplicate"):
        rec.add([4, 3], torch.tensor([[4.0], [9.0]]))
    assert_same_state(before, snapshot(rec))
    with pytest.raises(ValueError, match="item 2 appears more than once in this batch"):
        rec.add([2, 0, 2], torch.tensor([[2.0], [0.0], [2.0]]))
    assert_same_state(before, snapshot(rec))
    rec.add([4, 0], torch.tensor([[4.0], [0.0]]))  # still usable
    assert rec.result().tensor().flatten().tolist() == [0.0, 1.0, 3.0, 4.0]


def _oracle_policy(batches, policy):
    """A dict model of on_duplicate: rows applied one by one, in batch order."""
    store, counts = {}, {}
    for index, values in batches:
        for i, v in zip(index, values):
            if i not in store:
                store[i], counts[i] = v, 1
            elif policy == "last":
                store[i] = v
            elif policy == "mean":
                store[i] = (store[i] * counts[i] + v) / (counts[i] + 1)
                counts[i] += 1
    return store


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(st.tuples(st.integers(0, 9), st.integers(-50, 50)), max_size=6), max_size=6),
       policy=st.sampled_from(["first", "last", "mean"]), known=st.booleans())
def test_on_duplicate_matches_a_dict_model(batches, policy, known):
    batches = [([i for i, _ in b], [float(v) for _, v in b]) for b in batches]
    rec = pc.Recorder(num_items=10 if known else None, on_duplicate=policy)
    for index, values in batches:
        rec.add(index, torch.tensor(values, dtype=torch.float64).view(-1, 1))
    expect = _oracle_policy(batches, policy)
    preds = rec.result()
    assert list(preds) == sorted(expect)
    for i, v in expect.items():
        assert preds[i].item() == pytest.approx(v)


# --------------------------------------------------------------------------------------------
# errors: each one leaves the recorded state as it was
# --------------------------------------------------------------------------------------------


def _token_recorder():
    rec = pc.Recorder(num_items=6)
    rec.add(host_batch([1, 4], [2, 3]), {"tags": pad_rows([torch.tensor([1, 2]), torch.tensor([3, 4, 5])]), "label": torch.tensor([7, 8])},
            per_token={"tags"})
    return rec


BAD_ADDS = [
    ("index outside range", lambda: (host_batch([2, 6], [1, 1]), {"tags": torch.zeros(2, 1, dtype=torch.long), "label": torch.zeros(2, dtype=torch.long)}, {"tags"}),
     ValueError, r"index\[1\] = 6 is outside range\(num_items\) = range\(6\)"),
    ("negative index", lambda: (host_batch([-1], [1]), {"tags": torch.zeros(1, 1, dtype=torch.long), "label": torch.zeros(1, dtype=torch.long)}, {"tags"}),
     ValueError, r"index\[0\] = -1 is outside range"),
    ("outputs rows != batch", lambda: (host_batch([2, 3], [1, 1]), {"tags": torch.zeros(2, 1, dtype=torch.long), "label": torch.zeros(3, dtype=torch.long)}, {"tags"}),
     ValueError, r"outputs\['label'\] has 3 rows but the batch has 2 items"),
    ("per-token shorter than lengths", lambda: (host_batch([2, 3], [1, 4]), {"tags": torch.zeros(2, 3, dtype=torch.long), "label": torch.zeros(2, dtype=torch.long)}, {"tags"}),
     ValueError, r"outputs\['tags'\] has 3 positions, shorter than the batch's longest item \(4\)"),
    ("duplicate", lambda: (host_batch([2, 4], [1, 1]), {"tags": torch.zeros(2, 1, dtype=torch.long), "label": torch.zeros(2, dtype=torch.long)}, {"tags"}),
     ValueError, "item 4 is already recorded"),
    ("dtype differs", lambda: (host_batch([2], [1]), {"tags": torch.zeros(1, 1, dtype=torch.int32), "label": torch.zeros(1, dtype=torch.long)}, {"tags"}),
     TypeError, r"output 'tags' must be per-token int64 rows of shape \[\] as in the first add, got per-token int32"),
    ("row shape differs", lambda: (host_batch([2], [1]), {"tags": torch.zeros(1, 1, 2, dtype=torch.long), "label": torch.zeros(1, dtype=torch.long)}, {"tags"}),
     ValueError, r"must be per-token int64 rows of shape \[\] as in the first add, got per-token int64 rows of shape \[2\]"),
    ("per-token flag differs", lambda: (host_batch([2], [1]), {"tags": torch.zeros(1, 1, dtype=torch.long), "label": torch.zeros(1, dtype=torch.long)}, set()),
     ValueError, r"output 'tags' must be per-token .* got per-example int64 rows of shape \[1\]"),
    ("names differ", lambda: (host_batch([2], [1]), {"tags": torch.zeros(1, 1, dtype=torch.long)}, {"tags"}),
     ValueError, r"must have the names of the first add, \['label', 'tags'\], got \['tags'\]"),
    ("unknown per_token name", lambda: (host_batch([2], [1]), {"tags": torch.zeros(1, 1, dtype=torch.long), "label": torch.zeros(1, dtype=torch.long)}, {"tag"}),
     ValueError, r"per_token names \['tag'\] are not outputs"),
    ("no lengths", lambda: (host_batch([2]), {"tags": torch.zeros(1, 1, dtype=torch.long), "label": torch.zeros(1, dtype=torch.long)}, {"tags"}),
     ValueError, r"outputs\['tags'\] is per token but the batch has no lengths"),
    ("output not a tensor", lambda: (host_batch([2], [1]), {"tags": [[1]], "label": torch.zeros(1, dtype=torch.long)}, {"tags"}),
     TypeError, r"outputs\['tags'\] must be a tensor, got list"),
    ("outputs not a tensor or dict", lambda: (host_batch([2], [1]), [torch.zeros(1)], False),
     TypeError, "outputs must be a tensor or a dict of tensors, got list"),
    ("float index", lambda: (torch.tensor([1.0]), {"tags": torch.zeros(1, 1, dtype=torch.long), "label": torch.zeros(1, dtype=torch.long)}, {"tags"}),
     TypeError, "index must hold integers, got a tensor of dtype torch.float32"),
    ("2-d index", lambda: (np.zeros((1, 1), np.int64), {"tags": torch.zeros(1, 1, dtype=torch.long), "label": torch.zeros(1, dtype=torch.long)}, {"tags"}),
     ValueError, r"index must be 1-D, got shape \(1, 1\)"),
    ("batch of the wrong type", lambda: ("0", {"tags": torch.zeros(1, 1, dtype=torch.long)}, {"tags"}),
     TypeError, "batch must be a provcollate.Batch or an index tensor"),
]


@pytest.mark.parametrize("name, make, exc, message", BAD_ADDS, ids=[b[0] for b in BAD_ADDS])
def test_bad_add_raises_and_changes_nothing(name, make, exc, message):
    rec = _token_recorder()
    before = snapshot(rec)
    batch, outputs, per_token = make()
    with pytest.raises(exc, match=message):
        rec.add(batch, outputs, per_token=per_token)
    assert_same_state(before, snapshot(rec))
    rec.add(host_batch([0], [1]), {"tags": torch.tensor([[6]]), "label": torch.tensor([9])}, per_token={"tags"})
    assert rec.result()[0]["tags"].tolist() == [6]


def test_plain_index_keyword_errors():
    rec = pc.Recorder(num_items=4)
    with pytest.raises(ValueError, match=r"lengths must have one entry per index \(2\), got 1"):
        rec.add([0, 1], torch.zeros(2, 3), per_token=True, lengths=[1])
    with pytest.raises(ValueError, match=r"lengths must be >= 0, got lengths\[1\] = -1"):
        rec.add([0, 1], torch.zeros(2, 3), per_token=True, lengths=[1, -1])
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'up'"):
        rec.add([0], torch.zeros(1, 3), per_token=True, lengths=[1], padding_side="up")
    with pytest.raises(ValueError, match=r"view must have one entry per index|indices but 1 view ids"):
        rec.add([0, 1], torch.zeros(2, 3), view=[1])
    with pytest.raises(ValueError, match="view ids must be >= 0, got view -2"):
        rec.add([0, 1], torch.zeros(2, 3), view=[0, -2])
    with pytest.raises(TypeError, match="per_token must be a bool for a single tensor output"):
        rec.add([0], torch.zeros(1, 3), per_token={"x"})
    with pytest.raises(TypeError, match="lengths= is only for a plain index"):
        rec.add(host_batch([0], [1]), torch.zeros(1, 3), per_token=True, lengths=[1])
    assert len(rec.result()) == 0


def test_unknown_num_items_rejects_negative_indices():
    rec = pc.Recorder()
    with pytest.raises(ValueError, match=r"indices must be >= 0, got index\[1\] = -3"):
        rec.add([1, -3], torch.zeros(2))
    assert len(rec.result()) == 0


@pytest.mark.parametrize("kwargs, exc, message", [
    ({"num_items": -1}, ValueError, "num_items must be >= 0, got -1"),
    ({"num_items": 2.5}, TypeError, "num_items must be an int, an Indexed dataset or None, got float"),
    ({"num_items": True}, TypeError, "num_items must be an int, an Indexed dataset or None, got bool"),
    ({"on_duplicate": "keep"}, ValueError, "on_duplicate must be one of 'error', 'first', 'last', 'mean', got 'keep'"),
    ({"views": "max"}, ValueError, "views must be one of 'mean', 'vote', 'stack', 'none', got 'max'"),
    ({"reduce": "topk:0"}, ValueError, "reduce must be None, 'argmax', 'softmax' or 'topk:K' with K >= 1, got 'topk:0'"),
    ({"reduce": "max"}, ValueError, "got 'max'"),
    ({"reduce": 3}, TypeError, "reduce must be None or a str"),
    ({"device": 3.5}, TypeError, "device must be None, a torch.device or a device string, got 3.5"),
])
def test_constructor_validation(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        pc.Recorder(**kwargs)


def test_policy_dtype_requirements():
    with pytest.raises(TypeError, match="on_duplicate='mean' averages floating-point outputs, got 'prediction' of dtype torch.int64"):
        pc.Recorder(on_duplicate="mean").add([0], torch.zeros(1, dtype=torch.long))
    with pytest.raises(TypeError, match="views='vote' needs integer or bool outputs, got 'x' of dtype torch.float32"):
        pc.Recorder(views="vote").add([0], {"x": torch.zeros(1)})


# --------------------------------------------------------------------------------------------
# reductions
# --------------------------------------------------------------------------------------------


def test_reduce_argmax_softmax_topk():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 7, generator=gen)
    for reduce, expect in [("argmax", logits.argmax(-1)), ("softmax", logits.softmax(-1))]:
        rec = pc.Recorder(num_items=5, reduce=reduce)
        rec.add(torch.arange(5), logits)
        assert torch.equal(rec.result().tensor(), expect)
    rec = pc.Recorder(num_items=5, reduce="topk:3")
    rec.add(torch.arange(5), logits)
    preds = rec.result()
    values, indices = logits.topk(3, -1)
    assert preds.names == ("values", "indices")
    assert torch.equal(preds[2]["values"], values[2]) and torch.equal(preds[2]["indices"], indices[2])


def test_reduce_on_dict_and_per_token_outputs():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 6, generator=gen)
    label = torch.tensor([3, 1])
    rec = pc.Recorder(reduce="topk:2")
    rec.add(host_batch([1, 0], [4, 2]), {"logits": logits, "label": label}, per_token={"logits"})
    preds = rec.result()
    assert preds.names == ("logits.values", "logits.indices", "label")
    values, indices = logits.topk(2, -1)
    assert torch.equal(preds[0]["logits.indices"], indices[1, :2]) and torch.equal(preds[1]["logits.values"], values[0])
    assert torch.equal(preds[0]["label"], label[1])  # integer outputs are stored as they are
    with pytest.raises(ValueError, match=r"reduce='topk:9' keeps 9 of the last dimension, but outputs has only 6"):
        pc.Recorder(reduce="topk:9").add([0], logits[:1, 0])
    with pytest.raises(ValueError, match="works over a last class dimension"):
        pc.Recorder(reduce="argmax").add([0], torch.zeros(1))
    with pytest.raises(ValueError, match=r"reduce='topk:2' names its outputs \['a.indices', 'a.values'\], but \['a.values'\] already exist"):
        pc.Recorder(reduce="topk:2").add([0], {"a": torch.zeros(1, 3), "a.values": torch.zeros(1, 2)})


# --------------------------------------------------------------------------------------------
# views (test-time augmentation)
# --------------------------------------------------------------------------------------------


def _views_recorder(policy, outputs, per_token=False, lengths=None, index=(0, 0, 0, 1, 1), view=(0, 1, 2, 0, 2)):
    rec = pc.Recorder(num_items=3, views=policy)
    rec.add(host_batch(index, lengths, view), outputs, per_token=per_token)
    return rec


def test_views_mean_of_floats_vote_of_integers():
    floats = torch.tensor([[1.0, 0.0], [2.0, 0.0], [6.0, 3.0], [5.0, 1.0], [7.0, 3.0]])
    preds = _views_recorder("mean", floats).result()
    assert preds.tensor().tolist() == [[3.0, 1.0], [6.0, 2.0]] and preds.index.tolist() == [0, 1]
    ints = torch.tensor([[4, 1], [2, 1], [4, 0], [9, 3], [5, 3]])
    for policy in ("mean", "vote"):
        preds = _views_recorder(policy, ints).result()
        assert preds.tensor().tolist() == [[4, 1], [5, 3]]  # item 1: 9 vs 5 tie -> 5
    flags = torch.tensor([True, False, False, True, True])
    assert _views_recorder("vote", flags).result().tensor().tolist() == [False, True]


def test_views_vote_ties_go_to_the_smallest_value():
    votes = torch.tensor([[3], [1], [2], [1], [3]])
    rec = pc.Recorder(num_items=1, views="vote")
    rec.add(host_batch([0] * 5, view=[0, 1, 2, 3, 4]), votes)
    assert rec.result()[0].tolist() == [1]  # 3 and 1 twice each: 1 wins
    rec = pc.Recorder(num_items=1, views="vote")
    rec.add(host_batch([0] * 3, view=[0, 1, 2]), torch.tensor([[-4], [7], [2]]))
    assert rec.result()[0].tolist() == [-4]


def test_views_stack_and_none():
    x = torch.arange(10.0).view(5, 2)
    rec = pc.Recorder(num_items=2, views="stack")
    rec.add(host_batch([0, 1, 0, 1], view=[1, 0, 0, 1]), x[:4])
    preds = rec.result()
    assert preds.stacked_views == 2 and preds[0].tolist() == [x[2].tolist(), x[0].tolist()]
    rec = _views_recorder("stack", x)
    with pytest.raises(ValueError, match=r"views='stack' needs all 3 views of every recorded item; item 1 has views \[0, 2\]"):
        rec.result()
    preds = _views_recorder("none", x).result()
    assert list(preds) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2)]
    assert preds[1, 2].tolist() == x[4].tolist() and preds.view.tolist() == [0, 1, 2, 0, 2]
    assert (1, 1) not in preds and (1, 2) in preds
    with pytest.raises(TypeError, match=r"views='none'\), index with preds\[i, v\]"):
        preds[1]
    with pytest.raises(KeyError):
        preds[1, 1]


def test_views_per_token_mean_vote_stack():
    lengths = [2, 2, 2, 3, 3]
    tok = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0], [5.0, 6.0, 0.0], [1.0, 1.0, 1.0], [3.0, 5.0, 7.0]])
    preds = _views_recorder("mean", tok, True, lengths).result()
    assert preds[0].tolist() == [3.0, 4.0] and preds[1].tolist() == [2.0, 3.0, 4.0]
    preds = _views_recorder("vote", tok.long(), True, lengths).result()
    assert preds[0].tolist() == [1, 2] and preds[1].tolist() == [1, 1, 1]
    rec = pc.Recorder(num_items=2, views="stack")
    rec.add(host_batch([1, 0, 1, 0], [3, 2, 3, 2], [1, 0, 0, 1]), tok[1:], per_token=True)
    preds = rec.result()
    assert preds[0].shape == (2, 2) and preds[0].tolist() == [[5.0, 6.0], [3.0, 5.0]]
    assert preds[1].tolist() == [[1.0, 1.0, 1.0], [3.0, 4.0, 0.0]]
    values, offsets = preds.jagged()
    assert values.shape == (5, 2) and offsets.tolist() == [0, 2, 5]


def test_views_of_one_item_must_share_one_length():
    rec = pc.Recorder(num_items=2)
    rec.add(host_batch([0], [2], [0]), torch.zeros(1, 3), per_token=True)
    before = snapshot(rec)
    with pytest.raises(ValueError, match=r"item 0 has length 3 in this batch but 2 in its recorded view 0"):
        rec.add(host_batch([0], [3], [1]), torch.zeros(1, 3), per_token=True)
    with pytest.raises(ValueError, match=r"item 1 appears in this batch with lengths \[1, 2\]"):
        rec.add(host_batch([1, 1], [1, 2], [0, 1]), torch.zeros(2, 3), per_token=True)
    assert_same_state(before, snapshot(rec))
    free = pc.Recorder(num_items=2, views="none")
    free.add(host_batch([0, 0], [1, 3], [0, 1]), torch.arange(6).view(2, 3), per_token=True)
    assert free.result()[0, 1].tolist() == [3, 4, 5]


def test_views_grow_after_the_first_batches():
    rec = pc.Recorder(num_items=3, views="none")
    rec.add(torch.tensor([2, 0]), torch.tensor([[2.0], [0.0]]))
    rec.add(torch.tensor([2]), torch.tensor([[5.0]]), view=np.int64(3))
    rec.add(torch.tensor([1]), torch.tensor([[1.0]]), view=[1])
    preds = rec.result()
    assert list(preds) == [(0, 0), (1, 1), (2, 0), (2, 3)]
    assert [preds[k].item() for k in preds] == [0.0, 1.0, 2.0, 5.0]


# --------------------------------------------------------------------------------------------
# the compiled pass (csrc/record.cpp): taken for common batches, identical to the general path
# --------------------------------------------------------------------------------------------

needs_compiled = pytest.mark.skipif(not FastPath.available(), reason="needs the compiled extension")


@needs_compiled
def test_common_batches_take_the_compiled_pass(monkeypatch):
    monkeypatch.setattr(store_rows, "MIN_CHUNK_BYTES", 64)  # a new chunk every few batches
    gen = torch.Generator().manual_seed(10)
    lengths = torch.randint(0, 9, (60,), generator=gen)
    rows = [torch.randn(int(n), 2, generator=gen) for n in lengths]
    label = torch.randn(60, 3, generator=gen)
    rec = pc.Recorder(num_items=60)
    order = torch.randperm(60, generator=gen)
    first = order[:4]
    rec.add(first, {"tok": pad_rows([rows[i] for i in first]), "label": label[first]}, per_token={"tok"}, lengths=lengths[first])
    monkeypatch.setattr(_inputs, "batch_outputs", lambda *args: pytest.fail("the general path was taken"))
    for k, chunk in enumerate(order[4:].split(7)):
        left = k % 2 == 1
        out = {"tok": pad_rows([rows[i] for i in chunk], left=left, pad=5, extra=k % 3), "label": label[chunk]}
        if k % 3 == 0:
            rec.add(chunk, out, per_token={"tok"}, lengths=lengths[chunk], padding_side="left" if left else None)
        else:
            rec.add(host_batch(chunk, lengths[chunk], padding_side="left" if left else "right"), out, per_token={"tok"})
    assert len(rec._store.tokens["tok"].chunks) > 3
    preds = rec.result()
    for i in range(60):
        assert torch.equal(preds[i]["tok"], rows[i]) and torch.equal(preds[i]["label"], label[i])


@needs_compiled
@pytest.mark.parametrize("bad, message", [
    ([7, 3, 2, 3], "item 3 appears more than once in this batch"),
    ([7, 8, 1], r"item 1 is already recorded \(batch position 2\)"),
    ([7, 8, 10], r"index\[2\] = 10 is outside range\(num_items\) = range\(10\)"),
    ([7, 8, -1], r"index\[2\] = -1 is outside range"),
])
def test_a_batch_failing_late_in_the_compiled_pass_changes_nothing(bad, message):
    rec = pc.Recorder(num_items=10)
    rec.add(torch.tensor([1, 0]), torch.zeros(2, 3), per_token=True, lengths=torch.tensor([1, 3]))
    before = snapshot(rec)
    with pytest.raises(ValueError, match=message):
        rec.add(torch.tensor(bad), torch.ones(len(bad), 3), per_token=True, lengths=torch.ones(len(bad), dtype=torch.long))
    assert_same_state(before, snapshot(rec))
    with pytest.raises(ValueError, match=r"has 3 positions, shorter than the batch's longest item \(4\)"):
        rec.add(torch.tensor([7, 8]), torch.ones(2, 3), per_token=True, lengths=torch.tensor([1, 4]))
    with pytest.raises(ValueError, match=r"lengths must be >= 0, got lengths\[1\] = -1"):
        rec.add(torch.tensor([7, 8]), torch.ones(2, 3), per_token=True, lengths=torch.tensor([1, -1]))
    assert_same_state(before, snapshot(rec))
    assert int(rec._store.table.count.sum()) == 2
    rec.add(torch.tensor([7, 8]), torch.ones(2, 3), per_token=True, lengths=torch.tensor([3, 2]))
    assert rec.result()[8].tolist() == [1.0, 1.0]


@needs_compiled
def test_compiled_pass_reads_non_contiguous_inputs():
    index = torch.arange(16)
    x = torch.arange(48.0).view(3, 16).t()  # [16, 3], column-major
    tokens = torch.arange(16 * 5).view(5, 16).t()  # [16, 5]
    lengths = torch.arange(16) % 6
    rec = pc.Recorder(num_items=16)
    for part in (slice(0, None, 2), slice(1, None, 2)):
        rec.add(index[part], {"x": x[part], "t": tokens[part]}, per_token={"t"}, lengths=lengths[part])
    preds = rec.result()
    assert torch.equal(preds.tensor("x"), x)
    assert all(torch.equal(preds[i]["t"], tokens[i, :lengths[i]]) for i in range(16))


@needs_compiled
@pytest.mark.parametrize("dtype, row", [(torch.uint8, (3,)), (torch.float32, (3,)), (torch.float64, (1,)), (torch.float32, (10,)),
                                        (torch.float64, (16,)), (torch.float64, (17,)), (torch.int16, (5, 7)), (torch.float32, (0,))])
def test_compiled_pass_copies_rows_of_every_size(monkeypatch, dtype, row):
    # csrc/record.cpp copies rows of whole words up to 128 bytes inline and others with memcpy.
    gen = torch.Generator().manual_seed(row[0])
    n = 600
    values = (torch.randn(n, *row, generator=gen) * 100).to(dtype)
    extra = torch.randn(n, 2, generator=gen)
    plain, named = pc.Recorder(num_items=n), pc.Recorder(num_items=n)
    order = torch.randperm(n, generator=gen)
    plain.add(order[:5], values[order[:5]])
    named.add(order[:5].numpy(), {"v": values[order[:5]], "e": extra[order[:5]]})
    monkeypatch.setattr(_inputs, "batch_outputs", lambda *args: pytest.fail("the general path was taken"))
    for chunk in order[5:].split(37):
        plain.add(chunk, values[chunk])
        named.add(chunk.numpy(), {"v": values[chunk], "e": extra[chunk]})
    assert torch.equal(plain.result().tensor(), values)
    got = named.result()
    assert torch.equal(got.tensor("v"), values) and torch.equal(got.tensor("e"), extra)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_compiled_pass_matches_the_general_path(data):
    policy = data.draw(st.sampled_from(["error", "first", "last", "mean"]), label="policy")
    known = data.draw(st.booleans(), label="known")
    per_token = data.draw(st.sampled_from([False, True, {"tok"}]), label="per_token")
    plain = data.draw(st.booleans(), label="plain")
    n = 12
    batches = data.draw(st.lists(st.lists(st.integers(0, n - 1), max_size=6), max_size=7), label="batches")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    fast, slow = pc.Recorder(num_items=n if known else None, on_duplicate=policy), pc.Recorder(num_items=n if known else None, on_duplicate=policy)
    slow._store.fast = None
    lengths_of = torch.randint(0, 5, (n,), generator=gen)  # one length per item: "mean" averages repeats
    for k, items in enumerate(batches):
        index = torch.tensor(items, dtype=torch.long)
        lengths = lengths_of[index]
        left = k % 2 == 1
        width = int(lengths.max()) + k % 2 if len(items) else 0
        tok = torch.randn(len(items), width, 2, generator=gen, dtype=torch.float64)
        label = torch.randn(len(items), 3, generator=gen, dtype=torch.float64)
        outputs = label if per_token is False else {"tok": tok} if per_token is True else {"tok": tok, "label": label}
        side = "left" if left else "right"
        batch, kwargs = (index, {"lengths": lengths, "padding_side": side}) if plain else (host_batch(index, lengths, padding_side=side), {})
        errors = []
        for rec in (fast, slow):
            try:
                rec.add(batch, outputs, per_token=per_token, **kwargs)
                errors.append(None)
            except (TypeError, ValueError) as exc:
                errors.append((type(exc), str(exc)))
        assert errors[0] == errors[1]
    assert np.array_equal(fast._store.table.count, slow._store.table.count) and np.array_equal(fast._store.table.token_len, slow._store.table.token_len)
    assert_preds_equal(fast.result(), slow.result())


# --------------------------------------------------------------------------------------------
# the GPU staging pipeline, run on the CPU with an event that fires when the test says so
# --------------------------------------------------------------------------------------------


class ManualEvent:
    def __init__(self, fired):
        self.fired = fired

    def query(self):
        return self.fired[0]

    def synchronize(self):
        self.fired[0] = True


def test_staged_writes_land_in_order_and_result_waits(monkeypatch):
    fired = [False]
    events = []

    def fake_pinned_copy(src):
        event = ManualEvent(fired)
        events.append(event)
        return src.clone(), event

    monkeypatch.setattr(staging.Staging, "pinned_copy", staticmethod(fake_pinned_copy))
    monkeypatch.setattr(Store, "needs_staging", lambda self, src: True)
    rec = pc.Recorder(num_items=6, on_duplicate="mean")
    rec.add(torch.tensor([0, 1]), torch.tensor([[1.0], [2.0]]))
    rec.add(torch.tensor([1, 2]), {"prediction": torch.tensor([[4.0], [3.0]])}.pop("prediction"))
    assert len(rec._store.staging.pending) == 2 and len(events) == 2  # nothing written yet, nothing waited for
    fired[0] = True
    assert rec.result().tensor().flatten().tolist() == [1.0, 3.0, 3.0] and not rec._store.staging.pending

    tok = pc.Recorder(on_duplicate="mean")
    fired[0] = False
    tok.add(torch.tensor([3]), torch.tensor([[1.0, 2.0, 9.0]]), per_token=True, lengths=[2])
    tok.add(torch.tensor([3, 0]), torch.tensor([[3.0, 4.0, 9.0], [7.0, 9.0, 9.0]]), per_token=True, lengths=[2, 1])
    tok.add(torch.tensor([5000]), torch.tensor([[8.0, 9.0, 9.0]]), per_token=True, lengths=[3])  # growth drains first
    preds = tok.result()
    assert preds[3].tolist() == [2.0, 3.0] and preds[0].tolist() == [7.0] and preds[5000].tolist() == [8.0, 9.0, 9.0]


def test_staged_copies_in_flight_are_bounded(monkeypatch):
    fired = [False]
    monkeypatch.setattr(staging.Staging, "pinned_copy", staticmethod(lambda src: (src.clone(), ManualEvent(fired))))
    monkeypatch.setattr(Store, "needs_staging", lambda self, src: True)
    rec = pc.Recorder(num_items=100)
    for i in range(20):
        rec.add(torch.tensor([i]), torch.tensor([[float(i)]]))
        assert len(rec._store.staging.pending) <= staging.MAX_PENDING
    assert rec.result().tensor().flatten().tolist() == [float(i) for i in range(20)]


@pytest.mark.cuda
def test_cuda_outputs_to_host_storage_and_device_storage():
    gen = torch.Generator().manual_seed(6)
    lengths = torch.randint(1, 9, (32,), generator=gen)
    rows = [torch.randn(int(n), 3, generator=gen) for n in lengths]
    label = torch.randn(32, 4, generator=gen)
    for device in (None, "cuda"):
        rec = pc.Recorder(num_items=32, device=device)
        for chunk in torch.randperm(32, generator=gen).split(5):
            padded = pad_rows([rows[i] for i in chunk], left=True).cuda()
            rec.add(host_batch(chunk, lengths[chunk], padding_side="left"), {"tok": padded, "label": label[chunk].cuda()}, per_token={"tok"})
        preds = rec.result()
        for i in range(32):
            assert torch.equal(preds[i]["tok"].cpu(), rows[i]) and torch.equal(preds[i]["label"].cpu(), label[i])


# --------------------------------------------------------------------------------------------
# Predictions: mapping, construction, export
# --------------------------------------------------------------------------------------------


def test_predictions_mapping_behaviour():
    rec = pc.Recorder(num_items=8)
    rec.add([6, 2, 4], torch.tensor([[6.0], [2.0], [4.0]]))
    preds = rec.result()
    assert len(preds) == 3 and list(preds) == [2, 4, 6] and list(preds.keys()) == [2, 4, 6]
    assert [(k, v.item()) for k, v in preds.items()] == [(2, 2.0), (4, 4.0), (6, 6.0)]
    assert 4 in preds and 3 not in preds and -1 not in preds and "x" not in preds
    assert preds[np.int64(4)].item() == 4.0 and preds[torch.tensor(6)].item() == 6.0
    with pytest.raises(KeyError):
        preds[3]
    with pytest.raises(TypeError, match=r"views were combined, index with preds\[i\]"):
        preds[2, 0]
    with pytest.raises(TypeError, match="keys are dataset indices"):
        preds[2.0]
    assert preds.missing().tolist() == [0, 1, 3, 5, 7]
    assert "3 entries" in repr(preds) and "per-example float32" in repr(preds)
    no_n = pc.Recorder()
    no_n.add([1], torch.zeros(1))
    with pytest.raises(ValueError, match="num_items is unknown"):
        no_n.result().missing()
    assert no_n.result().missing(num_items=3).tolist() == [0, 2]


def test_predictions_constructor():
    preds = pc.Predictions([1, 5], {"x": torch.tensor([[1.0], [5.0]]), "t": (torch.arange(5), torch.tensor([0, 2, 5]))}, num_items=6)
    assert preds[5]["t"].tolist() == [2, 3, 4] and preds[1]["x"].tolist() == [1.0]
    assert preds.missing().tolist() == [0, 2, 3, 4]
    with pytest.raises(ValueError, match="strictly increasing"):
        pc.Predictions([5, 1], torch.zeros(2))
    with pytest.raises(ValueError, match=r"must be \[E, \.\.\.\] with E = 2 entries"):
        pc.Predictions([1, 5], torch.zeros(3))
    with pytest.raises(ValueError, match="offsets increasing from 0"):
        pc.Predictions([1, 5], (torch.arange(5), torch.tensor([0, 3, 4])))
    with pytest.raises(TypeError, match="must be a tensor or a"):
        pc.Predictions([1], {"x": [1.0]})
    with pytest.raises(ValueError, match=r"outside range\(num_items\)"):
        pc.Predictions([1, 5], torch.zeros(2), num_items=5)


def _rich_predictions():
    gen = torch.Generator().manual_seed(7)
    lengths = torch.tensor([3, 0, 2, 5])
    out = {
        "f16": torch.randn(4, 2, generator=gen).half(),
        "bf16": torch.randn(4, generator=gen).bfloat16(),
        "flag": torch.rand(4, 3, generator=gen) > 0.5,
        "u8": torch.randint(0, 255, (4, 2, 2), generator=gen, dtype=torch.uint8),
        "empty": torch.zeros(4, 0, 3, dtype=torch.int8),
        "f64": torch.randn(4, 1, generator=gen, dtype=torch.float64),
        "tok": torch.randint(-9, 9, (4, 5, 2), generator=gen, dtype=torch.int32),
        "tokbf": torch.randn(4, 5, generator=gen).bfloat16(),
    }
    rec = pc.Recorder(num_items=9)
    rec.add(host_batch([7, 0, 3, 5], lengths), out, per_token={"tok", "tokbf"})
    return rec.result()


def test_arrow_and_parquet_round_trip_exactly(tmp_path):
    preds = _rich_predictions()
    table = preds.to_arrow()
    assert table.column_names == ["index", "f16", "bf16", "flag", "u8", "empty", "f64", "tok", "tokbf"]
    assert str(table.schema.field("tok").type) == "list<item: fixed_size_list<item: int32>[2]>"
    assert str(table.schema.field("f16").type) == "fixed_size_list<item: halffloat>[2]"
    assert_preds_equal(preds, pc.Predictions.from_arrow(table))
    path = tmp_path / "preds.parquet"
    preds.to_parquet(path)
    back = pc.Predictions.read(path)
    assert_preds_equal(preds, back)
    assert back.missing().tolist() == [1, 2, 4, 6, 8]


@pytest.mark.parametrize("policy", ["none", "stack"])
def test_parquet_round_trip_with_views_and_single_outputs(tmp_path, policy):
    rec = pc.Recorder(num_items=3, views=policy)
    rec.add(host_batch([2, 0, 2, 0], [1, 2, 1, 2], [0, 1, 1, 0]), torch.arange(8.0).view(4, 2), per_token=True)
    preds = rec.result()
    preds.to_parquet(tmp_path / "p.parquet")
    back = pc.Predictions.read(tmp_path / "p.parquet")
    assert_preds_equal(preds, back)
    assert (back.view is None) == (policy == "stack")


def test_to_arrow_rejects_reserved_names():
    preds = pc.Predictions([0], {"index": torch.zeros(1)})
    with pytest.raises(ValueError, match="may not be named 'index'"):
        preds.to_arrow()


def test_read_rejects_foreign_tables(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"index": [1, 2]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no provcollate metadata"):
        pc.Predictions.read(tmp_path / "x.parquet")


def test_to_pandas_with_dataset_fields():
    preds = _rich_predictions()
    df = preds.to_pandas()
    assert list(df.columns) == ["index", "f16", "bf16", "flag", "u8", "empty", "f64", "tok", "tokbf"]
    assert df["index"].tolist() == [0, 3, 5, 7]
    assert df["bf16"].dtype == np.float32
    assert np.array_equal(df["tok"][3], preds[7]["tok"].numpy()) and df["tok"][1].shape == (2, 2)

    dicts = [{"text": f"t{i}", "f16": i} for i in range(9)]
    df = preds.to_pandas(dataset=pc.Indexed(dicts))
    assert df["text"].tolist() == ["t0", "t3", "t5", "t7"] and df["f16_input"].tolist() == [0, 3, 5, 7]
    tuples = [(torch.tensor(float(i)), torch.arange(i)) for i in range(9)]
    df = preds.to_pandas(dataset=tuples)
    assert df["input_0"].tolist() == [0.0, 3.0, 5.0, 7.0] and np.array_equal(df["input_1"][2], np.arange(5))
    df = preds.to_pandas(dataset=list(range(100, 109)))
    assert df["input"].tolist() == [100, 103, 105, 107]


# --------------------------------------------------------------------------------------------
# end to end: DataLoader (shuffled, 2 workers) -> Indexed -> Collator -> model -> Recorder
# --------------------------------------------------------------------------------------------


class TinyModel(torch.nn.Module):
    """Embedding + per-position linear (per token) and masked mean-pool + linear (per example).

    Integer-valued weights keep every sum exact, so a padded batch and an example run alone give
    bitwise equal outputs: any difference is a bookkeeping error, not rounding.
    """

    def __init__(self, vocab=50, dim=8):
        super().__init__()
        gen = torch.Generator().manual_seed(8)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.tok = torch.nn.Linear(dim, 5, bias=False)
        self.cls = torch.nn.Linear(dim, 3, bias=False)
        with torch.no_grad():
            for p in (self.embed.weight, self.tok.weight, self.cls.weight):
                p.copy_(torch.randint(-3, 4, p.shape, generator=gen).float())

    def forward(self, ids, mask):
        h = self.embed(ids) * mask[..., None]
        pooled = self.cls(h.sum(1)) / mask.sum(1, keepdim=True)  # divide last: the sums stay exact
        return {"tags": self.tok(h), "pooled": pooled}


@pytest.mark.parametrize("side", ["right", "left"])
def test_end_to_end_dataloader_workers_shuffle(side):
    from torch.utils.data import DataLoader

    gen = torch.Generator().manual_seed(9)
    data = [{"input_ids": torch.randint(0, 50, (int(n),), generator=gen)} for n in torch.randint(1, 13, (61,), generator=gen)]
    model = TinyModel().eval()
    loader = DataLoader(pc.Indexed(data), batch_size=7, shuffle=True, num_workers=2, generator=gen,
                        collate_fn=pc.Collator(padding_side=side))
    rec = pc.Recorder(num_items=len(data))
    argmax = pc.Recorder(num_items=len(data), reduce="argmax")
    with torch.no_grad():
        for batch in loader:
            out = model(batch["input_ids"], batch.mask)
            rec.add(batch, out, per_token={"tags"})
            argmax.add(batch, out["tags"], per_token=True)
    preds, classes = rec.result(), argmax.result()
    assert preds.missing().numel() == 0 and len(preds) == len(data)
    with torch.no_grad():
        for i, example in enumerate(data):
            alone = model(example["input_ids"][None], torch.ones(1, len(example["input_ids"]), dtype=torch.bool))
            assert torch.equal(preds[i]["tags"], alone["tags"][0]), i
            assert torch.equal(preds[i]["pooled"], alone["pooled"][0]), i
            assert torch.equal(classes[i], alone["tags"][0].argmax(-1)), i
    df = preds.to_pandas(dataset=data)
    assert np.array_equal(df["input_ids"][60], data[60]["input_ids"].numpy())

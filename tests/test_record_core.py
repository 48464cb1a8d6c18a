"""The recording core's contract (issue 12): a rejected add changes nothing, whatever raises;
packed and nested per-token outputs; max_len is checked; views counted once; the summary."""
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import provcollate as pc
from provcollate import ops
from provcollate.store import SINGLE, Jagged, Spec, Store, memory, rows as store_rows


# --------------------------------------------------------------------------------------------
# validate-then-commit
# --------------------------------------------------------------------------------------------

def state(rec):
    """Everything observable about a Recorder, and its slot table, as plain values."""
    preds = rec.result()
    table = rec._store.table
    out = {
        "keys": list(preds), "repr": repr(rec), "records": rec._store.records,
        "specs": None if rec._store.specs is None else dict(rec._store.specs),
        "count": table.count[table.count > 0].tolist(), "where": np.flatnonzero(table.flat).tolist(),
        "token_len": table.token_len.reshape(-1)[table.flat > 0].tolist(),
        "done": rec.done(range(rec.num_items)).tolist() if rec.num_items else None,
        "summary": dataclasses.asdict(preds.summary()),
        "chunk_rows": {n: (t.rows, t.used) for n, t in rec._store.tokens.items()},
    }
    for key, value in preds.items():
        out[("value", key)] = {k: v.clone() for k, v in value.items()} if isinstance(value, dict) else value.clone()
    return out


def assert_unchanged(before, after):
    assert before.keys() == after.keys()
    for k in before:
        a, b = before[k], after[k]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
        elif isinstance(a, dict) and a and isinstance(next(iter(a.values())), torch.Tensor):
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), k
        else:
            assert a == b, k


def test_the_issue_repro_a_rejected_sparse_add_leaves_nothing_recorded():
    rec = pc.Recorder(num_items=4)
    rec.add(torch.tensor([3]), torch.ones(1, 5))
    before = state(rec)
    with pytest.raises(TypeError, match="layout torch.sparse_coo; outputs must be dense tensors"):
        rec.add(torch.tensor([0, 1]), torch.ones(2, 5).to_sparse())
    assert_unchanged(before, state(rec))
    assert not rec.done(0) and rec.result().missing().tolist() == [0, 1, 2]
    rec.add(torch.tensor([0, 1]), torch.full((2, 5), 2.0))  # and the same items can still be recorded
    assert rec.result()[0].tolist() == [2.0] * 5


def _bad_adds():
    """(name, Recorder kwargs, a good first add (batch, outputs[, add kwargs]), a bad add): each bad
    add must raise and change nothing."""
    tok = torch.arange(12.0).view(2, 3, 2)
    lengths = torch.tensor([3, 2])
    packed = pc.Collator(packed=True)([pc.Sample(0, 0, [1, 2, 3]), pc.Sample(1, 0, [4, 5])])
    batch = pc.Collator()([pc.Sample(2, 0, [1, 2]), pc.Sample(3, 0, [4])])
    hostile = pc.Batch(index=torch.tensor([2, 3]), view=torch.zeros(2, dtype=torch.long), data=torch.zeros(2, 2),
                       lengths=torch.tensor([2, -1]), max_len=2)
    q = torch.quantize_per_tensor(torch.ones(2, 5), 0.1, 0, torch.quint8)
    return [
        ("sparse", {}, (torch.tensor([0]), torch.ones(1, 5)), lambda r: r.add(torch.tensor([1, 2]), torch.ones(2, 5).to_sparse())),
        ("meta", {}, (torch.tensor([0]), torch.ones(1, 5)), lambda r: r.add(torch.tensor([1, 2]), torch.ones(2, 5, device="meta"))),
        ("quantized", {}, (torch.tensor([0]), torch.ones(1, 5)), lambda r: r.add(torch.tensor([1, 2]), q)),
        ("negative host_lengths", {}, (torch.tensor([0, 1]), tok, {"per_token": True, "lengths": lengths}), lambda r: r.add(hostile, torch.zeros(2, 2, 2), per_token=True)),
        ("index out of range", {}, (torch.tensor([0]), torch.ones(1, 5)), lambda r: r.add(torch.tensor([1, 9]), torch.ones(2, 5))),
        ("duplicate under error", {}, (torch.tensor([0]), torch.ones(1, 5)), lambda r: r.add(torch.tensor([1, 0]), torch.ones(2, 5))),
        ("repeat within the batch", {}, (torch.tensor([0]), torch.ones(1, 5)), lambda r: r.add(torch.tensor([1, 1]), torch.ones(2, 5))),
        ("dtype", {}, (torch.tensor([0]), torch.ones(1, 5)), lambda r: r.add(torch.tensor([1]), torch.ones(1, 5, dtype=torch.float64))),
        ("row shape", {}, (torch.tensor([0]), torch.ones(1, 5)), lambda r: r.add(torch.tensor([1]), torch.ones(1, 6))),
        ("names", {}, (torch.tensor([0]), torch.ones(1, 5)), lambda r: r.add(torch.tensor([1]), {"x": torch.ones(1, 5)})),
        ("per token after per example", {}, (torch.tensor([0]), torch.ones(1, 5)),
         lambda r: r.add(torch.tensor([1]), torch.ones(1, 5, 1), per_token=True, lengths=[2])),
        ("positions below max_len", {}, (batch, torch.ones(2, 2, 3), {"per_token": True}), lambda r: r.add(batch, torch.ones(2, 5, 3), per_token=True)),
        ("packed rows of the wrong total", {}, (packed, torch.ones(5, 2), {"per_token": True}), lambda r: r.add(packed, torch.ones(4, 2), per_token=True)),
        ("nested strided", {}, (torch.tensor([0]), torch.ones(1, 5)),
         lambda r: r.add(torch.tensor([1]), torch.nested.nested_tensor([torch.ones(2, 5)]), per_token=True, lengths=[2])),
        ("lengths clash under mean", {"on_duplicate": "mean"}, (torch.tensor([0, 1]), tok, {"per_token": True, "lengths": lengths}),
         lambda r: r.add(torch.tensor([0]), torch.ones(1, 3, 2), per_token=True, lengths=[1])),
        ("mean of ints", {"on_duplicate": "mean"}, (torch.tensor([0]), torch.ones(1, 5)),
         lambda r: r.add(torch.tensor([1]), torch.ones(1, 5, dtype=torch.long))),
        ("offsets with a Batch", {}, (batch, torch.ones(2, 2, 3), {"per_token": True}),
         lambda r: r.add(batch, torch.ones(2, 2, 3), per_token=True, offsets=[0, 2, 3])),
    ]


@pytest.mark.parametrize("name, kwargs, first, bad", _bad_adds(), ids=[c[0] for c in _bad_adds()])
def test_a_rejected_add_changes_nothing(name, kwargs, first, bad):
    rec = pc.Recorder(num_items=4, **kwargs)
    batch, out, *kw = first
    rec.add(batch, out, **(kw[0] if kw else {}))
    before = state(rec)
    with pytest.raises((TypeError, ValueError)):
        bad(rec)
    assert_unchanged(before, state(rec))


def test_a_rejected_first_add_fixes_no_outputs():
    rec = pc.Recorder(num_items=4)
    with pytest.raises(TypeError, match="meta device"):
        rec.add(torch.tensor([0]), torch.ones(1, 5, device="meta"))
    assert rec._store.specs is None
    rec.add(torch.tensor([0]), torch.ones(1, 7, dtype=torch.float64))  # any outputs may still come first
    assert rec.result()[0].shape == (7,)


@pytest.mark.parametrize("on_duplicate", ["error", "first", "last", "mean"])
@pytest.mark.parametrize("per_token", [False, True])
def test_whatever_raises_inside_the_copy_leaves_the_state(monkeypatch, on_duplicate, per_token):
    """The write itself fails (here: the op raises): counts, lengths and rows stay as they were."""
    rec = pc.Recorder(num_items=6, on_duplicate=on_duplicate)
    rec._store.fast = None  # the general path's writes are the ones under test
    out = torch.arange(12.0).view(2, 3, 2) if per_token else torch.arange(6.0).view(2, 3)
    kwargs = {"per_token": True, "lengths": [3, 2]} if per_token else {}
    rec.add(torch.tensor([0, 1]), out, **kwargs)
    before = state(rec)

    def broken(*args, **kw):
        raise RuntimeError("the copy failed")

    monkeypatch.setattr(ops, "unpad_scatter_", broken)
    monkeypatch.setattr(ops, "unpad", broken)
    monkeypatch.setattr(store_rows.TokenRows, "mean_into", broken)
    monkeypatch.setattr(store_rows.DenseRows, "mean_into", broken)
    index = torch.tensor([2, 3]) if on_duplicate == "error" else torch.tensor([1, 2])
    bad = {"per_token": True, "lengths": [2, 2]} if per_token else {}  # item 1 keeps its length (mean needs it)
    with pytest.raises(RuntimeError, match="the copy failed"):
        rec.add(index, out + 100, **bad)
    monkeypatch.undo()
    assert_unchanged(before, state(rec))


# --------------------------------------------------------------------------------------------
# packed and nested per-token outputs
# --------------------------------------------------------------------------------------------

class PackedModel(torch.nn.Module):
    """Per-token outputs that depend on the whole item: rows minus their item's mean (offsets)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(50, 4)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(50, 4, generator=gen))

    def forward(self, ids, offsets):
        rows = self.embed(ids)
        lengths = offsets.diff()
        item = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        sums = torch.zeros(len(lengths), 4).index_add_(0, item, rows)
        means = sums / lengths.clamp_min(1).unsqueeze(1)
        return rows - means[item]


def test_packed_rows_total_and_one_total_and_nested_match_the_padded_way():
    model = PackedModel()
    data = [torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 1, 5, 2)]
    samples = [pc.Sample(i, 0, d) for i, d in enumerate(data)]
    packed = pc.Collator(packed=True)(samples)
    padded = pc.Collator()(samples)
    rows = model(packed.data, packed.offsets)
    expected = [model(d, torch.tensor([0, len(d)])) for d in data]
    forms = {
        "rows [total, ...]": lambda r: r.add(packed, rows, per_token=True),
        "rows [1, total, ...]": lambda r: r.add(packed, rows.unsqueeze(0), per_token=True),
        "plain index, offsets=": lambda r: r.add(packed.host_index, rows, per_token=True, offsets=packed.offsets),
        "nested of a packed batch": lambda r: r.add(packed, torch.nested.nested_tensor_from_jagged(rows, packed.offsets), per_token=True),
        "nested of a padded batch": lambda r: r.add(padded, torch.nested.nested_tensor_from_jagged(rows, packed.offsets), per_token=True),
        "padded [B, max_len, ...] of a packed batch": lambda r: r.add(packed, ops.pad(rows, packed.offsets, packed.max_len), per_token=True),
        "dict, mixed": lambda r: r.add(packed, {"tok": rows, "first": rows[packed.offsets[:-1]]}, per_token={"tok"}),
    }
    for name, add in forms.items():
        rec = pc.Recorder(num_items=4)
        add(rec)
        preds = rec.result()
        for i, want in enumerate(expected):
            got = preds[i]["tok"] if isinstance(preds[i], dict) else preds[i]
            assert torch.allclose(got, want, atol=1e-6), (name, i)


def test_packed_rows_under_every_duplicate_policy():
    rows = torch.arange(10.0).view(5, 2)
    offsets = torch.tensor([0, 2, 3, 5])
    for policy, want in [("first", [[0.0, 1.0], [2.0, 3.0]]), ("last", [[6.0, 7.0], [8.0, 9.0]]), ("mean", [[3.0, 4.0], [5.0, 6.0]])]:
        rec = pc.Recorder(num_items=3, on_duplicate=policy)
        rec.add(torch.tensor([0, 1, 0]), rows, per_token=True, offsets=offsets)
        preds = rec.result()
        assert preds[0].tolist() == want and preds[1].tolist() == [[4.0, 5.0]], policy
        assert preds.summary().repeats == 1


def test_packed_rows_of_a_wrong_shape_name_the_forms():
    packed = pc.Collator(packed=True)([pc.Sample(0, 0, [1, 2, 3]), pc.Sample(1, 0, [4, 5])])
    rec = pc.Recorder(num_items=2)
    with pytest.raises(ValueError, match=r"rows \[total=5, \.\.\.\] or \[1, 5, \.\.\.\] in its offsets order, or padded \[B=2, max_len=3, \.\.\.\]"):
        rec.add(packed, torch.ones(4, 2), per_token=True)
    with pytest.raises(ValueError, match="offsets must be \\[B\\+1\\] = \\[3\\] starting at 0"):
        rec.add(torch.tensor([0, 1]), torch.ones(5, 2), per_token=True, offsets=[1, 3, 5])
    with pytest.raises(ValueError, match="lengths and offsets disagree"):
        rec.add(torch.tensor([0, 1]), torch.ones(5, 2), per_token=True, offsets=[0, 3, 5], lengths=[2, 3])
    nested = torch.nested.nested_tensor_from_jagged(torch.ones(4, 2), torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match=r"has items of lengths \[1, 3\] but the batch's lengths are \[3, 2\] \(first difference at item 0\)"):
        rec.add(packed, nested, per_token=True)
    spare = torch.nested.nested_tensor_from_jagged(torch.ones(7, 2), torch.tensor([0, 3, 5]))  # rows past its last item
    with pytest.raises(ValueError, match="holds 7 rows in all, but the batch's lengths add up to 5"):
        rec.add(packed, spare, per_token=True)
    assert len(rec.result()) == 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_nested_views_of_a_padded_output_record_their_own_rows(side):
    """torch.nested.narrow(padded, 1, start, lengths, layout=torch.jagged): a view whose values()
    is the whole padded buffer; each item's rows are its own, wherever they lie in it."""
    gen = torch.Generator().manual_seed(5)
    data = [torch.randint(1, 50, (int(n),), generator=gen) for n in torch.randint(1, 9, (40,), generator=gen)]
    ds = pc.Indexed(data)
    loader = DataLoader(ds, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(1),
                        collate_fn=pc.Collator(padding_side=side))
    embed = torch.nn.Embedding(50, 3)
    rec = pc.Recorder(num_items=ds)
    refused = 0
    with torch.no_grad():
        for batch in loader:
            padded = embed(batch.data)  # [B, max_len, 3]
            lengths = batch.lengths
            start = torch.zeros_like(lengths) if side == "right" else batch.max_len - lengths
            nested = torch.nested.narrow(padded, 1, start, lengths, layout=torch.jagged)
            if side == "right":
                assert not nested.is_contiguous()
            meant = [padded[b, start[b]:start[b] + lengths[b]] for b in range(len(lengths))]
            if not all(torch.equal(u, m) for u, m in zip(nested.unbind(), meant)):
                # torch's narrow took some left-padded views for contiguous ones and lost their
                # lengths: the tensor's own items are not the rows meant, and it must be refused.
                before = repr(rec)
                with pytest.raises(ValueError, match="has items of lengths .* but the batch's lengths are"):
                    rec.add(batch, nested, per_token=True)
                assert repr(rec) == before
                rec.add(batch, padded, per_token=True)
                refused += 1
                continue
            rec.add(batch, nested, per_token=True)
    preds = rec.result()
    assert preds.summary().exactly_once
    with torch.no_grad():
        for i, d in enumerate(data):
            assert torch.equal(preds[i], embed(d)), i
    assert refused < len(loader)  # most batches went through the views themselves


def test_nested_jagged_output_with_its_ragged_dim_elsewhere_is_refused():
    rows = [torch.randn(3, 5), torch.randn(2, 5)]
    transposed = torch.nested.nested_tensor(rows, layout=torch.jagged).transpose(1, 2)  # [2, 5, j]: 5 == 3 + 2
    rec = pc.Recorder(num_items=2)
    with pytest.raises(ValueError, match=r"nested jagged tensor \[2, 5, j\] whose ragged dimension is dim 2; .*transpose\(1, 2\)"):
        rec.add(torch.arange(2), transposed, per_token=True, lengths=torch.tensor([3, 2]))
    assert len(rec.result()) == 0
    rec.add(torch.arange(2), transposed.transpose(1, 2), per_token=True, lengths=torch.tensor([3, 2]))
    preds = rec.result()
    assert torch.equal(preds[0], rows[0]) and torch.equal(preds[1], rows[1])


def test_recorder_repr_says_what_is_missing_and_repeated():
    rec = pc.Recorder(num_items=10)
    rec.add(torch.arange(7), torch.zeros(7, 2))
    assert repr(rec).endswith("recorded=7, missing=3, records=7)")
    rec = pc.Recorder(num_items=10, on_duplicate="first", views="none")
    rec.add(torch.tensor([0, 1, 1, 2]), torch.zeros(4, 2), view=torch.tensor([0, 0, 0, 1]))
    rec.add(torch.tensor([2]), torch.zeros(1, 2))
    assert repr(rec).endswith("recorded=3, missing=7, records=5, repeats=1)")  # item 2 in views 0 and 1: one item
    rec = pc.Recorder()
    rec.add(torch.tensor([3, 5]), torch.zeros(2))
    assert repr(rec).endswith("recorded=2, records=2)")


def test_packed_batches_through_a_dataloader_match_each_example_alone():
    model = PackedModel()
    gen = torch.Generator().manual_seed(4)
    data = [torch.randint(0, 50, (int(n),), generator=gen) for n in torch.randint(1, 12, (200,), generator=gen)]
    ds = pc.Indexed(data)
    sampler = pc.LengthBucketSampler([len(d) for d in data], max_tokens=64, shuffle=True, seed=3)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=pc.Collator(packed=True))
    rec = pc.Recorder(num_items=ds)
    for batch in loader:
        rec.add(batch, model(batch.data, batch.offsets), per_token=True)
    preds = rec.result()
    assert preds.summary().exactly_once
    for i, d in enumerate(data):
        assert torch.allclose(preds[i], model(d, torch.tensor([0, len(d)])), atol=1e-6), i


# --------------------------------------------------------------------------------------------
# per-token outputs must have batch.max_len positions
# --------------------------------------------------------------------------------------------

def test_class_logits_are_not_unpadded_as_positions():
    batch = pc.Collator()([pc.Sample(0, 0, [1, 2, 3]), pc.Sample(1, 0, [4])])  # max_len 3
    rec = pc.Recorder(num_items=2)
    for classes in (5, 2):
        with pytest.raises(ValueError, match=rf"has {classes} positions but the batch's max_len is 3.*pass per_token=False"):
            rec.add(batch, torch.ones(2, classes), per_token=True)
    rec.add(batch, torch.ones(2, 5))  # what was meant
    assert rec.result()[0].shape == (5,)


def test_pad_to_multiple_of_positions_are_max_len():
    batch = pc.Collator(pad_to_multiple_of=8)([pc.Sample(0, 0, [1, 2, 3]), pc.Sample(1, 0, [4])])
    assert batch.max_len == 8
    rec = pc.Recorder(num_items=2)
    rec.add(batch, torch.arange(16.0).view(2, 8), per_token=True)
    assert rec.result()[0].tolist() == [0.0, 1.0, 2.0] and rec.result()[1].tolist() == [8.0]


# --------------------------------------------------------------------------------------------
# views counted once, summary
# --------------------------------------------------------------------------------------------

def test_num_items_takes_an_indexed_dataset_and_counts_items_not_views():
    ds = pc.Indexed(list(range(10)), views=4, seed=0)
    rec = pc.Recorder(num_items=ds)
    assert rec.num_items == 10
    loader = DataLoader(ds, batch_size=7, collate_fn=pc.Collator())
    for batch in loader:
        rec.add(batch, batch.data.float().unsqueeze(1))
    preds = rec.result()
    assert preds.missing().tolist() == [] and len(preds) == 10
    s = preds.summary()
    assert (s.expected, s.recorded, s.missing, s.records, s.repeats, s.views, s.incomplete) == (10, 10, 0, 40, 0, 4, 0)
    assert s.exactly_once


def test_summary_counts_repeats_and_says_how_they_were_resolved(tmp_path):
    for policy, resolution in [("first", "kept the first record"), ("last", "kept the latest record"), ("mean", "averaged")]:
        rec = pc.Recorder(num_items=5, on_duplicate=policy)
        rec.add(torch.tensor([0, 1, 1]), torch.ones(3, 2))
        rec.add(torch.tensor([1, 2]), torch.ones(2, 2))
        s = rec.result().summary()
        assert (s.expected, s.recorded, s.missing, s.records, s.repeats) == (5, 3, 2, 5, 2)
        assert resolution in s.resolution and not s.exactly_once
        text = str(s)
        assert "items expected  5" in text and f"repeats         2: {s.resolution}" in text and "items missing   2" in text
        # the provenance survives the file and the shard round trips
        path = tmp_path / f"{policy}.parquet"
        rec.result().to_parquet(path)
        assert pc.Predictions.read(str(path)).summary() == s
        out = tmp_path / policy
        rec.write(out)
        rec.add(torch.tensor([3]), torch.ones(1, 2))
        rec.add(torch.tensor([3]), torch.ones(1, 2))
        rec.write(out)
        read = pc.Predictions.read(str(out)).summary()
        assert (read.records, read.repeats, read.recorded, read.shards, read.ranks) == (7, 3, 4, 2, 1)
        assert rec.result().summary().records == 7
    error = pc.Recorder(num_items=3)
    error.add(torch.tensor([0, 1]), torch.ones(2))
    s = error.result().summary()
    assert s.repeats == 0 and s.resolution == "none seen" and s.missing == 1 and "ranks merged    1" in str(s)
    assert "Predictions(2 entries, num_items=3, missing=1," in repr(error.result())


def test_summary_of_views_missing_some():
    rec = pc.Recorder(num_items=3)
    rec.add(torch.tensor([0, 0, 1]), torch.ones(3, 1), view=[0, 1, 0])
    s = rec.result().summary()
    assert s.views == 2 and s.incomplete == 1 and s.missing == 1
    assert "2 (1 items missing some)" in str(s)


def test_summary_of_a_directly_built_predictions():
    preds = pc.Predictions(torch.tensor([1, 4]), torch.ones(2, 3), num_items=5)
    s = preds.summary()
    assert (s.recorded, s.missing, s.records, s.repeats, s.on_duplicate) == (2, 3, 2, 0, None)


# --------------------------------------------------------------------------------------------
# on_duplicate can be changed; progress bars
# --------------------------------------------------------------------------------------------

def test_on_duplicate_can_be_changed_and_is_checked():
    rec = pc.Recorder(num_items=3)
    rec.add(torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="already recorded"):
        rec.add(torch.tensor([0]), torch.tensor([2.0]))
    rec.on_duplicate = "mean"
    rec.add(torch.tensor([0]), torch.tensor([3.0]))
    assert rec.result()[0].item() == 2.0
    with pytest.raises(ValueError, match="on_duplicate must be one of"):
        rec.on_duplicate = "keep"
    ints = pc.Recorder(num_items=3)
    ints.add(torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(TypeError, match="averages floating-point outputs"):
        ints.on_duplicate = "mean"
    assert ints.on_duplicate == "error"


def test_progress_bars_of_write_read_and_gather(tmp_path, capsys):
    rec = pc.Recorder(num_items=4)
    rec.add(torch.tensor([0, 1, 2, 3]), torch.ones(4, 2))
    rec.write(tmp_path / "out", progress=True)
    assert "writing shard" in capsys.readouterr().err
    pc.Predictions.read(str(tmp_path / "out"), progress=True)
    assert "reading shards" in capsys.readouterr().err
    rec2 = pc.Recorder(num_items=4)
    rec2.add(torch.tensor([0]), torch.ones(1, 2))
    rec2.gather(progress=True)  # no process group: nothing to merge, no bar
    for call in (lambda: rec2.write(tmp_path / "o2", progress="yes"), lambda: pc.Predictions.read(str(tmp_path / "out"), progress=1),
                 lambda: rec2.gather(progress="no")):
        with pytest.raises(TypeError, match="progress must be a bool"):
            call()


def test_a_recorder_warns_of_distributed_sampler_padding_under_error(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pc.Recorder(num_items=5)  # one rank divides everything: no warning
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# the compiled pass reads numpy indices as they are
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(not pc.HAS_EXTENSION, reason="needs the compiled extension")
def test_numpy_indices_take_the_compiled_pass(monkeypatch):
    from provcollate import _inputs

    rec = pc.Recorder(num_items=8)
    rec.add(np.array([0, 1]), torch.ones(2, 3))
    monkeypatch.setattr(_inputs, "batch_outputs", lambda *a, **k: pytest.fail("the general path was taken"))
    rec.add(np.array([5, 2], dtype=np.int64), torch.full((2, 3), 2.0))
    monkeypatch.undo()
    assert rec.result().index.tolist() == [0, 1, 2, 5] and rec.result()[5].tolist() == [2.0] * 3


@pytest.mark.skipif(not pc.HAS_EXTENSION, reason="needs the compiled extension")
@pytest.mark.parametrize("on_duplicate", ["error", "first", "last", "mean"])
def test_a_batch_the_compiled_pass_hands_back_midway_lands_as_the_general_path_says(on_duplicate):
    # The compiled pass copies each row as it claims its slot; a repeat at the batch's end hands
    # the batch back after 63 rows were copied into unclaimed slots. Those rows must count for
    # nothing: the general path then records (or refuses) the batch as if the pass never ran.
    rec = pc.Recorder(num_items=100, on_duplicate=on_duplicate)
    rec.add(torch.arange(0, 4), torch.full((4, 3), 1.0))
    rec.add(torch.arange(4, 8), torch.full((4, 3), 2.0))  # the compiled pass is planned by now
    index = torch.cat([torch.arange(8, 71), torch.tensor([5])])  # 63 new slots, then a recorded one
    out = torch.arange(64.0).view(64, 1).expand(64, 3).contiguous() + 100
    before = state(rec)
    passes = []
    add_plain = rec._store.fast.add_plain
    rec._store.fast.add_plain = lambda *args: passes.append(add_plain(*args)) or passes[-1]
    if on_duplicate == "error":
        with pytest.raises(ValueError, match="5"):
            rec.add(index, out)
        assert passes == [-1]  # the compiled pass ran and handed the batch back
        assert_unchanged(before, state(rec))
        assert rec.result().missing().tolist() == list(range(8, 100))
        rec.add(torch.arange(8, 71), torch.full((63, 3), 7.0))  # the same slots, recorded for real
        assert bool((rec.result().tensor()[8:71] == 7.0).all())
        return
    rec.add(index, out)
    assert passes == [-1]
    preds = rec.result()
    assert preds.index.tolist() == list(range(71))
    assert torch.equal(preds.tensor()[8:71], out[:63])
    expected5 = {"first": 2.0, "last": 163.0, "mean": (2.0 + 163.0) / 2}[on_duplicate]
    assert preds[5].tolist() == [expected5] * 3


def test_numpy_indices_of_any_layout_and_byte_order_are_read_right():
    out = torch.arange(12.0).view(4, 3)
    expected = pc.Recorder(num_items=10)
    expected.add(torch.tensor([7, 1, 4, 9]), out)
    for index in (np.array([7, 1, 4, 9], dtype=">i8"), np.array([7, 0, 1, 0, 4, 0, 9, 0])[::2], np.array([7, 1, 4, 9], np.int32),
                  np.array([7, 1, 4, 9], np.uint16)):
        rec = pc.Recorder(num_items=10)
        rec.add(index, out)
        got = rec.result()
        assert got.index.tolist() == [1, 4, 7, 9] and torch.equal(got.tensor(), expected.result().tensor()), index.dtype


def test_from_arrow_refuses_unsorted_or_repeated_entries():
    import pyarrow as pa

    a = pc.Predictions(torch.tensor([3, 5]), torch.ones(2, 2)).to_arrow()
    b = pc.Predictions(torch.tensor([1, 5]), torch.zeros(2, 2)).to_arrow()
    both = pa.concat_tables([a, b])
    with pytest.raises(ValueError, match=r"strictly increasing by \(index, view\), but entry 2 \(index 1\) follows index 5"):
        pc.Predictions.from_arrow(both)
    assert pc.Predictions.from_arrow(a)[5].tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------------------------
# large row stores ask for transparent huge pages (provcollate.store.memory.huge_pages)
# --------------------------------------------------------------------------------------------

def vm_flags_at(address):
    """The VmFlags of the mapping of this process that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"), reason="needs Linux with THP")
def test_large_row_stores_are_advised_huge_pages(monkeypatch):
    rec = pc.Recorder(num_items=1_000_000)
    rec.add(torch.tensor([5]), torch.ones(1, 10))
    rows = rec._store.dense[SINGLE].rows
    size = rows.numel() * rows.element_size()
    assert "hg" in vm_flags_at(rows.data_ptr() + size // 2)  # MADV_HUGEPAGE over the aligned middle
    assert rec.result()[5].tolist() == [1.0] * 10

    class Libc:
        calls = []

        def madvise(self, start, length, advice):
            self.calls.append((start.value, length.value, advice))
            return 0

    monkeypatch.setattr(memory, "_libc", Libc())
    small = pc.Recorder(num_items=100_000)  # 4 MB: one whole aligned huge page at most, left alone
    small.add(torch.tensor([5]), torch.ones(1, 10))
    assert Libc.calls == []
    big = pc.Recorder(num_items=300_000)  # 12 MB: the aligned middle is advised, and nothing outside the store
    big.add(torch.tensor([5]), torch.ones(1, 10))
    rows = big._store.dense[SINGLE].rows
    [(start, length, advice)] = Libc.calls
    assert start % (2 << 20) == 0 and length % (2 << 20) == 0 and length >= 2 * (2 << 20)
    assert rows.data_ptr() <= start and start + length <= rows.data_ptr() + rows.numel() * rows.element_size()


# --------------------------------------------------------------------------------------------
# threads sharing a Recorder
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("wide", [False, True], ids=["gil-kept", "gil-released"])
def test_adds_from_two_threads_land_whole(per_token, wide):
    # Before the Recorder's lock, two threads' compiled passes (which release the GIL) wrote
    # per-token rows over each other's: hundreds of items of 40,000 came back wrong. Wide rows
    # make passes big enough to release the GIL (record.cpp kReleaseBytes); narrow ones keep it.
    import threading

    n, B = (4_000, 16) if wide else (40_000, 16)
    width = (256 if per_token else 2048) if wide else (1 if per_token else 4)
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 8, (n,), generator=gen)
    rec = pc.Recorder(num_items=n)

    def add(ix):
        if per_token:
            out = ix.view(-1, 1, 1).expand(-1, int(lengths[ix].max()), width).float()
            rec.add(ix, out, per_token=True, lengths=lengths[ix])
        else:
            rec.add(ix.numpy(), ix.view(-1, 1).expand(-1, width).float())

    add(torch.arange(B))
    rest = torch.randperm(n - B, generator=gen) + B
    errors = []

    def work(part):
        try:
            for ix in part.split(B):
                add(ix)
                if len(errors) == 0 and int(ix[0]) % 97 == 0:
                    rec.done(ix)  # reads between the other thread's adds
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(part,)) for part in (rest[: len(rest) // 2], rest[len(rest) // 2:])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    preds = rec.result()
    assert len(preds) == n and preds.summary().missing == 0
    wrong = [i for i in range(n) if not bool((preds[i] == i).all()) or (per_token and preds[i].shape[0] != int(lengths[i]))]
    assert wrong == []


@pytest.mark.skipif(not pc.HAS_EXTENSION, reason="needs the compiled extension")
@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None, reason="needs x86-64 and objdump")
def test_the_compiled_claims_loop_prefetches_its_rows():
    """record.cpp touches each slot's rows a few slots ahead of their copy. GCC deletes calls of a
    function whose only effect is a prefetch: built so, record_batch kept the counts' prefetch
    alone (one per count width: 2) and no row was ever prefetched (about 1.4x slower at 1M items)."""
    import provcollate._C as C

    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", C.__file__], capture_output=True,
                             text=True, check=True).stdout
    prefetches, function = 0, ""
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line
        elif "prefetch" in line and ("record_batch(" in function or "claim_rows<" in function):
            prefetches += 1
    assert prefetches >= 4, f"{prefetches} prefetch instructions in record_batch: the row touches were compiled away"


def test_compiled_pass_releases_the_gil_only_for_big_copies():
    # A busy Python thread runs only while the main thread lets the GIL go: with a long switch
    # interval the interpreter never takes it away, so the counter moves during an add exactly
    # when the compiled pass released the GIL. Small passes keep it (a release would hand it to
    # the busy thread and the add would wait out the switch interval); big ones let it go, and
    # so does the first pass into new storage (its page faults can take milliseconds). A released
    # GIL shows only if the OS runs the busy thread before the pass ends: on a loaded machine it
    # may not, so up to PASSES big (and first) passes run, and one that moves the counter is enough;
    # a pass that keeps the GIL never moves it.
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys, threading, time, torch, provcollate as pc
        PASSES = 8
        sys.setswitchinterval(0.5)
        count, stop = [0], [False]
        def busy():
            while not stop[0]:
                count[0] += 1
        small, big = pc.Recorder(num_items=100_000), pc.Recorder(num_items=8 + 16 * PASSES)
        fresh = [pc.Recorder(num_items=1_000_000) for _ in range(PASSES)]
        # the first adds fix the layout and plan the compiled pass (their torch ops release the GIL)
        for k in range(2):
            small.add(torch.arange(256 * k, 256 * k + 256), torch.ones(256, 10))
            big.add(torch.arange(4 * k, 4 * k + 4), torch.ones(4, 1 << 18))
        for rec in fresh:
            rec.add(torch.arange(245), torch.ones(245, 10))  # fixes the layout, touching its first page only
        fresh_index, fresh_rows = torch.arange(245, 1_000_000, 4096), torch.ones(245, 10)
        # made before the busy thread starts: torch ops release the GIL too
        small_index, small_rows = torch.arange(512, 256 * 102).split(256), torch.ones(256, 10)
        big_index, big_rows = torch.arange(8, 8 + 16 * PASSES).split(16), torch.ones(16, 1 << 18)
        t = threading.Thread(target=busy, daemon=True)
        t.start()
        time.sleep(0.05)  # the busy thread holds the GIL; main waits a switch interval to get it back
        before = count[0]
        for index in small_index:  # 100 passes of 10 KB
            small.add(index, small_rows)
        moved_small = count[0] - before
        def moved(adds):
            for add in adds:
                before = count[0]
                add()
                if count[0] != before:
                    return count[0] - before
            return 0
        moved_big = moved(lambda index=index: big.add(index, big_rows) for index in big_index)  # passes of 16 MiB
        # 10 KB each, but each Recorder's first compiled pass: it faults in 40 MB of fresh pages
        moved_fresh = moved(lambda rec=rec: rec.add(fresh_index, fresh_rows) for rec in fresh)
        stop[0] = True
        t.join()
        assert bool((small.result().tensor()[:256 * 102] == 1).all())
        done = big.result()
        assert bool((done.tensor() == 1).all()) and len(done) >= 8 + 16
        for rec in fresh:
            got = rec.result()  # the first 245 items, and the fresh pass's where it ran
            assert bool((got.tensor() == 1).all()) and got.index[:245].tolist() == list(range(245))
            assert len(got) in (245, 490) and bool((got.index[245:] % 4096 == 245).all())
        print(moved_small, moved_big, moved_fresh)
    """)], capture_output=True, text=True, timeout=120, env={**os.environ, "PROVCOLLATE_EXTENSION": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    moved_small, moved_big, moved_fresh = map(int, r.stdout.split())
    assert moved_small == 0 and moved_big > 0 and moved_fresh > 0, (moved_small, moved_big, moved_fresh)


# --------------------------------------------------------------------------------------------
# planned per-token rows (shards read back)
# --------------------------------------------------------------------------------------------

def test_token_rows_follow_their_plan_or_else_append():
    """TokenRows.lay_out plans one chunk of exactly the slots' rows in slot order; place() puts
    rows there whatever order they come in, and appends rows the plan did not foresee (another
    slot, another length) instead of writing them over planned rows."""
    spec = Spec(True, torch.float32, (2,))
    rows = store_rows.TokenRows(spec, torch.device("cpu"))
    slots, lengths = np.array([1, 4, 7]), np.array([2, 0, 3])
    rows.lay_out(slots, lengths)
    assert len(rows.chunks) == 1 and rows.chunks[0].shape == (5, 2)
    r7, r1 = torch.full((3, 2), 7.0), torch.full((2, 2), 1.0)
    assert rows.place(np.array([7, 4]), r7, np.array([3, 0])).tolist() == [2, 2]
    assert rows.place(np.array([1]), r1, np.array([2])).tolist() == [0]
    assert torch.equal(rows.chunks[0], torch.cat([r1, r7]))
    planned = rows.chunks[0].clone()
    other = torch.full((4, 2), 9.0)
    start = rows.place(np.array([7]), other, np.array([4]))  # a length the plan did not give it
    assert start.tolist() == [5] and len(rows.chunks) == 2 and torch.equal(rows.chunks[1][:4], other)
    assert rows.place(np.array([2]), r1, np.array([2])).tolist() == [9]  # a slot it did not plan
    assert torch.equal(rows.chunks[0], planned)
    starts, lens = np.array([0, 2, 2]), lengths
    values, offsets = Jagged(rows.chunks, np.asarray(rows.bases), starts, lens).contiguous()
    assert values.data_ptr() == rows.chunks[0].data_ptr() and offsets.tolist() == [0, 2, 2, 5]


def test_a_store_plans_nothing_for_repeated_slots_or_after_rows():
    store = Store(10, torch.device("cpu"), "last", "none")
    store.setup({"t": Spec(True, torch.float32, (1,))}, True, "test")
    assert not store.lay_out(np.array([3, 1, 3]), np.array([1, 1, 1]))
    assert store.tokens["t"].plan is None and not store.tokens["t"].chunks
    assert store.lay_out(np.array([3, 1]), np.array([2, 1]))
    assert store.tokens["t"].plan[0].tolist() == [1, 3] and store.tokens["t"].plan[1].tolist() == [0, 1, 3]
    assert not store.lay_out(np.array([5]), np.array([1]))  # it holds a chunk already


# --------------------------------------------------------------------------------------------
# row storage of its own (provcollate.store.memory.host_empty)
# --------------------------------------------------------------------------------------------

HEAP_AFTER_FREE = """
import sys, torch
from provcollate.store import memory
def in_heap(ptr):
    for line in open('/proc/self/maps'):
        if line.rstrip().endswith('[heap]'):
            lo, hi = (int(x, 16) for x in line.split()[0].split('-'))
            if lo <= ptr < hi:
                return True
    return False
size = (8 << 20,)
t = memory.host_empty(size, torch.uint8, torch.device('cpu')) if sys.argv[1] == 'mapped' else torch.empty(size, dtype=torch.uint8)
t.fill_(1)
del t
print(in_heap(torch.empty((4 << 20,), dtype=torch.uint8).data_ptr()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_freed_row_storage_leaves_the_allocator_as_it_was():
    """A store's big storage is a private mapping of its own: freeing it (a Recorder that writes
    shards does after each one) leaves glibc's mmap threshold alone. Through glibc, the free
    raised it to 8 MiB, so the next 4 MiB tensor (a model's activation) came from the heap,
    whose freed holes stay resident: a streaming predict's peak grew by 2.6x its result."""
    def heap(kind):
        r = subprocess.run([sys.executable, "-c", HEAP_AFTER_FREE, kind], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()[-1] == "True"
    if not heap("torch"):
        pytest.skip("this allocator does not move big blocks to the heap after a free")
    assert not heap("mapped")
    t = memory.host_empty((300, 1000), torch.float32, torch.device("cpu"))
    flags = vm_flags_at(t.data_ptr())
    assert "sh" not in flags and "mr" in flags  # private, like malloc's
    t.fill_(2.0)
    assert float(t.sum()) == 600_000.0 and t.is_contiguous()
    small = memory.host_empty((3, 4), torch.bfloat16, torch.device("cpu"))  # under 1 MiB: torch.empty
    assert small.shape == (3, 4) and small.dtype == torch.bfloat16

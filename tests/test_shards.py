"""Recorder.write / Recorder(resume=) / Recorder.done / Predictions.read of a shard directory.

A Recorder that streams to shards must give what the same Recorder gives in memory: the same
``result()``, and ``Predictions.read(dir)`` equal to it, for every output kind, policy and view
mode. A writer killed with SIGKILL and resumed leaves every example exactly once, right.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import provcollate as pc

from test_distributed import assert_same

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def token_rows(index, width=2, dtype=torch.float32):
    """Item i's per-token rows: length i % 5 + 1 (0 for multiples of 11), values from i."""
    length = 0 if index % 11 == 0 else index % 5 + 1
    base = torch.arange(length * width, dtype=torch.float64).view(length, width)
    return (base + 100 * index).to(dtype)


def padded(index, width=2, dtype=torch.float32):
    rows = [token_rows(i, width, dtype) for i in index]
    lengths = torch.tensor([r.shape[0] for r in rows])
    out = torch.zeros(len(rows), max(int(lengths.max()), 1), width, dtype=dtype)
    for b, r in enumerate(rows):
        out[b, :r.shape[0]] = r
    return out, lengths


def outputs(index, kind, view=0):
    """Deterministic outputs of a batch of items for one output kind, varied by view."""
    index = torch.as_tensor(index)
    x = index.double()[:, None] + view / 8
    if kind == "float":
        return {"out": torch.cat([x, -x, x / 3], 1).float()}, {}
    if kind == "bf16":
        return {"out": (x / 7).to(torch.bfloat16)}, {}
    if kind == "bool-int":
        return {"flag": (index % 3 == 0), "label": (index * 7 + view) % 5, "empty": torch.zeros(len(index), 0)}, {}
    tok, lengths = padded(index.tolist(), dtype=torch.float64)
    return {"tok": tok + view, "score": x[:, 0].float()}, {"per_token": {"tok"}, "lengths": lengths}


def batches(num_items, size, seed, repeats=0, views=1):
    """Shuffled batches of (index, view) pairs; ``repeats`` items recorded a second time at the end."""
    g = torch.Generator().manual_seed(seed)
    pairs = torch.cartesian_prod(torch.arange(num_items), torch.arange(views)) if views > 1 else torch.arange(num_items)[:, None]
    pairs = pairs[torch.randperm(len(pairs), generator=g)]
    if repeats:
        pairs = torch.cat([pairs, pairs[:repeats]])
    for k in range(0, len(pairs), size):
        part = pairs[k:k + size]
        yield part[:, 0], (part[:, 1] if views > 1 else None)


def feed(rec, kind, num_items, size=16, seed=0, repeats=0, views=1, write=None, every=None):
    """Record every batch; with ``write``, stream to that directory (every ``every`` rows, and at the end)."""
    if write is not None and every is not None:
        rec.write(write, every=every)
    for k, (index, view) in enumerate(batches(num_items, size, seed, repeats, views)):
        if view is None:
            outs, extra = outputs(index, kind)
            rec.add(index, outs, **extra)
        else:  # each view's rows in its own add: outputs depend on the view
            for v in view.unique().tolist():
                sel = view == v
                outs, extra = outputs(index[sel], kind, v)
                rec.add(index[sel], outs, view=v, **extra)
        if write is not None and every is None and k % 3 == 2:
            rec.write(write)
    if write is not None:
        rec.write(write)
    return rec


def shard_files(path):
    return sorted(f for f in os.listdir(path) if f.endswith(".parquet"))


# --------------------------------------------------------------------------------------------
# round trips: streaming gives what memory gives
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["float", "bf16", "bool-int", "tokens"])
@pytest.mark.parametrize("num_items", [None, 150])
def test_streamed_equals_in_memory(tmp_path, kind, num_items):
    path = tmp_path / "out"
    rec = feed(pc.Recorder(num_items=num_items), kind, 150, write=path)
    expected = feed(pc.Recorder(num_items=num_items), kind, 150).result()
    assert len(shard_files(path)) > 3
    assert_same(rec.result(), expected)
    assert_same(pc.Predictions.read(path), expected)
    assert_same(pc.Predictions.read(str(path)), expected)


def assert_streamed_like_in_memory(tmp_path, kind, n, settings, **feed_kwargs):
    """A Recorder writing shards as it goes ends with what one kept in memory holds, read back or not."""
    rec = feed(pc.Recorder(num_items=n, **settings), kind, n, write=tmp_path, **feed_kwargs)
    expected = feed(pc.Recorder(num_items=n, **settings), kind, n, **feed_kwargs).result()
    assert_same(rec.result(), expected)
    assert_same(pc.Predictions.read(tmp_path), expected)


@pytest.mark.parametrize("kind", ["float", "tokens"])
@pytest.mark.parametrize("how", ["mean", "stack", "none"])
def test_streamed_views(tmp_path, kind, how):
    assert_streamed_like_in_memory(tmp_path, kind, 60, {"views": how}, views=3)


def test_streamed_vote_and_reduce(tmp_path):
    logits = torch.randn(40, 3, 6, generator=torch.Generator().manual_seed(3))
    recs = [pc.Recorder(num_items=40, views="vote", reduce="argmax") for _ in range(2)]
    for k, (index, view) in enumerate(batches(40, 8, 1, views=3)):
        for rec in recs:
            rec.add(index, logits[index, view], view=view)
        if k % 2:
            recs[0].write(tmp_path)
    recs[0].write(tmp_path)
    assert_same(pc.Predictions.read(tmp_path), recs[1].result())


@pytest.mark.parametrize("policy", ["first", "last", "mean"])
@pytest.mark.parametrize("kind", ["float", "tokens"])
def test_repeats_across_shards_follow_the_policy(tmp_path, policy, kind):
    """Items recorded again after they were written: merged as one Recorder in memory merges them."""
    assert_streamed_like_in_memory(tmp_path, kind, 80, {"on_duplicate": policy}, repeats=30)


def test_repeat_of_a_written_item_under_error_raises(tmp_path):
    rec = pc.Recorder(num_items=10)
    rec.add(torch.tensor([1, 2]), torch.ones(2, 3))
    rec.write(tmp_path)
    with pytest.raises(ValueError, match="item 2 is already recorded"):
        rec.add(torch.tensor([5, 2]), torch.ones(2, 3))
    rec.add(torch.tensor([5]), torch.ones(1, 3))
    rec.write(tmp_path)
    assert pc.Predictions.read(tmp_path).index.tolist() == [1, 2, 5]


def test_first_ignores_and_last_replaces_written_values(tmp_path):
    for policy, expected in (("first", 1.0), ("last", 2.0)):
        path = tmp_path / policy
        rec = pc.Recorder(num_items=4, on_duplicate=policy)
        rec.add(torch.tensor([3]), torch.full((1, 2), 1.0))
        rec.write(path)
        rec.add(torch.tensor([3]), torch.full((1, 2), 2.0))
        rec.write(path)
        assert rec.result()[3].tolist() == [expected] * 2
        assert pc.Predictions.read(path)[3].tolist() == [expected] * 2


def test_read_with_another_policy(tmp_path):
    """Shards of two ranks that both hold item 0 (as DistributedSampler padding makes them)."""
    for rank in (0, 1):
        rec = pc.Recorder(num_items=3)
        rec.add(torch.tensor([0, rank + 1]), torch.tensor([[float(rank)], [5.0]]))
        rec.write(tmp_path / f"tmp{rank}")
        (tmp_path / f"tmp{rank}" / "part-r00000-000000.parquet").rename(tmp_path / f"part-r{rank:05d}-000000.parquet")
    with pytest.raises(ValueError, match="item 0 is recorded more than once"):
        pc.Predictions.read(tmp_path)
    assert pc.Predictions.read(tmp_path, on_duplicate="first")[0].item() == 0.0
    assert pc.Predictions.read(tmp_path, on_duplicate="last")[0].item() == 1.0
    assert pc.Predictions.read(tmp_path, on_duplicate="mean")[0].item() == 0.5


def test_every_writes_by_itself_and_bounds_what_is_held(tmp_path):
    rec = pc.Recorder(num_items=200)
    rec.write(tmp_path, every=50)  # nothing recorded yet: arms automatic writes only
    assert shard_files(tmp_path) == []
    for index, _ in batches(200, 20, 0):
        rec.add(index, outputs(index, "float")[0])
        assert len(rec._store.unwritten()) < 50  # what memory holds between shards
    assert len(shard_files(tmp_path)) == 3  # after 60, 120 and 180 rows (3 batches of 20 >= 50)
    rec.write(tmp_path)
    assert len(shard_files(tmp_path)) == 4
    assert_same(pc.Predictions.read(tmp_path), feed(pc.Recorder(num_items=200), "float", 200, size=20).result())


@pytest.mark.parametrize("views", [1, 3])
def test_read_back_token_rows_lie_in_result_order(tmp_path, views):
    """Shards read back hold each per-token column in one block of exactly its rows, in the order
    the result lists them (planned from the shards' bookkeeping columns before any row is read):
    jagged() takes it as it is. It gathered a copy before, so reading a per-token result back
    peaked at twice its bytes. Likewise Recorder.result() after a write, with rows still in memory."""
    settings = {"views": "none"} if views > 1 else {}
    n = 120
    expected = feed(pc.Recorder(num_items=n, **settings), "tokens", n, views=views).result()
    streamed = feed(pc.Recorder(num_items=n, **settings), "tokens", n, views=views, write=tmp_path / "all", every=50)
    partly = pc.Recorder(num_items=n, **settings)
    for k, (index, view) in enumerate(batches(n, 16, 0, views=views)):
        for v in ([0] if view is None else view.unique().tolist()):
            sel = slice(None) if view is None else view == v
            outs, extra = outputs(index[sel], "tokens", v)
            partly.add(index[sel], outs, **({} if view is None else {"view": v}), **extra)
        if k == 4:
            partly.write(tmp_path / "part")  # the rest stays in memory
    assert partly._store.unwritten().size
    for got in (pc.Predictions.read(tmp_path / "all"), streamed.result(), partly.result()):
        assert_same(got, expected)
        values, offsets = got.jagged("tok")
        again, _ = got.jagged("tok")
        assert values.data_ptr() == again.data_ptr()  # the store's own rows, not a copy per call
        assert values.untyped_storage().nbytes() == values.numel() * values.element_size()  # and no spare ones
        assert offsets[-1] == len(values) > 0


def test_read_back_token_rows_with_repeats_are_gathered(tmp_path):
    """An item in two shards (on_duplicate='last'): nothing is planned, rows are appended as
    before and the result is right."""
    rec = feed(pc.Recorder(num_items=40, on_duplicate="last"), "tokens", 40, repeats=10, write=tmp_path)
    expected = feed(pc.Recorder(num_items=40, on_duplicate="last"), "tokens", 40, repeats=10).result()
    assert_same(pc.Predictions.read(tmp_path), expected)
    assert_same(rec.result(), expected)


def test_write_frees_recorded_rows(tmp_path):
    rec = pc.Recorder(num_items=100)
    rec.add(torch.arange(100), torch.ones(100, 4))
    before = rec._store.dense["prediction"].rows
    rec.write(tmp_path)
    assert rec._store.dense["prediction"].rows is not before  # the written rows' memory went with the old tensor
    assert not rec._store.unwritten().size


# --------------------------------------------------------------------------------------------
# resume and done
# --------------------------------------------------------------------------------------------

def test_resume_done_and_the_rest(tmp_path):
    first = pc.Recorder(num_items=50)
    for index, _ in batches(50, 10, 0):
        index = index[index % 3 > 0]  # a first run that stopped part-way
        first.add(index, outputs(index, "tokens")[0], **outputs(index, "tokens")[1])
    first.write(tmp_path)
    recorded = first.result().index

    rec = pc.Recorder(num_items=50, resume=tmp_path)
    assert torch.equal(torch.nonzero(rec.done(range(50))).flatten(), recorded)
    assert bool(rec.done(int(recorded[0]))) and rec.done(int(recorded[0])).dim() == 0
    todo = torch.nonzero(~rec.done(torch.arange(50))).flatten()
    assert_same(rec.result(), first.result())
    with pytest.raises(ValueError, match="already recorded"):
        rec.add(recorded[:1], outputs(recorded[:1], "tokens")[0], **outputs(recorded[:1], "tokens")[1])
    rec.add(todo, outputs(todo, "tokens")[0], **outputs(todo, "tokens")[1])
    assert bool(rec.done(range(50)).all())
    rec.write(tmp_path)
    expected = feed(pc.Recorder(num_items=50), "tokens", 50).result()
    assert_same(rec.result(), expected)
    assert_same(pc.Predictions.read(tmp_path), expected)
    assert len(pc.Predictions.read(tmp_path).missing()) == 0


def test_resume_of_a_new_directory_is_a_fresh_start(tmp_path):
    path = tmp_path / "not-yet"
    rec = pc.Recorder(num_items=5, resume=path)
    assert not rec.done(range(5)).any() and not path.exists()
    rec.add(torch.tensor([0, 4]), torch.ones(2))
    rec.write(path)
    again = pc.Recorder(num_items=5, resume=path)
    assert again.done(range(5)).tolist() == [True, False, False, False, True]


@pytest.mark.parametrize("policy", ["first", "last", "mean"])
def test_resume_keeps_the_policy(tmp_path, policy):
    rec = feed(pc.Recorder(num_items=40, on_duplicate=policy), "float", 40, write=tmp_path)
    resumed = pc.Recorder(num_items=40, on_duplicate=policy, resume=tmp_path)
    index = torch.arange(0, 40, 3)
    again = {"out": 3 * outputs(index, "float")[0]["out"]}  # the same items, other values
    resumed.add(index, again)
    resumed.write(tmp_path)
    expected = feed(pc.Recorder(num_items=40, on_duplicate=policy), "float", 40)
    expected.add(index, again)
    assert_same(pc.Predictions.read(tmp_path), expected.result())
    assert_same(resumed.result(), expected.result())
    assert bool(resumed.done(range(40)).all()) and not rec.result().missing().numel()


def test_done_with_views_and_batches(tmp_path):
    rec = pc.Recorder(num_items=6)
    rec.add(torch.tensor([1, 2]), torch.ones(2, 1), view=torch.tensor([0, 2]))
    rec.write(tmp_path)
    rec.add(torch.tensor([3]), torch.ones(1, 1), view=1)
    assert rec.done(range(6)).tolist() == [False, True, True, True, False, False]
    assert rec.done([1, 2, 3], view=2).tolist() == [False, True, False]
    assert rec.done([1, 2, 3], view=[0, 0, 1]).tolist() == [True, False, True]
    batch = pc.Collator()([pc.Sample(2, 2, torch.zeros(1)), pc.Sample(2, 1, torch.zeros(1)), pc.Sample(3, 1, torch.zeros(1))])
    assert rec.done(batch).tolist() == [True, False, True]
    resumed = pc.Recorder(num_items=6, resume=tmp_path)
    assert resumed.done([1, 2, 3], view=[0, 2, 1]).tolist() == [True, True, False]


@pytest.mark.parametrize("args, error, match", [
    ((-1,), ValueError, r"range\(num_items\) = range\(6\), got -1"),
    (([6],), ValueError, "got 6"),
    (([0.5],), TypeError, "must hold integers"),
    ((2.5,), TypeError, "must be a 1-D integer"),
    (([1, 2], [0]), ValueError, "one entry per index"),
    (([1], -1), ValueError, "view ids must be >= 0"),
])
def test_done_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        pc.Recorder(num_items=6).done(*args)


def test_done_of_a_batch_takes_no_view():
    batch = pc.Collator()([pc.Sample(1, 0, torch.zeros(1))])
    with pytest.raises(TypeError, match="view= is only for a plain index"):
        pc.Recorder(num_items=6).done(batch, view=0)


# --------------------------------------------------------------------------------------------
# errors, atomicity, foreign files
# --------------------------------------------------------------------------------------------

def test_write_bad_arguments(tmp_path):
    rec = pc.Recorder(num_items=4)
    rec.add(torch.tensor([0]), torch.ones(1))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="must be a directory of shards, got the file"):
        rec.write(tmp_path / "file")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        rec.write(3)
    with pytest.raises(TypeError, match="every must be an int"):
        rec.write(tmp_path, every=2.5)
    with pytest.raises(ValueError, match="every must be >= 1 row, got 0"):
        rec.write(tmp_path, every=0)
    rec.write(tmp_path / "a")
    with pytest.raises(ValueError, match="this Recorder writes to"):
        rec.write(tmp_path / "b")
    other = pc.Recorder(num_items=4)
    other.add(torch.tensor([1]), torch.ones(1))
    with pytest.raises(ValueError, match="already holds shards of an earlier run"):
        other.write(tmp_path / "a")


def test_resume_must_match_the_shards(tmp_path):
    rec = pc.Recorder(num_items=4, on_duplicate="first")
    rec.add(torch.tensor([0]), torch.ones(1, 2))
    rec.write(tmp_path)
    for kwargs, match in (({"num_items": 5, "on_duplicate": "first"}, "num_items=4"),
                          ({"num_items": 4}, "on_duplicate='first'"),
                          ({"num_items": 4, "on_duplicate": "first", "views": "none"}, "views='mean'")):
        with pytest.raises(ValueError, match=match):
            pc.Recorder(**kwargs, resume=tmp_path)
    resumed = pc.Recorder(num_items=4, on_duplicate="first", resume=tmp_path)
    with pytest.raises(ValueError, match="outputs must have the names of the first add"):
        resumed.add(torch.tensor([1]), {"x": torch.ones(1, 2)})
    with pytest.raises(TypeError, match="must be per-example float32 rows of shape \\[2\\]"):
        resumed.add(torch.tensor([1]), torch.ones(1, 2, dtype=torch.float64))


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        pc.Predictions.read(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no shards"):
        pc.Predictions.read(tmp_path)
    with pytest.raises(ValueError, match="on_duplicate must be None"):
        pc.Predictions.read(tmp_path, on_duplicate="avg")
    preds = pc.Recorder(num_items=2)
    preds.add(torch.tensor([0]), torch.ones(1))
    preds.result().to_parquet(tmp_path / "part-r00000-000000.parquet")
    with pytest.raises(ValueError, match="no provcollate shard metadata"):
        pc.Predictions.read(tmp_path)
    with pytest.raises(ValueError, match="applies to a directory of shards"):
        pc.Predictions.read(tmp_path / "part-r00000-000000.parquet", on_duplicate="first")


def test_shards_that_disagree(tmp_path):
    for rank, dtype in enumerate((torch.float32, torch.float64)):
        rec = pc.Recorder(num_items=4)
        rec.add(torch.tensor([rank]), torch.ones(1, dtype=dtype))
        rec.write(tmp_path / f"w{rank}")
        (tmp_path / f"w{rank}" / "part-r00000-000000.parquet").rename(tmp_path / f"part-r{rank:05d}-000000.parquet")
    with pytest.raises(ValueError, match="the shards disagree on outputs"):
        pc.Predictions.read(tmp_path)


def test_mean_of_per_token_repeats_needs_one_length(tmp_path):
    rec = pc.Recorder(num_items=4, on_duplicate="mean")
    rec.add(torch.tensor([1]), torch.ones(1, 3), per_token=True, lengths=[3])
    rec.write(tmp_path)
    rec.add(torch.tensor([1]), torch.ones(1, 3), per_token=True, lengths=[2])
    rec.write(tmp_path)
    with pytest.raises(ValueError, match="repeats must have one length"):
        pc.Predictions.read(tmp_path)


@pytest.mark.parametrize("policy", ["error", "last"])
def test_views_of_one_item_need_one_length_when_combined(tmp_path, policy):
    """Under "error" and "first" add still knows written lengths; under "last" and "mean" reading checks."""
    rec = pc.Recorder(num_items=4, views="mean", on_duplicate=policy)
    rec.add(torch.tensor([1]), torch.ones(1, 3), per_token=True, lengths=[3], view=0)
    rec.write(tmp_path)
    if policy == "error":
        with pytest.raises(ValueError, match="has length 2 in this batch but 3 in its recorded view 0"):
            rec.add(torch.tensor([1]), torch.ones(1, 3), per_token=True, lengths=[2], view=1)
        return
    rec.add(torch.tensor([1]), torch.ones(1, 3), per_token=True, lengths=[2], view=1)
    rec.write(tmp_path)
    with pytest.raises(ValueError, match="item 1 has views of lengths \\[2, 3\\]"):
        pc.Predictions.read(tmp_path)
    with pytest.raises(ValueError, match="item 1 has views of lengths \\[2, 3\\]"):
        rec.result()


def test_temporary_files_are_skipped_and_cleaned(tmp_path):
    rec = pc.Recorder(num_items=4)
    rec.add(torch.tensor([0, 1]), torch.ones(2))
    rec.write(tmp_path)
    stale = tmp_path / ".part-r00000-000001.parquet.999.tmp"
    stale.write_bytes(b"half a shard")
    foreign = tmp_path / ".part-r00001-000000.parquet.999.tmp"
    foreign.write_bytes(b"another rank's")
    assert pc.Predictions.read(tmp_path).index.tolist() == [0, 1]
    pc.Recorder(num_items=4, resume=tmp_path)
    assert not stale.exists() and foreign.exists()  # only this rank's leftovers are removed


# --------------------------------------------------------------------------------------------
# a writer killed with SIGKILL, then resumed
# --------------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[3])
    import provcollate as pc
    from test_shards import outputs

    path, num_items = sys.argv[1], int(sys.argv[2])
    rec = pc.Recorder(num_items=num_items, resume=path)            # the same script starts and restarts
    todo = torch.nonzero(~rec.done(range(num_items))).flatten()
    todo = todo[torch.randperm(len(todo), generator=torch.Generator().manual_seed(len(todo)))]
    rec.write(path, every=256)
    for k in range(0, len(todo), 32):
        index = todo[k:k + 32]
        outs, extra = outputs(index, "tokens")
        rec.add(index, outs, **extra)
    rec.write(path)
    print("finished", len(todo), flush=True)
""")


def _writer(path, num_items):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(num_items), os.path.dirname(os.path.abspath(__file__))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_killed_writer_resumes_without_loss_or_repeats(tmp_path):
    num_items = 12_000
    proc = _writer(tmp_path, num_items)
    deadline = time.monotonic() + 60
    while len(shard_files(tmp_path)) < 5:
        assert proc.poll() is None, f"the writer ended before it was killed: {proc.communicate()}"
        assert time.monotonic() < deadline, "the writer wrote no shards in 60 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    partial = pc.Predictions.read(tmp_path)  # whole shards only: a shard cut short is invisible
    assert 0 < len(partial) < num_items

    proc = _writer(tmp_path, num_items)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.split() == ["finished", str(num_items - len(partial))]

    # on_duplicate="error" (the shards' own): any entry written twice would raise here.
    preds = pc.Predictions.read(tmp_path)
    assert torch.equal(preds.index, torch.arange(num_items)) and not len(preds.missing())
    expected = pc.Recorder(num_items=num_items)
    index = torch.arange(num_items)
    outs, extra = outputs(index, "tokens")
    expected.add(index, outs, **extra)
    assert_same(preds, expected.result())

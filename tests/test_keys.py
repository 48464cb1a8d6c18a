"""Keys: users' own identities (str, bytes, tuples, sparse int64 ids) from Indexed through the
Collator, a real DataLoader and the Recorder, to Predictions, Arrow/Parquet/pandas, shards,
resume and gather; bad keys and mixed ways of filing are clear errors that change nothing."""
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import provcollate as pc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def docs(n=40, seed=0):
    gen = random.Random(seed)
    return [{"id": f"doc-{i:04d}", "tokens": [gen.randrange(1, 50) for _ in range(gen.randrange(1, 9))]} for i in range(n)]


class Model(torch.nn.Module):
    """Per-example mean embedding and per-token states: each depends on its example alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 3)

    def forward(self, ids, mask):
        tokens = self.embed(ids) * mask[..., None]
        return tokens.sum(1) / mask.sum(1, keepdim=True), tokens


def alone(model, tokens):
    ids = torch.tensor([tokens])
    return model(ids, torch.ones_like(ids, dtype=torch.bool))


class KeyedStream(IterableDataset):
    """A WebDataset-like stream of keyed records, split among DataLoader workers."""

    def __init__(self, records):
        self.records = records

    def __iter__(self):
        info = get_worker_info()
        share = self.records if info is None else self.records[info.id::info.num_workers]
        return iter(share)


def state(rec):
    preds = rec.result()
    values = {k: v.clone() for k, v in preds.items()} if len(preds) else {}
    return repr(rec), list(preds), values, preds.summary()


def assert_same_state(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3]
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])


# --------------------------------------------------------------------------------------------
# keys where identity enters
# --------------------------------------------------------------------------------------------

def test_indexed_map_style_key_field_or_function_keeps_positions():
    data = docs(5)
    for ds in (pc.Indexed(data, key="id"), pc.Indexed(data, key=lambda ex: ex["id"])):
        sample = ds[3]
        assert sample.index == 3 and sample.key == "doc-0003" and sample.data is data[3]
    assert "key='id'" in repr(pc.Indexed(data, key="id"))
    views = pc.Indexed(data, views=2, seed=1, key="id")
    assert views[7].index == 3 and views[7].view == 1 and views[7].key == "doc-0003"
    assert views.replay(3, 1).key == "doc-0003"


@pytest.mark.parametrize("bad, error, match", [
    (None, TypeError, r"the key of example 1 is None"),
    (1.5, TypeError, r"the key of example 1 is 1\.5 of type float"),
    ([1, 2], TypeError, r"the key of example 1 is \[1, 2\] of type list"),
    ((), ValueError, r"the key of example 1 is an empty tuple"),
    (("a", 2.0), TypeError, r"element 1 of \('a', 2\.0\)"),
    (2**63, ValueError, r"does not fit in int64"),
])
def test_bad_keys_name_the_key_and_the_example(bad, error, match):
    data = [{"id": "ok"}, {"id": bad}]
    with pytest.raises(error, match=match):
        pc.Indexed(data, key="id")[1]


def test_a_key_function_that_raises_names_the_example():
    with pytest.raises(KeyError, match=r"key='id' raised KeyError on example 0"):
        pc.Indexed([{"no_id": 1}], key="id")[0]

    def broken(example):
        raise ZeroDivisionError("boom")

    with pytest.raises(RuntimeError, match=r"key=broken raised ZeroDivisionError on example 0: boom"):
        pc.Indexed([1], key=broken)[0]
    with pytest.raises(TypeError, match="key must be None, a field name"):
        pc.Indexed([1], key=3)


def test_collator_carries_keys_through_pickling_and_to():
    ds = pc.Indexed(docs(6), key="id")
    batch = pc.Collator()([ds[i] for i in (4, 1, 2)])
    assert batch.key == ["doc-0004", "doc-0001", "doc-0002"]
    again = pickle.loads(pickle.dumps(batch))
    assert again.key == batch.key and again.to("cpu").key == batch.key
    ints = pc.Indexed(list(range(4)), key=lambda x: 10**12 + x)
    keys = pc.Collator()([ints[i] for i in (3, 0)]).key
    assert keys.dtype == torch.int64 and keys.tolist() == [10**12 + 3, 10**12]
    assert pc.Collator()([pc.Indexed([1, 2])[0]]).key is None


def test_collator_refuses_batches_whose_keys_disagree():
    with pytest.raises(TypeError, match=r"sample 1 has no key but sample 0 has one"):
        pc.Collator()([pc.Sample(0, 0, [1], "a"), pc.Sample(1, 0, [2])])
    with pytest.raises(TypeError, match=r"sample 1 has a key but sample 0 has none"):
        pc.Collator()([pc.Sample(0, 0, [1]), pc.Sample(1, 0, [2], "b")])
    with pytest.raises(TypeError, match=r"the key of sample 1 is 1\.5 of type float"):
        pc.Collator()([pc.Sample(0, 0, [1], "a"), pc.Sample(1, 0, [2], 1.5)])
    with pytest.raises(TypeError, match=r"the key of sample 1 is 7 \(int\) but that of sample 0 is 'a' \(str\)"):
        pc.Collator()([pc.Sample(0, 0, [1], "a"), pc.Sample(1, 0, [2], 7)])


# --------------------------------------------------------------------------------------------
# end to end through a real DataLoader
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_keyed_predictions_through_a_dataloader_with_workers_match_each_example_alone(stream):
    data = docs(60)
    ds = pc.Indexed(KeyedStream(data), key=lambda ex: ex["id"]) if stream else pc.Indexed(data, key="id")
    loader = DataLoader(ds, batch_size=7, shuffle=not stream, num_workers=2, collate_fn=pc.Collator(primary="tokens"))
    model = Model()
    rec = pc.Recorder()
    with torch.no_grad():
        for batch in loader:
            pooled, tokens = model(batch["tokens"], batch.mask)
            rec.add(batch, {"pooled": pooled, "tokens": tokens}, per_token={"tokens"})
    preds = rec.result()
    assert preds.keys() == sorted(d["id"] for d in data)  # every key exactly once
    assert preds.summary().repeats == 0 and preds.keyed
    with torch.no_grad():
        for d in data:
            pooled, tokens = alone(model, d["tokens"])
            assert torch.allclose(preds[d["id"]]["pooled"], pooled[0], atol=1e-6)
            assert torch.allclose(preds[d["id"]]["tokens"], tokens[0], atol=1e-6)


def test_keys_sort_the_same_whatever_the_order_they_came_in():
    keys = ["é", "z", "a", "ab", "Z", "b"]
    tuples = [("b", 2), ("a", 10), ("a", 9), ("b", -1)]
    ints = [10**15, -5, 7, 0]
    for kind, ks, want in (("str", keys, sorted(keys, key=lambda k: k.encode())), ("tuple", tuples, sorted(tuples)),
                           ("int", ints, sorted(ints))):
        seen = []
        for seed in range(3):
            order = list(range(len(ks)))
            random.Random(seed).shuffle(order)
            rec = pc.Recorder(keys=kind == "int")
            shuffled = [ks[i] for i in order]
            rec.add(torch.tensor(shuffled) if kind == "int" else shuffled, torch.tensor(order, dtype=torch.float32))
            preds = rec.result()
            seen.append(preds.keys())
            assert all(float(preds[ks[i]]) == i for i in range(len(ks)))
        assert seen[0] == seen[1] == seen[2] == want, kind


# --------------------------------------------------------------------------------------------
# the keyed Recorder: sparse ids, mixing, duplicates, validate-then-commit
# --------------------------------------------------------------------------------------------

def test_sparse_int64_ids_need_keys_true_and_say_so():
    rec = pc.Recorder()
    with pytest.raises(ValueError, match=r"room for index 1000000000000 .*pc\.Recorder\(keys=True\)"):
        rec.add(torch.tensor([10**12, 5]), torch.ones(2, 3))
    assert len(rec.result()) == 0  # nothing changed: the same Recorder still files positions
    rec.add(torch.tensor([1]), torch.ones(1, 3))
    keyed = pc.Recorder(keys=True)
    keyed.add(torch.tensor([10**12, 5]), torch.ones(2, 3))
    keyed.add(np.array([-(2**63), 2**63 - 1]), torch.zeros(2, 3))
    preds = keyed.result()
    assert preds.keys() == [-(2**63), 5, 10**12, 2**63 - 1]
    assert preds.index.tolist() == preds.keys()


def test_mixing_keyed_and_positional_adds_is_an_error_that_changes_nothing():
    rec = pc.Recorder()
    rec.add(["a", "b"], torch.ones(2))
    before = state(rec)
    with pytest.raises(TypeError, match="key 0 is 0, but this Recorder files str keys"):
        rec.add(torch.tensor([0, 1]), torch.ones(2))
    with pytest.raises(ValueError, match="files by key; give keys here too"):
        rec.add(pc.Collator()([pc.Indexed([[1], [2]])[0]]), torch.ones(1))
    with pytest.raises(TypeError, match=r"key 0 is \('x', 1\), but this Recorder files str keys"):
        rec.add([("x", 1)], torch.ones(1))
    assert_same_state(before, state(rec))
    positional = pc.Recorder(num_items=4)
    positional.add(torch.tensor([0]), torch.ones(1))
    with pytest.raises(ValueError, match="files by position"):
        positional.add(["a"], torch.ones(1))
    with pytest.raises(ValueError, match="files by position"):
        positional.add(pc.Collator()([pc.Sample(1, 0, [1], "k")]), torch.ones(1))
    with pytest.raises(ValueError, match="files by position"):
        positional.done("01")
    assert pc.Recorder(num_items=6).done(["a"]).tolist() == [False]  # nothing recorded: not recorded


def test_a_rejected_keyed_add_keeps_neither_its_keys_nor_its_rows():
    rec = pc.Recorder()
    rec.add(["a"], torch.ones(1, 2))
    before = state(rec)
    with pytest.raises(ValueError, match=r"key 'a' is already recorded \(batch position 1\)"):
        rec.add(["new", "a"], torch.zeros(2, 2))
    assert_same_state(before, state(rec))
    assert not bool(rec.done("new"))
    with pytest.raises(ValueError, match=r"key 'x' appears more than once in this batch"):
        rec.add(["x", "x"], torch.zeros(2, 2))
    assert_same_state(before, state(rec))
    first = pc.Recorder()
    with pytest.raises(ValueError, match="1 rows but the batch has 2"):
        first.add(["a", "b"], torch.zeros(1, 2))
    first.add(torch.tensor([3]), torch.zeros(1, 2))  # the failed first add decided nothing
    assert first.result().keyed is False


@pytest.mark.parametrize("policy, want, repeats", [("first", 1.0, 2), ("last", 3.0, 2), ("mean", 2.0, 2)])
def test_repeated_keys_under_every_policy(policy, want, repeats):
    rec = pc.Recorder(on_duplicate=policy)
    rec.add(["k", "other"], torch.tensor([1.0, 9.0]))
    rec.add(["k"], torch.tensor([2.0]))
    rec.add(["k"], torch.tensor([3.0]))
    preds = rec.result()
    assert float(preds["k"]) == want and float(preds["other"]) == 9.0
    summary = preds.summary()
    assert summary.repeats == repeats and summary.recorded == 2 and summary.records == 4


def test_keyed_lookups_missing_and_done():
    pd = pytest.importorskip("pandas")
    pa = pytest.importorskip("pyarrow")
    rec = pc.Recorder(num_items=4)
    rec.add(["b", "a"], torch.tensor([[1.0], [2.0]]))
    preds = rec.result()
    assert "a" in preds and "z" not in preds and 3 not in preds
    with pytest.raises(KeyError, match=r"key 'z' was not recorded; preds\.missing\(expected\)"):
        preds["z"]
    expected = ["a", "z", "b", "y"]
    for column in (expected, np.array(expected, dtype=object), pd.Series(expected), pa.array(expected)):
        assert preds.missing(column) == ["z", "y"]
    with pytest.raises(TypeError, match="pass the expected keys"):
        preds.missing()
    assert preds.summary().missing == 2 and preds.summary().expected == 4
    assert rec.done(["a", "z"]).tolist() == [True, False] and bool(rec.done("b"))
    ints = pc.Recorder(keys=True)
    ints.add(torch.tensor([7, 10**13]), torch.ones(2))
    assert ints.result().missing([7, 8, 10**13]).tolist() == [8]
    tuples = pc.Recorder()
    tuples.add([("d", 1), ("d", 2)], torch.ones(2))
    assert bool(tuples.done(("d", 2))) and tuples.done([("d", 2), ("e", 0)]).tolist() == [True, False]


def test_keyed_views_none_entries_are_key_and_view():
    rec = pc.Recorder(views="none")
    rec.add(["b", "a", "b"], torch.tensor([1.0, 2.0, 3.0]), view=torch.tensor([0, 0, 1]))
    preds = rec.result()
    assert list(preds) == [("a", 0), ("b", 0), ("b", 1)]
    assert float(preds["b", 1]) == 3.0 and preds.summary().recorded == 2


# --------------------------------------------------------------------------------------------
# keys survive every sink
# --------------------------------------------------------------------------------------------

KEY_SETS = {
    "str": ["b", "a", "é", "c"],
    "bytes": [b"\x00b", b"a", b"\xff", b"c"],
    "tuple": [("d", 2), ("d", 1), ("a", 5), ("b", 0)],
    "int": [10**12, -3, 7, 0],
}


@pytest.mark.parametrize("kind", sorted(KEY_SETS))
def test_keys_survive_arrow_parquet_and_pandas(kind, tmp_path):
    pytest.importorskip("pyarrow")
    keys = KEY_SETS[kind]
    rec = pc.Recorder(keys=kind == "int")
    outputs = {"p": torch.arange(8.0).view(4, 2), "t": torch.arange(16).view(4, 4)}
    rec.add(torch.tensor(keys) if kind == "int" else keys, outputs, per_token={"t"}, lengths=torch.tensor([1, 4, 2, 3]))
    preds = rec.result()
    table = preds.to_arrow()
    assert table.schema.names[0] == "key" and "index" not in table.schema.names
    path = tmp_path / "p.parquet"
    preds.to_parquet(path)
    for back in (pc.Predictions.from_arrow(table), pc.Predictions.read(path)):
        assert back.keys() == preds.keys()
        for k in keys:
            assert torch.equal(back[k]["p"], preds[k]["p"]) and torch.equal(back[k]["t"], preds[k]["t"])
    df = preds.to_pandas()
    assert list(df.columns)[0] == "key" and list(df["key"]) == preds.keys()
    with pytest.raises(TypeError, match="join"):
        preds.to_pandas(dataset=[1, 2, 3, 4])


@pytest.mark.parametrize("kind", ["str", "tuple", "int"])
def test_keys_survive_shards_read_and_resume(kind, tmp_path):
    pytest.importorskip("pyarrow")
    keys = KEY_SETS[kind]
    as_input = (lambda ks: torch.tensor(ks)) if kind == "int" else (lambda ks: ks)
    rec = pc.Recorder(on_duplicate="first", keys=kind == "int")
    rec.add(as_input(keys[:2]), torch.tensor([[1.0], [2.0]]))
    rec.write(tmp_path)
    rec.add(as_input([keys[2], keys[0]]), torch.tensor([[3.0], [99.0]]))  # keys[0] again: the first is kept
    rec.write(tmp_path)
    read = pc.Predictions.read(tmp_path)
    assert read.keys() == sorted(keys[:3]) and float(read[keys[0]]) == 1.0 and read.summary().repeats == 1
    assert rec.result().keys() == read.keys()
    resumed = pc.Recorder(on_duplicate="first", resume=tmp_path, keys=kind == "int")
    assert resumed.done(as_input(keys)).tolist() == [True, True, True, False]
    resumed.add(as_input([keys[3], keys[1]]), torch.tensor([[4.0], [77.0]]))
    resumed.write(tmp_path)
    final = pc.Predictions.read(tmp_path)
    assert final.keys() == sorted(keys) and float(final[keys[1]]) == 2.0 and float(final[keys[3]]) == 4.0
    out = subprocess.run([sys.executable, "-m", "provcollate", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0 and "items:     4" in out.stdout, out.stdout + out.stderr
    target = tmp_path / "all.parquet"
    out = subprocess.run([sys.executable, "-m", "provcollate", "export", str(tmp_path), str(target)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert pc.Predictions.read(target).keys() == sorted(keys)


KILLED = textwrap.dedent("""
    import os, signal, sys, torch
    import provcollate as pc
    out, stop = sys.argv[1], int(sys.argv[2])
    keys = [f"rec-{i:03d}" for i in range(200)]
    rec = pc.Recorder(resume=out)
    todo = [k for k, done in zip(keys, rec.done(keys).tolist()) if not done]
    for start in range(0, len(todo), 10):
        part = todo[start:start + 10]
        rec.add(part, torch.tensor([[float(keys.index(k))] for k in part]))
        rec.write(out)
        if start // 10 == stop:
            os.kill(os.getpid(), signal.SIGKILL)
    rec.write(out)
""")


def test_keyed_resume_after_sigkill_records_every_key_once(tmp_path):
    pytest.importorskip("pyarrow")
    script = tmp_path / "run.py"
    script.write_text(KILLED)
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, str(script), str(out), "6"], cwd=ROOT, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert 0 < len(pc.Predictions.read(out)) < 200
    finished = subprocess.run([sys.executable, str(script), str(out), "-1"], cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    preds = pc.Predictions.read(out)
    assert preds.keys() == [f"rec-{i:03d}" for i in range(200)] and preds.summary().repeats == 0
    assert all(float(preds[f"rec-{i:03d}"]) == i for i in range(200))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    results = {}
    for kind, keys in sorted(KEY_SETS.items()):
        rec = pc.Recorder(on_duplicate="first", keys=kind == "int")
        mine = keys[rank::world] + [keys[0]]  # keys[0] on every rank: the lowest rank's is kept
        values = torch.tensor([[float(rank * 10 + keys.index(k))] for k in mine])
        rec.add(torch.tensor(mine) if kind == "int" else mine, values)
        merged = rec.gather()
        results[kind] = (merged.keys(), {k: float(merged[k]) for k in keys}, merged.summary().repeats)
    if rank == 0:
        with open(path, "wb") as f:
            pickle.dump(results, f)
    dist.destroy_process_group()


def test_gather_over_two_ranks_moves_keys(tmp_path):
    path = str(tmp_path / "gathered.pkl")
    ctx = mp.start_processes(_gather_worker, args=(2, _free_port(), path), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):  # True once every rank has exited (a failed rank raises here)
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail("the 2-rank gather did not finish in 180 s")
    with open(path, "rb") as f:
        results = pickle.load(f)
    for kind, keys in KEY_SETS.items():
        got_keys, values, repeats = results[kind]
        assert got_keys == sorted(keys), kind
        # keys[i] was recorded on rank i % 2 as 10 * rank + i; keys[0] on both ranks, rank 0's kept
        assert values == {k: float(10 * (i % 2) + i) for i, k in enumerate(keys)}, kind
        assert repeats == 2, kind  # keys[0] twice on rank 0 (its own batch), and again on rank 1


# --------------------------------------------------------------------------------------------
# join-back
# --------------------------------------------------------------------------------------------

def _joined_rows(joined):
    import pandas as pd

    if isinstance(joined, pd.DataFrame):
        return joined.to_dict("records")
    return joined.to_pandas().to_dict("records") if hasattr(joined, "to_pandas") else None


@pytest.mark.parametrize("kind", ["pandas", "arrow", "datasets"])
def test_join_puts_every_source_row_beside_its_prediction(kind):
    pd = pytest.importorskip("pandas")
    pa = pytest.importorskip("pyarrow")
    frame = pd.DataFrame({"id": ["c", "a", "never", "b", "a"], "p": [3, 1, 0, 2, 1]})
    source = {"pandas": lambda: frame, "arrow": lambda: pa.Table.from_pandas(frame, preserve_index=False),
              "datasets": lambda: pytest.importorskip("datasets").Dataset.from_pandas(frame, preserve_index=False).select([0, 1, 2, 3, 4])}[kind]()
    rec = pc.Recorder()
    rows = torch.arange(6)
    rec.add(["a", "b", "c"], {"p": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), "tok": rows}, per_token={"tok"},
            offsets=torch.tensor([0, 1, 3, 6]))
    joined = rec.result().join(source, on="id")
    assert type(joined) is type(source)
    got = _joined_rows(joined)
    assert [r["id"] for r in got] == ["c", "a", "never", "b", "a"]  # every source row, in source order
    assert list(got[0]["p_prediction"]) == [5.0, 6.0] and list(got[0]["tok"]) == [3, 4, 5]
    assert list(got[4]["p_prediction"]) == [1.0, 2.0] and got[4]["p"] == 1
    missing = got[2]["p_prediction"]
    assert missing is None or (isinstance(missing, float) and np.isnan(missing))


def test_join_by_position_and_its_errors():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"text": ["a", "b", "c"], "item": [2, 0, 7]})
    rec = pc.Recorder(num_items=3)
    rec.add(torch.tensor([0, 2]), torch.tensor([10.0, 30.0]))
    preds = rec.result()
    by_row = preds.join(frame)["prediction"].tolist()
    assert by_row[0] == 10.0 and np.isnan(by_row[1]) and by_row[2] == 30.0
    by_column = preds.join(frame, on="item")["prediction"].tolist()
    assert by_column[:2] == [30.0, 10.0] and np.isnan(by_column[2])
    with pytest.raises(KeyError, match=r"on='nope' is not a column of the source, whose columns are \['text', 'item'\]"):
        preds.join(frame, on="nope")
    with pytest.raises(TypeError, match="pandas DataFrame, a pyarrow Table or a datasets.Dataset"):
        preds.join([1, 2, 3])
    keyed = pc.Recorder()
    keyed.add(["a"], torch.ones(1))
    with pytest.raises(TypeError, match="filed by key; name the source column"):
        keyed.result().join(frame)
    views = pc.Recorder(views="none")
    views.add(torch.tensor([0, 0]), torch.ones(2), view=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="views='none'"):
        views.result().join(frame)


def test_keyed_webdataset_example_runs():
    """examples/keyed_webdataset.py: local tar shards through 2 workers, joined back, each checked alone."""
    pytest.importorskip("webdataset")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "keyed_webdataset.py"), "--records", "120"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "items recorded  120" in out.stdout and "repeats         0" in out.stdout


def test_keyed_adds_take_the_compiled_pass_and_land_as_the_general_path_says():
    """After the first add, keyed batches go through the compiled pass under their keys' slots; a
    store without it (the general path) must end with the same predictions and raise the same errors."""
    rng = random.Random(3)
    batches = []
    for b in range(30):
        keys = [f"k{rng.randrange(400)}" for _ in range(rng.randrange(0, 9))]
        batches.append((keys, torch.randn(len(keys), 3, generator=torch.Generator().manual_seed(b))))
    for policy in ("error", "first", "last", "mean"):
        compiled, general = pc.Recorder(on_duplicate=policy), pc.Recorder(on_duplicate=policy)
        general._store.fast = None
        passes = []
        if compiled._store.fast is not None:
            fast_add = compiled._store.fast.add
            compiled._store.fast.add = lambda *args: passes.append(fast_add(*args)) or passes[-1]
        for keys, outputs in batches:
            errors = []
            for rec in (compiled, general):
                try:
                    rec.add(keys, outputs)
                    errors.append(None)
                except (TypeError, ValueError) as exc:
                    errors.append(str(exc))
            assert errors[0] == errors[1], policy
        a, b = compiled.result(), general.result()
        assert a.keys() == b.keys() and a.summary() == b.summary(), policy
        assert all(torch.equal(a[k], b[k]) for k in a.keys()), policy
        if pc.HAS_EXTENSION:
            assert sum(n > 0 for n in passes) >= 5, (policy, passes)  # batches the compiled pass recorded


def test_int_keys_are_never_taken_for_positions():
    """Recorder(keys=True): int ids that are also valid positions still file by key (the plain
    positional call must not take them)."""
    rec = pc.Recorder(keys=True)
    rec.add(torch.tensor([5, 10**12]), torch.tensor([[5.0], [12.0]]))
    rec.add(torch.tensor([0, 1]), torch.tensor([[0.0], [1.0]]))
    rec.add(np.array([2, 3]), torch.tensor([[2.0], [3.0]]))
    preds = rec.result()
    assert preds.keys() == [0, 1, 2, 3, 5, 10**12]
    assert [float(preds[k]) for k in preds.keys()] == [0.0, 1.0, 2.0, 3.0, 5.0, 12.0]

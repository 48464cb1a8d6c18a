"""Ray Data: provcollate.integrations.ray on a local Ray (2 CPUs, loopback only).

Every item exactly once and equal to the model run on that example alone, per example and per
token, with preserve_order off, 2 actors, an actor killed by its first call and the task retried,
blocks written twice and half-written files, and a resumed run that writes only what is missing.
The python blocks of docs/ray.md run too, in order, as one script.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import provcollate as pc

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
import ray.data  # noqa: E402
from ray.util.annotations import RayDeprecationWarning  # noqa: E402

from provcollate.integrations import ray as pc_ray  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "ray.md"

NUM_ITEMS = 90
VOCAB = 50


def token_rows(n=NUM_ITEMS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, int(rng.integers(1, 13))).tolist() for _ in range(n)]


class TinyModel:
    """Integer-valued float64 weights: every sum is exact, so batched equals alone bitwise.

    Takes padded batches (``batch.data`` [B, T], ``batch.mask``) and packed ones (``batch.data``
    [total], ``batch.offsets``); returns a per-example ``pooled`` [B, 8] and per-token ``tokens``.
    With ``crash_marker``, the first call in the whole cluster (the one that creates the marker
    file) kills its actor process, as a lost node would; with ``calls``, every call that
    survives leaves its process id there.
    """

    def __init__(self, crash_marker=None, calls=None):
        g = torch.Generator().manual_seed(0)
        self.embed = torch.randint(-4, 5, (VOCAB, 8), generator=g).double()
        self.head = torch.randint(-3, 4, (8, 3), generator=g).double()
        self.crash_marker, self.calls = crash_marker, calls

    def __call__(self, batch):
        if self.crash_marker is not None:
            try:
                os.close(os.open(self.crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        if self.calls is not None:
            Path(self.calls, str(os.getpid())).touch()
        h = self.embed[batch.data]
        if batch.offsets is not None:
            pooled = torch.segment_reduce(h, "max", offsets=batch.offsets, axis=0)
        else:
            pooled = h.masked_fill(~batch.mask[..., None], -float("inf")).amax(1)
        return {"pooled": pooled, "tokens": h @ self.head}


def alone(model, tokens):
    """The model on one example, in a batch of its own."""
    return {k: v[0] for k, v in model(pc.Collator()([pc.Sample(0, 0, torch.tensor(tokens))])).items()}


def check_against_alone(preds, rows, ids):
    model = TinyModel()
    assert preds.index.tolist() == sorted(ids)
    for i, tokens in zip(ids, rows):
        expected = alone(model, tokens)
        got = preds[i]
        assert got["tokens"].shape == (len(tokens), 3)  # per token, unpadded
        assert torch.equal(got["tokens"], expected["tokens"]), i
        assert torch.equal(got["pooled"], expected["pooled"]), i


def write_source(directory, rows, files=3, extra=None):
    """``rows`` as ``files`` Parquet files of 2 row groups each (positional ids cross files and groups)."""
    directory.mkdir()
    bounds = np.linspace(0, len(rows), files + 1).astype(int)
    for f in range(files):
        part = {"tokens": pa.array(rows[bounds[f]:bounds[f + 1]], pa.list_(pa.int64()))}
        for name, values in (extra or {}).items():
            part[name] = pa.array(values[bounds[f]:bounds[f + 1]])
        pq.write_table(pa.table(part), directory / f"part-{f}.parquet", row_group_size=max(1, (bounds[f + 1] - bounds[f] + 1) // 2))
    return directory


@pytest.fixture(scope="module")
def cluster():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = False
    yield
    ray.shutdown()


def run(source, out, *, skip=None, crash_marker=None, calls=None, **predict):
    """source -> Predict on 2 actors (half a CPU each, so reads and writes still get a CPU) -> out.

    As docs/ray.md says: no remote arguments for retries (Ray 2.60 deprecates them), the actor pool
    restarts a lost actor and retries its task by default; using no deprecated argument is checked.
    """
    predict.setdefault("inputs", "tokens")
    predict.setdefault("per_token", {"tokens"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped = source.map_batches(
            pc_ray.Predict, fn_constructor_kwargs=dict(model=lambda: TinyModel(crash_marker, calls), skip=skip, **predict),
            compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5, batch_size=16, batch_format="pyarrow",
        )
    assert not [str(w.message) for w in caught if issubclass(w.category, RayDeprecationWarning)]
    mapped.write_parquet(str(out))


def test_padded_buckets_two_actors_and_a_killed_actor_retried(cluster, tmp_path):
    rows = token_rows()
    source = pc_ray.read_parquet(write_source(tmp_path / "src", rows), override_num_blocks=6)
    marker, calls = tmp_path / "crashed", tmp_path / "calls"
    calls.mkdir()
    run(source, tmp_path / "out", crash_marker=str(marker), calls=str(calls), bucket_size=4)
    assert marker.exists()  # a call really died, and its task ran again on a restarted actor
    assert len(list(calls.iterdir())) >= 2  # batches ran in 2 actor processes (at least)
    files = sorted((tmp_path / "out").glob("*.parquet"))
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == NUM_ITEMS  # the retried block once
    preds = pc_ray.read(tmp_path / "out", num_items=NUM_ITEMS)  # on_duplicate="error": any repeat would raise
    s = preds.summary()
    assert (s.expected, s.recorded, s.missing, s.records, s.repeats) == (NUM_ITEMS, NUM_ITEMS, 0, NUM_ITEMS, 0)
    check_against_alone(preds, rows, list(range(NUM_ITEMS)))


def test_packed_max_tokens_own_id_column_and_resume(cluster, tmp_path):
    rows = token_rows(seed=1)
    ids = (1000 + 7 * np.arange(NUM_ITEMS)).tolist()  # the data's own document numbers
    src = write_source(tmp_path / "src", rows, extra={"doc": ids})
    out = tmp_path / "out"
    packed = dict(id_column="doc", collator=pc.Collator(packed=True), max_tokens=24)
    first = ray.data.read_parquet(str(src), override_num_blocks=3).filter(lambda row: row["doc"] % 3 == 0)  # a first run that stopped a third of the way
    run(first, out, **packed)
    before = set(out.glob("*.parquet"))
    done = pc_ray.written(out)  # the files name their id column "doc"
    assert len(done) == len([i for i in ids if i % 3 == 0])
    run(ray.data.read_parquet(str(src), override_num_blocks=3), out, skip=ray.put(done), **packed)  # the same input again
    new = set(out.glob("*.parquet")) - before
    rerun_ids = sorted(i for f in new for i in pq.read_table(f, columns=["doc"]).column("doc").to_pylist())
    assert rerun_ids == [i for i in ids if i % 3 != 0]  # only what was missing, by id
    preds = pc_ray.read(out)  # "error": nothing written twice; the id column "doc" from the files
    check_against_alone(preds, rows, ids)


def test_string_ids_through_predict_written_skip_and_read(cluster, tmp_path):
    rows = token_rows(seed=3)
    ids = [f"shard-{i % 4:03d}/doc_{i:05d}" for i in range(NUM_ITEMS)]  # the data's own string ids
    src = write_source(tmp_path / "src", rows, extra={"doc_id": ids})
    out = tmp_path / "out"
    first = ray.data.read_parquet(str(src), override_num_blocks=3).filter(lambda row: row["doc_id"].endswith(("0", "5")))
    run(first, out, id_column="doc_id", bucket_size=4)  # a first run that stopped part of the way
    before = set(out.glob("*.parquet"))
    done = pc_ray.written(out)
    firsts = [i for i in ids if i.endswith(("0", "5"))]
    assert len(done) == len(firsts) and done.contains(firsts).all() and not done.contains(["never"]).any()
    run(ray.data.read_parquet(str(src), override_num_blocks=3), out, id_column="doc_id", bucket_size=4, skip=ray.put(done))
    new = set(out.glob("*.parquet")) - before
    rerun = sorted(i for f in new for i in pq.read_table(f, columns=["doc_id"]).column("doc_id").to_pylist())
    assert rerun == sorted(set(ids) - set(firsts))  # only what was missing, by id
    preds = pc_ray.read(out)  # "error": nothing written twice; keyed by the string ids
    assert preds.keyed and preds.keys() == sorted(ids) and preds.summary().repeats == 0
    model = TinyModel()
    for i, tokens in zip(ids, rows):
        expected = alone(model, tokens)
        assert torch.equal(preds[i]["tokens"], expected["tokens"]) and torch.equal(preds[i]["pooled"], expected["pooled"]), i
    table = pa.table({"doc_id": ids[::-1], "n": list(range(NUM_ITEMS))})
    joined = preds.join(table, on="doc_id")  # the source rows, their predictions beside them
    assert joined.column("doc_id").to_pylist() == ids[::-1] and joined.column("pooled").null_count == 0


def test_resume_positional_ids_skips_written_row_groups(cluster, tmp_path):
    rows = token_rows(seed=2)
    src = write_source(tmp_path / "src", rows)
    done = pc_ray.Written(np.arange(0, 45))  # the first file and a half: whole row groups, never read again
    ds = pc_ray.read_parquet(src, skip=done)
    assert sorted(os.path.basename(f) for f in ds.input_files()) == ["part-1.parquet", "part-2.parquet"]  # part-0: all written, not read
    assert sorted(ds.to_pandas()["id"].tolist()) == list(range(45, NUM_ITEMS))
    assert sorted(pc_ray.read_parquet(src, skip=pc_ray.Written([3, 50])).to_pandas()["id"].tolist()) == sorted(set(range(NUM_ITEMS)) - {3, 50})


@pytest.fixture(scope="module")
def written_once(tmp_path_factory):
    """One Predict output directory, made without Ray (Predict called as map_batches would), 3 blocks."""
    rows = token_rows(seed=3)
    out = tmp_path_factory.mktemp("once")
    predict = pc_ray.Predict(TinyModel, inputs="tokens", per_token={"tokens"}, bucket_size=5)
    for k, start in enumerate(range(0, NUM_ITEMS, 30)):
        block = pa.table({"id": np.arange(start, start + 30), "tokens": pa.array(rows[start:start + 30])})
        pq.write_table(predict(block), out / f"block-{k}.parquet", row_group_size=16)
    return out, rows


def test_read_a_block_written_twice_is_counted_and_resolved(written_once, tmp_path):
    src, rows = written_once
    out = tmp_path / "out"
    shutil.copytree(src, out)
    shutil.copy(out / "block-1.parquet", out / "block-1-again.parquet")  # a block written twice
    with pytest.raises(ValueError, match=r"read: .*block-1-again.parquet: .*\b3\d\b"):
        pc_ray.read(out, num_items=NUM_ITEMS)  # the policy "error" names the file and an id of block 1
    for policy in ("first", "last", "mean"):
        preds = pc_ray.read(out, num_items=NUM_ITEMS, on_duplicate=policy)
        assert len(preds) == NUM_ITEMS  # never doubled
        check_against_alone(preds, rows, list(range(NUM_ITEMS)))
        s = preds.summary()
        assert (s.records, s.repeats, s.on_duplicate, s.missing) == (NUM_ITEMS + 30, 30, policy, 0)
        # the block's copy repeats the same inputs with the same outputs: fingerprints kept, nothing flagged
        assert s.fingerprinted and (s.conflicts, s.disagreements) == (0, 0)
        assert preds.fingerprints is not None and len(set(preds.fingerprints.tolist())) == NUM_ITEMS


def test_read_reports_missing_ids_and_skips_a_half_written_file(written_once, tmp_path):
    src, rows = written_once
    out = tmp_path / "out"
    shutil.copytree(src, out)
    data = (out / "block-2.parquet").read_bytes()
    (out / "block-2.parquet").write_bytes(data[: len(data) // 2])  # a write killed half-way: no footer
    with pytest.warns(RuntimeWarning, match="block-2.parquet, which is not a readable Parquet file"):
        preds = pc_ray.read(out, num_items=NUM_ITEMS)
    assert preds.missing().tolist() == list(range(60, 90))
    assert (preds.summary().missing, preds.summary().exactly_once) == (30, False)
    check_against_alone(preds, rows[:60], list(range(60)))
    with pytest.warns(RuntimeWarning):
        done = pc_ray.written(out)
    assert done.contains(np.arange(NUM_ITEMS)).tolist() == [True] * 60 + [False] * 30  # the rerun redoes block 2


def test_predict_takes_ray_numpy_batches_and_views():
    rows = token_rows(12, seed=4)
    batch = {"id": np.arange(12) // 2, "view": np.arange(12) % 2, "tokens": np.array([np.array(r) for r in rows], dtype=object)}
    out = pc_ray.Predict(TinyModel, inputs="tokens", view_column="view", per_token={"tokens"})(batch)
    assert out.column_names == ["id", "view", "pooled", "tokens", "fingerprint"]
    assert sorted(zip(out["id"].to_pylist(), out["view"].to_pylist())) == [(i // 2, i % 2) for i in range(12)]
    assert out["fingerprint"].to_pylist() == [pc.fingerprint(r) for r in rows]  # each row's tokens, as a list hashes
    table = out.rename_columns(["index"] + out.column_names[1:]).replace_schema_metadata(out.schema.metadata)
    preds = pc.Predictions.from_arrow(table)
    for k, tokens in enumerate(rows):
        assert torch.equal(preds[k // 2, k % 2]["tokens"], alone(TinyModel(), tokens)["tokens"])
    pandas = pytest.importorskip("pandas")  # batch_format="pandas": the same columns
    frame = pandas.DataFrame({"id": batch["id"], "view": batch["view"], "tokens": rows})
    assert pc_ray.Predict(TinyModel, inputs="tokens", view_column="view", per_token={"tokens"})(frame).equals(out)


def test_read_combines_views_as_the_recorder_does(tmp_path):
    rows = token_rows(10, seed=5)
    views = [[t, [(x + 1) % VOCAB for x in t]] for t in rows]  # 2 views per example: the tokens, shifted by one
    block = pa.table({"id": np.repeat(np.arange(10), 2), "view": np.tile([0, 1], 10), "tokens": pa.array([v for pair in views for v in pair])})
    predict = pc_ray.Predict(TinyModel, inputs="tokens", view_column="view", per_token={"tokens"})
    pq.write_table(predict(block.slice(0, 11)), tmp_path / "a.parquet")  # an example's views in two files
    pq.write_table(predict(block.slice(11)), tmp_path / "b.parquet")
    model = TinyModel()
    mean = pc_ray.read(tmp_path, num_items=10)  # views="mean"
    kept = pc_ray.read(tmp_path, num_items=10, views="none")
    assert mean.summary().views == 2 and len(kept) == 20
    for i, (v0, v1) in enumerate(views):
        a, b = alone(model, v0), alone(model, v1)
        assert torch.equal(kept[i, 1]["tokens"], b["tokens"])
        torch.testing.assert_close(mean[i]["pooled"], (a["pooled"] + b["pooled"]) / 2)
        torch.testing.assert_close(mean[i]["tokens"], (a["tokens"] + b["tokens"]) / 2)


def test_predict_and_written_errors():
    with pytest.raises(TypeError, match="Predict: model must be a factory"):
        pc_ray.Predict(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="give bucket_size or max_tokens, not both"):
        pc_ray.Predict(TinyModel, bucket_size=2, max_tokens=8)
    with pytest.raises(TypeError, match="skip must be None, a provcollate.integrations.ray.Written"):
        pc_ray.Predict(TinyModel, skip=[1, 2])
    predict = pc_ray.Predict(TinyModel, inputs="tokens")
    with pytest.raises(ValueError, match="Predict: the batch has no id column 'id'"):
        predict(pa.table({"tokens": [[1, 2]]}))
    with pytest.raises(TypeError, match=r"column 'id' must hold integers \(ids: or str / bytes\), got double"):
        predict(pa.table({"id": [0.5], "tokens": [[1, 2]]}))
    with pytest.raises(ValueError, match="the id column 'id' holds 1 nulls"):
        predict(pa.table({"id": pa.array(["a", None]), "tokens": [[1, 2], [3]]}))
    with pytest.raises(ValueError, match="input column 'tokens' is not in the batch"):
        predict(pa.table({"id": [0], "text": [[1, 2]]}))
    done = pc_ray.Written([5, 6, 7, 9], [0, 0, 0, 1])
    assert done.contains([4, 5, 7, 8, 9, 9], [0, 0, 0, 0, 0, 1]).tolist() == [False, True, True, False, False, True]
    assert (done.covers(5, 8), done.covers(5, 9), done.covers(9, 10, view=1), len(done)) == (True, False, True, 4)
    assert len(pc_ray.written(Path("/nonexistent/provcollate-out"))) == 0


def test_read_and_written_take_the_id_column_predict_wrote(tmp_path):
    rows = token_rows(20, seed=6)
    ids = (500 + 3 * np.arange(20)).tolist()
    predict = pc_ray.Predict(TinyModel, inputs="tokens", id_column="doc_id", per_token={"tokens"})
    table = predict(pa.table({"doc_id": ids, "tokens": pa.array(rows)}))
    assert table.column_names == ["doc_id", "view", "pooled", "tokens", "fingerprint"]  # named as Predict's id_column, not "id"
    pq.write_table(table.slice(0, 12), tmp_path / "a.parquet")
    pq.write_table(table.slice(12), tmp_path / "b.parquet")
    preds = pc_ray.read(tmp_path)
    check_against_alone(preds, rows, ids)
    done = pc_ray.written(tmp_path)
    assert len(done) == 20 and done.contains(ids).all()
    empty = predict(pa.table({"doc_id": ids[:2], "tokens": pa.array(rows[:2])}).slice(0, 0))
    pq.write_table(empty, tmp_path / "c.parquet")  # a batch with nothing left to run names its id column too
    assert len(pc_ray.written(tmp_path)) == 20
    # An explicit id_column= wins over what the files say.
    with pytest.raises(ValueError, match=r"read: .*a\.parquet has no id column 'id'; its columns are \['doc_id'"):
        pc_ray.read(tmp_path, id_column="id")
    with pytest.raises(ValueError, match=r"written: .*a\.parquet has no id column 'id'"):
        pc_ray.written(tmp_path, id_column="id")


def test_files_that_do_not_name_their_id_column_need_id_column(tmp_path):
    rows = token_rows(6, seed=7)
    table = pc_ray.Predict(TinyModel, inputs="tokens", per_token={"tokens"})(pa.table({"id": np.arange(6), "tokens": pa.array(rows)}))
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"provcollate.ray"}  # Predictions' own metadata only
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "plain.parquet")
    for call in (pc_ray.read, pc_ray.written):
        with pytest.raises(ValueError, match=r"plain\.parquet does not name its id column .*pass id_column=, one of its columns \['id', 'view'"):
            call(tmp_path)
    check_against_alone(pc_ray.read(tmp_path, id_column="id"), rows, list(range(6)))
    assert len(pc_ray.written(tmp_path, id_column="id")) == 6


def test_read_mean_refuses_integer_outputs_first_and_last_take_them(tmp_path):
    rows = token_rows(8, seed=8)
    model = lambda: (lambda batch: TinyModel()(batch)["pooled"].argmax(-1))  # noqa: E731  class ids, int64
    table = pc_ray.Predict(model, inputs="tokens")(pa.table({"id": np.arange(8), "tokens": pa.array(rows)}))
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(table, tmp_path / "a-again.parquet")  # every id written twice
    with pytest.raises(TypeError, match="on_duplicate='mean' averages floating-point outputs, got 'prediction' of dtype torch.int64"):
        pc_ray.read(tmp_path, num_items=8, on_duplicate="mean")
    for policy in ("first", "last"):
        preds = pc_ray.read(tmp_path, num_items=8, on_duplicate=policy)
        assert preds.summary().repeats == 8
        assert preds.tensor().tolist() == [int(alone(TinyModel(), r)["pooled"].argmax()) for r in rows]


def test_docs_ray_md_blocks_run(tmp_path):
    """docs/ray.md's python blocks, in order, in one namespace, in a fresh process (its own local
    Ray; a hang fails at the timeout) where a deprecated Ray argument is an error."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) >= 4 and not [b for b in blocks if b.startswith("# (sketch)")]  # every block runs
    script = (
        "import re, sys, warnings\n"
        "from ray.util.annotations import RayDeprecationWarning\n"
        "warnings.filterwarnings('error', category=RayDeprecationWarning)\n"
        "text = open(sys.argv[1]).read()\n"
        "namespace = {'__name__': '__main__'}\n"
        "for k, block in enumerate(re.findall(r'```python\\n(.*?)```', text, re.S)):\n"
        "    exec(compile(block, f'docs/ray.md block {k}', 'exec'), namespace)\n"
        "print('ran', k + 1, 'blocks')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never the cluster of this process
    env.setdefault("RAY_TMPDIR", tempfile.gettempdir())  # Ray's sockets stay under a short path
    env["TMPDIR"] = str(tmp_path)  # the page's tempfile.mkdtemp() directories
    proc = subprocess.run([sys.executable, "-c", script, str(DOCS)], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"ran {len(blocks)} blocks" in proc.stdout

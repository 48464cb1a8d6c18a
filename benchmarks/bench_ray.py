"""Ray Data batch inference: provcollate.integrations.ray against the same pipeline written by hand.

Data: ``--items`` token sequences with heavy-tailed lengths (lognormal, 1 to ``--max-length``),
in 4 Parquet files with an ``id`` column. Model, the same in both pipelines, built once per actor
with a fixed seed and one torch thread: token embedding + one ``nn.TransformerEncoderLayer``
(d_model 64, 4 heads, eval, ``src_key_padding_mask``) -> per-token ``tokens`` [L, 16] and a
masked-mean ``pooled`` [64].

Pipelines, each on a local Ray with 2 actors (half a CPU each), ``batch_size=--batch-size`` rows
per Ray batch, ``preserve_order`` off, timed from the read of the source files to predictions in
dataset order in this process:

- provcollate: ``pc_ray.read_parquet`` (ids from row positions) -> ``map_batches(pc_ray.Predict,
  bucket_size=--bucket-size)`` (length buckets inside each Ray batch, Collator, Recorder unpads)
  -> ``write_parquet`` -> ``pc_ray.read`` (a Recorder, ``on_duplicate="error"``) -> Predictions.
- by hand, with Ray's own tools: ``ray.data.read_parquet`` (ids as a column) -> ``map_batches``
  of a class that pads the Ray batch with ``pad_sequence``, runs the model and cuts the padding
  off each row into a list column -> ``write_parquet`` -> read back sorted by id, with Ray
  (``ray.data.read_parquet(...).sort("id")``) and, timed apart on the same files, with pyarrow
  in the driver (``pq.read_table(...).sort_by("id")``).

Both results are compared (every item's outputs within atol 1e-5, rtol 1e-4: different padding
changes the shapes of the matrix products, hence float rounding) before any number is reported.
Rounds alternate which pipeline runs first; the table gives each candidate's best round (its two
phases and their sum) and the median over rounds of provcollate's speed over it in the same round.

    python benchmarks/bench_ray.py [--items 20000] [--rounds 3] [--batch-size 512] [--bucket-size 64] [--write]
    python benchmarks/bench_ray.py --quick          # 1,500 items, one round: about a minute
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from torch import nn

import provcollate as pc
from common import RESULTS_DIR, machine, markdown_table, write_markdown
from provcollate.integrations import ray as pc_ray

ATOL, RTOL = 1e-5, 1e-4
VOCAB, D_MODEL, TOKEN_DIM = 1000, 64, 16


class Encoder(nn.Module):
    """Embedding + one TransformerEncoderLayer: ``[B, T]`` ids and mask -> ``pooled`` [B, 64], ``tokens`` [B, T, 16]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.layer = nn.TransformerEncoderLayer(D_MODEL, nhead=4, dim_feedforward=4 * D_MODEL, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D_MODEL, TOKEN_DIM)
        self.eval()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        h = self.layer(self.embed(ids), src_key_padding_mask=~mask)
        weights = mask.unsqueeze(-1).to(h.dtype)
        return {"pooled": (h * weights).sum(1) / weights.sum(1).clamp(min=1), "tokens": self.head(h)}


def make_model():
    """The model of one actor: the Encoder on a provcollate Batch."""
    torch.set_num_threads(1)
    encoder = Encoder()
    return lambda batch: encoder(batch["tokens"], batch.mask)


class HandPredict:
    """The hand-written map_batches class: pad the Ray batch, run the model, cut each row's padding off."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.encoder = Encoder()

    def __call__(self, batch: dict) -> pa.Table:
        seqs = [torch.from_numpy(np.asarray(x, dtype=np.int64)) for x in batch["tokens"]]
        lengths = torch.tensor([len(s) for s in seqs])
        ids = nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        mask = torch.arange(ids.shape[1]) < lengths[:, None]
        with torch.inference_mode():
            out = self.encoder(ids, mask)
        offsets = np.concatenate(([0], np.cumsum(lengths.numpy()))).astype(np.int32)
        rows = out["tokens"][mask].numpy()  # the real positions only, row after row
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), TOKEN_DIM))
        pooled = pa.FixedSizeListArray.from_arrays(pa.array(out["pooled"].numpy().reshape(-1)), D_MODEL)
        return pa.table({"id": pa.array(batch["id"]), "pooled": pooled, "tokens": tokens})


def write_source(directory: str, items: int, max_length: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.0, 0.9, items).astype(int), 1, max_length)
    rows = [rng.integers(0, VOCAB, n).tolist() for n in lengths]
    bounds = np.linspace(0, items, 5).astype(int)
    os.makedirs(directory)
    for f in range(4):
        a, b = bounds[f], bounds[f + 1]
        table = pa.table({"id": pa.array(np.arange(a, b)), "tokens": pa.array(rows[a:b], pa.list_(pa.int64()))})
        pq.write_table(table, os.path.join(directory, f"part-{f}.parquet"), row_group_size=2048)
    return lengths


def actors() -> dict:
    return dict(compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5)


def run_provcollate(src: str, out: str, items: int, args) -> dict:
    start = time.perf_counter()
    ds = pc_ray.read_parquet(src, columns=["tokens"], override_num_blocks=8)
    ds = ds.map_batches(pc_ray.Predict, fn_constructor_kwargs=dict(model=make_model, inputs=["tokens"], per_token={"tokens"},
                                                                   bucket_size=args.bucket_size),
                        batch_size=args.batch_size, batch_format="pyarrow", **actors())
    ds.write_parquet(out)
    written = time.perf_counter()
    preds = pc_ray.read(out, num_items=items)
    assert preds.summary().exactly_once, preds.summary()
    values, offsets = preds.jagged("tokens")
    done = time.perf_counter()
    return {"provcollate.integrations.ray": ((preds.tensor("pooled"), values, offsets), written - start, done - written)}


def in_order(table: pa.Table, items: int) -> tuple:
    """pooled [N, 64], token rows [total, 16] and their offsets [N+1] from a table sorted by id."""
    assert table.column("id").to_pylist() == list(range(items)), "every item exactly once"
    tokens = table.column("tokens").combine_chunks()
    offsets = torch.from_numpy(tokens.offsets.to_numpy().astype(np.int64) - tokens.offsets[0].as_py())
    values = torch.from_numpy(np.array(tokens.flatten().flatten().to_numpy()).reshape(-1, TOKEN_DIM))
    pooled = torch.from_numpy(np.array(table.column("pooled").combine_chunks().flatten().to_numpy()).reshape(-1, D_MODEL))
    return pooled, values, offsets


def run_by_hand(src: str, out: str, items: int, args) -> dict:
    start = time.perf_counter()
    # Ray's reader makes one block of these small files (whatever override_num_blocks says), which
    # would leave one actor idle: split it in 8, as pc_ray.read_parquet's 8 read tasks are.
    ds = ray.data.read_parquet(src).repartition(8)
    ds = ds.map_batches(HandPredict, batch_size=args.batch_size, batch_format="numpy", **actors())
    ds.write_parquet(out)
    written = time.perf_counter()
    by_ray = in_order(pa.concat_tables(ray.get(ray.data.read_parquet(out).sort("id").to_arrow_refs())), items)
    sorted_by_ray = time.perf_counter()
    by_arrow = in_order(pq.read_table(out).sort_by("id"), items)
    sorted_by_arrow = time.perf_counter()
    return {"by hand: pad in the UDF, Ray's sort": (by_ray, written - start, sorted_by_ray - written),
            "by hand: pad in the UDF, pyarrow sort_by in the driver": (by_arrow, written - start, sorted_by_arrow - sorted_by_ray)}


class RandomOutputs:
    """Random outputs shaped as the Encoder's, at next to no cost: for timing what is around a model."""

    def __call__(self, batch) -> dict:
        b, t = batch["tokens"].shape
        return {"pooled": torch.rand(b, D_MODEL), "tokens": torch.rand(b, t, TOKEN_DIM)}


def measure_read(work: str, items: int, lengths: np.ndarray, seed: int) -> tuple:
    """Identity bytes per item in Predict's files, and the single-process merge rate of ``pc_ray.read``.

    ``items`` rows (lengths drawn like the source's) go through ``Predict`` in this process (no
    Ray, random outputs) in blocks of 4,096 rows, one Parquet file each, as
    ``write_parquet`` leaves them; the blocks are shuffled, as ``preserve_order=False`` leaves them.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.choice(lengths, items)
    tokens = pa.ListArray.from_arrays(pa.array(np.concatenate(([0], np.cumsum(sizes))).astype(np.int32)),
                                      pa.array(rng.integers(0, VOCAB, int(sizes.sum()))))
    source = pa.table({"id": pa.array(np.arange(items)), "tokens": tokens})
    predict = pc_ray.Predict(RandomOutputs, inputs=["tokens"], per_token={"tokens"}, bucket_size=64)
    out = os.path.join(work, "read")
    os.makedirs(out)
    for k, start in enumerate(rng.permutation(np.arange(0, items, 4096))):
        pq.write_table(predict(source.slice(start, 4096)), os.path.join(out, f"block-{k:05}.parquet"))
    files = sorted(os.listdir(out))
    on_disk = collections.Counter()
    for f in files:
        meta = pq.ParquetFile(os.path.join(out, f)).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                column = meta.row_group(g).column(c)
                on_disk[column.path_in_schema.split(".")[0]] += column.total_compressed_size
    start = time.perf_counter()
    preds = pc_ray.read(out, num_items=items)
    read_s = time.perf_counter() - start
    assert preds.summary().exactly_once
    start = time.perf_counter()
    done = pc_ray.written(out)
    written_s = time.perf_counter() - start
    runs = sum(len(starts) for starts, _ in done.ranges.values())
    return on_disk, read_s, written_s, runs, len(files), int(sizes.sum())


def padding(lengths: np.ndarray, batch_size: int, bucket_size: int) -> tuple:
    """Padded fraction of the tokens the model sees: Ray batches of consecutive rows (as the source's
    row groups, a multiple of the batch size, give them) padded whole, and cut into provcollate's buckets."""
    real = int(lengths.sum())
    whole = bucketed = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start:start + batch_size]
        whole += len(batch) * int(batch.max())
        bucketed += sum(len(b) * int(batch[b].max()) for b in pc.LengthBucketSampler(batch, batch_size=bucket_size, num_replicas=1, rank=0))
    return 1 - real / bucketed, 1 - real / whole


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=512, help="rows per Ray batch (map_batches batch_size)")
    p.add_argument("--bucket-size", type=int, default=64, help="rows per length bucket inside a Ray batch (provcollate)")
    p.add_argument("--rounds", type=int, default=None, help="rounds, each running both pipelines (default 3; 1 with --quick)")
    p.add_argument("--read-items", type=int, default=100000, help="rows of Predict output to time pc_ray.read on (default 100,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="1,500 items of at most 64 tokens, one round: a smoke test")
    p.add_argument("--write", action="store_true", help="write the table to benchmarks/results/bench_ray.md")
    args = p.parse_args(argv)
    if args.quick:
        args.items, args.max_length, args.read_items = min(args.items, 1500), min(args.max_length, 64), min(args.read_items, 20000)
    rounds = args.rounds or (1 if args.quick else 3)

    work = tempfile.mkdtemp(prefix="bench_ray_")
    try:
        lengths = write_source(os.path.join(work, "src"), args.items, args.max_length, args.seed)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, _node_ip_address="127.0.0.1")
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = False
        pipelines = [run_provcollate, run_by_hand]
        runs = {}  # candidate -> [(outputs, map + write seconds, read seconds)] over rounds
        for r in range(rounds):
            for k in [(r + j) % len(pipelines) for j in range(len(pipelines))]:  # rotating order
                out = os.path.join(work, f"out-{r}-{k}")
                for name, run in pipelines[k](os.path.join(work, "src"), out, args.items, args).items():
                    runs.setdefault(name, []).append(run)
                shutil.rmtree(out)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    try:
        on_disk, read_s, written_s, id_runs, blocks, total_tokens = measure_read(work, args.read_items, lengths, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    names = list(runs)
    mine = runs[names[0]][-1][0]
    diffs = []
    for name in names[1:]:
        theirs = runs[name][-1][0]
        if not torch.equal(mine[2], theirs[2]):
            raise SystemExit(f"{name}: the items' lengths differ from provcollate's")
        diffs += [(a - b).abs().max().item() for a, b in zip(mine[:2], theirs[:2])]
        if not all(torch.allclose(a, b, atol=ATOL, rtol=RTOL) for a, b in zip(mine[:2], theirs[:2])):
            raise SystemExit(f"{name}: outputs differ from provcollate's by up to {max(diffs):.3g} (atol {ATOL}, rtol {RTOL})")
    totals = {name: [m + r for _, m, r in rs] for name, rs in runs.items()}
    rows = []
    for name in names:
        best = min(range(rounds), key=lambda r: totals[name][r])
        _, map_s, read_s = runs[name][best]
        ratio = statistics.median(t / m for t, m in zip(totals[name], totals[names[0]]))
        rows.append([name, f"{map_s:.2f}", f"{read_s:.2f}", f"{totals[name][best]:.2f}", f"{args.items / totals[name][best]:,.0f}",
                     f"{1 / ratio:.2f}x"])
    headers = ["pipeline", "read + map + write (s)", "read back in order (s)", "total (s)", "items/s", "vs provcollate (median of rounds)"]
    table = markdown_table(headers, rows)
    bucketed, whole = padding(lengths, args.batch_size, args.bucket_size)
    summary = (f"{args.items} items, {int(lengths.sum())} tokens (length median {int(np.median(lengths))}, mean {lengths.mean():.1f}, "
               f"max {int(lengths.max())}); Ray batches of {args.batch_size} rows, provcollate buckets of {args.bucket_size} rows; "
               f"padding: {bucketed:.1%} of the positions the model computes in provcollate's buckets, {whole:.1%} in whole Ray "
               f"batches padded by hand (most of the difference in the map phase); "
               f"2 actors on a local Ray with 2 CPUs; best of {rounds} round(s), order rotating (the two hand-written rows share one "
               f"map run). Outputs agree within atol {ATOL}, rtol {RTOL} (max |diff| {max(diffs):.1e}); every item exactly once in all.")
    n = args.read_items
    read_rows = [[f"`{name}`", f"{on_disk[name] / n:.2f}"] for name in ("id", "view", "pooled", "tokens")]
    read_table = markdown_table(["column of Predict's files", "bytes per item on disk (Parquet, snappy)"], read_rows)
    read_note = (f"Identity and the merge, measured apart (no Ray; `measure_read`): {n:,} items, {total_tokens:,} tokens through "
                 f"`Predict` with random outputs of the Encoder's shapes, in {blocks} blocks of 4,096 rows written in shuffled order, one "
                 f"Parquet file each ({sum(on_disk.values()) / 1e6:.0f} MB; the page cache holds them, so this times the merge: "
                 f"decoding, sorting each row group by id, the Recorder's bookkeeping and copies, not a disk). In memory, Arrow holds 8 bytes of `id` and 8 of `view` per item and 4 bytes of list "
                 f"offsets per per-token output. `pc_ray.read` merged them in {read_s:.2f} s in one process: {n / read_s:,.0f} "
                 f"items/s, {total_tokens / read_s:,.0f} token rows/s. `pc_ray.written` read the id and view columns in "
                 f"{written_s:.2f} s and kept {id_runs} run(s) of ids ({16 * id_runs} bytes).")
    print(summary, table, read_note, read_table, sep="\n\n")
    if args.write:
        note = __doc__.split("\n\n")[0] + "\n\n" + summary
        write_markdown(os.path.join(RESULTS_DIR, "bench_ray.md"), "Ray Data batch inference", [note, table, read_note, read_table], machine())


if __name__ == "__main__":
    main()

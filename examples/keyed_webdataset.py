"""Predictions filed under WebDataset keys, then joined back to the source records.

A stream of keyed records (tar shards written here with the ``webdataset`` package, nothing
downloaded) goes through ``pc.Indexed(stream, key=...)`` -> a DataLoader with 2 workers (each
reads its own shards) -> ``pc.Collator`` -> a model -> ``pc.Recorder``; the predictions then
sit beside the records they came from in one table (``preds.join``), and each is checked
against the model run on its record alone.

    python examples/keyed_webdataset.py [--records 200] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile

import pandas as pd
import torch
import webdataset as wds
from torch.utils.data import DataLoader

import provcollate as pc

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def tokens_of(text: str) -> list:
    """A toy tokenizer: one id per character."""
    return [1 + ord(c) % 63 for c in text]


def write_shards(directory: str, records: int, shards: int, seed: int = 0) -> pd.DataFrame:
    """``records`` keyed text records in ``shards`` tar files; returns them as a table."""
    gen = random.Random(seed)
    rows = []
    for s in range(shards):
        with wds.TarWriter(os.path.join(directory, f"shard-{s:03d}.tar")) as sink:
            for i in range(s, records, shards):
                key = f"shard-{s:03d}/rec_{i:05d}"
                text = " ".join(gen.choice(WORDS) for _ in range(gen.randint(1, 6)))
                sink.write({"__key__": key, "json": json.dumps({"text": text}).encode()})
                rows.append({"key": key, "text": text})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def to_example(sample: dict) -> dict:
    """A WebDataset sample as the Collator's input: its key and token ids."""
    return {"__key__": sample["__key__"], "input_ids": tokens_of(json.loads(sample["json"])["text"])}


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(64, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = (self.embed(input_ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--out", default=None, help="directory for the shards (default: a temporary one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.out or tmp
        os.makedirs(directory, exist_ok=True)
        source = write_shards(directory, args.records, shards=4)
        urls = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".tar"))
        stream = wds.WebDataset(urls, shardshuffle=False, workersplitter=wds.split_by_worker,
                                nodesplitter=wds.single_node_only).map(to_example)
        ds = pc.Indexed(stream, key=lambda ex: ex["__key__"])
        loader = DataLoader(ds, batch_size=16, num_workers=2,
                            collate_fn=pc.Collator(primary="input_ids"))
        model = Model().eval()
        rec = pc.Recorder()
        with torch.no_grad():
            for batch in loader:
                rec.add(batch, {"logits": model(batch["input_ids"], batch.mask)})
        preds = rec.result()
        summary = preds.summary()
        assert summary.recorded == args.records and summary.repeats == 0, summary
        assert preds.missing(source["key"]) == [], "every record has its prediction"
        joined = preds.join(source, on="key")  # every source row, in source order, its logits beside it
        with torch.no_grad():
            for row in joined.sample(n=min(20, len(joined)), random_state=1).itertuples():
                ids = torch.tensor([tokens_of(row.text)])
                alone = model(ids, torch.ones_like(ids, dtype=torch.bool))[0]
                assert torch.allclose(torch.as_tensor(row.logits), alone, atol=1e-6), row.key
    print(summary)
    print(joined.head())
    return joined


if __name__ == "__main__":
    main()

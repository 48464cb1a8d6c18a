"""Lightning ``Trainer.predict`` with provcollate: bucketed batches in, predictions in dataset order out.

    python examples/lightning_predict.py                                   # one process
    python examples/lightning_predict.py --strategy ddp --devices 2        # 2 gloo processes on the CPU
    python examples/lightning_predict.py --strategy ddp_spawn --devices 2

A tiny token tagger (random weights, nothing downloaded) runs over sequences of varied lengths
through ``LengthBucketSampler`` (shuffled, 2 DataLoader workers) and ``Collator``; its
``predict_step`` returns a per-example and a per-token output, ``PredictionWriter`` records them
under each batch's identity and gathers them over ranks. Rank 0 then checks every item against
the model run on that item alone, and ``validate`` checks that ``self.log`` weights by batch size.

With several processes, every wait of one rank for another (the rendezvous, the writer's gather,
``self.log``'s sync) gives up after ``--timeout`` seconds with an error, instead of Lightning's
default 30 minutes: a rank whose peer died fails, it does not hang. The rendezvous is at
MASTER_ADDR:MASTER_PORT when they are set; otherwise Lightning picks a free port and releases it
before rank 0 binds it, so a busy machine can hand it to another process in between (rank 0 then
fails with EADDRINUSE). tests/test_integrations_lightning.py sets a port it holds.
"""
from __future__ import annotations

import argparse
import tempfile
from datetime import timedelta

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader

import provcollate as pc
from provcollate.integrations.lightning import PredictionWriter

VOCAB, TAGS, CLASSES = 50, 5, 3


class Tagger(L.LightningModule):
    """Per-token tags and a per-sequence class from a masked mean of token embeddings."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.tags = nn.Linear(16, TAGS)
        self.classes = nn.Linear(16, CLASSES)

    def forward(self, input_ids, mask):
        h = self.embed(input_ids)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return {"label": self.classes(pooled), "tags": self.tags(h)}

    def predict_step(self, batch, batch_idx):
        return self(batch["input_ids"], batch.mask)

    def validation_step(self, batch, batch_idx):
        out = self(batch["input_ids"], batch.mask)
        loss = nn.functional.cross_entropy(out["label"], batch["label"])
        self.log("val_loss", loss, sync_dist=True)  # batch size inferred from the Batch: its number of rows


def make_dataset(n: int = 45, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=g)
    return [{"input_ids": torch.randint(0, VOCAB, (int(n_i),), generator=g), "label": i % CLASSES} for i, n_i in enumerate(lengths)]


def make_loader(dataset: list) -> DataLoader:
    lengths = pc.lengths_of(dataset, "input_ids")
    sampler = pc.LengthBucketSampler(lengths, batch_size=4, shuffle=True, seed=1)
    return DataLoader(pc.Indexed(dataset), batch_sampler=sampler, num_workers=2, collate_fn=pc.Collator(primary="input_ids"))


def check(model: Tagger, dataset: list, preds: pc.Predictions) -> None:
    """Every item's predictions equal the model run on that item alone."""
    assert preds.index.tolist() == list(range(len(dataset))), "every item exactly once"
    model.eval()
    with torch.no_grad():
        for i, item in enumerate(dataset):
            ids = item["input_ids"][None]
            alone = model(ids, torch.ones_like(ids, dtype=torch.bool))
            torch.testing.assert_close(preds[i]["label"], alone["label"][0])
            torch.testing.assert_close(preds[i]["tags"], alone["tags"][0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="auto", choices=["auto", "ddp", "ddp_spawn"])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds a rank waits for the others (rendezvous, gather, sync) before it fails")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    strategy = args.strategy
    if strategy != "auto":  # ddp re-runs this script for the other ranks; ddp_spawn starts them with multiprocessing
        strategy = DDPStrategy(start_method="popen" if strategy == "ddp" else "spawn", timeout=timedelta(seconds=args.timeout))

    dataset = make_dataset()
    model = Tagger()
    # ddp_spawn runs the writer in child processes, so this process reads their shards instead.
    output_dir = tempfile.mkdtemp(prefix="provcollate-") if args.strategy == "ddp_spawn" else None
    writer = PredictionWriter(per_token={"tags"}, output_dir=output_dir)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, callbacks=[writer], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(model, make_loader(dataset), return_predictions=False)
    if trainer.is_global_zero:
        check(model, dataset, writer.predictions if output_dir is None else pc.Predictions.read(output_dir))
        print(f"lightning predict ({args.strategy}, {args.devices} process(es)): {len(dataset)} items, every prediction checked")
    if args.strategy != "ddp_spawn":  # ddp_spawn runs validate in fresh processes whose metrics stay there
        # Lightning's DistributedSampler pads ranks with repeats: validate on a multiple of 2 items.
        val = dataset[: len(dataset) // 2 * 2]
        metrics = trainer.validate(model, make_loader(val), verbose=False)[0]
        model.eval()
        with torch.no_grad():
            losses = [nn.functional.cross_entropy(model(d["input_ids"][None], torch.ones(1, len(d["input_ids"]), dtype=torch.bool))["label"],
                                                  torch.tensor([d["label"]])) for d in val]
        torch.testing.assert_close(torch.tensor(metrics["val_loss"]), torch.stack(losses).mean())
        if trainer.is_global_zero:
            print(f"lightning validate: self.log weighted by each Batch's size, val_loss {metrics['val_loss']:.4f} = per-example mean")


if __name__ == "__main__":
    main()

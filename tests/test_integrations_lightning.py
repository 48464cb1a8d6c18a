"""Lightning: PredictionWriter, LengthBucketSampler rebuilt by the Trainer, self.log's batch size;
examples/lightning_predict.py in one process and over 2 gloo processes (ddp, ddp_spawn)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import provcollate as pc

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper  # noqa: E402
from lightning.pytorch.trainer.states import RunningStage  # noqa: E402
from lightning.pytorch.utilities.data import _update_dataloader  # noqa: E402

from provcollate.integrations.lightning import PredictionWriter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning_predict.py"


def example():
    spec = importlib.util.spec_from_file_location("lightning_predict", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batches(loader):
    return [b for b in loader.batch_sampler]


@pytest.mark.parametrize("budget", [dict(batch_size=4), dict(max_tokens=20)])
def test_lightning_rebuilds_length_bucket_sampler(budget):
    lengths = torch.randint(1, 9, (23,), generator=torch.Generator().manual_seed(0))
    sampler = pc.LengthBucketSampler(lengths, shuffle=True, seed=3, **budget)
    loader = DataLoader(list(range(23)), batch_sampler=sampler)
    rebuilt = _update_dataloader(loader, loader.sampler, mode=RunningStage.PREDICTING)
    assert batches(rebuilt) == list(sampler)
    shards = []
    for rank in range(2):
        shard = UnrepeatedDistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=rank, shuffle=False)
        part = batches(_update_dataloader(loader, shard, mode=RunningStage.PREDICTING))
        assert part and all(lengths[b].tolist() == sorted(lengths[b].tolist()) for b in part)  # each a length bucket
        shards += [i for b in part for i in b]
    assert sorted(shards) == list(range(23))  # every item exactly once over the 2 ranks
    for rank in range(2):  # use_distributed_sampler=False: Lightning passes the plain sampler, the rank's own sharding stays
        own = pc.LengthBucketSampler(lengths, shuffle=True, seed=3, num_replicas=2, rank=rank, **budget)
        loader = DataLoader(list(range(23)), batch_sampler=own)
        assert batches(_update_dataloader(loader, loader.sampler, mode=RunningStage.PREDICTING)) == list(own)


def test_sampler_argument_restricts_positions():
    lengths = torch.tensor([5, 1, 4, 2, 3, 6])
    sampler = pc.LengthBucketSampler(lengths, batch_size=2, sampler=[0, 2, 4, 5])
    assert list(sampler) == [[4, 2], [0, 5]]
    with pytest.raises(ValueError, match=r"LengthBucketSampler: sampler must yield positions in \[0, 6\)"):
        pc.LengthBucketSampler(lengths, batch_size=2, sampler=[0, 6])
    with pytest.raises(ValueError, match="at most once, got 1 repeats"):
        pc.LengthBucketSampler(lengths, batch_size=2, sampler=[1, 1])
    with pytest.raises(TypeError, match="sampler must be None or a Sampler"):
        pc.LengthBucketSampler(lengths, batch_size=2, sampler=3)


def test_prediction_writer_one_process_and_log_batch_size():
    module = example()
    module.main([])  # predict checked item by item against the model alone, validate's val_loss against the per-example mean


def test_prediction_writer_rejects_other_batches():
    writer = PredictionWriter(num_items=2)
    writer.recorder = pc.Recorder(num_items=2)
    with pytest.raises(TypeError, match="PredictionWriter: batches must be provcollate.Batch .* got dict"):
        writer.write_on_batch_end(None, None, torch.zeros(2), None, {"x": torch.zeros(2)}, 0)
    with pytest.raises(ValueError, match="every applies to output_dir"):
        PredictionWriter(every=10)
    with pytest.raises(ValueError, match="Recorder: on_duplicate must be one of"):
        PredictionWriter(on_duplicate="sometimes")


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_prediction_writer_two_gloo_processes(strategy):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(EXAMPLE), "--strategy", strategy, "--devices", "2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"lightning predict ({strategy}, 2 process(es)): 45 items, every prediction checked" in run.stdout


@pytest.mark.parametrize("streamed", [False, True])
def test_prediction_writer_with_the_standalone_pytorch_lightning_trainer(tmp_path, streamed):
    pl = pytest.importorskip("pytorch_lightning")

    class Embedder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, 4)

        def predict_step(self, batch, batch_idx):
            return self.embed(batch["input_ids"])

    dataset = [{"input_ids": torch.arange(n) + n} for n in (3, 1, 4, 1, 5)]
    sampler = pc.LengthBucketSampler(pc.lengths_of(dataset, "input_ids"), batch_size=2, shuffle=True)
    loader = DataLoader(pc.Indexed(dataset), batch_sampler=sampler, collate_fn=pc.Collator())
    writer = PredictionWriter(per_token=True, **(dict(output_dir=tmp_path, every=2) if streamed else {}))
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[writer], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    model = Embedder()
    trainer.predict(model, loader, return_predictions=False)
    assert writer.predictions.index.tolist() == list(range(5))
    assert len(list(tmp_path.glob("*.parquet"))) >= (2 if streamed else 0)  # shards every 2 rows, then the rest
    with torch.no_grad():
        for i, item in enumerate(dataset):
            torch.testing.assert_close(writer.predictions[i], model.embed(item["input_ids"]))

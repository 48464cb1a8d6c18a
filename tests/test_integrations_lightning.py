"""Lightning: PredictionWriter, LengthBucketSampler rebuilt by the Trainer, self.log's batch size;
examples/lightning_predict.py in one process and over 2 gloo processes (ddp, ddp_spawn)."""
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
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


def held_port() -> socket.socket:
    """A socket bound to a free port, never listening, that keeps the port for one run's rendezvous.

    Without MASTER_PORT, Lightning picks a free port, releases it and has rank 0 bind it again; a
    busy machine can give it to another process in between, and rank 0 fails with EADDRINUSE. No
    other process is given a port this socket holds, and rank 0's store can still listen on it:
    on Linux, sockets bound with SO_REUSEADDR (torch's store sets it too) share a port as long as
    only one of them listens.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def run_ranks(command: list, env: dict, timeout: float = 240):
    """Run a command that starts ranks: (the launching process's exit code, None past timeout; the
    output of every rank). The ranks it leaves are killed once it has exited, after a minute's grace
    when it succeeded: Lightning leaves rank 1 running when rank 0 fails, and rank 1 then holds the
    output open and can wait in the rendezvous for ever (a store client that reached a listener that
    never answers has no timeout), so waiting for the end of the output would wait for it."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout))
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    if code == 0:
        reader.join(timeout=60)  # the other ranks end after their last collective
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # every process of the run has exited
        pass
    reader.join()
    proc.wait()
    return code, "".join(lines)


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
    """The example over 2 processes with its rendezvous on a port held for the run (no race for it)
    and every wait between ranks bounded by the example's --timeout, 120 s."""
    with held_port() as port:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port.getsockname()[1]), "PYTHONPATH": str(ROOT)}
        code, out = run_ranks([sys.executable, str(EXAMPLE), "--strategy", strategy, "--devices", "2"], env)
    assert code == 0, out[-6000:]
    assert f"lightning predict ({strategy}, 2 process(es)): 45 items, every prediction checked" in out
    assert "Traceback" not in out, out[-6000:]  # no rank failed after rank 0 was done


def test_a_taken_rendezvous_port_ends_the_run_with_rank_0s_error():
    """The race that held_port() prevents, forced: another process listens on MASTER_PORT. Rank 0
    fails at once with EADDRINUSE; rank 1, connected to that listener, waits for an answer that never
    comes (no timeout applies there), and the run ends with rank 0's error, not at the test's limit."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(taken.getsockname()[1]), "PYTHONPATH": str(ROOT)}
        code, out = run_ranks([sys.executable, str(EXAMPLE), "--strategy", "ddp", "--devices", "2"], env, timeout=120)
    assert code == 1, out[-6000:]
    assert "EADDRINUSE" in out, out[-6000:]


RANK = """
import os, sys
from datetime import timedelta
import torch
import torch.distributed as dist
import provcollate as pc
from provcollate.integrations.lightning import PredictionWriter

rank, store, output_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3] or None
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
dist.barrier()
if rank == 1:
    os._exit(0)  # as a rank that failed in predict_step: it never reaches the writer's collective
writer = PredictionWriter(output_dir=output_dir)
writer.recorder = pc.Recorder(num_items=4)
writer.recorder.add(torch.tensor([0, 1]), torch.zeros(2, 3))
writer.on_predict_epoch_end(None, None)
"""


@pytest.mark.parametrize("streamed", [False, True])
def test_prediction_writer_says_which_rank_waited_on_what(tmp_path, streamed):
    """Rank 1 leaves after the process group is up; rank 0's gather (or, streaming, its barrier
    after the shards) fails naming the rank and the collective, which gloo's message does not.
    The ranks meet in a file store: no port to race for."""
    output_dir = str(tmp_path / "shards") if streamed else ""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(tmp_path / "store"), output_dir], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [rank.communicate(timeout=180) for rank in ranks]
    assert ranks[1].returncode == 0, outputs[1][1][-3000:]
    assert ranks[0].returncode == 1, outputs[0][1][-3000:]
    what = f"the barrier after writing its shards to {output_dir}" if streamed else "the gather of predictions (Recorder.gather)"
    assert f"RuntimeError: PredictionWriter: rank 0 of 2 waited for the other ranks at {what} and gave up: " in outputs[0][1], \
        outputs[0][1][-3000:]


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

"""PyTorch Lightning: record ``Trainer.predict`` outputs under each example's identity.

``PredictionWriter`` is a ``BasePredictionWriter`` of ``lightning.pytorch`` and of the standalone
``pytorch_lightning``, whichever of them are installed (a Trainer only accepts callbacks of its
own package, so it subclasses both, and either Trainer takes it). With a :class:`provcollate.Collator` as the DataLoader's ``collate_fn``,
every batch reaching the writer is a :class:`provcollate.Batch` that Lightning moved with
``batch.to()``, so its identity is intact.
"""
from __future__ import annotations

import importlib
import os

import torch.distributed as dist

import provcollate as pc


def _writer_bases() -> tuple:
    bases = []
    for package in ("lightning.pytorch.callbacks", "pytorch_lightning.callbacks"):
        try:
            bases.append(importlib.import_module(package).BasePredictionWriter)
        except ImportError:
            continue
    if not bases:
        raise ImportError("provcollate.integrations.lightning needs PyTorch Lightning: pip install lightning (or pytorch-lightning)")
    return tuple(bases)


__all__ = ["PredictionWriter"]


def _collective(what: str, run):
    """``run()``, a collective every rank must reach; a failure (a peer that died, a wait past the
    process group's timeout) is raised again naming this rank and what it waited for, which gloo's
    and NCCL's messages do not."""
    try:
        return run()
    except RuntimeError as error:  # what torch.distributed raises for both (DistError is a RuntimeError)
        raise RuntimeError(
            f"PredictionWriter: rank {dist.get_rank()} of {dist.get_world_size()} waited for the other ranks at {what} "
            f"and gave up: {error}. A rank that failed or is still predicting never reaches it; the wait ends at the "
            "process group's timeout (Lightning's DDPStrategy(timeout=...), 30 minutes unless given)") from error


def _num_items(trainer) -> int:
    """The base length of the one predict DataLoader's dataset (an Indexed dataset's views not counted)."""
    loaders = trainer.predict_dataloaders
    if isinstance(loaders, (list, tuple)):
        if len(loaders) != 1:
            raise ValueError(f"PredictionWriter: num_items must be given with several predict dataloaders, got {len(loaders)}")
        loaders = loaders[0]
    dataset = loaders.dataset
    return len(dataset.dataset) if isinstance(dataset, pc.Indexed) else len(dataset)


class PredictionWriter(*_writer_bases()):
    """Records every ``predict_step`` output under its batch's dataset indices; leaves ``self.predictions``.

    Args:
        num_items: number of dataset items (None: the length of the predict DataLoader's dataset,
            the base dataset of a :class:`provcollate.Indexed` one).
        per_token: as :meth:`provcollate.Recorder.add`: True when outputs are ``[B, T, ...]``
            per position (unpadded with the batch's lengths), or the set of keys of a dict output that are.
        reduce, views, on_duplicate: passed to :class:`provcollate.Recorder`.
        output_dir: a directory to stream Parquet shards to (``Recorder.write``): each rank
            writes its own, every ``every`` rows and once at the end; memory stays bounded.
        every: rows between shards with ``output_dir`` (None: one shard per rank at the end).
        dst: with several processes, the global rank that receives the gathered predictions
            (None: every rank).

    ``predict_step`` returns a tensor ``[B, ...]`` / ``[B, T, ...]`` or a dict of them for each
    :class:`provcollate.Batch`. After ``trainer.predict``, ``writer.predictions`` is a
    :class:`provcollate.Predictions` in dataset order: on every rank (or on ``dst`` only, None
    elsewhere) after a tensor gather over ranks (``Recorder.gather``, no pickle per item); with
    ``output_dir``, read back from every rank's shards after a barrier. With ``ddp_spawn`` the
    writer runs in the child processes, so the launching process's writer keeps None: give
    ``output_dir`` and read it there with :meth:`provcollate.Predictions.read`. Pass
    ``trainer.predict(..., return_predictions=False)`` so that Lightning does not also keep every output.
    """

    def __init__(self, num_items: int | None = None, *, per_token=False, reduce: str | None = None, views: str = "mean",
                 on_duplicate: str = "error", output_dir=None, every: int | None = None, dst: int | None = None) -> None:
        super().__init__(write_interval="batch")
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise TypeError(f"PredictionWriter: output_dir must be None or a path, got {type(output_dir).__name__}")
        if every is not None and output_dir is None:
            raise ValueError(f"PredictionWriter: every applies to output_dir (rows between shards), got every={every!r} without output_dir")
        self.num_items = num_items
        self.per_token = per_token
        self.output_dir = output_dir
        self.every = every
        self.dst = dst
        self._recorder_args = dict(reduce=reduce, views=views, on_duplicate=on_duplicate)
        pc.Recorder(num_items=num_items, **self._recorder_args)  # validates the arguments now, not at predict time
        self.recorder: pc.Recorder | None = None
        self.predictions: pc.Predictions | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        """A fresh :class:`provcollate.Recorder` for this ``trainer.predict`` run."""
        num_items = self.num_items if self.num_items is not None else _num_items(trainer)
        self.recorder = pc.Recorder(num_items=num_items, **self._recorder_args)
        self.predictions = None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        """Record ``prediction`` under ``batch``'s identity (a :class:`provcollate.Batch`)."""
        if not isinstance(batch, pc.Batch):
            raise TypeError(f"PredictionWriter: batches must be provcollate.Batch (use collate_fn=provcollate.Collator(...)), got {type(batch).__name__}")
        self.recorder.add(batch, prediction, per_token=self.per_token)
        if self.output_dir is not None and self.every is not None and batch_idx == 0:
            self.recorder.write(self.output_dir, every=self.every)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        """Gather (or write and read back) this run's predictions into ``self.predictions``."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.output_dir is not None:
            self.recorder.write(self.output_dir)
            if distributed:
                _collective(f"the barrier after writing its shards to {self.output_dir}", dist.barrier)
            rank = dist.get_rank() if distributed else 0
            self.predictions = pc.Predictions.read(self.output_dir) if self.dst in (None, rank) else None
        elif distributed:
            self.predictions = _collective("the gather of predictions (Recorder.gather)", lambda: self.recorder.gather(dst=self.dst))
        else:
            self.predictions = self.recorder.result()

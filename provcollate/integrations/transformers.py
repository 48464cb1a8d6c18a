"""transformers: a Trainer's model over a dataset, predictions back in dataset order.

``Trainer(data_collator=provcollate.Collator(...))`` works as is for ``train``, ``evaluate``
and ``predict`` (a dict-data :class:`provcollate.Batch` is a mapping of model inputs, moved by
accelerate with ``batch.to()``); :func:`predict` is the identity-keeping counterpart of
``trainer.predict``.
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Subset

import provcollate as pc

__all__ = ["predict"]


def _loader(trainer, dataset: pc.Indexed, collator: pc.Collator, lengths, max_tokens) -> DataLoader:
    """This process's share of ``dataset`` (every item on exactly one process), batched as the Trainer's args say."""
    args, state = trainer.args, trainer.accelerator.state
    world, rank = state.num_processes, state.process_index
    common = dict(num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory, collate_fn=collator)
    if lengths is None:
        share = Subset(dataset, range(rank, len(dataset), world))
        return DataLoader(share, batch_size=args.per_device_eval_batch_size, **common)
    budget = dict(max_tokens=max_tokens) if max_tokens is not None else dict(batch_size=args.per_device_eval_batch_size)
    sampler = pc.LengthBucketSampler(lengths, **budget, num_replicas=world, rank=rank)
    return DataLoader(dataset, batch_sampler=sampler, **common)


def predict(trainer, dataset, *, per_token=False, output_dir=None, output: str = "logits", collator: pc.Collator | None = None,
            lengths=None, max_tokens: int | None = None, reduce: str | None = None, every: int | None = None) -> pc.Predictions:
    """Run ``trainer.model`` over ``dataset`` as ``trainer.predict`` would, and return its outputs in dataset order.

    Uses the Trainer's arguments: ``per_device_eval_batch_size``, ``dataloader_num_workers``,
    ``dataloader_pin_memory``, its device, fp16/bf16 autocast and its processes (under
    ``accelerate launch`` or ``torchrun`` each process takes every ``num_processes``-th item, or
    every ``num_processes``-th bucketed batch, so every item runs exactly once, with no padding
    repeats). Outputs move to host memory as each batch is recorded: no logits accumulate on the device.

    Args:
        trainer: a ``transformers.Trainer``.
        dataset: a map-style dataset of model-input dicts (lists of ints or tensors), or a
            :class:`provcollate.Indexed` one.
        per_token: True when ``output`` is per position ``[B, T, ...]``: unpadded to each item's
            length (no -100 padding), as :meth:`provcollate.Recorder.add`.
        output_dir: stream Parquet shards there (``Recorder.write``, each process its own) and
            return them read back; ``every`` rows between shards (None: one shard per process).
        output: the model output's key to record (``"logits"``, ``"last_hidden_state"``, ...);
            a model that returns a plain tensor has that recorded.
        collator: the :class:`provcollate.Collator` (None: the Trainer's ``data_collator`` when it
            is one, else ``Collator()``).
        lengths: one length per item: enables :class:`provcollate.LengthBucketSampler` batches.
        max_tokens: with ``lengths``: a token budget per batch instead of the batch size.
        reduce: as :class:`provcollate.Recorder` (``"argmax"``, ``"softmax"``, ``"topk:K"``).

    Returns:
        :class:`provcollate.Predictions` of every item, in dataset order, on every process.
    """
    if collator is None:
        collator = trainer.data_collator if isinstance(trainer.data_collator, pc.Collator) else pc.Collator()
    if not isinstance(collator, pc.Collator):
        raise TypeError(f"predict: collator must be None or a provcollate.Collator, got {type(collator).__name__}")
    if not isinstance(output, str):
        raise TypeError(f"predict: output must be the name of a model output (a str), got {type(output).__name__}")
    if max_tokens is not None and lengths is None:
        raise ValueError(f"predict: max_tokens needs lengths (one per item) to bucket by, got max_tokens={max_tokens!r} and lengths=None")
    if every is not None and output_dir is None:
        raise ValueError(f"predict: every applies to output_dir (rows between shards), got every={every!r} without output_dir")
    if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"predict: output_dir must be None or a path, got {type(output_dir).__name__}")
    indexed = dataset if isinstance(dataset, pc.Indexed) else pc.Indexed(dataset)
    loader = _loader(trainer, indexed, collator, lengths, max_tokens)
    recorder = pc.Recorder(num_items=len(indexed.dataset), reduce=reduce)
    accelerator, device = trainer.accelerator, trainer.args.device
    model = trainer.model.to(device).eval()
    streaming = False
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device, non_blocking=True)
            with accelerator.autocast():
                outputs = model(**batch)
            if isinstance(outputs, torch.Tensor):
                rows = outputs
            elif output in outputs:
                rows = outputs[output]
            else:
                raise ValueError(f"predict: output must be one of the model's outputs {list(outputs.keys())}, got {output!r}")
            recorder.add(batch, rows, per_token=per_token)
            if output_dir is not None and every is not None and not streaming:
                recorder.write(output_dir, every=every)
                streaming = True
    if output_dir is not None:
        recorder.write(output_dir)
        accelerator.wait_for_everyone()
        return pc.Predictions.read(output_dir)
    return recorder.gather() if accelerator.num_processes > 1 else recorder.result()

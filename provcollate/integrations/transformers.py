"""transformers: a Trainer's model over a dataset, predictions back in dataset order.

``Trainer(data_collator=provcollate.Collator(...))`` works as is for ``train``, ``evaluate``
and ``predict`` (a dict-data :class:`provcollate.Batch` is a mapping of model inputs, moved by
accelerate with ``batch.to()``); :func:`predict` is the identity-keeping counterpart of
``trainer.predict``.
"""
from __future__ import annotations

import inspect
import os

import torch
from torch.utils.data import DataLoader, Subset

import provcollate as pc

__all__ = ["predict"]


_FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _packed_collator(collator: pc.Collator) -> pc.Collator:
    """``collator`` with ``packed=True`` (its other settings kept)."""
    if collator.packed:
        return collator
    return pc.Collator(pad_value=collator.pad_value, pad_values=collator.pad_values, padding_side=collator.padding_side,
                       packed=True, index=collator.index, primary=collator.primary, stack=list(collator.stack),
                       pin_memory=collator.pin_memory, fingerprint=collator.fingerprint)


class _PaddingFree:
    """A packed batch as ``model`` takes it padding-free: ``model_inputs()`` without the packed
    ``attention_mask`` (a mask of ones over the pack would join its sequences), with the
    flash-attention varlen arguments when the model's attention is flash-attention, and
    ``use_cache=False`` for a model that has a cache."""

    def __init__(self, model) -> None:
        params = inspect.signature(model.forward).parameters
        if "position_ids" not in params:
            raise ValueError(f"predict: packed=True needs a model that takes position_ids (it restarts them per sequence "
                             f"to run packed sequences apart); {type(model).__name__}.forward does not; use packed=False")
        attention = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
        self.flash = attention.startswith("flash")
        self.extra = {"use_cache": False} if "use_cache" in params else {}
        self.checked = False

    def inputs(self, batch) -> dict:
        inputs = {k: v for k, v in batch.model_inputs().items() if k != "attention_mask" and (self.flash or k not in _FLASH_KEYS)}
        return {**inputs, **self.extra}

    def check(self, model, batch, inputs: dict, rows: torch.Tensor, pick) -> None:
        """Once: the last sequence of the first pack of two or more, run alone, must give the rows
        it gave in the pack; a model whose attention joins packed sequences is refused by name.
        ``pick`` takes the recorded output out of the model's."""
        if self.checked or len(batch) < 2:
            return
        self.checked = True
        start, end = int(batch.offsets[-2]), int(batch.offsets[-1])
        total = inputs["input_ids"].shape[1]
        alone_inputs = {k: v[:, start:end] if torch.is_tensor(v) and v.dim() >= 2 and tuple(v.shape[:2]) == (1, total) else v
                        for k, v in inputs.items() if k not in _FLASH_KEYS}
        alone = pick(model(**alone_inputs))[0].float()
        packed = (rows[0] if rows.shape[0] == 1 and rows.dim() > 2 else rows)[start:end].float()
        if alone.shape != packed.shape or (alone - packed).abs().max() > 1e-2 * alone.abs().max() + 1e-3:
            raise ValueError(f"predict: {type(model).__name__} does not run packed sequences apart: a sequence of a pack gave "
                             "other outputs than alone (its attention joins the sequences of a pack; decoders need "
                             "use_cache=False, encoders an attention that builds its masks from position_ids); use packed=False")


def _output(outputs, output: str) -> torch.Tensor:
    """The recorded output of a model's: a plain tensor, or ``outputs[output]``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if output in outputs:
        return outputs[output]
    raise ValueError(f"predict: output must be one of the model's outputs {list(outputs.keys())}, got {output!r}")


def _loader(trainer, dataset: pc.Indexed, collator: pc.Collator, lengths, max_tokens, packed: bool = False) -> DataLoader:
    """This process's share of ``dataset`` (every item on exactly one process), batched as the Trainer's args say."""
    args, state = trainer.args, trainer.accelerator.state
    world, rank = state.num_processes, state.process_index
    common = dict(num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory, collate_fn=collator)
    if lengths is None:
        share = Subset(dataset, range(rank, len(dataset), world))
        return DataLoader(share, batch_size=args.per_device_eval_batch_size, **common)
    budget = dict(max_tokens=max_tokens) if max_tokens is not None else dict(batch_size=args.per_device_eval_batch_size)
    sampler = pc.LengthBucketSampler(lengths, **budget, num_replicas=world, rank=rank, packed=packed and max_tokens is not None)
    return DataLoader(dataset, batch_sampler=sampler, **common)


def predict(trainer, dataset, *, per_token=False, output_dir=None, output: str = "logits", collator: pc.Collator | None = None,
            lengths=None, max_tokens: int | None = None, reduce: str | None = None, every: int | None = None,
            packed: bool = False) -> pc.Predictions:
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
        packed: run padding-free: sequences packed end to end (``Collator(packed=True)``), given
            to the model as ``batch.model_inputs()`` (``input_ids`` and ``position_ids``
            ``[1, total]``; with flash-attention also ``cu_seq_lens_*`` / ``max_length_*``; no
            attention mask), ``use_cache=False`` for models with a cache, and a token budget of
            real tokens with ``max_tokens``. Per-token outputs only. The first pack of two or more
            sequences is checked once (its last sequence run alone must give the same rows): a
            model whose attention joins packed sequences is refused with a ValueError.

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
    if not isinstance(packed, bool):
        raise TypeError(f"predict: packed must be a bool, got {type(packed).__name__}")
    if packed and per_token is not True:
        raise ValueError("predict: packed=True runs the model over packs of sequences, which gives rows per token: pass "
                         "per_token=True (a per-example head would pool a whole pack)")
    indexed = dataset if isinstance(dataset, pc.Indexed) else pc.Indexed(dataset)
    loader = _loader(trainer, indexed, _packed_collator(collator) if packed else collator, lengths, max_tokens, packed)
    recorder = pc.Recorder(num_items=len(indexed.dataset), reduce=reduce)
    accelerator, device = trainer.accelerator, trainer.args.device
    model = trainer.model.to(device).eval()
    padding_free = _PaddingFree(model) if packed else None
    streaming = False
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device, non_blocking=True)
            inputs = padding_free.inputs(batch) if packed else batch
            with accelerator.autocast():
                outputs = model(**inputs)
            rows = _output(outputs, output)
            if packed:
                with accelerator.autocast():
                    padding_free.check(model, batch, inputs, rows, lambda out: _output(out, output))
            recorder.add(batch, rows, per_token=per_token)
            if output_dir is not None and every is not None and not streaming:
                recorder.write(output_dir, every=every)
                streaming = True
    if output_dir is not None:
        recorder.write(output_dir)
        accelerator.wait_for_everyone()
        return pc.Predictions.read(output_dir)
    return recorder.gather() if accelerator.num_processes > 1 else recorder.result()

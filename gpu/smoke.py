"""GPU proof kit, step "smoke": run every provcollate kernel once on a device, check it against
the pure-PyTorch reference, then run the batch -> model -> Recorder path with host syncs forbidden.

Short on purpose: compute-sanitizer runs this same script. Usage: python gpu/smoke.py DEVICE [--kernels-only]
"""
import sys

import torch

import provcollate as pc
from provcollate import reference


def kernels(device: torch.device) -> None:
    """Each op over int32/int64 offsets, left/right, with an empty item, against reference.py."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 0, 5, 1])
    for offset_dtype in (torch.int32, torch.int64):
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(offset_dtype)
        total, max_len = int(lengths.sum()), int(lengths.max())
        values = torch.randn(total, 4, generator=g)
        for left in (False, True):
            padded = pc.ops.pad(values.to(device), offsets.to(device), max_len, pad_value=-1.0, left=left)
            expected = reference.pad(values, offsets, max_len, pad_value=-1.0, left=left)
            torch.testing.assert_close(padded.cpu(), expected)
            back = pc.ops.unpad(padded, offsets.to(device), total, left=left)
            torch.testing.assert_close(back.cpu(), values)
            dst = torch.zeros(total, 4, device=device)
            pc.ops.unpad_scatter_(dst, padded, lengths.to(device), offsets[:-1].to(device).long(), left=left)
            torch.testing.assert_close(dst.cpu(), values)


def no_sync_path(device: torch.device) -> None:
    """Collator (padded and packed) -> batch.to(device) -> model -> Recorder.add, syncs forbidden."""
    samples = [pc.Sample(index=i, view=0, data={"input_ids": torch.arange(1, 2 + i % 5)}) for i in range(8)]
    model = torch.nn.Embedding(16, 3).to(device)
    for packed in (False, True):
        batch = pc.Collator(packed=packed)(samples)
        if device.type == "cuda":
            batch = batch.pin_memory()
            torch.cuda.set_sync_debug_mode("error")
        try:
            on_device = batch.to(device, non_blocking=True)
            ids = on_device.padded()["input_ids"] if packed else on_device["input_ids"]
            rec = pc.Recorder(num_items=len(samples), device=device)
            with torch.no_grad():
                rec.add(on_device, model(ids), per_token=True)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        preds = rec.result()
        with torch.no_grad():
            for s in samples:
                torch.testing.assert_close(preds[s.index].cpu(), model(s.data["input_ids"].to(device)).cpu())


if __name__ == "__main__":
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    kernels(dev)
    if "--kernels-only" not in sys.argv:
        no_sync_path(dev)
    print(f"smoke: passed on {dev} ({'kernels' if '--kernels-only' in sys.argv else 'kernels and the no-sync path'})")

"""GPU proof kit, step "bench": pad and unpad against torch's peers and a device-to-device copy
of the same bytes, medians of CUDA-event timings. Usage: python gpu/bench.py DEVICE OUT_MD

On a CPU device (the kit's dry run) it runs tiny shapes with wall-clock timing: plumbing only.
"""
import statistics
import sys
import time

import torch

import provcollate as pc


def _median_ms(fn, device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rows(device: torch.device, shapes, reps: int):
    """One row per (shape, op, implementation): milliseconds and GB/s of the padded bytes."""
    for batch, max_len, dim, dtype in shapes:
        lengths = torch.randint(1, max_len + 1, (batch,), generator=torch.Generator().manual_seed(0))
        lengths[0] = max_len
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device)
        total = int(lengths.sum())
        values = torch.randn(total, dim, device=device).to(dtype)
        padded = pc.ops.pad(values, offsets, max_len)
        mask = torch.arange(max_len, device=device)[None, :] < lengths.to(device)[:, None]
        parts = list(values.split(lengths.tolist()))
        nested = torch.nested.nested_tensor(parts, layout=torch.jagged)
        moved = 2 * total * dim * values.element_size()
        flat = padded.reshape(-1)
        copy_dst = torch.empty(moved // (2 * values.element_size()), dtype=dtype, device=device)
        shape = f"B={batch} T={max_len} D={dim} {str(dtype).split('.')[-1]}"
        cases = {
            "copy bound": lambda: copy_dst.copy_(flat[: copy_dst.numel()]),
            "pad": lambda: pc.ops.pad(values, offsets, max_len),
            "pad_sequence": lambda: torch.nn.utils.rnn.pad_sequence(parts, batch_first=True),
            "nested to_padded_tensor": lambda: nested.to_padded_tensor(0.0),
            "unpad": lambda: pc.ops.unpad(padded, offsets, total),
            "padded[mask]": lambda: padded[mask],
            "nonzero+index_select": lambda: padded.reshape(-1, dim).index_select(0, mask.reshape(-1).nonzero().squeeze(1)),
        }
        for name, fn in cases.items():
            ms = _median_ms(fn, device, reps)
            yield shape, name, ms, moved / (ms * 1e-3) / 1e9


if __name__ == "__main__":
    dev = torch.device(sys.argv[1])
    if dev.type == "cuda":
        shapes = [(64, 512, 64, torch.float32), (256, 1024, 128, torch.bfloat16), (1024, 4096, 128, torch.bfloat16)]
        reps = 20
    else:
        shapes = [(8, 32, 16, torch.float32)]
        reps = 3
    lines = ["| shape | op | median ms | GB/s |", "|---|---|---:|---:|"]
    lines += [f"| {s} | {n} | {ms:.4f} | {gbs:.1f} |" for s, n, ms, gbs in rows(dev, shapes, reps)]
    with open(sys.argv[2], "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

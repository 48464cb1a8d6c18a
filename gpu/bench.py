"""GPU proof kit, step "bench": provcollate's ops against torch's peers and a device-to-device copy
of the same bytes, and Recorder.add with outputs on the GPU, alone and behind a model's compute.

Ops: every candidate of benchmarks/bench_ops.py (pad_sequence, nested jagged to_padded_tensor,
torch.ops.aten._jagged_to_padded_dense_forward / _padded_dense_to_jagged_forward where torch has
them, padded[mask], nonzero + index_select and flash-attention's nonzero + gather, ...), each
checked equal to provcollate's result before it is timed, over that benchmark's shapes and large
ones. Each call is timed alone between two CUDA events, after warm-up; the median is kept. GB/s
counts bytes read + written; the copy bound is ``dst.copy_(src)`` of buffers that together move
the same bytes. Verdict, per the issue's targets: at least 0.8 of the copy bound where D >= 64,
and at least 1.5x the fastest peer where the peers are slow (the fastest below 1/1.5 of the copy
bound, so that 1.5x of it still fits under the bound).

Recorder: a matmul-heavy model on one stream, with per-token and per-example outputs; the wall
time of N batches of the model alone, of Recorder.add alone (outputs made beforehand), and of both
interleaved, for storage on the host (pinned copies) and on the device; median of 3 runs.
Overlap = the share of add's own time that disappears behind the model's.

    python gpu/bench.py DEVICE OUT_MD      # on a CPU (the kit's dry run): tiny shapes, wall clock, plumbing only
"""
import pathlib
import statistics
import sys
import time

import torch

import provcollate as pc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_ops  # noqa: E402  (the candidates and shapes of the CPU benchmark)

LARGE_SHAPES = [((256, 1024, 128), torch.bfloat16), ((1024, 4096, 128), torch.bfloat16)]
PEER_TARGET, COPY_TARGET = 1.5, 0.8


def _median_ms(fn, device: torch.device, reps: int) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _copy_ms(nbytes: int, device: torch.device, reps: int) -> float:
    """A device-to-device copy that reads nbytes / 2 and writes nbytes / 2."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _median_ms(lambda: dst.copy_(src), device, reps)


def verdict(dim: int, ours: float, peer, copy: float) -> str:
    goals = []
    if dim >= 64:
        goals.append((f"{copy / ours:.2f} of copy (>= {COPY_TARGET})", copy / ours >= COPY_TARGET))
    if peer is not None and copy / peer < 1 / PEER_TARGET:
        goals.append((f"{peer / ours:.2f}x the fastest peer (>= {PEER_TARGET}x)", peer / ours >= PEER_TARGET))
    if not goals:
        return "no target (D < 64 and the fastest peer near the copy bound)"
    return "; ".join(("meets: " if met else "MISSES: ") + what for what, met in goals)


def shape_rows(c, dtype, device: torch.device, reps: int):
    """One shape's rows: a summary per op, one per candidate, and the candidates that cannot run."""
    shape = f"{c.name} {str(dtype).replace('torch.', '')}"
    summary, detail, skipped = [], [], []
    for op in bench_ops.OPS:
        fns, missing = bench_ops.prepare(op, c)  # every candidate checked equal to provcollate's result
        fns.pop(bench_ops.BOUND)
        skipped += [f"{op.name} {shape}: {name}: {why}" for name, why in missing.items()]
        moved = op.bytes_moved(c)
        copy = _copy_ms(moved, device, reps)
        times = {name: _median_ms(fn, device, reps) for name, fn in fns.items()}
        ours, *peers = times
        fastest = min(peers, key=times.get) if peers else None
        for name, ms in times.items():
            detail.append(f"| {shape} | {op.name} | {name} | {ms:.4f} | {moved / ms / 1e6:,.0f} | {copy / ms:.2f} |")
        bound = "device-to-device copy of the same bytes" if device.type == "cuda" else "copy of the same bytes"
        detail.append(f"| {shape} | {op.name} | {bound} | {copy:.4f} | {moved / copy / 1e6:,.0f} | 1.00 |")
        peer_ms = times[fastest] if fastest else None
        summary.append(
            f"| {shape} | {op.name} | {times[ours]:.4f} | {moved / times[ours] / 1e6:,.0f} | {copy / times[ours]:.2f} | "
            f"{fastest or '-'} | {f'{peer_ms:.4f}' if fastest else '-'} | {f'{peer_ms / times[ours]:.2f}x' if fastest else '-'} | "
            f"{verdict(c.dim, times[ours], peer_ms, copy)} |")
    return summary, detail, skipped


def op_rows(device: torch.device, shapes, reps: int):
    """Every shape's rows; each shape's tensors are freed before the next is made."""
    gen = torch.Generator().manual_seed(0)
    summary, detail, skipped = [], [], []
    for (batch, max_len, dim), dtype in shapes:
        rows = shape_rows(bench_ops.make_case(batch, max_len, dim, dtype, gen, str(device)), dtype, device, reps)
        for into, got in zip((summary, detail, skipped), rows):
            into += got
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return summary, detail, skipped


class _Model(torch.nn.Module):
    """A matmul-heavy stand-in for an encoder: per-token outputs and a pooled per-example one."""

    def __init__(self, hidden: int, layers: int, out: int, classes: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(layers))
        self.tokens = torch.nn.Linear(hidden, out)
        self.pooled = torch.nn.Linear(hidden, classes)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return {"tokens": self.tokens(x), "pooled": self.pooled(x[:, 0])}


def _wall_s(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def recorder_rows(device: torch.device, batch: int, max_len: int, hidden: int, layers: int, n: int):
    """Items/s of Recorder.add alone, and how much of it hides behind the model's compute."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(1)
    model = _Model(hidden, layers, 128, 16).to(device, dtype).eval()
    x = torch.randn(batch, max_len, hidden, generator=gen).to(device, dtype)
    order = torch.randperm(n * batch, generator=gen)
    collate = pc.Collator()
    batches = []
    for k in range(n):
        lengths = torch.randint(1, max_len + 1, (batch,), generator=gen)
        lengths[0] = max_len  # every batch is [batch, max_len]: the model's input shape is fixed
        samples = [pc.Sample(int(i), 0, {"input_ids": torch.zeros(int(m), dtype=torch.long)})
                   for i, m in zip(order[k * batch:(k + 1) * batch], lengths)]
        b = collate(samples)
        batches.append(b.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else b)
    with torch.no_grad():
        outputs = [model(x) for _ in range(n)]

        def model_alone():
            for _ in range(n):
                model(x)

        def run(storage, with_model):
            rec = pc.Recorder(num_items=n * batch, device=storage)

            def loop():
                for k, b in enumerate(batches):
                    rec.add(b, model(x) if with_model else outputs[k], per_token={"tokens"})
            return _wall_s(loop, device), _wall_s(rec.result, device)

        rows = []
        model_alone()  # warm-up
        for storage in (None, device):
            run(storage, True)  # warm-up: kernels, pinned and device caches
            t_model = statistics.median(_wall_s(model_alone, device) for _ in range(3))
            add = [run(storage, False) for _ in range(3)]
            t_add, t_result = statistics.median(a for a, _ in add), statistics.median(r for _, r in add)
            t_both = statistics.median(run(storage, True)[0] for _ in range(3))
            overlap = (t_model + t_add - t_both) / t_add if t_add > 0 else float("nan")
            where = "host (pinned copies)" if storage is None else f"device ({device})"
            rows.append(f"| {where} | {n * batch / t_add:,.0f} | {t_add * 1e3:.1f} | {t_result * 1e3:.1f} | {t_model * 1e3:.1f} | "
                        f"{t_both * 1e3:.1f} | {t_both / t_model - 1:+.0%} | {min(max(overlap, 0.0), 1.0):.0%} |")
    setup = (f"{n} batches of {batch} items, T = {max_len}, lengths uniform in 1..T; model: {layers} Linear({hidden}, {hidden}) + "
             f"ReLU, heads to per-token [B, T, 128] and per-example [B, 16], {str(dtype).replace('torch.', '')}; wall time, "
             "median of 3")
    return setup, rows


def main() -> None:
    device = torch.device(sys.argv[1])
    if device.type == "cuda":
        if not pc.HAS_EXTENSION:
            raise SystemExit("bench: the compiled extension did not load")
        shapes = [(s, torch.float32) for s in bench_ops.SHAPES] + LARGE_SHAPES
        reps, rec_args = 20, (64, 512, 2048, 8, 20)
        timing = f"CUDA events around each call, median of {reps} after 3 warm-up calls, on {torch.cuda.get_device_name()}"
    else:
        shapes = [(s, torch.float32) for s in bench_ops.QUICK_SHAPES]
        reps, rec_args = 3, (8, 16, 32, 2, 4)
        timing = f"wall clock (a CPU: plumbing only, not GPU numbers), median of {reps}"
    summary, detail, skipped = op_rows(device, shapes, reps)
    rec_setup, rec = recorder_rows(device, *rec_args)
    lines = [f"Ops: {timing}. GB/s = (bytes read + bytes written) / time; \"of copy\" = the copy's time / the op's. "
             f"Shapes (B, T, D): benchmarks/bench_ops.py's in float32, and large ones in bfloat16.", "",
             "| shape | op | provcollate ms | GB/s | of copy | fastest peer | peer ms | speedup | verdict |",
             "|---|---|---:|---:|---:|---|---:|---:|---|", *summary, "",
             "### Recorder.add with outputs on the device", "", rec_setup + ".", "",
             "| storage | add alone, items/s | add alone ms | result() ms | model alone ms | model + add ms | "
             "cost over the model | add hidden behind compute |",
             "|---|---:|---:|---:|---:|---:|---:|---:|", *rec, "",
             "### Every candidate", "",
             "| shape | op | candidate | median ms | GB/s | of copy |", "|---|---|---|---:|---:|---:|", *detail]
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped)]
    met = sum("MISSES" not in row and "meets" in row for row in summary)
    judged = sum("meets" in row or "MISSES" in row for row in summary)
    with open(sys.argv[2], "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"bench: targets met in {met} of {judged} judged (shape, op) rows")


if __name__ == "__main__":
    main()

"""GPU proof kit, step "smoke": every provcollate kernel on a device against reference.py, then the
whole batch -> model -> Recorder path with host syncs forbidden.

The no-sync proof has two halves. ``torch.cuda.set_sync_debug_mode("error")`` makes torch raise at
every call it knows to synchronise (a read of a device value, a blocking copy, a stream or device
sync). A sentinel catches the waits torch does not report (an event's ``synchronize()``, a copy from
pageable memory, which waits for its stream): the GPU first gets ~0.5 s of sleep to run, and the
whole path, model and Recorder.add included, must be queued while that sleep still runs, which it
cannot be if the host ever waited for the GPU. Only ``result()`` may wait, and runs after.

Short on purpose: compute-sanitizer runs this same script, ``--sanitizer`` (no sentinel: an
instrumented run cannot keep its timing) and ``--kernels-only`` (the kernels alone, for racecheck).

    python gpu/smoke.py DEVICE [--sanitizer | --kernels-only]
"""
import argparse
import contextlib
import inspect
import time

import torch

import provcollate as pc
from provcollate import reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8, torch.bool)
LENGTHS = [3, 0, 5, 1, 0]  # empty items, inside and at the end
SLEEP_S = 0.5
BATCHES = 3  # per run of the path: two outputs each stay within the Recorder's copies in flight
# rec.add(packed_batch, rows [total, ...], per_token=True) came with the 2026-12 recording core
# (issue 12), whose add() also takes offsets=; a tree from before it cannot record packed rows.
PACKED_ROWS = "offsets" in inspect.signature(pc.Recorder.add).parameters


def _values(n, dtype, gen):
    if dtype == torch.bool:
        return torch.rand(n, 4, generator=gen) > 0.5
    return (torch.randn(n, 4, generator=gen) * 20).to(dtype)


def kernels(device: torch.device) -> int:
    """pad / unpad / unpad_scatter_ over dtypes, int32/int64 offsets, left/right, empty items,
    against reference.py; then corrupt offsets on the device, which the kernels must keep in
    bounds (compute-sanitizer's memcheck watches). Returns the number of cases checked."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor(LENGTHS)
    total, max_len = int(lengths.sum()), int(lengths.max()) + 1
    # Items land in reverse order, one spare row first: every destination differs from its source.
    dst_offsets = 1 + torch.cat([lengths.flip(0).cumsum(0).flip(0)[1:], torch.zeros(1, dtype=torch.long)])
    cases = 0
    for dtype in DTYPES:
        values = _values(total, dtype, gen)
        fill = True if dtype == torch.bool else 7
        for index_dtype in (torch.int32, torch.int64):
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(index_dtype)
            for left in (False, True):
                padded = pc.ops.pad(values.to(device), offsets.to(device), max_len, pad_value=fill, left=left)
                assert torch.equal(padded.cpu(), reference.pad(values, offsets, max_len, fill, left)), (dtype, index_dtype, left)
                back = pc.ops.unpad(padded, offsets.to(device), total, left=left)
                assert torch.equal(back.cpu(), values), (dtype, index_dtype, left)
                dst = torch.zeros(total + 1, 4, dtype=dtype)
                expected = reference.unpad_scatter_(dst.clone(), padded.cpu(), lengths, dst_offsets, left)
                dst = dst.to(device)
                pc.ops.unpad_scatter_(dst, padded, lengths.to(device, index_dtype), dst_offsets.to(device, index_dtype), left=left)
                assert torch.equal(dst.cpu(), expected), (dtype, index_dtype, left)
                cases += 1
    if device.type == "cuda":
        bad = torch.tensor([0, 50, -3, 10**12], device=device)
        assert pc.ops.pad(torch.randn(10, 4, device=device), bad, 6).shape == (3, 6, 4)
        assert pc.ops.unpad(torch.randn(3, 6, 4, device=device), bad, 10).shape == (10, 4)
        dst = torch.zeros(4, 4, device=device)
        pc.ops.unpad_scatter_(dst, torch.randn(3, 6, 4, device=device), torch.tensor([7, -2, 3], device=device),
                              torch.tensor([2, 0, 10**9], device=device))
        torch.cuda.synchronize()
        cases += 3
    return cases


class _Model(torch.nn.Module):
    """Per-token hidden states and a per-example pooled output, like an encoder with a head."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, ids):
        hidden = self.embed(ids)
        return hidden, self.head(hidden[..., 0, :])  # the first token's, as BERT pools: padding-free


@contextlib.contextmanager
def _syncs_forbidden(device: torch.device):
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _record(batches, model, device, storage, packed_rows: bool):
    """The path for host-made batches: to the device, (packed: padded()), model, Recorder.add."""
    rec = pc.Recorder(num_items=sum(len(b) for b in batches), device=storage)
    with torch.no_grad():
        for batch in batches:
            on_device = batch.to(device, non_blocking=True)
            if packed_rows:  # per-token rows straight from the packed values, in offsets order
                # model_inputs() (a padding-free model's kwargs) is made under the same no-sync rule
                inputs = on_device.model_inputs() if hasattr(on_device, "model_inputs") else {"input_ids": on_device["input_ids"][None]}
                ids = inputs["input_ids"][0]
                hidden = model.embed(ids)
                rec.add(on_device, hidden, per_token=True)
                continue
            padded = on_device.padded()  # a padded batch is returned as is
            hidden, pooled = model(padded["input_ids"])
            rec.add(padded, {"tokens": hidden, "pooled": pooled}, per_token={"tokens"})
    return rec


def no_sync_path(device: torch.device, sentinel: bool) -> list:
    """Padded and packed batches, host and device storage, per-example and per-token outputs."""
    samples = [pc.Sample(index=i, view=0, data={"input_ids": torch.arange(1, 2 + (7 * i) % 9)})
               for i in range(4 * BATCHES)]
    chunks = [samples[i::BATCHES] for i in range(BATCHES)]  # shuffled: each batch spans the dataset
    model = _Model().to(device)
    sleep_cycles = int(SLEEP_S * _cycles_per_second()) if sentinel else 0
    runs = []
    for packed in (False, True):
        collate = pc.Collator(packed=packed)

        def host_batches():  # made and pinned before the path, as DataLoader(pin_memory=True) does
            return [collate(c).pin_memory() if device.type == "cuda" else collate(c) for c in chunks]

        for storage in (None, device):
            for packed_rows in ((False, True) if packed and PACKED_ROWS else (False,)):
                _record(host_batches(), model, device, storage, packed_rows).result()  # warm-up: kernels, caches
                batches = host_batches()
                if sentinel:
                    torch.cuda.synchronize()
                    torch.cuda._sleep(sleep_cycles)
                start = time.perf_counter()
                with _syncs_forbidden(device):
                    rec = _record(batches, model, device, storage, packed_rows)
                host_s = time.perf_counter() - start
                where = f"packed={packed}, storage={'host' if storage is None else storage}, packed rows={packed_rows}"
                if sentinel and torch.cuda.current_stream().query():
                    raise AssertionError(
                        f"the GPU's {SLEEP_S} s sleep, queued first, had ended when the host had queued the path "
                        f"({host_s * 1e3:.0f} ms on the host; {where}): "
                        + ("the host waited for the GPU" if host_s < SLEEP_S else "inconclusive, the host was slower than the sleep"))
                preds = rec.result()
                with torch.no_grad():
                    for s in samples:
                        hidden, pooled = model(s.data["input_ids"].to(device))
                        got = preds[s.index]
                        if packed_rows:
                            torch.testing.assert_close(got.cpu(), hidden.cpu())
                        else:
                            torch.testing.assert_close(got["tokens"].cpu(), hidden.cpu())
                            torch.testing.assert_close(got["pooled"].cpu(), pooled.cpu())
                runs.append(f"{'packed' if packed else 'padded'}{' rows' if packed_rows else ''}, "
                            f"{'host' if storage is None else 'device'} storage: {host_s * 1e3:.1f} ms on the host")
    return runs


def _cycles_per_second() -> float:
    """The GPU clock, from a timed sleep of known cycles (torch.cuda._sleep counts cycles)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(10**7)
    end.record()
    end.synchronize()
    return 10**7 / (start.elapsed_time(end) * 1e-3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("device")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--kernels-only", action="store_true", help="the kernels alone (racecheck)")
    mode.add_argument("--sanitizer", action="store_true", help="under compute-sanitizer: no timing sentinel")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not pc.HAS_EXTENSION:
        raise SystemExit("smoke: the compiled extension did not load: the CUDA kernels cannot be checked")
    print(f"smoke: {kernels(device)} kernel cases match reference.py on {device}", flush=True)
    if args.kernels_only:
        return
    sentinel = device.type == "cuda" and not args.sanitizer
    if device.type != "cuda":
        proof = "results only: a CPU has no host sync to forbid"
    else:
        proof = 'no host sync: set_sync_debug_mode("error")' + (" and the sleep sentinel" if sentinel else "")
    for run in no_sync_path(device, sentinel):
        print(f"smoke: {proof}: {run}")
    if not PACKED_ROWS:
        print("smoke: not checked: Recorder.add(packed_batch, rows), which this tree's Recorder predates (issue 12)")
    if device.type != "cuda":
        print("smoke: on the CPU only the plumbing and the results are checked; the sync checks need a GPU")


if __name__ == "__main__":
    main()

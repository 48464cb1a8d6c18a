"""CUDA checks the GPU proof kit runs (`make gpu-check`), each compared with reference.py on the CPU:
the ops over every dtype, int32/int64 offsets, left/right, empty items, row sizes of every copy
width and misaligned views; opcheck, gradcheck, torch.compile(fullgraph=True), CUDA graph capture
and replay, 64-bit indexing; the Recorder (host and device storage, per-example and per-token,
views, reductions, repeats, more copies in flight than it keeps) and the Collator on the device.

Self-contained on purpose (no hypothesis, nothing from conftest): on a GPU machine without
hypothesis the kit runs this file alone, with --noconftest.
"""
import inspect

import pytest
import torch
from torch.utils.data import DataLoader

import provcollate as pc
from provcollate import ops, reference

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not pc.HAS_EXTENSION, reason="needs the compiled extension")]

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]
# (lengths, trailing dims, max_len): empty items, an empty batch, only empty items, no padding,
# zero-width rows, and rows of 1, 3, 6, 10, 16 and 40 elements: every copy width of the kernels.
CASES = [([3, 0, 5, 1], (2,), 6), ([], (3,), 5), ([0, 0], (2, 2), 3), ([4, 4], (), 4), ([1, 2], (0,), 2),
         ([2, 7, 1], (3,), 8), ([6, 0, 2], (2, 5), 6), ([5, 1, 3], (16,), 5), ([9, 4], (40,), 9)]
# rec.add(packed_batch, rows), rec.add(batch, nested) and offsets= came with issue 12's recording core.
PACKED_ROWS = "offsets" in inspect.signature(pc.Recorder.add).parameters
needs_packed_rows = pytest.mark.skipif(not PACKED_ROWS, reason="Recorder.add(packed rows / nested) predates this tree (issue 12)")


def _offsets(lengths, dtype=torch.int64, device="cuda"):
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths, dtype=torch.long).cumsum(0)]).to(device, dtype)


def _random(shape, dtype, gen):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=gen)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 30).to(dtype)
    return torch.randint(0 if dtype == torch.uint8 else -100, 100, shape, generator=gen).to(dtype)


def _fill(dtype):
    return True if dtype == torch.bool else 7


def _scatter_layout(lengths, gen):
    """Destination offsets of the items in a random order with gaps, and the number of rows."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    dst_offsets, pos = [0] * len(lengths), 1
    for b in order:
        dst_offsets[b] = pos
        pos += lengths[b] + 1
    return torch.tensor(dst_offsets, dtype=torch.long), pos


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ops_match_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    for lengths, trailing, max_len in CASES:
        # Values at the start of an allocation and one row in (views on the device, so that the
        # misaligned copy widths run too); the scatter's dst likewise one row in.
        base = _random((sum(lengths) + 1, *trailing), dtype, gen)
        on_device = base.cuda()
        for values, device_values in ((base[:-1], on_device[:-1]), (base[1:], on_device[1:])):
            dst_offsets, rows = _scatter_layout(lengths, gen)
            for index_dtype in (torch.int32, torch.int64):
                offsets = _offsets(lengths, index_dtype, "cpu")
                for left in (False, True):
                    where = (dtype, lengths, trailing, index_dtype, left, values.storage_offset())
                    padded = ops.pad(device_values, offsets.cuda(), max_len, _fill(dtype), left)
                    expected = reference.pad(values, offsets, max_len, _fill(dtype), left)
                    assert torch.equal(padded.cpu(), expected), where
                    assert torch.equal(ops.unpad(padded, offsets.cuda(), values.shape[0], left).cpu(), values), where
                    dst = _random((rows + 1, *trailing), dtype, gen)
                    want = reference.unpad_scatter_(dst[1:].clone(), expected, torch.tensor(lengths, dtype=torch.long), dst_offsets, left)
                    got = dst.cuda()
                    ops.unpad_scatter_(got[1:], padded, torch.tensor(lengths).to("cuda", index_dtype),
                                       dst_offsets.to("cuda", index_dtype), left)
                    assert torch.equal(got[1:].cpu(), want) and torch.equal(got[0].cpu(), dst[0]), where


def test_cuda_unpad_scatter_into_a_strided_dst():
    padded = torch.arange(24.0, device="cuda").reshape(2, 4, 3).transpose(1, 2)  # [2, 3, 4], strided
    base = torch.zeros(4, 6, device="cuda")
    dst = base[:, ::2].t()  # [3, 4], a strided view of base
    ops.unpad_scatter_(dst, padded, torch.tensor([1, 2], device="cuda"), torch.tensor([2, 0], device="cuda"))
    expected = reference.unpad_scatter_(torch.zeros(3, 4), padded.cpu(), torch.tensor([1, 2]), torch.tensor([2, 0]))
    assert torch.equal(base[:, ::2].t().cpu(), expected)  # written through to the base


def test_cuda_corrupt_device_offsets_stay_in_bounds():
    """Unchecked device offsets: the kernels clamp every span (compute-sanitizer's memcheck in
    the kit watches gpu/smoke.py do the same); what lands is within the outputs."""
    values = torch.randn(10, 4, device="cuda")
    bad = torch.tensor([0, 50, -3, 10**12], device="cuda")
    out = ops.pad(values, bad, 6, -1.0)
    torch.cuda.synchronize()
    assert out.shape == (3, 6, 4) and torch.isfinite(out).all()
    assert ops.unpad(torch.randn(3, 6, 4, device="cuda"), bad, 10).shape == (10, 4)
    dst = torch.full((4, 4), 5.0, device="cuda")
    ops.unpad_scatter_(dst, torch.ones(3, 6, 4, device="cuda"), torch.tensor([7, -2, 3], device="cuda"),
                       torch.tensor([2, 0, 10**9], device="cuda"))
    torch.cuda.synchronize()
    assert set(dst.unique().tolist()) <= {1.0, 5.0}


def test_cuda_opcheck():
    # A few cases only: opcheck costs ~0.5 s a call, and test_ops.py's test_opcheck[cuda] runs the rest.
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bool):
        for lengths, trailing, max_len in CASES[:1]:
            values = _random((sum(lengths), *trailing), dtype, gen).cuda()
            for index_dtype in (torch.int32, torch.int64):
                offsets = _offsets(lengths, index_dtype)
                for left in (False, True):
                    torch.library.opcheck(torch.ops.provcollate.pad.default, (values, offsets, max_len, _fill(dtype), left))
                    padded = ops.pad(values, offsets, max_len, _fill(dtype), left)
                    torch.library.opcheck(torch.ops.provcollate.unpad.default, (padded, offsets, values.shape[0], left))
                    dst = torch.zeros_like(values)
                    lengths_t = torch.tensor(lengths, dtype=torch.long, device="cuda")
                    torch.library.opcheck(torch.ops.provcollate.unpad_scatter_.default,
                                          (dst, padded, lengths_t, offsets[:-1].long(), left))


@pytest.mark.parametrize("left", [False, True])
def test_cuda_gradcheck(left):
    offsets = _offsets([2, 0, 3, 1])
    values = torch.randn(6, 2, dtype=torch.double, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ops.pad(v, offsets, 4, 0.5, left), (values,))
    assert torch.autograd.gradgradcheck(lambda v: ops.pad(v, offsets, 4, 0.5, left), (values,))
    padded = torch.randn(4, 4, 2, dtype=torch.double, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: ops.unpad(p, offsets, 6, left), (padded,))
    assert torch.autograd.gradgradcheck(lambda p: ops.unpad(p, offsets, 6, left), (padded,))


def test_cuda_compile_fullgraph():
    torch._dynamo.reset()
    offsets = _offsets([3, 1, 4])
    values = torch.randn(8, 5, device="cuda")

    @torch.compile(fullgraph=True)
    def round_trip(v, o):
        padded = ops.pad(v, o, 4, -1.0)
        return ops.unpad(padded * 2, o, 8), padded

    out, padded = round_trip(values, offsets)
    torch.testing.assert_close(out, values * 2)
    assert torch.equal(padded.cpu(), reference.pad(values.cpu(), offsets.cpu(), 4, -1.0))


def test_cuda_graph_capture_and_replay():
    offsets = _offsets([3, 0, 5])
    values = torch.randn(8, 4, device="cuda")
    dst = torch.zeros(9, 4, device="cuda")
    lengths = torch.tensor([3, 0, 5], device="cuda")
    dst_offsets = torch.tensor([6, 0, 1], device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs asks
        ops.unpad_scatter_(dst, ops.pad(values, offsets, 5, 7.0), lengths, dst_offsets)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        padded = ops.pad(values, offsets, 5, 7.0)
        rows = ops.unpad(padded, offsets, 8)
        ops.unpad_scatter_(dst, padded, lengths, dst_offsets)
    for seed in range(3):
        values.copy_(torch.randn(8, 4, generator=torch.Generator().manual_seed(seed)))
        dst.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(padded.cpu(), reference.pad(values.cpu(), offsets.cpu(), 5, 7.0))
        assert torch.equal(rows, values)
        want = reference.unpad_scatter_(torch.zeros(9, 4), padded.cpu(), lengths.cpu(), dst_offsets.cpu())
        assert torch.equal(dst.cpu(), want)


def test_cuda_64bit_indexing():
    # padded has more than INT_MAX elements: offsets into it need 64-bit arithmetic
    lengths = [2, 3]
    dim = (2**31 // 5) + 7
    values = torch.arange(5, dtype=torch.int8, device="cuda")[:, None].expand(5, dim).contiguous()
    padded = ops.pad(values, _offsets(lengths), 3)
    assert padded.numel() > 2**31
    assert torch.equal(padded[1, :, -1].cpu(), torch.tensor([2, 3, 4], dtype=torch.int8))
    assert torch.equal(padded[0, 2, -3:].cpu(), torch.zeros(3, dtype=torch.int8))
    assert torch.equal(ops.unpad(padded, _offsets(lengths), 5)[:, -1].cpu(), torch.arange(5, dtype=torch.int8))
    dst = torch.zeros_like(values)
    ops.unpad_scatter_(dst, padded, torch.tensor(lengths, device="cuda"), torch.tensor([3, 0], device="cuda"))
    assert torch.equal(dst[:, -1].cpu(), torch.tensor([2, 3, 4, 0, 1], dtype=torch.int8))


# ------------------------------------------------------------------------------------------ Recorder


def _sentences(n, seed=0, max_len=9):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 50, (int(torch.randint(1, max_len + 1, (1,), generator=gen)),), generator=gen) for _ in range(n)]


def _model():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(50, 6, padding_idx=0).cuda()  # the pad id 0 embeds to zeros
    head = torch.nn.Linear(6, 3).cuda()

    def run(ids):
        hidden = embed(ids)
        return {"tokens": hidden, "label": head(hidden.sum(-2))} if ids.dim() > 1 else hidden
    return run


@pytest.mark.parametrize("storage", [None, "cuda"], ids=["host", "device"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_cuda_recorder_padded_and_packed(storage, side):
    """Shuffled batches; padded, and packed then padded on the device; more batches than the
    Recorder keeps copies in flight, so host storage drains while it records."""
    items = _sentences(96)
    model = _model()
    for packed in (False, True):
        collate = pc.Collator(packed=packed, padding_side=side)
        rec = pc.Recorder(num_items=len(items), device=storage)
        with torch.no_grad():
            for chunk in torch.randperm(len(items), generator=torch.Generator().manual_seed(2)).split(4):
                batch = collate([pc.Sample(int(i), 0, {"ids": items[i]}) for i in chunk]).pin_memory().to("cuda", non_blocking=True)
                padded = batch.padded()
                rec.add(padded, model(padded["ids"]), per_token={"tokens"})
            preds = rec.result()
            assert len(preds) == len(items) and not len(preds.missing())
            for i, ids in enumerate(items):
                alone = model(ids[None].cuda())
                assert torch.equal(preds[i]["tokens"].cuda(), alone["tokens"][0]), (i, packed)
                torch.testing.assert_close(preds[i]["label"].cuda(), alone["label"][0])


@needs_packed_rows
@pytest.mark.parametrize("storage", [None, "cuda"], ids=["host", "device"])
def test_cuda_recorder_packed_rows_and_nested(storage):
    items = _sentences(24, seed=3)
    model = _model()
    for form in ("rows", "nested"):
        rec = pc.Recorder(num_items=len(items), device=storage)
        collate = pc.Collator(packed=True)
        with torch.no_grad():
            for chunk in torch.randperm(len(items), generator=torch.Generator().manual_seed(4)).split(5):
                batch = collate([pc.Sample(int(i), 0, {"ids": items[i]}) for i in chunk]).to("cuda", non_blocking=True)
                rows = model(batch["ids"])  # [total, 6] in offsets order
                if form == "nested":
                    rows = torch.nested.nested_tensor_from_jagged(rows, batch.offsets)
                rec.add(batch, rows, per_token=True)
        preds = rec.result()
        for i, ids in enumerate(items):
            assert torch.equal(preds[i].cuda(), model(ids.cuda())), (i, form)


@pytest.mark.parametrize("storage", [None, "cuda"], ids=["host", "device"])
def test_cuda_recorder_views_reduce_and_repeats(storage):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(20, 2, 7, generator=gen)  # [item, view, class]
    ds = pc.Indexed(list(range(20)), views=2)  # entry j: item j // 2, view j % 2
    means = pc.Recorder(num_items=20, device=storage)  # views="mean"
    repeats = pc.Recorder(num_items=20, device=storage, on_duplicate="mean")
    argmax = pc.Recorder(num_items=20, device=storage, reduce="argmax")
    for chunk in torch.randperm(len(ds), generator=gen).split(6):
        batch = pc.Collator()([ds[int(j)] for j in chunk]).to("cuda", non_blocking=True)
        out = logits[batch.host_index, batch.host_view].cuda()
        means.add(batch, out)
        repeats.add(batch.host_index, out)  # both views under one index: a repeat, averaged
        first = batch.host_view == 0
        argmax.add(batch.host_index[first], out[first.cuda()])
    by_views, by_repeats, classes = means.result(), repeats.result(), argmax.result()
    for i in range(20):
        torch.testing.assert_close(by_views[i].cpu(), logits[i].mean(0))
        torch.testing.assert_close(by_repeats[i].cpu(), logits[i].mean(0))
        assert int(classes[i]) == int(logits[i, 0].argmax())


def test_cuda_collator_on_the_device():
    """Samples already on the GPU collate there; host batches move with non_blocking from pinned
    memory, packed ones pad on the device; a DataLoader with workers and pin_memory feeds it."""
    items = _sentences(16, seed=6)
    cpu = pc.Collator(pad_value=-1, padding_side="left", pad_to_multiple_of=4)
    on_gpu = cpu([pc.Sample(i, 0, {"ids": x.cuda(), "n": i}) for i, x in enumerate(items)])
    want = cpu([pc.Sample(i, 0, {"ids": x, "n": i}) for i, x in enumerate(items)])
    assert on_gpu["ids"].is_cuda and torch.equal(on_gpu["ids"].cpu(), want["ids"])
    assert torch.equal(on_gpu.mask.cpu(), want.mask) and on_gpu.host_index.device.type == "cpu"
    packed = pc.Collator(packed=True, pad_value=-1, padding_side="left")([pc.Sample(i, 0, {"ids": x}) for i, x in enumerate(items)])
    moved = packed.pin_memory().to("cuda", non_blocking=True)
    assert moved.offsets.is_cuda and moved.host_lengths.device.type == "cpu"
    assert torch.equal(moved.padded()["ids"].cpu(), packed.padded()["ids"])
    assert torch.equal(moved.padded().mask.cpu(), packed.padded().mask)
    loader = DataLoader(pc.Indexed([{"ids": x} for x in items]), batch_size=5, num_workers=2, pin_memory=True,
                        collate_fn=pc.Collator(pad_value=-1))
    seen = []
    for batch in loader:
        assert batch["ids"].is_pinned() and batch.index.is_pinned()
        batch = batch.to("cuda", non_blocking=True)
        for row, i, n in zip(batch["ids"].cpu(), batch.host_index.tolist(), batch.host_lengths.tolist()):
            assert torch.equal(row[:n], items[i]) and (row[n:] == -1).all()
            seen.append(i)
    assert sorted(seen) == list(range(len(items)))

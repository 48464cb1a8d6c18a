"""CUDA-only checks the GPU proof kit runs (`make gpu-check`): gradcheck, torch.compile and CUDA
graph capture on the device, and 64-bit indexing; each compared with reference.py on the CPU."""
import pytest
import torch

from provcollate import ops, reference


def _offsets(lengths, device="cuda"):
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths).cumsum(0)]).to(device)


@pytest.mark.cuda
@pytest.mark.parametrize("left", [False, True])
def test_cuda_gradcheck(left):
    offsets = _offsets([2, 0, 3, 1])
    values = torch.randn(6, 2, dtype=torch.double, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ops.pad(v, offsets, 4, 0.5, left), (values,))
    padded = torch.randn(4, 4, 2, dtype=torch.double, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: ops.unpad(p, offsets, 6, left), (padded,))


@pytest.mark.cuda
def test_cuda_compile_fullgraph():
    offsets = _offsets([3, 1, 4])
    values = torch.randn(8, 5, device="cuda")

    @torch.compile(fullgraph=True)
    def round_trip(v, o):
        return ops.unpad(ops.pad(v, o, 4, -1.0) * 2, o, 8)

    torch.testing.assert_close(round_trip(values, offsets), values * 2)


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    offsets = _offsets([3, 0, 5])
    values = torch.randn(8, 4, device="cuda")
    dst = torch.zeros(8, 4, device="cuda")
    lengths = torch.tensor([3, 0, 5], device="cuda")
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.pad(values, offsets, 5)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        padded = ops.pad(values, offsets, 5, 7.0)
        ops.unpad_scatter_(dst, padded, lengths, offsets[:-1])
    for _ in range(2):
        values.copy_(torch.randn(8, 4))
        dst.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(padded.cpu(), reference.pad(values.cpu(), offsets.cpu(), 5, 7.0))
        torch.testing.assert_close(dst, values)


@pytest.mark.cuda
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

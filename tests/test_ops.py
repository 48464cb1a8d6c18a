"""pad / unpad / unpad_scatter_ against provcollate.reference, on every backend and code path.

Every case runs three ways on the CPU: the CPU copy loops, and the CUDA element bodies run on the
CPU (PROVCOLLATE_EMULATE_DEVICE=1, 32-bit indices as on a GPU; =int64, forced 64-bit indices),
plus on a GPU when there is one.
"""
import contextlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, strategies as st

import provcollate as pc
from provcollate import ops, reference

from conftest import DEVICES

# The tests below hold pc.ops to reference.py whichever path runs (`make test` runs this file
# again with PROVCOLLATE_EXTENSION=0); those of the compiled ops themselves need the extension.
needs_extension = pytest.mark.skipif(not pc.HAS_EXTENSION, reason="needs the compiled extension")

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]
MODES = ["0", "1", "int64"]


@contextlib.contextmanager
def emulate(mode):
    old = os.environ.get("PROVCOLLATE_EMULATE_DEVICE")
    os.environ["PROVCOLLATE_EMULATE_DEVICE"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["PROVCOLLATE_EMULATE_DEVICE"]
        else:
            os.environ["PROVCOLLATE_EMULATE_DEVICE"] = old


def random_tensor(shape, dtype, gen=None):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen).to(dtype) if not dtype.is_complex else torch.randn(shape, dtype=dtype, generator=gen)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=gen).to(dtype)


def pad_value_for(dtype):
    return True if dtype == torch.bool else (7 if not (dtype.is_floating_point or dtype.is_complex) else -1.5)


def offsets_of(lengths, dtype=torch.int64):
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out.to(dtype)


def sample_inputs(device="cpu"):
    """Jagged batches every test draws from: (values, offsets, max_len)."""
    cases = [
        ([3, 0, 5, 1], (2,), 6),        # an empty item, extra padding
        ([4, 4], (), 4),                # no padding at all
        ([], (3,), 5),                  # empty batch
        ([0, 0], (2, 2), 3),            # only empty items
        ([2, 7, 1], (3, 5), 7),         # 2 trailing dims
        ([1, 2], (0,), 2),              # zero-width rows
        ([5, 1, 3], (4,), 0 + 5),
    ]
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for lengths, trailing, max_len in cases:
            values = random_tensor((sum(lengths), *trailing), dtype, gen).to(device)
            for off_dtype in (torch.int64, torch.int32):
                yield values, offsets_of(lengths, off_dtype).to(device), max_len


@st.composite
def jagged_batches(draw):
    lengths = draw(st.lists(st.integers(0, 9), min_size=0, max_size=7))
    trailing = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    dtype = draw(st.sampled_from(DTYPES))
    max_len = max(lengths, default=0) + draw(st.integers(0, 3))
    left = draw(st.booleans())
    off_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    contiguous = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    values = random_tensor((sum(lengths), *trailing), dtype, gen)
    if not contiguous and values.dim() >= 1:
        # Same values, strided storage: every other row of a twice-as-long tensor.
        wide = random_tensor((2 * values.shape[0], *trailing), dtype, gen)
        wide[::2] = values
        values = wide[::2]
    return values, offsets_of(lengths, off_dtype), max_len, left


@needs_extension
@pytest.mark.parametrize("mode", MODES)
@given(batch=jagged_batches())
def test_pad_unpad_match_reference(mode, batch):
    values, offsets, max_len, left = batch
    fill = pad_value_for(values.dtype)
    with emulate(mode):
        padded = ops.pad(values, offsets, max_len, fill, left)
        expected = reference.pad(values, offsets, max_len, fill, left)
        assert padded.dtype == values.dtype and padded.shape == expected.shape
        assert torch.equal(padded, expected)
        back = ops.unpad(padded, offsets, values.shape[0], left)
        assert torch.equal(back, reference.unpad(padded, offsets, values.shape[0], left))
        assert torch.equal(back, values)


@needs_extension
@pytest.mark.parametrize("mode", MODES)
@given(batch=jagged_batches(), data=st.data())
def test_unpad_scatter_matches_reference(mode, batch, data):
    values, offsets, max_len, left = batch
    padded = reference.pad(values, offsets, max_len, pad_value_for(values.dtype), left)
    lengths = (offsets[1:] - offsets[:-1]).long()
    # Destinations: the items in a random order, with random gaps between them.
    order = data.draw(st.permutations(range(len(lengths))))
    gaps = data.draw(st.lists(st.integers(0, 3), min_size=len(lengths) + 1, max_size=len(lengths) + 1))
    dst_offsets = torch.zeros(len(lengths), dtype=torch.int64)
    pos = 0
    for k, b in enumerate(order):
        pos += gaps[k]
        dst_offsets[b] = pos
        pos += int(lengths[b])
    rows = pos + gaps[-1]
    dst = random_tensor((rows, *values.shape[1:]), values.dtype)
    expected = reference.unpad_scatter_(dst.clone(), padded, lengths, dst_offsets, left)
    index_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    with emulate(mode):
        out = ops.unpad_scatter_(dst, padded, lengths.to(index_dtype), dst_offsets.to(index_dtype), left)
    assert out is dst
    assert torch.equal(dst, expected)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_sample_inputs_all_paths(device):
    for values, offsets, max_len in sample_inputs(device):
        for left in (False, True):
            fill = pad_value_for(values.dtype)
            expected = reference.pad(values.cpu(), offsets.cpu(), max_len, fill, left)
            for mode in MODES if device == "cpu" else ["0"]:
                with emulate(mode):
                    padded = ops.pad(values, offsets, max_len, fill, left)
                    assert torch.equal(padded.cpu(), expected), (values.dtype, offsets, left, mode)
                    assert torch.equal(ops.unpad(padded, offsets, values.shape[0], left).cpu(), values.cpu())


def test_unpad_scatter_into_non_contiguous_dst():
    padded = torch.arange(24.0).reshape(2, 4, 3).transpose(1, 2)  # [2, 3, 4], strided
    base = torch.zeros(4, 6)
    dst = base[:, ::2].t()  # [3, 4], strided view of base
    assert not dst.is_contiguous() and not padded.is_contiguous()
    ops.unpad_scatter_(dst, padded, torch.tensor([1, 2]), torch.tensor([2, 0]))
    expected = torch.zeros(3, 4)
    expected[2] = padded[0, 0]
    expected[0:2] = padded[1, :2]
    assert torch.equal(dst, expected)
    assert torch.equal(base[:, ::2].t(), expected)  # written through to the base


def test_pad_value_kept_exactly_for_int64():
    values = torch.tensor([1, 2, 3])
    big = 2**62 + 1  # not representable in float64
    out = ops.pad(values, torch.tensor([0, 1, 3]), 3, big)
    assert out[0, 1].item() == big and out[1, 2].item() == big


@pytest.mark.parametrize("dtype", DTYPES + [torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("fill", [0, 1, 7, -3, 2.5, 1e10, 1e40, float("inf"), float("nan"), True, 2**40])
def test_pad_value_converts_as_torch_full(dtype, fill):
    """The pad value becomes exactly torch.full's element of the dtype, or the op raises."""
    values = torch.zeros(3, 2, dtype=dtype)
    offsets = torch.tensor([0, 1, 3])
    try:
        want = torch.full((), fill, dtype=dtype)
    except RuntimeError:  # overflows the dtype: the op must refuse it too
        with pytest.raises((RuntimeError, ValueError)):
            ops.pad(values, offsets, 3, fill)
        return
    if dtype.is_floating_point:  # a finite value that becomes inf (1e10 in float16) is refused too
        exact = math.isinf(fill) or not want.isinf().item()
    else:
        exact = dtype.is_complex or want.item() == fill
    if not exact:  # e.g. -3 into uint8, 2.5 into int64: refused rather than wrapped or truncated
        with pytest.raises(ValueError, match="cannot be represented"):
            ops.pad(values, offsets, 3, fill)
        return
    out = ops.pad(values, offsets, 3, fill)
    padding = out[0, 1:].reshape(-1)
    assert torch.equal(padding.view(torch.uint8), want.expand_as(padding).contiguous().view(torch.uint8)), (padding, want)


@pytest.mark.parametrize("fill", [0, 1, False, True, 0.0])
def test_bool_pad_values(fill):
    values = torch.tensor([True, False, True])
    out = ops.pad(values, torch.tensor([0, 1, 3]), 3, fill)
    assert out.tolist() == [[True, bool(fill), bool(fill)], [False, True, bool(fill)]]
    assert torch.equal(ops.pad(values, torch.tensor([0, 3]), 3), values[None])  # default pad_value=0


@needs_extension
def test_torch_ops_namespace():
    values, offsets = torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 3])
    assert torch.equal(torch.ops.provcollate.pad(values, offsets, 2, 0, False), ops.pad(values, offsets, 2))
    padded = ops.pad(values, offsets, 2)
    assert torch.equal(torch.ops.provcollate.unpad(padded, offsets, 3), values)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    checked = 0
    for values, offsets, max_len in sample_inputs(device):
        if values.dtype not in (torch.float32, torch.bool):
            continue
        fill = pad_value_for(values.dtype)
        for left in (False, True):
            torch.library.opcheck(torch.ops.provcollate.pad.default, (values, offsets, max_len, fill, left))
            padded = ops.pad(values, offsets, max_len, fill, left)
            torch.library.opcheck(torch.ops.provcollate.unpad.default, (padded, offsets, values.shape[0], left))
            lengths = (offsets[1:] - offsets[:-1]).long()
            dst_offsets = offsets[:-1].long()
            dst = torch.zeros_like(values)
            torch.library.opcheck(torch.ops.provcollate.unpad_scatter_.default, (dst, padded, lengths, dst_offsets, left))
            checked += 1
    assert checked > 0


@needs_extension
@pytest.mark.parametrize("left", [False, True])
def test_gradcheck(left):
    offsets = torch.tensor([0, 2, 2, 5, 6])
    values = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ops.pad(v, offsets, 4, 0.5, left), (values,))
    assert torch.autograd.gradgradcheck(lambda v: ops.pad(v, offsets, 4, 0.5, left), (values,))
    padded = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: ops.unpad(p, offsets, 6, left), (padded,))
    assert torch.autograd.gradgradcheck(lambda p: ops.unpad(p, offsets, 6, left), (padded,))


def test_gradient_drops_padding_positions():
    offsets = torch.tensor([0, 1, 3])
    padded = torch.randn(2, 3, requires_grad=True)
    ops.unpad(padded, offsets, 3).sum().backward()
    assert torch.equal(padded.grad, torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0]]))


@needs_extension
def test_compile_fullgraph():
    torch._dynamo.reset()

    def roundtrip(values, offsets):
        padded = ops.pad(values, offsets, 8, -1.0)
        return ops.unpad(padded * 2, offsets, values.shape[0]), padded

    compiled = torch.compile(roundtrip, fullgraph=True, backend="inductor")
    values, offsets = torch.randn(10, 4), offsets_of([3, 0, 7])
    out, padded = compiled(values, offsets)
    assert torch.equal(out, values * 2)
    assert torch.equal(padded, reference.pad(values, offsets, 8, -1.0))


BAD_INPUTS = [
    # (call, exception, message fragment)
    (lambda: ops.pad(torch.zeros(5, 2), torch.tensor([1, 2, 5]), 4), ValueError, "offsets must start at 0, got offsets[0] = 1"),
    (lambda: ops.pad(torch.zeros(5, 2), torch.tensor([0, 3, 2, 5]), 4), ValueError, "offsets must not decrease, got offsets[1] = 3 > offsets[2] = 2"),
    (lambda: ops.pad(torch.zeros(5, 2), torch.tensor([0, 5]), 4), ValueError, "item 0 has length 5 (offsets[1] - offsets[0]), more than max_len = 4"),
    (lambda: ops.pad(torch.zeros(5, 2), torch.tensor([0, 2, 4]), 4), ValueError, "offsets must end at the number of rows, 5, got offsets[2] = 4"),
    (lambda: ops.pad(torch.zeros(5, 2), torch.tensor([0, 2, 5]), -1), ValueError, "max_len must be >= 0, got -1"),
    (lambda: ops.pad(torch.zeros(5, 2), torch.tensor([0, 2, 5]), 4.0), TypeError, "max_len must be an int, got float"),
    (lambda: ops.pad(torch.zeros(5, 2), torch.tensor([0.0, 2, 5]), 4), TypeError, "offsets must be an int32 or int64 tensor, got Float"),
    (lambda: ops.pad(torch.zeros(5, 2), torch.tensor([[0, 2, 5]]), 4), ValueError, "offsets must be 1-D"),
    (lambda: ops.pad(torch.zeros(5, 2), torch.tensor([], dtype=torch.long), 4), ValueError, "offsets must be 1-D with B+1 >= 1 elements"),
    (lambda: ops.pad(torch.tensor(1.0), torch.tensor([0]), 4), ValueError, "values must have a leading length dimension"),
    (lambda: ops.pad(torch.zeros(5, dtype=torch.uint8), torch.tensor([0, 5]), 5, -100), ValueError, "pad_value -100 cannot be represented in Byte (it would become 156)"),
    (lambda: ops.pad(torch.zeros(5, dtype=torch.int64), torch.tensor([0, 5]), 5, 0.5), ValueError, "pad_value 0.5 cannot be represented in Long"),
    (lambda: ops.pad(torch.zeros(5, dtype=torch.bool), torch.tensor([0, 5]), 5, 7), ValueError, "pad_value 7 cannot be represented in Bool"),
    (lambda: ops.unpad(torch.zeros(2, 4), torch.tensor([0, 2, 5]), 6), ValueError, "offsets must end at the number of rows, 6, got offsets[2] = 5"),
    (lambda: ops.unpad(torch.zeros(2, 4), torch.tensor([0, 2]), 2), ValueError, "offsets must have 3 elements, got 2"),
    (lambda: ops.unpad(torch.zeros(4), torch.tensor([0, 2]), 2), ValueError, "padded must be [B, max_len, ...], got shape [4]"),
    (lambda: ops.unpad(torch.zeros(2, 4), torch.tensor([0, 2, 5]), -5), ValueError, "total must be >= 0, got -5"),
    (lambda: ops.unpad(torch.zeros(1, 2), torch.tensor([0, 3]), 3), ValueError, "item 0 has length 3 (offsets[1] - offsets[0]), more than max_len = 2"),
    (lambda: ops.unpad_scatter_(torch.zeros(4, 2), torch.zeros(2, 3, 2), torch.tensor([1, 4]), torch.tensor([0, 1])), ValueError, "lengths[1] must be in [0, 3] (padded.size(1)), got 4"),
    (lambda: ops.unpad_scatter_(torch.zeros(4, 2), torch.zeros(2, 3, 2), torch.tensor([1, -1]), torch.tensor([0, 1])), ValueError, "lengths[1] must be in [0, 3]"),
    (lambda: ops.unpad_scatter_(torch.zeros(4, 2), torch.zeros(2, 3, 2), torch.tensor([1, 2]), torch.tensor([0, 3])), ValueError, "rows [3, 5) of item 1 (dst_offsets[1] + lengths[1]) must lie inside dst's 4 rows"),
    (lambda: ops.unpad_scatter_(torch.zeros(4, 2), torch.zeros(2, 3, 2), torch.tensor([1, 2]), torch.tensor([-1, 0])), ValueError, "rows [-1, 0) of item 0"),
    (lambda: ops.unpad_scatter_(torch.zeros(4, 3), torch.zeros(2, 3, 2), torch.tensor([1, 2]), torch.tensor([0, 1])), ValueError, "trailing dims of dst [3] must equal those of padded [2]"),
    (lambda: ops.unpad_scatter_(torch.zeros(4, 2, dtype=torch.float64), torch.zeros(2, 3, 2), torch.tensor([1, 2]), torch.tensor([0, 1])), TypeError, "dst and padded must have one dtype, got Double and Float"),
    (lambda: ops.unpad_scatter_(torch.zeros(4, 2), torch.zeros(2, 3, 2), torch.tensor([1, 2, 0]), torch.tensor([0, 1])), ValueError, "lengths must have 2 elements, got 3"),
    (lambda: ops.unpad_scatter_(torch.zeros(4, 2), torch.zeros(2, 3, 2), torch.tensor([1, 2]), torch.tensor([0.0, 1.0])), TypeError, "dst_offsets must be an int32 or int64 tensor"),
    (lambda: ops.unpad_scatter_(torch.zeros(4), torch.zeros(2, 3, 2), torch.tensor([1, 2]), torch.tensor([0, 1])), ValueError, "dst must be [rows, *padded.shape[2:]] with 2 dims, got shape [4]"),
]


@needs_extension
@pytest.mark.parametrize("mode", ["0", "1"])
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_inputs_raise_clear_errors(case, mode):
    call, exc, fragment = BAD_INPUTS[case]
    with emulate(mode), pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value)


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_reference_rejects_the_same_inputs(case, monkeypatch):
    call, exc, _ = BAD_INPUTS[case]
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    with pytest.raises((exc, RuntimeError, ValueError, TypeError)):
        call()


def test_scatter_leaves_other_rows_untouched():
    dst = torch.full((6, 2), 9.0)
    padded = torch.ones(2, 2, 2)
    ops.unpad_scatter_(dst, padded, torch.tensor([1, 2]), torch.tensor([4, 0]))
    assert torch.equal(dst[[0, 1, 4]], torch.ones(3, 2))
    assert torch.equal(dst[[2, 3, 5]], torch.full((3, 2), 9.0))


@needs_extension
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("dtype,trailing,max_len", [(torch.float32, (1000,), 600), (torch.float16, (3,), 400_000), (torch.int8, (5,), 500_000)])
def test_outputs_larger_than_the_cache(dtype, trailing, max_len, left):
    """Outputs of 8 MiB and more: odd row sizes, unaligned spans. Outputs past the last-level cache
    take the non-temporal store path; test_streamed_stores_match_reference forces it for every size."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, max_len + 1, (6,), generator=gen).tolist()
    lengths[0], lengths[1] = max_len, 1
    values = random_tensor((sum(lengths), *trailing), dtype, gen)
    offsets = offsets_of(lengths)
    for fill in (0, 3):
        padded = ops.pad(values, offsets, max_len, fill, left)
        assert padded.numel() * padded.element_size() >= 8 << 20
        assert torch.equal(padded, reference.pad(values, offsets, max_len, fill, left))
        assert torch.equal(ops.unpad(padded, offsets, values.shape[0], left), values)


@needs_extension
def test_streamed_stores_match_reference():
    """PROVCOLLATE_STREAM_BYTES=0 writes every output with non-temporal stores: rerun the op tests so."""
    env = dict(os.environ, PROVCOLLATE_STREAM_BYTES="0", HYPOTHESIS_PROFILE=os.environ.get("HYPOTHESIS_PROFILE", "ci"))
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(tests, "test_ops.py"),
         "-k", "match_reference and not streamed or larger_than_the_cache or scatter"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tests,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " failed" not in out.stdout


@needs_extension
def test_bad_stream_bytes_raises():
    code = "import torch, provcollate as pc; pc.ops.pad(torch.ones(2, 1), torch.tensor([0, 2]), 3)"
    env = dict(os.environ, PROVCOLLATE_STREAM_BYTES="lots")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0
    assert "PROVCOLLATE_STREAM_BYTES must be a byte count >= 0, got 'lots'" in out.stderr


@needs_extension
@pytest.mark.parametrize("op", ["pad", "unpad"])
def test_graph_recorded_only_when_a_gradient_is_needed(op):
    offsets = torch.tensor([0, 2, 3])
    x = torch.randn(3, 2, requires_grad=True) if op == "pad" else torch.randn(2, 2, 2, requires_grad=True)
    call = (lambda t: ops.pad(t, offsets, 2)) if op == "pad" else (lambda t: ops.unpad(t, offsets, 3))
    assert call(x).grad_fn is not None and call(x).requires_grad
    with torch.no_grad():
        assert call(x).grad_fn is None and not call(x).requires_grad
    with torch.inference_mode():
        assert not call(x).requires_grad
    assert call(x.detach()).grad_fn is None
    out = call(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@needs_extension
def test_64bit_sizes():
    """Sizes past 2**31 elements: indices must not wrap (a 32-bit index would)."""
    n = 2**31 + 5
    values = torch.empty(n, dtype=torch.uint8)
    values[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    values[-4:] = torch.tensor([5, 6, 7, 8], dtype=torch.uint8)
    offsets = torch.tensor([0, 3, n])
    padded = ops.pad(values, offsets, n - 3, pad_value=255)
    assert padded.shape == (2, n - 3)
    assert padded[0, :4].tolist() == [1, 2, 3, 255] and padded[0, -1].item() == 255
    assert padded[1, 0].item() == 4 and padded[1, -4:].tolist() == [5, 6, 7, 8]
    del values
    back = ops.unpad(padded, offsets, n)
    assert back[:4].tolist() == [1, 2, 3, 4] and back[-4:].tolist() == [5, 6, 7, 8]


@needs_extension
def test_fallback_without_extension_warns_once_and_matches():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["provcollate._C"] = None  # makes `from . import _C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import provcollate as pc
            import provcollate.ops
        import torch
        msgs = [str(w.message) for w in caught if "provcollate" in str(w.message)]
        assert len(msgs) == 1 and "reference" in msgs[0], msgs
        assert not pc.HAS_EXTENSION
        v, o = torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 3])
        p = pc.ops.pad(v, o, 2, -1.0, left=True)
        assert p.tolist() == [[[-1.0, -1.0], [0.0, 1.0]], [[2.0, 3.0], [4.0, 5.0]]], p
        assert torch.equal(pc.ops.unpad(p, o, 3, left=True), v)
        print("fallback ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout


@pytest.mark.cuda
def test_cuda_matches_cpu_random():
    gen = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        lengths = torch.randint(0, 50, (33,), generator=gen).tolist()
        values = random_tensor((sum(lengths), 3, 5), dtype, gen)
        offsets = offsets_of(lengths)
        for left in (False, True):
            cpu = ops.pad(values, offsets, 60, pad_value_for(dtype), left)
            gpu = ops.pad(values.cuda(), offsets.cuda(), 60, pad_value_for(dtype), left)
            assert torch.equal(gpu.cpu(), cpu)
            assert torch.equal(ops.unpad(gpu, offsets.cuda(), values.shape[0], left).cpu(), values)


@pytest.mark.cuda
def test_cuda_corrupt_offsets_stay_in_bounds():
    values = torch.randn(10, 4, device="cuda")
    bad = torch.tensor([0, 50, -3, 10**12], device="cuda")
    out = ops.pad(values, bad, 6)
    torch.cuda.synchronize()
    assert out.shape == (3, 6, 4)
    out = ops.unpad(torch.randn(3, 6, 4, device="cuda"), bad, 10)
    torch.cuda.synchronize()
    assert out.shape == (10, 4)


@pytest.mark.cuda
def test_cuda_checked_mode_validates_device_offsets():
    code = textwrap.dedent(
        """
        import torch, provcollate as pc
        try:
            pc.ops.pad(torch.randn(10, 4, device="cuda"), torch.tensor([0, 50, 10], device="cuda"), 6)
        except ValueError as e:
            assert "more than max_len" in str(e); print("checked ok")
        """
    )
    env = dict(os.environ, PROVCOLLATE_CHECK="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "checked ok" in out.stdout, out.stderr

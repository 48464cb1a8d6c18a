"""Fuzz suite: seeded random and corrupt inputs, each batch of cases run in a subprocess so that a
segfault is a failed test, not a dead test run.

* ops: random and corrupt arguments of pad / unpad / unpad_scatter_ against provcollate.reference
  (the same result, or the same exception class).
* Collator: random nested samples of every dtype and memory layout against a Python-loop oracle
  written here, independent of collate.py; corrupt samples through both collate paths (the same
  batch, or the same exception class and message).

``PROVCOLLATE_FUZZ_CASES`` scales every run (default 150 cases per seed).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import provcollate as pc
from provcollate import reference

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = int(os.environ.get("PROVCOLLATE_FUZZ_CASES", "150"))


def in_subprocess(fn: str, seed: int) -> None:
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_fuzz; test_fuzz.{fn}({seed}, {CASES}); print('fuzz ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "fuzz ok" in r.stdout, f"{fn}({seed}) exited {r.returncode}:\n{r.stderr[-4000:]}"


def outcome(fn):
    try:
        return "ok", fn()
    except (TypeError, ValueError, IndexError) as e:
        return type(e).__name__, str(e)


# --- ops ----------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8,
          torch.bool, torch.complex64]


def _random_offsets(rng, batch, max_len):
    lengths = rng.integers(0, max_len + 1, batch)
    return np.concatenate(([0], np.cumsum(lengths))), lengths


def _corrupt(rng, offsets):
    offsets = offsets.copy()
    kind = rng.integers(0, 6)
    if kind == 0 and len(offsets) > 1:
        offsets[rng.integers(0, len(offsets))] = -rng.integers(1, 10)
    elif kind == 1 and len(offsets) > 2:
        i = rng.integers(1, len(offsets) - 1)
        offsets[i] = offsets[i + 1] + rng.integers(1, 5)
    elif kind == 2:
        offsets[0] = rng.integers(1, 4)
    elif kind == 3:
        offsets[-1] += rng.integers(1, 50)
    elif kind == 4:
        offsets = offsets[:-1] if len(offsets) > 1 else offsets
    return offsets


def ops_cases(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    for case in range(n):
        dtype = DTYPES[rng.integers(0, len(DTYPES))]
        batch, max_len = int(rng.integers(0, 6)), int(rng.integers(0, 7))
        trailing = tuple(int(d) for d in rng.integers(0, 4, rng.integers(0, 3)))
        offsets, lengths = _random_offsets(rng, batch, max_len)
        corrupt = rng.random() < 0.5
        if corrupt:
            offsets = _corrupt(rng, offsets)
        off_dtype = [torch.int64, torch.int32, torch.float32][rng.integers(0, 3) if corrupt else rng.integers(0, 2)]
        off = torch.tensor(offsets, dtype=off_dtype)
        total = int(lengths.sum())
        values = (torch.randn(total, *trailing) * 10).to(dtype)
        if rng.random() < 0.3 and values.dim() >= 2 and values.shape[-1] > 1:
            values = torch.randn(total, *trailing[:-1], trailing[-1] * 2)[..., ::2].to(dtype)  # strided
        ml = max_len if not (corrupt and rng.random() < 0.3) else int(rng.integers(-3, max_len + 1))
        left = bool(rng.random() < 0.5)
        pad_value = [0, 1, -1, 2.5, True][rng.integers(0, 5)]
        what = f"case {case}: dtype={dtype} offsets={offsets.tolist()} {off_dtype} max_len={ml} left={left} pad={pad_value}"
        got = outcome(lambda: pc.ops.pad(values, off, ml, pad_value, left))
        want = outcome(lambda: reference.pad(values, off, ml, pad_value, left))
        assert got[0] == want[0], (what, got, want)
        if got[0] == "ok":
            assert torch.equal(got[1], want[1]), what
            padded = got[1]
        else:
            padded = (torch.randn(batch, max(max_len, 0), *trailing) * 10).to(dtype)
        tot = total if not (corrupt and rng.random() < 0.3) else int(rng.integers(-2, total + 3))
        got = outcome(lambda: pc.ops.unpad(padded, off, tot, left))
        want = outcome(lambda: reference.unpad(padded, off, tot, left))
        assert got[0] == want[0], (what, "unpad", tot, got, want)
        if got[0] == "ok":
            assert torch.equal(got[1], want[1]), what
        # unpad_scatter_ into a destination with gaps, sometimes aliased or out of bounds
        lens = torch.tensor(lengths if not corrupt else np.resize(offsets, batch), dtype=off_dtype)
        dst_rows = total + int(rng.integers(0, 4))
        dst_offsets = torch.tensor(np.concatenate(([0], np.cumsum(lengths)))[:batch], dtype=off_dtype)
        if corrupt and rng.random() < 0.3:
            dst_offsets = dst_offsets + int(rng.integers(-3, 4))
        aliased = rng.random() < 0.15 and padded.numel() > 0 and dst_rows > 0
        if aliased:  # dst is a view of padded: both must refuse, and write nothing
            d1 = d2 = padded.reshape(-1, *padded.shape[2:])[:dst_rows]
            before = padded.clone()
        else:
            d1 = torch.zeros(dst_rows, *padded.shape[2:], dtype=dtype)
            d2 = d1.clone()
        got = outcome(lambda: pc.ops.unpad_scatter_(d1, padded, lens, dst_offsets, left))
        want = outcome(lambda: reference.unpad_scatter_(d2, padded, lens, dst_offsets, left))
        assert got[0] == want[0], (what, "unpad_scatter_", got, want)
        if aliased:
            assert got[0] == "ValueError" and torch.equal(padded, before), (what, got)
        if got[0] == "ok":
            assert torch.equal(d1, d2), what


@pytest.mark.parametrize("seed", [0, 1])
def test_ops_against_reference_on_random_and_corrupt_arguments(seed):
    in_subprocess("ops_cases", seed)


# --- Collator -----------------------------------------------------------------------------------


def _value(rng, kind, dtype, length, trailing):
    if kind == "list":
        x = rng.integers(-50, 50, (length, *trailing))
        return (x % 2 == 0).tolist() if dtype == "bool" else x.tolist()
    base = rng.standard_normal((length, *trailing)) * 20
    arr = base.astype(dtype)
    layout = rng.integers(0, 4)
    if layout == 1 and arr.ndim >= 1:
        arr = np.ascontiguousarray(arr[::-1])[::-1]  # negative strides
    elif layout == 2 and arr.ndim >= 2:
        arr = np.asfortranarray(arr)
    elif layout == 3:
        arr = arr.copy()
        arr.flags.writeable = False
    if kind == "array":
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if rng.random() < 0.3 and t.dim() >= 2:
        t = t.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous view
    return t


def _oracle_field(items, pad_value, left, multiple, dtype):
    """The expected padded field, position by position in Python."""
    lengths = [len(x) for x in items]
    T = max(lengths)
    if multiple:
        T = -(-T // multiple) * multiple
    trailing = tuple(np.asarray(items[0]).shape[1:]) if lengths[0] else None
    out = []
    for x, n in zip(items, lengths):
        rows = [torch.as_tensor(np.asarray(r)).to(dtype) for r in (list(x) if not isinstance(x, torch.Tensor) else x.unbind(0))]
        shape = trailing if trailing is not None else tuple(rows[0].shape) if rows else ()
        pad = [torch.full(shape, pad_value, dtype=dtype)] * (T - n)
        out.append(torch.stack(pad + rows if left else rows + pad) if T else torch.empty(0, *shape, dtype=dtype))
    return torch.stack(out), lengths


def collate_cases(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    kinds = [("array", "float32"), ("array", "int64"), ("array", "uint8"), ("array", "float16"), ("array", "bool"),
             ("tensor", "float32"), ("tensor", "int32"), ("tensor", "float64"), ("list", "int"), ("list", "bool")]
    for case in range(n):
        chosen = [kinds[i] for i in rng.choice(len(kinds), int(rng.integers(1, 4)), replace=False)]
        trailing = [tuple(int(d) for d in rng.integers(1, 3, rng.integers(0, 2))) for _ in chosen]
        batch = int(rng.integers(1, 6))
        left, multiple, pad_value = bool(rng.random() < 0.5), [None, 1, 4][rng.integers(0, 3)], int(rng.integers(0, 2))
        samples = []
        for b in range(batch):
            data = {f"f{j}": _value(rng, k, d, int(rng.integers(1, 5)), t) for j, ((k, d), t) in enumerate(zip(chosen, trailing))}
            samples.append(pc.Sample(100 + b, 0, {"inputs": data, "tag": f"s{b}"}))
        collator = pc.Collator(pad_value=pad_value, padding_side="left" if left else "right", pad_to_multiple_of=multiple)
        got = collator(samples)
        assert got.index.tolist() == [100 + b for b in range(batch)] and got["tag"] == [f"s{b}" for b in range(batch)]
        for j, (k, d) in enumerate(chosen):
            name = f"f{j}"
            items = [s.data["inputs"][name] for s in samples]
            dtype = got["inputs"][name].dtype
            expected, lengths = _oracle_field(items, pad_value, left, multiple, dtype)
            assert got.field_lengths[f"inputs.{name}"].tolist() == lengths, (case, name)
            assert torch.equal(got["inputs"][name], expected), (case, name, k, d)
        assert got.lengths.tolist() == got.field_lengths["inputs.f0"].tolist()  # the primary: the first field


def _mutations(rng, good):
    """A corrupt variant of one sample's data."""
    data = {k: v for k, v in good.items()}
    key = list(data)[rng.integers(0, len(data))]
    kind = rng.integers(0, 8)
    if kind == 0:
        del data[key]
    elif kind == 1:
        data["extra"] = 1
    elif kind == 2:
        data[key] = None
    elif kind == 3:
        data[key] = "text"
    elif kind == 4:
        data[key] = [[1, 2], [3]]  # ragged
    elif kind == 5:
        data[key] = [2**70]
    elif kind == 6:
        data[key] = torch.ones(2, 3, 4)
    else:
        data[key] = [object()]
    return data


def corrupt_collate_cases(seed: int, n: int) -> None:
    from provcollate import collate as collate_module

    rng = np.random.default_rng(seed)
    for case in range(n):
        good = {"ids": list(range(int(rng.integers(1, 4)))), "x": torch.randn(int(rng.integers(1, 4)), 2), "y": 1.5}
        samples = [pc.Sample(i, 0, good if i != 1 else _mutations(rng, good)) for i in range(3)]
        results = []
        for native in (collate_module._native, None):
            saved = collate_module._native
            collate_module._native = native
            try:
                results.append(outcome(lambda: pc.Collator()(samples)))
            finally:
                collate_module._native = saved
        (k1, v1), (k2, v2) = results
        assert k1 == k2, (case, samples[1].data, results)
        if k1 != "ok":
            assert v1 == v2, (case, v1, v2)


@pytest.mark.parametrize("seed", [0, 1])
def test_collate_of_random_layouts_against_an_oracle(seed):
    in_subprocess("collate_cases", seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_corrupt_samples_fail_alike_on_both_paths(seed):
    if not pc.HAS_EXTENSION:
        pytest.skip("compares the compiled collate with the Python one")
    in_subprocess("corrupt_collate_cases", seed)

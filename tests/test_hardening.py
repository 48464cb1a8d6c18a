"""Regression tests for what a hostile user broke (issue 11): each one failed before its fix.

Cases that could crash the interpreter run in a subprocess, so a segfault fails the test
instead of ending the run.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import provcollate as pc
from provcollate import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


# --- 1. owned references while the GIL is released --------------------------------------------


def test_collate_survives_a_thread_replacing_fields():
    # Before: the fused pass held borrowed pointers to the lists and read them after the
    # tensor copies had released the GIL, while this thread freed them (SIGSEGV).
    r = run_python("""
        import threading, torch, provcollate as pc
        samples = [pc.Sample(i, 0, {"x": torch.randn(2000, 64), "ids": list(range(1000)),
                                    "n": {"deep": [1.5] * 50}}) for i in range(32)]
        expected = pc.Collator()(samples)
        stop = False
        def mutate():
            while not stop:
                for s in samples:
                    s.data["ids"] = list(range(1000))
                    s.data["n"] = {"deep": [1.5] * 50}
        t = threading.Thread(target=mutate, daemon=True)
        t.start()
        # The compiled pass is what could crash (150 rounds); the pure-Python one (which hands the
        # GIL to the mutating thread at every torch call and hash) checks the values in fewer.
        for _ in range(150 if pc.HAS_EXTENSION else 40):
            b = pc.Collator()(samples)
            assert torch.equal(b["ids"], expected["ids"]) and torch.equal(b["n"]["deep"], expected["n"]["deep"])
        stop = True
        t.join()
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_collate_of_a_mapping_whose_getitem_runs_python():
    import collections.abc

    class View(collections.abc.Mapping):
        def __init__(self, d):
            self.d = d

        def __getitem__(self, k):
            return list(self.d[k])  # a new object every time: only the pass holds it

        def __iter__(self):
            return iter(self.d)

        def __len__(self):
            return len(self.d)

    samples = [pc.Sample(i, 0, View({"ids": [i] * (i + 1)})) for i in range(5)]
    b = pc.Collator()(samples)
    assert b.field_lengths["ids"].tolist() == [1, 2, 3, 4, 5]
    assert b["ids"][4].tolist() == [4] * 5


# --- 2. the schema never depends on one batch's lengths -----------------------------------------


@pytest.mark.parametrize("kind", ["list", "tensor", "array"])
def test_schema_is_the_same_for_every_batch_of_a_loader(kind):
    make = {"list": lambda n: list(range(1, n + 1)), "tensor": lambda n: torch.arange(1, n + 1),
            "array": lambda n: np.arange(1, n + 1)}[kind]
    data = [{"input_ids": make(3 if i < 49 else 2)} for i in range(50)]  # batches of equal lengths
    loader = DataLoader(pc.Indexed(data), batch_size=7, collate_fn=pc.Collator())
    rec = pc.Recorder(num_items=50)
    for batch in loader:
        assert batch.lengths is not None and batch.mask is not None, batch
        assert set(batch.field_lengths) == {"input_ids"}
        assert batch.mask.shape == batch["input_ids"].shape
        emb = batch["input_ids"].float()[..., None].repeat(1, 1, 2)
        rec.add(batch, emb, per_token=True)
    preds = rec.result()
    assert len(preds.missing()) == 0
    assert preds[49].tolist() == [[1.0, 1.0], [2.0, 2.0]]
    assert preds[0].shape == (3, 2)


def test_a_batch_of_one_has_lengths_and_mask():
    b = pc.Collator()([pc.Sample(0, 0, ([4, 5, 6], 1))])
    assert b.lengths.tolist() == [3] and b.mask.tolist() == [[True, True, True]] and b.max_len == 3


def test_feature_rows_come_out_stacked_with_lengths():
    # Seed scenario 1: rows [10] are features; padding equal lengths is stacking.
    xs = [torch.randn(10) for _ in range(4)]
    b = pc.Collator()([pc.Sample(i, 0, (x, i % 2)) for i, x in enumerate(xs)])
    assert torch.equal(b.data[0], torch.stack(xs))
    assert b.lengths.tolist() == [10] * 4 and bool(b.mask.all())
    assert b.data[1].tolist() == [0, 1, 0, 1]


def test_pad_to_multiple_of_applies_to_equal_lengths_too():
    b = pc.Collator(pad_to_multiple_of=8)([pc.Sample(i, 0, [1, 2, 3]) for i in range(3)])
    assert b.data.shape == (3, 8) and b.max_len == 8 and b.lengths.tolist() == [3, 3, 3]


def test_packed_equal_lengths_are_packed():
    b = pc.Collator(packed=True)([pc.Sample(i, 0, torch.ones(4, 2)) for i in range(3)])
    assert b.data.shape == (12, 2) and b.offsets.tolist() == [0, 4, 8, 12]
    assert torch.equal(b.padded().data, torch.ones(3, 4, 2))


def test_stack_keeps_fixed_size_fields_out_of_packing():
    samples = [pc.Sample(i, 0, {"pixels": torch.full((3, 2, 2), float(i)), "ids": list(range(i + 1))}) for i in range(3)]
    b = pc.Collator(packed=True, pad_to_multiple_of=4, stack=["pixels"])(samples)
    assert b["pixels"].shape == (3, 3, 2, 2) and "pixels" not in b.field_lengths
    assert b["ids"].shape == (6,) and b.offsets.tolist() == [0, 1, 3, 6]
    with pytest.raises(ValueError, match="field 'pixels' of sample 1 has length 4, but sample 0 has length 3"):
        pc.Collator(stack=["pixels"])([pc.Sample(i, 0, {"pixels": torch.ones(3 + i)}) for i in range(2)])
    with pytest.raises(ValueError, match="stack= also names"):
        pc.Collator(stack=["ids"], primary="ids")(samples)
    with pytest.raises(TypeError, match="stack must be a list of field paths"):
        pc.Collator(stack="pixels")


# --- 3. aliasing arguments of unpad_scatter_ ----------------------------------------------------


def _aliasing_cases():
    base = torch.arange(200.0)
    yield "dst is padded", base[:40].view(20, 2), base[:40].view(2, 10, 2)
    yield "dst inside padded", base[10:30].view(10, 2), base[:40].view(2, 10, 2)
    yield "padded inside dst", base[:100].view(50, 2), base[20:60].view(2, 10, 2)
    yield "interleaved", base[:80].view(40, 2)[:, 0:1], base[:80].view(2, 20, 2)[:, :, 1:]


@pytest.mark.parametrize("fn", [pc.ops.unpad_scatter_, reference.unpad_scatter_], ids=["ops", "reference"])
def test_unpad_scatter_refuses_overlapping_arguments(fn):
    for what, dst, padded in _aliasing_cases():
        before = dst.clone()
        lengths = torch.tensor([3, 4])
        with pytest.raises(ValueError, match="dst and padded share memory"):
            fn(dst, padded, lengths, torch.tensor([0, 5]))
        assert torch.equal(dst, before), what
    offsets = torch.zeros(4, dtype=torch.int64)
    dst = offsets.view(4, 1)
    with pytest.raises(ValueError, match="dst and dst_offsets share memory"):
        fn(dst, torch.zeros(4, 1, 1, dtype=torch.int64), torch.ones(4, dtype=torch.int64), offsets)
    with pytest.raises(ValueError, match="dst has elements that share memory"):
        fn(torch.zeros(1, 2).expand(6, 2), torch.ones(2, 3, 2), torch.tensor([3, 3]), torch.tensor([0, 3]))


def test_unpad_scatter_takes_disjoint_views_of_one_buffer():
    buf = torch.arange(100.0)
    dst, padded = buf[:20].view(10, 2), buf[40:80].view(2, 10, 2)
    expected = reference.unpad_scatter_(dst.clone(), padded.clone(), torch.tensor([3, 4]), torch.tensor([0, 5]))
    pc.ops.unpad_scatter_(dst, padded, torch.tensor([3, 4]), torch.tensor([0, 5]))
    assert torch.equal(dst, expected)


# --- 4. two fields with one path ----------------------------------------------------------------


@pytest.mark.parametrize("data", [{"a.b": [1], "a": {"b": [2, 3]}}, {0: [1], "0": [2]}, {"x": ([1], [2]), "x.0": [3]}],
                         ids=["dotted", "int-and-str", "position"])
def test_two_fields_with_one_path_raise(data):
    with pytest.raises(ValueError, match="two fields of sample 0 have the path"):
        pc.Collator()([pc.Sample(0, 0, data)])


# --- 6. the pure-PyTorch paths agree with the compiled ones -------------------------------------


def test_numpy_scalars_in_lists_collate_without_the_extension_too():
    samples = [pc.Sample(0, 0, [np.int64(6), np.True_]), pc.Sample(1, 0, [1])]
    from provcollate import collate as collate_module

    plan = collate_module._Plan(pc.Collator(), samples[0])
    got = collate_module._collate_python(samples, plan.walk, tuple(plan.leaves), False, 0, False, False,
                                         torch.get_default_dtype(), plan.primary)
    assert got[2][0][0].tolist() == [[6, 1], [1, 0]]
    assert pc.Collator()(samples).data.tolist() == [[6, 1], [1, 0]]


def test_provcollate_extension_0_runs_the_python_paths():
    r = run_python("""
        import warnings
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import provcollate as pc, provcollate.collate as c
            from provcollate.store import FastPath
        assert not pc.HAS_EXTENSION and c._native is None and not FastPath.available()
        assert [str(x.message) for x in w if "PROVCOLLATE_EXTENSION=0" in str(x.message)], [str(x.message) for x in w]
        b = pc.Collator()([pc.Sample(0, 0, [1, 2]), pc.Sample(1, 0, [3])])
        assert b.data.tolist() == [[1, 2], [3, 0]]
        print("ok")
    """, PROVCOLLATE_EXTENSION="0")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    r = run_python("import provcollate", PROVCOLLATE_EXTENSION="yes")
    assert r.returncode != 0 and "PROVCOLLATE_EXTENSION must be '0' or '1', got 'yes'" in r.stderr


# --- clear errors -------------------------------------------------------------------------------


def test_pad_to_multiple_of_is_bounded_at_the_edge():
    for bad in (2**62, 2**63 - 1, 2**63, 0, -8):
        with pytest.raises(ValueError, match=r"pad_to_multiple_of must be in \[1, 1048576\]"):
            pc.Collator(pad_to_multiple_of=bad)
    with pytest.raises(TypeError, match="pad_to_multiple_of must be None or an int"):
        pc.Collator(pad_to_multiple_of=8.0)


def test_hand_built_batch_validates_padding_side():
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'middle'"):
        pc.Batch(index=torch.tensor([0]), view=torch.tensor([0]), data=torch.ones(1, 2), padding_side="middle")


@pytest.mark.parametrize("impl", ["native", "python"])
def test_collate_dtype_errors_name_the_field(impl, monkeypatch):
    from provcollate import collate as collate_module

    if impl == "python":
        monkeypatch.setattr(collate_module, "_native", None)
    samples = [pc.Sample(0, 0, {"x": torch.ones(2, dtype=torch.int64)}), pc.Sample(1, 0, {"x": torch.ones(2, dtype=torch.uint16)})]
    with pytest.raises(TypeError, match="field 'x' of sample 1 has dtype torch.uint16, which torch cannot promote with torch.int64"):
        pc.Collator()(samples)
    with pytest.raises(ValueError, match="field 'n' of sample 1 is an int too large for float64"):
        pc.Collator()([pc.Sample(0, 0, {"n": 1.5}), pc.Sample(1, 0, {"n": 10**400})])
    with pytest.raises(ValueError, match="pad value 100000.0 of field 'h' does not fit its dtype torch.float16"):
        pc.Collator(pad_value=1e5)([pc.Sample(i, 0, {"h": torch.ones(i + 1, dtype=torch.float16)}) for i in range(2)])


@pytest.mark.parametrize("fn", [pc.ops.pad, reference.pad], ids=["ops", "reference"])
def test_pad_value_that_overflows_to_inf_raises(fn):
    with pytest.raises(ValueError, match="cannot be represented"):
        fn(torch.ones(3, dtype=torch.float16), torch.tensor([0, 1, 3]), 2, 1e5)
    assert fn(torch.ones(3, dtype=torch.float16), torch.tensor([0, 1, 3]), 2, float("inf"))[0, 1].item() == float("inf")
    assert fn(torch.ones(3, dtype=torch.bfloat16), torch.tensor([0, 1, 3]), 2, 1e5)[0, 1].item() > 9e4


def test_ops_of_values_below_their_alignment():
    # complex128 at an address that is 8 mod 16, as torch.frombuffer allows. Before: an INTERNAL
    # ASSERT in pad; torch's own typed kernels (copy_, index_put) crash on such data, so the case
    # runs in a subprocess, on both paths.
    code = """
        import numpy as np, torch, provcollate as pc
        from provcollate import reference

        def misaligned(n):
            raw = bytearray(16 * (n + 2))
            offset = (8 - torch.frombuffer(raw, dtype=torch.uint8).data_ptr()) % 16
            raw[offset:offset + 16 * n] = (np.arange(n) * (1 + 2j)).astype(np.complex128).tobytes()
            t = torch.frombuffer(raw, dtype=torch.complex128, offset=offset, count=n)
            assert t.data_ptr() % 16 == 8
            return t, raw

        values, keep = misaligned(5)
        aligned = torch.from_numpy((np.arange(5) * (1 + 2j)).astype(np.complex128))
        offsets = torch.tensor([0, 2, 5])
        for left in (False, True):
            assert torch.equal(pc.ops.pad(values, offsets, 4, 7, left), reference.pad(aligned, offsets, 4, 7, left))
        padded, keep2 = misaligned(8)
        padded = padded.view(2, 4)
        expected = torch.from_numpy((np.arange(8) * (1 + 2j)).astype(np.complex128)).view(2, 4)
        assert torch.equal(pc.ops.unpad(padded, offsets, 5), reference.unpad(expected, offsets, 5))
        print("ok")
    """
    for flag in ("1", "0"):
        r = run_python(code, PROVCOLLATE_EXTENSION=flag)
        assert r.returncode == 0 and "ok" in r.stdout, (flag, r.stderr[-3000:])


@pytest.mark.parametrize("op", ["pad", "unpad"])
def test_sizes_past_int64_raise_the_same_on_both_paths(op, monkeypatch):
    from provcollate import ops

    for has in (True, False):
        monkeypatch.setattr(ops, "HAS_EXTENSION", has and pc.HAS_EXTENSION)
        for bad in (2**63, -(2**63) - 1):
            with pytest.raises(ValueError, match=f"{op}: (max_len|total) must fit in int64, got {bad}"):
                if op == "pad":
                    ops.pad(torch.ones(3), torch.tensor([0, 3]), bad)
                else:
                    ops.unpad(torch.ones(1, 3), torch.tensor([0, 3]), bad)


# --- 5. damaged shards --------------------------------------------------------------------------


def _shard_dir(tmp_path):
    rec = pc.Recorder(num_items=64)
    rec.add(torch.arange(64), torch.full((64, 32), 1.0))
    rec.write(tmp_path)
    (file,) = sorted(tmp_path.glob("part-*.parquet"))
    return file


def test_a_flipped_bit_in_a_value_page_raises(tmp_path):
    file = _shard_dir(tmp_path)
    assert torch.equal(pc.Predictions.read(tmp_path).tensor(), torch.ones(64, 32))
    data = bytearray(file.read_bytes())
    at = data.find(np.float32(1.0).tobytes() * 64)  # inside the output column's only page
    assert at > 0
    data[at + 100] ^= 0x01  # 1.0 becomes 1.0000001: valid-looking data
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{file.name} is damaged"):
        pc.Predictions.read(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "directory", "foreign parquet", "bad metadata"])
def test_damaged_shards_raise_value_error_naming_the_file(tmp_path, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = _shard_dir(tmp_path)
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "garbage":
        file.write_bytes(os.urandom(4096))
    elif damage == "directory":
        (tmp_path / "part-r00000-000001.parquet").mkdir()
        file = tmp_path / "part-r00000-000001.parquet"
    elif damage == "foreign parquet":
        pq.write_table(pa.table({"a": [1, 2]}), file)
    else:
        table = pq.read_table(file)
        pq.write_table(table.replace_schema_metadata({b"provcollate.shard": b"{not json"}), file)
    with pytest.raises(ValueError, match=f"Predictions.read: .*{file.name}"):
        pc.Predictions.read(tmp_path)
    with pytest.raises(ValueError, match=f"Recorder: .*{file.name}|{file.name}"):
        pc.Recorder(num_items=64, resume=tmp_path)


def test_missing_io_packages_name_the_io_extra():
    r = run_python("""
        import sys
        sys.modules["pandas"] = None
        sys.modules["pyarrow"] = None
        import torch, provcollate as pc
        rec = pc.Recorder(num_items=2)
        rec.add(torch.tensor([0, 1]), torch.ones(2, 3))
        for call in (rec.result().to_pandas, rec.result().to_arrow):
            try:
                call()
            except ImportError as e:
                assert "[io] extra" in str(e), e
            else:
                raise AssertionError("no ImportError")
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]

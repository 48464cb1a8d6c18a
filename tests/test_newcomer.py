"""A newcomer's first hour (issue 14): install behaviour, errors that teach, reprs."""
import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

import provcollate as pc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_module():
    spec = importlib.util.spec_from_file_location("provcollate_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_setup_without_torch_stops_at_once_naming_no_build_isolation():
    # What pip's build isolation looks like to setup.py: no torch to import.
    code = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', 'bdist_wheel']; " \
           "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__'})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--no-build-isolation" in proc.stderr
    assert "python -m build --no-isolation" in proc.stderr


def test_pyproject_does_not_require_torch_to_build():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    requires = next(line for line in text.splitlines() if line.startswith("requires"))
    assert "torch" not in requires
    assert 'version = { attr = "provcollate.__version__" }' in text


def test_cuda_build_without_gpu_or_arch_list_gets_a_default(monkeypatch, capsys):
    setup = _setup_module()
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    setup._default_cuda_archs()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == setup._DEFAULT_CUDA_ARCHS
    assert "TORCH_CUDA_ARCH_LIST" in capsys.readouterr().err
    # A list the user set is left alone.
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    setup._default_cuda_archs()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"


def test_build_info_mismatch_warning_names_both_versions_and_the_fix(tmp_path):
    info = tmp_path / "_build_info.json"
    info.write_text(json.dumps({"torch": "2.14.1+cu128", "cuda": "12.8"}))
    with pytest.warns(RuntimeWarning, match=r"built against torch 2\.14\.1\+cu128 but torch 2\.13\.0 is running") as rec:
        pc._check_build_torch(str(info), "2.13.0")
    assert "--no-build-isolation" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pc._check_build_torch(str(info), "2.14.1+cu128")  # same torch: silent
        pc._check_build_torch(str(tmp_path / "absent.json"), "2.13.0")  # no record: silent


def test_package_ships_py_typed_and_license():
    assert os.path.exists(os.path.join(ROOT, "provcollate", "py.typed"))
    assert "BSD 3-Clause" in open(os.path.join(ROOT, "LICENSE")).read()
    assert "py.typed" in open(os.path.join(ROOT, "pyproject.toml")).read()


def test_default_collate_batch_to_recorder_says_to_use_the_collator():
    ds = pc.Indexed([torch.ones(3)] * 4)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    rec = pc.Recorder(num_items=4)
    with pytest.raises(TypeError, match=r"pc\.Collator batch or an index tensor.*collate_fn=pc\.Collator"):
        rec.add(batch, torch.zeros(2))
    with pytest.raises(TypeError, match="list of Samples"):
        rec.add([ds[0], ds[1]], torch.zeros(2))
    rec.add(torch.tensor([0, 2]), torch.zeros(2))  # nothing recorded was changed by the failures
    assert rec.result().index.tolist() == [0, 2]


def test_unrecorded_and_negative_keys_point_to_missing():
    rec = pc.Recorder(num_items=10)
    rec.add(torch.tensor([0, 2]), torch.arange(2.0))
    preds = rec.result()
    with pytest.raises(KeyError, match=r"item 7 was not recorded; preds\.missing\(\)"):
        preds[7]
    with pytest.raises(KeyError, match=r"dataset indices \(>= 0\), not positions, got preds\[-1\]"):
        preds[-1]
    assert preds[2].item() == 1.0


def test_batch_sampler_passed_as_sampler_says_batch_sampler():
    ds = pc.Indexed([torch.ones(n) for n in (3, 1, 2, 5)])
    sampler = pc.LengthBucketSampler([3, 1, 2, 5], batch_size=2)
    loader = DataLoader(ds, sampler=sampler, collate_fn=pc.Collator())
    with pytest.raises(TypeError, match=r"batch_sampler=sampler\), not sampler="):
        next(iter(loader))
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=pc.Collator())
    assert sorted(int(i) for b in loader for i in b.index) == [0, 1, 2, 3]


def test_reprs():
    assert repr(pc.Indexed(list(range(5)), views=2, seed=3)) == "Indexed(list of 5 items, views=2, seed=3)"
    assert repr(pc.Indexed(list(range(5)))) == "Indexed(list of 5 items, views=1)"
    sampler = pc.LengthBucketSampler([3, 1, 2, 5, 4], batch_size=2)
    assert repr(sampler) == "LengthBucketSampler(5 examples, batch_size=2, 3 batches, shuffle=False, rank 0 of 1, epoch=0)"
    rec = pc.Recorder(num_items=4)
    rec.add(torch.tensor([0, 2]), torch.zeros(2))
    assert "missing=2" in repr(rec.result())
    rec = pc.Recorder()
    rec.add(torch.tensor([0, 2]), torch.zeros(2))
    assert "missing" not in repr(rec.result())


def test_readme_quickstart_runs_as_a_script():
    # The Quickstart's body sits under `if __name__ == "__main__":` (spawn-safe); run it as a script would.
    import re

    text = open(os.path.join(ROOT, "README.md")).read()
    quick = text.split("## Quickstart", 1)[1]
    block = re.search(r"```python\n(.*?)```", quick, re.S).group(1)
    assert 'if __name__ == "__main__":' in block
    scope = {"__name__": "__main__"}
    exec(compile(block, "README.md Quickstart", "exec"), scope)
    assert len(scope["df"]) == 100


def test_api_reference_renders_types_as_written():
    spec = importlib.util.spec_from_file_location("gen_api", os.path.join(ROOT, "docs", "gen_api.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.render()
    assert "provcollate.Sample(index: int, view: int, data: Any, key: Any = None)" in text
    assert "Collator.__call__(self, samples) -> Batch`" in text
    assert "ForwardRef" not in text and "\"'" not in text


def test_items_longer_than_max_len_raise_as_the_ops_docstrings_say():
    values, offsets = torch.arange(5.0), torch.tensor([0, 3, 5])
    assert "not a truncation" in pc.ops.pad.__doc__ and "FBGEMM" in pc.ops.pad.__doc__
    with pytest.raises(ValueError, match="item 0 has length 3 .* more than max_len = 2"):
        pc.ops.pad(values, offsets, 2)
    with pytest.raises(ValueError, match="item 0 has length 3"):
        pc.ops.unpad(torch.zeros(2, 2), offsets, 5)


def test_lengths_of_progress_bar_and_log(capsys, caplog):
    pytest.importorskip("tqdm")
    data = [[0] * n for n in (3, 1, 4, 1, 5)]
    with caplog.at_level("INFO", logger="provcollate"):
        got = pc.lengths_of(data, progress=True)
    assert got.tolist() == [3, 1, 4, 1, 5]
    assert "lengths_of" in capsys.readouterr().err  # tqdm writes its bar to stderr
    assert "lengths_of: 5 items, longest 5" in caplog.text
    with pytest.raises(TypeError, match="progress must be a bool, got str"):
        pc.lengths_of(data, progress="yes")


def test_gather_logs_what_it_merged(tmp_path, caplog):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        rec = pc.Recorder(num_items=4)
        rec.add(torch.tensor([3, 1]), torch.tensor([3.0, 1.0]))
        with caplog.at_level("INFO", logger="provcollate"):
            preds = rec.gather()
    finally:
        dist.destroy_process_group()
    assert preds.index.tolist() == [1, 3] and preds[3].item() == 3.0
    assert "Recorder.gather: 2 entries from 1 ranks" in caplog.text


def test_per_token_mismatch_suggests_per_token():
    rec = pc.Recorder(num_items=4)
    rec.add(torch.tensor([0]), torch.zeros(1, 3, 2), per_token=True, lengths=[3])
    with pytest.raises(ValueError, match=r"first add recorded it per token: pass per_token=True"):
        rec.add(torch.tensor([1]), torch.zeros(1, 3, 2), lengths=None)
    rec = pc.Recorder(num_items=4)
    rec.add(torch.tensor([0]), {"tok": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match=r"first add recorded it per example: pass per_token=a set without it"):
        rec.add(torch.tensor([1]), {"tok": torch.zeros(1, 3, 2)}, per_token={"tok"}, lengths=[3])
    rec.add(torch.tensor([1]), {"tok": torch.ones(1, 2)})  # the failures changed nothing
    assert rec.result().index.tolist() == [0, 1]


def test_every_subpackage_is_installed():
    """A plain (non-editable) install ships every package directory: provcollate.integrations too."""
    import tomllib

    listed = set(tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(root, ROOT).replace(os.sep, ".") for root, _, files in os.walk(os.path.join(ROOT, "provcollate"))
             if "__init__.py" in files}
    assert found == listed, f"pyproject.toml [tool.setuptools] packages must list {sorted(found)}"


def test_shards_without_pyarrow_name_the_io_extra(tmp_path):
    code = ("import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None\n"
            "import torch, provcollate as pc\n"
            "rec = pc.Recorder(num_items=2); rec.add(torch.tensor([0]), torch.ones(1))\n"
            f"rec.write({str(tmp_path / 'out')!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "[io]" in proc.stderr and "Recorder.write" in proc.stderr

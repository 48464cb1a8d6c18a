"""``python -m provcollate inspect|export`` on a shard directory."""
import os
import subprocess
import sys

import pytest
import torch

import provcollate as pc
from provcollate import cli

pytest.importorskip("pyarrow")


def _run(tmp_path):
    """Two writes (shards) of a Recorder of 6 items; items 1 and 4 never recorded, item 0 twice."""
    out = tmp_path / "out"
    rec = pc.Recorder(num_items=6, on_duplicate="last")
    rec.add(torch.tensor([0, 2]), {"score": torch.tensor([1.0, 2.0]), "tok": torch.arange(8.0).view(2, 2, 2)},
            per_token={"tok"}, lengths=[2, 1])
    rec.write(out)
    rec.add(torch.tensor([3, 5, 0]), {"score": torch.tensor([3.0, 5.0, 9.0]), "tok": torch.ones(3, 1, 2)},
            per_token={"tok"}, lengths=[1, 1, 1])
    rec.write(out)
    return out, rec.result()


def test_inspect_summarises_the_shards(tmp_path):
    out, _ = _run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "provcollate", "inspect", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "items:     4 of num_items=6" in text
    assert "missing:   2" in text
    assert "repeats:   1 (kept the latest record (on_duplicate='last')); records 5, shard rows 5" in text
    assert "shards:    2 from 1 rank(s)" in text
    assert "score: per-example float32 row shape []" in text
    assert "tok: per-token float32 row shape [2]" in text


def test_export_merges_into_one_table_equal_to_the_run(tmp_path):
    out, expected = _run(tmp_path)
    target = tmp_path / "preds.parquet"
    assert cli.main(["export", str(out), str(target)]) == 0
    got = pc.Predictions.read(str(target))
    assert got.index.tolist() == expected.index.tolist() == [0, 2, 3, 5]
    assert torch.equal(got.tensor("score"), expected.tensor("score"))
    assert got[0]["score"].item() == 9.0  # on_duplicate="last"
    for a, b in zip(got.jagged("tok"), expected.jagged("tok")):
        assert torch.equal(a, b)


def test_errors_name_the_path(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope")]) == 1
    assert "must be a directory of shards" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path)]) == 1
    assert "no shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])


def test_predictions_read_logs_what_it_read(tmp_path, caplog):
    out, _ = _run(tmp_path)
    with caplog.at_level("INFO", logger="provcollate"):
        pc.Predictions.read(str(out))
    assert f"Predictions.read: 4 entries from {out}" in caplog.text


def test_recorder_write_logs_each_shard(tmp_path, caplog):
    with caplog.at_level("INFO", logger="provcollate"):
        out, _ = _run(tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Recorder.write:")]
    assert len(lines) == 2
    assert lines[0].startswith("Recorder.write: 2 entries, ") and "part-r00000-000000.parquet" in lines[0]
    assert lines[1].startswith("Recorder.write: 3 entries, ")


@pytest.mark.parametrize("damage", ["truncated", "empty"])
@pytest.mark.parametrize("command", ["inspect", "export"])
def test_a_damaged_shard_is_named(tmp_path, capsys, damage, command):
    out, _ = _run(tmp_path)
    shard = out / "part-r00000-000001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    target = tmp_path / "preds.parquet"
    assert cli.main([command, str(out)] + ([str(target)] if command == "export" else [])) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    assert str(shard) in err, err
    assert not target.exists()


def test_a_fifo_named_like_a_shard_is_refused_without_blocking(tmp_path):
    out, _ = _run(tmp_path)
    fifo = out / "part-r00000-000002.parquet"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer that never comes
    target = tmp_path / "preds.parquet"
    script = (
        "import sys, provcollate as pc\n"
        "from provcollate import cli\n"
        "out, target = sys.argv[1:]\n"
        "assert cli.main(['inspect', out]) == 1\n"
        "assert cli.main(['export', out, target]) == 1\n"
        "try:\n"
        "    pc.Predictions.read(out)\n"
        "except ValueError as exc:\n"
        "    print(f'read: {exc}', file=sys.stderr)\n"
        "else:\n"
        "    raise AssertionError('Predictions.read accepted a FIFO')\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", script, str(out), str(target)],
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading a shard directory holding the FIFO {fifo} did not return within 120 s")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, proc.stderr
    for line in lines:
        assert str(fifo) in line and "not a regular file" in line, line
    assert not target.exists()


def test_export_of_outputs_parquet_cannot_hold_is_a_one_line_error(tmp_path):
    out = tmp_path / "out"
    rec = pc.Recorder(num_items=2)
    rec.add(torch.tensor([0, 1]), torch.tensor([1 + 2j, 3j], dtype=torch.complex64))
    rec.write(out)
    target = tmp_path / "preds.parquet"
    proc = subprocess.run([sys.executable, "-m", "provcollate", "export", str(out), str(target)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "complex64" in proc.stderr and str(target) in proc.stderr
    assert proc.stdout == "" and not target.exists()

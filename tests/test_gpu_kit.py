"""The GPU proof kit's dry run (`make gpu-check DRY_RUN=1`) on this machine, so the kit cannot rot."""
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = sorted(p.name for p in results.iterdir())
    env = dict(os.environ, OUT=str(tmp_path))
    run = subprocess.run(["make", "-s", "gpu-check", "DRY_RUN=1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    page = (tmp_path / "gpu-dry-run.md").read_text()
    assert page.startswith("# GPU proof kit: DRY RUN"), page
    for step in ("build", "pytest -m cuda", "compute-sanitizer memcheck"):
        assert f"| {step} | skipped:" in page
    assert "| bert end to end (cpu) | pass |" in page
    assert "| smoke (cpu) | pass |" in page and "| bench (cpu, tiny) | pass |" in page
    assert "| pad | " in page and "| copy bound | " in page
    assert (tmp_path / "gpu-check.log").exists()
    assert run.stdout.strip().splitlines()[-1].startswith("| bench (cpu, tiny) | pass")
    assert sorted(p.name for p in results.iterdir()) == before, "a dry run wrote into benchmarks/results/"

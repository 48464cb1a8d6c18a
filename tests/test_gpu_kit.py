"""The GPU proof kit (`make gpu-check`) on this CPU machine, so that it cannot rot between lends:
its dry run passes and writes nowhere but $OUT, and a failing or hanging step fails the kit."""
import os
import pathlib
import stat
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
RAN = ("machine", "gpu-deps (for the carry)", "pytest (collects; CUDA tests skip)", "smoke (cpu)",
       "bert end to end (cpu)", "bench (cpu, tiny)")
SKIPPED = ("build", "compute-sanitizer memcheck", "compute-sanitizer racecheck")


def test_gpu_check_dry_run(tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = sorted(p.name for p in results.iterdir())
    run = subprocess.run(["make", "-s", "gpu-check", "DRY_RUN=1"], cwd=ROOT, env=dict(os.environ, OUT=str(tmp_path)),
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout + run.stderr
    page = (tmp_path / "gpu-dry-run.md").read_text()
    assert page.startswith("# GPU proof kit: DRY RUN"), page
    for step in RAN:
        assert f"| {step} | pass |" in page, page
    for step in SKIPPED:
        assert f"| {step} | skipped:" in page, page
    assert "## Machine" in page and "- torch: " in page
    for op in ("pad", "unpad", "unpad_scatter_"):  # the speed summary, one row per shape and op
        assert f" float32 | {op} | " in page
    assert "| aten._jagged_to_padded_dense_forward |" in page and "### Recorder.add with outputs on the device" in page
    assert (tmp_path / "gpu-check.log").exists()
    assert run.stdout.strip().splitlines()[-1].startswith("| compute-sanitizer racecheck | skipped"), run.stdout
    assert sorted(p.name for p in results.iterdir()) == before, "a dry run wrote into benchmarks/results/"
    deps = ROOT / "build" / "gpu-deps"  # what the GPU run needs carried: hypothesis, ninja
    assert (deps / "hypothesis" / "__init__.py").exists() and (deps / "bin" / "ninja").exists()


def test_gpu_check_fails_when_a_step_fails_or_hangs(tmp_path):
    """Every step's outcome reaches the table and the exit code: an interpreter that fails every
    script but hangs in the smoke test; the hang is cut at the budget, later steps are not run."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\ncase \"$*\" in *smoke.py*) exec sleep 120;; esac\necho \"boom: $*\"\nexit 3\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, OUT=str(tmp_path), DRY_RUN="1", GPU_PYTHON=str(python), GPU_CHECK_BUDGET_S="16")
    run = subprocess.run(["bash", "gpu/check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    table = run.stdout[run.stdout.rindex("| step |"):]
    assert "| machine | FAIL: exit 3 |" in table and "| pytest (collects; CUDA tests skip) | FAIL: exit 3 |" in table
    assert "| smoke (cpu) | FAIL: timed out |" in table
    assert "| bert end to end (cpu) | NOT RUN: the 16 s budget was spent |" in table
    page = (tmp_path / "gpu-dry-run.md").read_text()
    assert "## Failures" in page and "boom: gpu/env.py cpu" in page

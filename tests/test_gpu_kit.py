"""The GPU proof kit (`make gpu-check`) on this CPU machine, so that it cannot rot between lends:
its dry run passes in a fresh clone and writes nowhere but $OUT, and a failing or hanging step fails the kit."""
import os
import pathlib
import shutil
import stat
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
RAN = ("machine", "gpu-deps (for the carry)", "pytest (collects; CUDA tests skip)", "smoke (cpu)",
       "bert end to end (cpu)", "bench (cpu, tiny)")
SKIPPED = ("build", "compute-sanitizer memcheck", "compute-sanitizer racecheck")
# What a make that runs this test passes to the makes it starts (its command-line variables
# among them, VENV=... included): the clone's make must see none of it.
MAKE_STATE = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "VENV", "GPU_PYTHON", "DRY_RUN")


def test_gpu_check_dry_run_in_a_fresh_clone(tmp_path):
    """`make gpu-check DRY_RUN=1` in a `git clone` of HEAD, with no venv and no extension: it sets
    up both as `make test` does, then every step runs. The clone is HEAD's, what CI checks out: edits
    not committed (the kit's own among them) are not in it, and neither is a half-done edit of
    someone else's in a shared tree. The set-up is the real one, with nothing reused from this
    checkout: a venv of its own (torch and requirements-dev.txt from the index pip is configured
    with, about 2 minutes here) and the extension built in place (2.5 to 7 minutes on 2 shared
    cores), then about a minute of steps. Pointing the clone at this checkout's venv (VENV=...) would
    be quicker but wrong: its `make build` would install the clone into that venv in editable mode."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, capture_output=True, timeout=120)
    out = tmp_path / "out"
    assert not (clone / ".venv").exists() and not list((clone / "provcollate").glob("_C*.so"))
    results = clone / "benchmarks" / "results"
    before = sorted(p.name for p in results.iterdir())
    env = {k: v for k, v in os.environ.items() if k not in MAKE_STATE}
    run = subprocess.run(["make", "-s", "gpu-check", "DRY_RUN=1"], cwd=clone, env=dict(env, OUT=str(out)),
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert (clone / ".venv" / ".deps").exists() and list((clone / "provcollate").glob("_C*.so")), "the dry run set up nothing"
    page = (out / "gpu-dry-run.md").read_text()
    assert page.startswith("# GPU proof kit: DRY RUN"), page
    for step in RAN:
        assert f"| {step} | pass |" in page, page
    for step in SKIPPED:
        assert f"| {step} | skipped:" in page, page
    assert "## Machine" in page and "- torch: " in page
    for op in ("pad", "unpad", "unpad_scatter_"):  # the speed summary, one row per shape and op
        assert f" float32 | {op} | " in page
    assert "| aten._jagged_to_padded_dense_forward |" in page and "### Recorder.add with outputs on the device" in page
    assert (out / "gpu-check.log").exists()
    assert run.stdout.strip().splitlines()[-1].startswith("| compute-sanitizer racecheck | skipped"), run.stdout
    assert sorted(p.name for p in results.iterdir()) == before, "a dry run wrote into benchmarks/results/"
    deps = clone / "build" / "gpu-deps"  # what the GPU run needs carried: hypothesis, ninja
    assert (deps / "hypothesis" / "__init__.py").exists() and (deps / "bin" / "ninja").exists()
    shutil.rmtree(clone)  # 2 GiB of venv; pytest keeps the last 3 runs' tmp_path, so a failing clone stays to look at


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

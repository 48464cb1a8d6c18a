"""Every benchmark script runs end to end on small sizes (numbers are measured, never asserted)."""
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SCRIPTS = sorted(f for f in os.listdir(BENCH) if f.startswith("bench_") and f.endswith(".py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_quick_run(script):
    out = subprocess.run([sys.executable, os.path.join(BENCH, script), "--quick"], cwd=BENCH,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert out.stdout.strip(), "a benchmark must print its table"


def test_bench_ops_cold_caches_quick_run():
    out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_ops.py"), "--quick", "--cache", "cold"], cwd=BENCH,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "cold caches" in out.stdout and "| unpad |" in out.stdout


def test_bench_collate_floors_quick_run():
    """benchmarks/floors.cpp compiles and its lower bounds run beside the collates."""
    out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_collate.py"), "--quick", "--floors"], cwd=BENCH,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "floor: read every int" in out.stdout and "floor: bare C++ pad" in out.stdout
    assert "floor: write the batch's bytes once" in out.stdout


def test_bench_record_floors_quick_run():
    """floors.cpp's scatter_rows runs beside the plain-index add (and its rows are checked)."""
    out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_record.py"), "--quick", "--floors"], cwd=BENCH,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert out.stdout.count("floor: claims and copies alone") == 4

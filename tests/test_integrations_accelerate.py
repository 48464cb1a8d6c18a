"""examples/accelerate_predict.py (prepare + Recorder + gather, even_batches repeats) in one process and
over 2 gloo processes under torchrun; the script checks every prediction against the model alone."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "accelerate_predict.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("processes", [1, 2])
def test_accelerate_recipe(processes):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if processes == 1:
        command = [sys.executable, str(EXAMPLE)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", "--master-addr=127.0.0.1",
                   f"--master-port={free_port()}", str(EXAMPLE)]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"accelerate ({processes} process(es)): 41 items, every prediction checked, gather_for_metrics agrees" in run.stdout

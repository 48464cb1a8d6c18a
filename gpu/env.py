"""GPU proof kit, step "machine": what the kit will run with, as a list for the results page.

Fails (on a GPU run) only for what no later step could do without: a CUDA device visible to
torch, a CUDA build of torch, and nvcc for the build. Everything else is reported.

    python gpu/env.py cuda|cpu
"""
import importlib.util
import os
import platform
import shutil
import subprocess
import sys

import torch


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "missing"
    return getattr(__import__(module), "__version__", "present")


def _which(name: str) -> str:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which(name) or shutil.which(name, path=os.path.join(cuda_home, "bin")) or ""


def _first_line(cmd) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return "cannot run"
    return out[-1] if out else "no output"


def main() -> None:
    want_device = sys.argv[1] == "cuda"
    nvcc, sanitizer, ninja = _which("nvcc"), _which("compute-sanitizer"), shutil.which("ninja")
    facts = {
        "python": f"{sys.executable} {platform.python_version()}",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "device": (f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
                   f"{torch.cuda.device_count()} visible" if torch.cuda.is_available() else "none visible to torch"),
        "CPU cores": str(os.cpu_count()),
        "CUDA_HOME": os.environ.get("CUDA_HOME", "unset"),
        "nvcc": f"{nvcc}: {_first_line([nvcc, '--version'])}" if nvcc else "not found",
        "compute-sanitizer": f"{sanitizer}: {_first_line([sanitizer, '--version'])}" if sanitizer else "not found",
        "ninja": f"{ninja} {_first_line([ninja, '--version'])}" if ninja else "not found (the build compiles one file at a time)",
        **{name: _version(name) for name in ("setuptools", "numpy", "pytest", "hypothesis", "transformers", "triton")},
    }
    for name, value in facts.items():
        print(f"- {name}: {value}")
    problems = []
    if want_device:
        if not torch.version.cuda:
            problems.append("this torch is not a CUDA build")
        if not torch.cuda.is_available():
            problems.append("torch sees no CUDA device")
        if not nvcc:
            problems.append("no nvcc (set CUDA_HOME): the extension cannot be built")
    if problems:
        raise SystemExit("machine: " + "; ".join(problems))
    print(f"machine: ready for the {'GPU run' if want_device else 'dry run'}")


if __name__ == "__main__":
    main()

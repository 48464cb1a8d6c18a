#!/usr/bin/env bash
# CUDA compile check: build provcollate against a CUDA build of torch (no GPU needed) and fail
# unless every op has a CUDA kernel registered with the dispatcher.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${CUDA_VENV:-$root/.venv-cuda}
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/python" -m pip install -q torch==2.14.1 numpy ninja "setuptools>=64" wheel

# Build from a copy of the tree so the CPU build in place (provcollate/_C*.so) is left alone.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -C "$root" --exclude=./.venv --exclude=./.venv-cuda --exclude=./build --exclude='*.so' \
    --exclude=./.git -cf - . | tar -C "$src" -xf -

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PROVCOLLATE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
start=$(date +%s)
"$venv/bin/python" -m pip install -q --no-build-isolation --no-deps --force-reinstall "$src"
echo "cuda_check: built in $(( $(date +%s) - start )) s for sm_${TORCH_CUDA_ARCH_LIST/./}"

cd "$src/.."
"$venv/bin/python" - <<'PY'
import torch
import provcollate

assert provcollate.HAS_EXTENSION, "the compiled extension did not load"
assert torch.version.cuda, "this check needs a CUDA build of torch"
ops = ["pad", "unpad", "unpad_scatter_"]
missing = [op for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"provcollate::{op}", "CUDA")]
if missing:
    raise SystemExit(f"cuda_check: no CUDA kernel registered for {missing}")
print(f"cuda_check: CUDA kernels registered for {ops} (torch {torch.__version__}, CUDA {torch.version.cuda})")
PY

#!/usr/bin/env bash
# CUDA compile check: build provcollate against CUDA builds of torch (no GPU needed) and fail
# unless every op has a CUDA kernel registered with the dispatcher.
#
# CUDA_TORCH lists the torch versions to build against, each in its own venv under .venv-cuda/;
# by default 2.14.1 (the newest CI pins) and 2.11.0, the torch of the GPU machine `make gpu-check`
# runs on (PyPI's 2.11.0 is its CUDA 13.0 build): about 1 min to install and 3 min to compile
# each on 2 cores. setuptools>=77 reads the SPDX license field.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
versions=${CUDA_TORCH:-2.14.1 2.11.0}

# Build from a copy of the tree so the CPU build in place (provcollate/_C*.so) is left alone.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -C "$root" --exclude=./.venv --exclude=./.venv-cuda --exclude=./build --exclude='*.so' \
    --exclude=./.git -cf - . | tar -C "$src" -xf -

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PROVCOLLATE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}

for version in $versions; do
    venv=$root/.venv-cuda/torch-$version
    if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
    "$venv/bin/python" -m pip install -q "torch==$version" numpy ninja "setuptools>=77" wheel
    start=$(date +%s)
    "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps --force-reinstall "$src"
    echo "cuda_check: built against torch $version in $(( $(date +%s) - start )) s for sm_${TORCH_CUDA_ARCH_LIST/./}"

    (cd "$src/.." && "$venv/bin/python" - <<'PY'
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
    )
done

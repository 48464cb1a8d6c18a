"""GPU proof kit, step "build": compile provcollate._C in place against this interpreter's torch.

The extensions and the build command are setup.py's own (imported, not copied). They are built
from a scratch directory that links to csrc/ and provcollate/, because `setup.py build_ext` in the
tree makes setuptools validate pyproject.toml, and setuptools before 77 rejects its SPDX
`license` field: a GPU machine's python3 often has an older setuptools than the project needs to
package itself, and an in-place build needs none of that metadata.

    PROVCOLLATE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 gpu/build.py

Ends by importing the built extension and listing the dispatch keys of every op.
"""
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("pad", "unpad", "unpad_scatter_")

CHECK = """
import sys, torch, provcollate
if not provcollate.HAS_EXTENSION:
    sys.exit("build: the compiled extension did not load")
keys, ops = sys.argv[1].split(","), sys.argv[2].split(",")
missing = [f"{op} ({key})" for op in ops for key in keys
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"provcollate::{op}", key)]
if missing:
    sys.exit(f"build: no kernel registered for {missing}")
print(f"build: provcollate._C loads; {'/'.join(keys)} kernels registered for {', '.join(ops)} (torch {torch.__version__})")
"""


def _setup_module():
    spec = importlib.util.spec_from_file_location("provcollate_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only under __main__
    return module


def build() -> None:
    from setuptools import setup

    project = _setup_module()
    with tempfile.TemporaryDirectory(prefix="provcollate-build-") as scratch:
        for name in ("csrc", "provcollate"):
            os.symlink(ROOT / name, os.path.join(scratch, name))
        here = os.getcwd()
        os.chdir(scratch)  # setup.py names its sources relative to the tree; the links resolve them
        try:
            setup(name="provcollate", packages=[], ext_modules=project.extensions(),
                  cmdclass={"build_ext": project._BuildExt},
                  script_args=["build_ext", "--inplace", "--build-temp", os.path.join(scratch, "build")])
        finally:
            os.chdir(here)


if __name__ == "__main__":
    start = time.monotonic()
    build()
    print(f"build: compiled in {time.monotonic() - start:.0f} s (MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'unset')})", flush=True)
    keys = "CPU,CUDA" if os.environ.get("PROVCOLLATE_CUDA") == "1" else "CPU"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    sys.exit(subprocess.run([sys.executable, "-c", CHECK, keys, ",".join(OPS)], cwd=ROOT, env=env).returncode)

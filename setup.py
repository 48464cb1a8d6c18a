"""Build of provcollate's compiled core against the user's own torch.

CUDA sources are compiled when a CUDA toolkit sits next to a CUDA build of torch, or when
PROVCOLLATE_CUDA=1; PROVCOLLATE_CUDA=0 forbids it. Whether this machine has a GPU does not
matter: build machines often have none; a CUDA build on a machine without a GPU and without
TORCH_CUDA_ARCH_LIST targets the architectures in _DEFAULT_CUDA_ARCHS.

torch is deliberately not a build requirement: the extension must be compiled against the torch
that will import it. Under pip's build isolation (a plain ``pip install .``) torch is absent from
the build environment, and this file stops at once saying to pass ``--no-build-isolation``.
The torch version built against is written to provcollate/_build_info.json, so that an import
against another torch can name the mismatch.
"""
import glob
import json
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "provcollate: building needs torch importable in the build environment, and pip's build "
        "isolation hides the torch you have installed. Install torch first, then run\n"
        "    pip install --no-build-isolation .\n"
        "(or: python -m build --no-isolation). The extension must be compiled against the torch "
        "that will import it."
    )

HERE = os.path.dirname(os.path.abspath(__file__))
# Datacenter and consumer GPUs of the last generations; +PTX lets newer ones JIT the kernels.
_DEFAULT_CUDA_ARCHS = "7.0;7.5;8.0;8.6;8.9;9.0+PTX"


def _want_cuda() -> bool:
    flag = os.environ.get("PROVCOLLATE_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    if flag:
        raise ValueError(f"PROVCOLLATE_CUDA must be '0' or '1', got {flag!r}")
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _default_cuda_archs() -> None:
    """Set TORCH_CUDA_ARCH_LIST when it is unset and no GPU is visible to detect one from.

    Without either, torch's own detection fails with an IndexError in _get_cuda_arch_flags.
    """
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = _DEFAULT_CUDA_ARCHS
    print(
        f"provcollate: no GPU visible and TORCH_CUDA_ARCH_LIST unset; building CUDA kernels for "
        f"{_DEFAULT_CUDA_ARCHS}. Set TORCH_CUDA_ARCH_LIST (e.g. '9.0') to target your GPUs only.",
        file=sys.stderr,
    )


class _BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension that also records the torch version next to the built extension."""

    def run(self):
        super().run()
        target = os.path.dirname(self.get_ext_fullpath("provcollate._C"))
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "_build_info.json"), "w") as f:
            json.dump({"torch": torch.__version__, "cuda": torch.version.cuda}, f)


def extensions():
    with_cuda = _want_cuda()
    if with_cuda:
        _default_cuda_archs()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fvisibility=hidden"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for runs serially in code built without OpenMP; with it, the extension
        # shares torch's own libgomp, so torch.set_num_threads() governs it too.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    define_macros = []
    if os.environ.get("PROVCOLLATE_DEBUG") == "1":
        cxx = ["-O0", "-g"]
    extra = {"cxx": cxx}
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        ext_cls = cpp_extension.CUDAExtension
        sources += _sources("csrc/cuda/*.cu")
        define_macros.append(("PROVCOLLATE_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return [
        ext_cls(
            name="provcollate._C",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=link,
        )
    ]


if __name__ == "__main__":  # pip and build run this file as __main__; tests import its helpers
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": _BuildExt},
    )

"""Build of provcollate's compiled core against the user's own torch.

CUDA sources are compiled when a CUDA toolkit sits next to a CUDA build of torch, or when
PROVCOLLATE_CUDA=1; PROVCOLLATE_CUDA=0 forbids it. Whether this machine has a GPU does not
matter: build machines often have none.
"""
import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("PROVCOLLATE_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    if flag:
        raise ValueError(f"PROVCOLLATE_CUDA must be '0' or '1', got {flag!r}")
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extensions():
    with_cuda = _want_cuda()
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


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

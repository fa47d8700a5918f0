"""Build and install resnet_fused.

The C++ extension ``resnet_fused._C`` is built from ``csrc/``: as a CUDA extension when PyTorch
has CUDA and nvcc is found (or ``FORCE_CUDA=1``), otherwise CPU-only. Honoured environment:
``FORCE_CUDA``, ``CUDA_HOME``, ``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS``, and
``RESNET_FUSED_NO_EXTENSION=1`` to skip the extension (the pure-Python backends still work).

Build against the torch already installed: ``pip install --no-build-isolation -e .``
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["resnet_fused", "resnet_fused.backends", "resnet_fused.kernels"]
# kernels/ lives at the top of the repository but ships inside the package: a top-level `kernels`
# import name belongs to another project on PyPI.
PACKAGE_DIR = {"resnet_fused.kernels": "kernels"}


def _want_cuda(torch_cuda_version) -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if torch_cuda_version is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )


def _extensions():
    if os.environ.get("RESNET_FUSED_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-std=c++17"]
    if _want_cuda(torch.version.cuda):
        extension = CUDAExtension(
            "resnet_fused._C",
            sources + rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp"),
            define_macros=[("RESNET_FUSED_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
        )
    else:
        extension = CppExtension("resnet_fused._C", sources, extra_compile_args={"cxx": cxx_flags})
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

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
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["resnet_fused", "resnet_fused.backends", "resnet_fused.kernels"]
# kernels/ lives at the top of the repository but ships inside the package: a top-level `kernels`
# import name belongs to another project on PyPI.
PACKAGE_DIR = {"resnet_fused.kernels": "kernels"}


def _fix_cuda_home() -> None:
    """Without ``CUDA_HOME`` set, torch guesses it from the ``nvcc`` on PATH; where that is a wrapper
    in /usr/local/bin the guess is /usr/local, which has no libcudart to link against. Prefer
    /usr/local/cuda then."""
    from torch.utils import cpp_extension

    def has_cudart(home):
        return home is not None and any(
            glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib", "targets/*/lib")
        )

    fallback = "/usr/local/cuda"
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ or has_cudart(cpp_extension.CUDA_HOME):
        return
    if has_cudart(fallback) and os.path.exists(os.path.join(fallback, "bin", "nvcc")):
        print(f"setup.py: CUDA_HOME guessed as {cpp_extension.CUDA_HOME!r} has no libcudart; using {fallback}")
        cpp_extension.CUDA_HOME = fallback


def _cudnn_include_dirs() -> list:
    """cuDNN's headers, for the extension's own fused cuDNN graphs (csrc/cuda/fused_conv_graph.cpp):
    CUDNN_HOME (or CUDNN_PATH), then CUDA_HOME, then the nvidia-cudnn wheel pip's torch depends on.
    Without them the extension still builds; convs cuDNN's graph would fuse then run as cuDNN's
    convolution + our epilogue."""
    from torch.utils.cpp_extension import CUDA_HOME

    homes = [os.environ.get("CUDNN_HOME") or os.environ.get("CUDNN_PATH"), CUDA_HOME]
    try:
        import nvidia.cudnn

        homes += list(nvidia.cudnn.__path__)
    except ImportError:
        pass
    for home in homes:
        if home and os.path.exists(os.path.join(home, "include", "cudnn.h")):
            return [os.path.join(home, "include")]
    print("setup.py: cuDNN's headers not found (set CUDNN_HOME); building without the fused cuDNN graphs")
    return []


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
    # No -std: each torch release adds the C++ standard its headers need (C++17 or C++20).
    cxx_flags = ["-O3"]
    link_flags = []
    # at::parallel_for is inline: without -fopenmp our CPU kernels would run on one thread. The
    # runtime is the libgomp torch already loaded (same soname), so the threads are torch's.
    if torch.backends.openmp.is_available() and os.name == "posix":
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if torch.version.cuda is not None:
        _fix_cuda_home()
    if _want_cuda(torch.version.cuda):
        extension = CUDAExtension(
            "resnet_fused._C",
            sources + rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp"),
            define_macros=[("RESNET_FUSED_WITH_CUDA", "1")],
            include_dirs=_cudnn_include_dirs(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension(
            "resnet_fused._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    return [extension], {"build_ext": _build_ext_class(BuildExtension)}


def _build_ext_class(build_extension):
    """torch's BuildExtension with ninja, compiling into a fixed folder under ``build/``.

    WHY: pip's editable install points the build at a fresh temporary folder, so every ``pip
    install -e .`` (the README's run command, then its test command) recompiled the whole
    extension, CUDA included; in a fixed folder ninja keeps the objects whose sources, headers and
    flags did not change."""
    import sysconfig

    base = build_extension.with_options(use_ninja=True)

    class BuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")

    return BuildExt


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

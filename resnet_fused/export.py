"""Save a fused model for serving from another process, and load it back.

Two kinds of file, both ``.pt2`` archives:

- :func:`save_program`: a ``torch.export`` program (the graph and the weights). Loading it needs
  Python, torch, and ``resnet_fused``'s ops registered: :func:`load` does that
  (``import resnet_fused.ops`` before ``torch.export.load`` does too; a plain ``import
  resnet_fused`` does not, since the package imports its submodules lazily).
- :func:`save_aoti_package`: an AOTInductor package, the graph compiled to a shared library
  (C++ is compiled, so this takes tens of seconds even for a small model). It runs without the
  model's Python code, through ``torch._inductor.aoti_load_package`` in Python or
  ``torch::inductor::AOTIModelPackageLoader`` in C++. The ``extension`` backend's ops are called
  through AOTInductor's proxy executor by name, so the process must have loaded the extension's
  library first: ``import resnet_fused.ops``, or ``torch.ops.load_library(<path of
  resnet_fused/_C*.so>)`` without resnet_fused's Python, or in C++ ``dlopen(path, RTLD_LAZY |
  RTLD_GLOBAL)`` (lazy: the library's Python module entry point is never called) with torch's
  ``lib/`` on the library path. The ``torch`` backend needs nothing more.
  On CPU, Inductor compiles the package with ``-march=native``: build it on the kind of CPU that
  will serve it (a package built where AVX-512 exists may not run where it does not).
  Backends whose kernels are Python custom ops (``triton``, ``onednn``) cannot be compiled into a package:
  :func:`save_aoti_package` refuses them and says which backend to use instead.

The batch dimension is dynamic by default: the saved model takes any batch size >= 1, every other
dimension (image size, channels) is fixed at the example's.
"""

from __future__ import annotations

import os
import warnings
import zipfile

import torch
from torch import nn

from . import ops  # noqa: F401 - registers the custom ops and their fake kernels, which loading needs

__all__ = ["ExportError", "save_program", "save_aoti_package", "load"]

# Where each kind of file keeps its payload inside the .pt2 zip (torch/csrc/export/pt2_archive_constants.h).
_AOTI_DIR = "/data/aotinductor/"
_PROGRAM_DIR = "/models/"
# Namespaces whose ops Inductor lowers itself; any other op in the graph is called as it is.
_BUILTIN_NAMESPACES = ("aten", "prims")


class ExportError(RuntimeError):
    """The model cannot be saved in the requested form; the message says why and what to do instead."""


def _output_path(path) -> str:
    # Checked before the slow export: torch only warns about another suffix, and loaders look for it.
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"the output path must end in .pt2, got {path!r}")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the output folder {folder!r} does not exist")
    return path


def _check_arguments(module, example_inputs) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        raise TypeError("example_inputs must be a tuple of inputs: pass (x,), not x")
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise TypeError(f"example_inputs must be a non-empty tuple of inputs, got {type(example_inputs).__name__}")


def _batched(t):
    # torch.export treats a dimension of size 1 as the constant 1, so a batch of 1 cannot become
    # dynamic: trace a batch of 2 instead (export runs on fake tensors, only the metadata matters).
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1:
        return torch.cat((t, t))
    return t


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _trace(module: nn.Module, args: tuple, dynamic_shapes=None) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    except Exception as e:
        raise ExportError(f"torch.export cannot trace {type(module).__name__}: {_first_line(e)}") from e


def _export(module: nn.Module, example_inputs: tuple, dynamic_batch: bool) -> torch.export.ExportedProgram:
    _check_arguments(module, example_inputs)
    if not dynamic_batch:
        return _trace(module, example_inputs)
    batch = torch.export.Dim("batch", min=1)
    dynamic_shapes = tuple({0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in example_inputs)
    try:
        return _trace(module, tuple(_batched(t) for t in example_inputs), dynamic_shapes)
    except ExportError as dynamic_error:
        _trace(module, example_inputs)  # raises if the model cannot be exported at all
        raise ExportError(
            f"{type(module).__name__} exports only for a fixed batch size, not a dynamic one "
            f"({_first_line(dynamic_error.__cause__)}); pass dynamic_batch=False to save it for the "
            "example's batch size only"
        ) from dynamic_error.__cause__


def save_program(module: nn.Module, example_inputs: tuple, path, *, dynamic_batch: bool = True) -> str:
    """``torch.export`` ``module`` on ``example_inputs`` and save the program to ``path`` (a ``.pt2``).

    With ``dynamic_batch`` the program takes any batch size >= 1 (an example batch of 1 is traced
    as 2); a model whose code fixes its batch size raises :class:`ExportError` suggesting
    ``dynamic_batch=False``. Returns the path written. Load it with :func:`load`.
    """
    path = _output_path(path)
    program = _export(module, example_inputs, dynamic_batch)
    with warnings.catch_warnings():
        # torch says this of our channels_last weights (no tensor it deems complete) and then
        # saves its whole storage, which is right: the round-trip tests compare bit for bit.
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, path)
    return path


def _python_custom_ops(program: torch.export.ExportedProgram) -> list[str]:
    """Ops in the graph implemented in Python (``torch.library.custom_op``): a package can call
    them only from a process that has defined them, in Python, which defeats its purpose."""
    from torch._library.custom_ops import OPDEFS

    names = set()
    for node in program.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            if target.namespace not in _BUILTIN_NAMESPACES and target._schema.name in OPDEFS:
                names.add(target._schema.name)
    return sorted(names)


def save_aoti_package(module: nn.Module, example_inputs: tuple, path, *, dynamic_batch: bool = True) -> str:
    """Compile ``module`` with AOTInductor into a package at ``path`` (a ``.pt2``) that runs without
    the model's Python code.

    Works for fused models on the ``extension`` backend (its C++ ops are called by name: load the
    extension's library in the serving process, see the module docstring) and the ``torch``
    backend. A model whose ops are Python custom ops (the ``triton`` and ``onednn`` backends) raises
    :class:`ExportError`. ``dynamic_batch`` as in :func:`save_program`. Compiling takes tens of
    seconds (C++). Returns the path written. Load it with :func:`load`.
    """
    path = _output_path(path)
    program = _export(module, example_inputs, dynamic_batch)
    python_ops = _python_custom_ops(program)
    if python_ops:
        raise ExportError(
            f"an AOTInductor package cannot run {', '.join(python_ops)}: these ops are implemented in Python "
            "(torch.library.custom_op), so the package would need Python and resnet_fused to run them. "
            "Fuse the model with backend='extension' (C++ ops) or backend='torch' for a package, "
            "or use save_program() to keep this backend"
        )
    from torch._inductor import aoti_compile_and_package

    return aoti_compile_and_package(program, package_path=path)


def load(path):
    """Load a file written by :func:`save_program` or :func:`save_aoti_package`, and return a callable
    that takes the same inputs as the saved module.

    Importing this module registers resnet_fused's ops and their fake kernels (it imports
    :mod:`resnet_fused.ops`), which loading either kind of file needs. A program comes back as a
    ``torch.fx.GraphModule``, a package as the model ``torch._inductor.aoti_load_package`` returns.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a .pt2 archive (written by save_program or save_aoti_package)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(_AOTI_DIR in name for name in names):
        from torch._inductor import aoti_load_package

        return aoti_load_package(path)
    if any(_PROGRAM_DIR in name for name in names):
        return torch.export.load(path).module()
    raise ValueError(f"{path} holds neither an exported program nor an AOTInductor package")


"""CUDA graphs for a fused model at fixed input shapes: one replay instead of one launch per kernel.

    import resnet_fused
    from resnet_fused.cuda_graphs import graphed

    fast = graphed(resnet_fused.fuse(model.eval().cuda(), dtype=torch.float16))
    with torch.inference_mode():
        logits = fast(images)      # first call at a shape: warm-up + capture; later calls: replay

:func:`graphed` wraps an eval-mode module called with one CUDA tensor. Each input signature (shape,
dtype, device, memory format) gets its own graph, captured on first sight:

- the model first runs ``warmup`` times on a side stream, so everything that must not happen
  during capture (Triton autotuning, cuDNN's algorithm search, the extension's per-shape timing,
  lazy initialisation) happens there;
- the input is copied into a static buffer the graph reads, and the graph's output lives in memory
  the graph owns; by default each call returns a **copy** of it, so a result stays valid after later
  calls. ``copy_output=False`` returns the graph's own output tensor instead (one copy less per
  call), which **the next call overwrites**: use it before calling again, or copy it;
- at most ``max_shapes`` graphs are kept (each holds its own activation memory). A new signature
  beyond that evicts the least recently used graph (``when_full="evict"``, the default), or runs
  the model eagerly, uncaptured, with a one-time warning (``when_full="eager"``). A signature whose
  capture fails runs eagerly from then on, with a warning naming the error.

The model's parameters are read by every replay where they lay at capture time: in-place updates
are seen, replaced tensors (``p.data = t``) are not; wrap the model again after changing it. Calls
are not thread-safe, and inputs that require grad are refused (graphs capture inference only).
Inside a capture of the caller's own, the model runs as it is (captures do not nest).
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass
from typing import Callable, Hashable

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["graphed", "GraphedModule", "CudaGraphWarning"]

WHEN_FULL = ("evict", "eager")


class CudaGraphWarning(UserWarning):
    """A call ran eagerly instead of replaying a CUDA graph (capture failed or the cache is full)."""


def input_key(x: torch.Tensor) -> tuple:
    """The signature one graph serves: shape, dtype, device and memory format of the input."""
    return tuple(x.shape), x.dtype, x.device, _memory_format(x)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # channels_last only when it differs from contiguous: a tensor that is both (one channel, or a
    # 1x1 plane) is dense either way.
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class LRU:
    """At most ``capacity`` entries; looking one up makes it the most recent."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, key: Hashable):
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def full(self) -> bool:
        return len(self._entries) >= self.capacity

    def put(self, key: Hashable, value) -> None:
        """Adds ``key``, evicting the least recently used entry when full."""
        if key not in self._entries and self.full():
            self._entries.popitem(last=False)
        self._entries[key] = value
        self._entries.move_to_end(key)

    def keys(self) -> list:
        """Least recently used first."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    static_output: object


class GraphedModule(nn.Module):
    """``module`` replayed from CUDA graphs, one per input signature; see :func:`graphed`."""

    def __init__(self, module: nn.Module, *, max_shapes: int = 4, copy_output: bool = True, warmup: int = 3,
                 when_full: str = "evict"):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"graphed() needs an nn.Module, got {type(module).__name__}")
        if module.training:
            raise ValueError("graphed() needs a module in eval mode (call .eval() first): CUDA graphs capture inference only")
        if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
            raise ValueError(f"max_shapes must be a positive int, got {max_shapes!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(
                f"warmup must be a positive int, got {warmup!r} (autotuning and cuDNN's benchmark must run before capture)")
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {WHEN_FULL}, got {when_full!r}")
        self.module = module
        self.training = False
        self.copy_output = bool(copy_output)
        self.warmup = warmup
        self.when_full = when_full
        self._graphs = LRU(max_shapes)
        self._eager_keys: set = set()  # signatures whose capture failed
        self._warned_full = False

    @property
    def max_shapes(self) -> int:
        return self._graphs.capacity

    def captured(self) -> list[tuple]:
        """The input signatures (see :func:`input_key`) with a graph, least recently used first."""
        return self._graphs.keys()

    def train(self, mode: bool = True):
        if mode:
            raise ValueError("a graphed module is inference-only; train the original module instead")
        return super().train(False)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.module.training:
            raise ValueError("the wrapped module was put in training mode; graphed modules are inference-only")
        _check_input(x, args, kwargs)
        if torch.cuda.is_current_stream_capturing():
            return self.module(x)
        key = input_key(x)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._new_graph(key, x)
            if entry is None:
                return self.module(x)
        entry.static_input.copy_(x)
        entry.graph.replay()
        if not self.copy_output:
            return entry.static_output
        return pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, entry.static_output)

    def _new_graph(self, key: tuple, x: torch.Tensor) -> _Graph | None:
        if key in self._eager_keys:
            return None
        if self._graphs.full() and self.when_full == "eager":
            if not self._warned_full:
                self._warned_full = True
                warnings.warn(
                    f"graphed(): {self.max_shapes} graphs are captured (max_shapes); input {key[0]} {key[1]} and "
                    "every further new signature run eagerly, without a CUDA graph", CudaGraphWarning, stacklevel=3)
            return None
        try:
            entry = capture(self.module, x, key[3], self.warmup)
        except Exception as e:  # noqa: BLE001 - any failure to capture leaves the eager model working
            self._eager_keys.add(key)
            warnings.warn(
                f"graphed(): capturing a CUDA graph for input {key[0]} {key[1]} failed, so it runs eagerly: "
                f"{type(e).__name__}: {e}", CudaGraphWarning, stacklevel=3)
            return None
        self._graphs.put(key, entry)
        return entry


def _check_input(x, args: tuple, kwargs: dict) -> None:
    if args or kwargs:
        raise TypeError("a graphed module takes exactly one tensor argument")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"a graphed module takes a tensor, got {type(x).__name__}")
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("the input requires grad: CUDA graphs here capture inference only (use torch.inference_mode())")
    if x.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA input, got a tensor on {x.device}; move it with .cuda() or call the "
                         "un-graphed module")


def capture(module: Callable, example: torch.Tensor, memory_format: torch.memory_format, warmup: int) -> _Graph:
    """Warms ``module`` up on a side stream, then captures one call of it reading a static input."""
    device = example.device
    # Made outside inference mode: a replay copies the next input into it, and an in-place write
    # to an inference tensor outside inference mode is an error.
    with torch.inference_mode(False):
        static_input = torch.empty_like(example, memory_format=memory_format)
    static_input.copy_(example)
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.device(device), torch.cuda.stream(side), torch.no_grad():
        for _ in range(warmup):
            module(static_input)
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), torch.no_grad(), torch.cuda.graph(graph):
        static_output = module(static_input)
    return _Graph(graph, static_input, static_output)


def graphed(model: nn.Module, *, max_shapes: int = 4, copy_output: bool = True, warmup: int = 3,
            when_full: str = "evict") -> GraphedModule:
    """``model`` (eval mode, on a CUDA device, called with one tensor) replayed from CUDA graphs.

    One graph per input signature, captured on first sight after ``warmup`` eager calls on a side
    stream; at most ``max_shapes`` graphs are kept, and a new signature beyond them evicts the least
    recently used (``when_full="evict"``) or runs eagerly with a one-time warning
    (``when_full="eager"``). Each call returns a copy of the graph's output; with
    ``copy_output=False`` it returns the graph's own output tensor, which the next call overwrites.
    The model is not copied: its parameters are read in place. See the module docstring.
    """
    return GraphedModule(model, max_shapes=max_shapes, copy_output=copy_output, warmup=warmup, when_full=when_full)

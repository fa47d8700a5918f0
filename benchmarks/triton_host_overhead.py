"""Host time per fused conv on the Triton path, with the GPU launch stubbed out: runs on a CPU.

What a conv costs in Python before the GPU could start, through the whole op layer:
``ops.conv_bias_act`` (and ``ops.BoundConvBiasAct``, the fused modules' path) -> backend -> custom
op -> ``kernels.conv.conv_bias_act`` -> tuner -> launch. It pretends to be on a GPU
(:func:`pretend_cuda`): the Triton kernels' launches are no-ops, the device is a fixed stand-in
(132 SMs, 227 KiB of shared memory: an H100/H200), autotuning "times" every candidate at 1 ms, and
CPU tensors flow through everything else. Triton's own launcher (a few microseconds more on a GPU)
is not included. The numbers are in-process microseconds on this machine's CPU; on a GPU the same
host time either hides behind the kernels or, at batch 1, is the forward's floor.

Usage: python benchmarks/triton_host_overhead.py [--calls N] [--repeats R]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from unittest import mock

# The triton backend serves CPU tensors only through the interpreter; the launches never run.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from resnet_fused import ops  # noqa: E402
from resnet_fused.backends import triton as triton_backend  # noqa: E402
from resnet_fused.kernels import configs, conv  # noqa: E402

STAND_IN = configs.Device("stand-in GPU (132 SMs)", 227 * 1024, 132)

# (c, h, w, k, kernel, stride, padding, residual): resnet50 layers at batch 1, 224x224.
LAYERS = {
    "stem_7x7_s2": (3, 224, 224, 64, 7, 2, 3, False),
    "layer1_1x1": (256, 56, 56, 64, 1, 1, 0, False),
    "layer3_3x3": (256, 14, 14, 256, 3, 1, 1, False),
    "layer4_1x1_residual": (512, 7, 7, 2048, 1, 1, 0, True),
}


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None


@contextlib.contextmanager
def pretend_cuda():
    """The Triton conv path as on a GPU (tuning, keys, candidates), minus the kernels; a fresh tuner
    without a disk cache, so nothing is read or written outside this process."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(conv, "INTERPRETED", False))
        stack.enter_context(mock.patch.object(conv, "conv_bias_act_kernel", _NoLaunch()))
        stack.enter_context(mock.patch.object(conv, "splitk_reduce_kernel", _NoLaunch()))
        stack.enter_context(mock.patch.object(configs, "device_info", lambda device: STAND_IN))
        tuner = configs.Tuner(bench=lambda fn: (fn(), 1.0)[1])
        stack.enter_context(mock.patch.object(configs, "TUNED", tuner))
        yield tuner


def layer_inputs(c, h, w, k, kernel, stride, padding, residual, dtype=torch.float16):
    x = torch.randn(1, c, h, w).to(dtype=dtype, memory_format=torch.channels_last)
    weight = torch.randn(k, c, kernel, kernel).to(dtype=dtype, memory_format=torch.channels_last)
    bias = torch.randn(k).to(dtype)
    p, q = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    res = torch.randn(1, k, p, q).to(dtype=dtype, memory_format=torch.channels_last) if residual else None
    return x, weight, bias, res


def per_call_us(fn, calls: int, repeats: int) -> float:
    """Fastest over ``repeats`` of the mean time of ``calls`` back-to-back calls (tuning happens first):
    on a shared machine the fastest run is the one least disturbed by others."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return min(times)


def measure(calls: int = 2000, repeats: int = 5) -> dict[str, dict[str, float]]:
    """Per layer: microseconds per call at each entry point of the path, outermost first."""
    results = {}
    # Resolved (and cached) while the backend still sees the interpreter it needs on CPU.
    ops.resolve_backend("triton", "cpu", torch.float16)
    with torch.inference_mode(), pretend_cuda():
        for name, (c, h, w, k, kernel, stride, padding, residual) in LAYERS.items():
            x, weight, bias, res = layer_inputs(c, h, w, k, kernel, stride, padding, residual)
            bound = ops.BoundConvBiasAct(stride=stride, padding=padding, backend="triton")
            pair = (stride, stride), (padding, padding)
            results[name] = {
                "ops.BoundConvBiasAct": per_call_us(lambda: bound(x, weight, bias, res), calls, repeats),
                "ops.conv_bias_act": per_call_us(
                    lambda: ops.conv_bias_act(x, weight, bias, stride=stride, padding=padding, residual=res,
                                              backend="triton"), calls, repeats),
                "backends.triton": per_call_us(
                    lambda: triton_backend.conv_bias_act(x, weight, bias, *pair, 1, res, True), calls, repeats),
                "kernels.conv": per_call_us(
                    lambda: conv.conv_bias_act(x, weight, bias, *pair, 1, res, True), calls, repeats),
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timing (default 2000)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per entry point; the fastest is shown")
    args = parser.parse_args()
    results = measure(args.calls, args.repeats)
    entries = list(next(iter(results.values())))
    print(f"host microseconds per conv, launch stubbed, in-process (torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs)")
    print(f"{'layer':<22}" + "".join(f"{e:>22}" for e in entries))
    for name, row in results.items():
        print(f"{name:<22}" + "".join(f"{row[e]:>22.1f}" for e in entries))


if __name__ == "__main__":
    main()

"""Triton backend: kernels, custom ops, backend choice. Without a GPU, through Triton's interpreter on CPU.

Shapes stay tiny (the interpreter runs each program in Python). Every test runs with deterministic
algorithms on, so torch.empty fills new tensors with NaN: an output element the kernel never wrote
fails the finiteness check in assert_close. On a GPU the same tests run on CUDA tensors, with TF32
off; tests/test_triton_gpu.py adds real ResNet-50 shapes, fp16/bf16 and the >2^31-element cases.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from utils import assert_close, reference_conv_bias_act

from resnet_fused import ops
from resnet_fused._shapes import conv_output_shape, pair
from resnet_fused.backends import triton as triton_backend

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REASON = triton_backend.unavailable_reason(DEVICE, None)
needs_triton = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")


pytestmark = pytest.mark.usefixtures("nan_filled_empty_exact_fp32")


def make(shape, layout, dtype=torch.float32):
    """A random tensor in ``layout``; "sliced" is a strided view into a NaN-filled channels_last tensor."""
    t = torch.randn(shape, dtype=dtype, device=DEVICE)
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = shape
    big = torch.full((n + 1, c + 3, h + 2, 2 * w + 1), float("nan"), dtype=dtype, device=DEVICE)
    if layout == "sliced":
        big = big.contiguous(memory_format=torch.channels_last)
    else:
        assert layout == "sliced_nchw"
    view = big[1:, 2 : c + 2, 1 : h + 1, 1::2]
    view.copy_(t)
    return view


def conv_inputs(n, c, h, w, k, kernel, stride, padding, groups, *, layout="channels_last", dtype=torch.float32,
                bias=True, residual=True):
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x = make((n, c, h, w), layout, dtype)
    weight = torch.randn(k, c // groups, kh, kw, dtype=dtype, device=DEVICE) / (kh * kw * c // groups) ** 0.5
    b = torch.randn(k, dtype=dtype, device=DEVICE) if bias else None
    out_shape = conv_output_shape(x.shape, weight.shape, pair(stride, "stride"), pair(padding, "padding"))
    res = make(out_shape, layout, dtype) if residual else None
    return x, weight, b, res


def check_conv(x, weight, bias, res, stride, padding, groups, relu):
    out = ops.conv_bias_act(x, weight, bias, stride=stride, padding=padding, groups=groups, residual=res, relu=relu,
                            backend="triton")
    ref = reference_conv_bias_act(x, weight, bias, stride=stride, padding=padding, groups=groups, residual=res,
                                  relu=relu)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.dtype == x.dtype and out.device == x.device
    assert_close(out, ref)
    return out


# (n, c, h, w, k, kernel, stride, padding, groups): every ResNet-family shape class, tiny.
CONV_CASES = {
    "stem_7x7_s2": (1, 3, 11, 11, 16, 7, 2, 3, 1),
    "stem_7x7_s2_batch2": (2, 3, 9, 8, 16, 7, 2, 3, 1),
    "3x3_s1": (2, 16, 7, 9, 16, 3, 1, 1, 1),
    "3x3_s2": (1, 16, 9, 9, 32, 3, 2, 1, 1),
    "3x3_unpadded_odd": (2, 16, 6, 5, 16, 3, 1, 0, 1),
    "3x3_many_channels": (1, 80, 5, 5, 80, 3, 1, 1, 1),
    "3x3_ragged_channels": (1, 20, 5, 5, 24, 3, 1, 1, 1),
    "1x1_s1_gemm": (2, 32, 5, 7, 16, 1, 1, 0, 1),
    "1x1_s2_downsample": (2, 16, 7, 7, 32, 1, 2, 0, 1),
    "1x1_padded": (1, 16, 5, 5, 16, 1, 1, 1, 1),
    "grouped_3x3_narrow": (2, 16, 7, 7, 16, 3, 1, 1, 4),
    "grouped_3x3_wide_s2": (1, 32, 5, 5, 32, 3, 2, 1, 2),
    "grouped_1x1": (1, 32, 5, 5, 32, 1, 1, 0, 2),
    "asymmetric": (1, 16, 8, 7, 16, (3, 5), (2, 1), (0, 2), 1),
}


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced", "sliced_nchw"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_layouts(case, layout):
    *_, stride, padding, groups = CONV_CASES[case]
    x, weight, bias, res = conv_inputs(*CONV_CASES[case], layout=layout)
    check_conv(x, weight, bias, res, stride, padding, groups, relu=True)


@needs_triton
@pytest.mark.parametrize("bias,residual,relu", [(True, False, True), (False, True, False), (False, False, False)])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_epilogues(case, bias, residual, relu):
    *_, stride, padding, groups = CONV_CASES[case]
    x, weight, b, res = conv_inputs(*CONV_CASES[case], bias=bias, residual=residual)
    check_conv(x, weight, b, res, stride, padding, groups, relu=relu)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["stem_7x7_s2", "3x3_s2", "1x1_s1_gemm", "grouped_3x3_narrow", "3x3_many_channels"])
def test_conv_low_precision(case, dtype):
    *_, stride, padding, groups = CONV_CASES[case]
    x, weight, bias, res = conv_inputs(*CONV_CASES[case], dtype=dtype)
    check_conv(x, weight, bias, res, stride, padding, groups, relu=True)


@needs_triton
def test_conv_channels_last_weight_and_nan_propagation():
    x, weight, bias, res = conv_inputs(1, 16, 5, 5, 16, 3, 1, 1, 1)
    out = check_conv(x, weight.contiguous(memory_format=torch.channels_last), bias, res, 1, 1, 1, relu=True)
    res[0, 3, 2, 2] = float("nan")
    out = ops.conv_bias_act(x, weight, bias, padding=1, residual=res, backend="triton")
    assert out[0, 3, 2, 2].isnan() and torch.isfinite(out).sum() == out.numel() - 1


@needs_triton
def test_channels_last_input_is_not_copied():
    from resnet_fused.kernels import conv

    x = make((2, 16, 5, 7), "channels_last")
    assert conv._channels_inner(x) is x
    view = make((2, 16, 5, 7), "sliced")
    assert conv._channels_inner(view) is view
    nchw = make((2, 16, 5, 7), "nchw")
    assert conv._channels_inner(nchw).is_contiguous(memory_format=torch.channels_last)


@needs_triton
def test_nchw_weight_is_copied_once_until_it_changes():
    from resnet_fused.kernels import conv

    x, weight, bias, res = conv_inputs(*CONV_CASES["3x3_s1"])
    assert weight.stride(1) != 1  # NCHW: the kernel wants channels innermost
    copy = conv._weight_channels_inner(weight)
    assert copy.is_contiguous(memory_format=torch.channels_last) and torch.equal(copy, weight)
    assert conv._weight_channels_inner(weight) is copy
    check_conv(x, weight, bias, res, 1, 1, 1, relu=False)
    weight.mul_(-2.0)  # in place: the copy must not be served stale
    assert conv._weight_channels_inner(weight) is not copy
    check_conv(x, weight, bias, res, 1, 1, 1, relu=False)
    weight.data = torch.randn_like(weight)
    check_conv(x, weight, bias, res, 1, 1, 1, relu=False)
    entries = len(conv._WEIGHT_COPIES)
    del weight
    assert len(conv._WEIGHT_COPIES) == entries - 1, "a dead weight's copy is kept alive"
    with torch.inference_mode():  # no version counter: copied every call, never cached
        frozen = torch.randn(16, 16, 3, 3, device=DEVICE)
        assert conv._weight_channels_inner(frozen) is not conv._weight_channels_inner(frozen)
    assert len(conv._WEIGHT_COPIES) == entries - 1


def test_shape_classes():
    from resnet_fused.kernels.conv import shape_class

    def cls(c, k, kernel, stride, padding, groups, layout="channels_last"):
        x = make((2, c, 6, 6), layout)
        w = torch.empty(k, c // groups, kernel, kernel)
        return shape_class(x, w, (stride, stride), (padding, padding))

    assert cls(3, 16, 7, 2, 3, 1) == "flat"
    assert cls(32, 32, 3, 1, 1, 8) == "flat"
    assert cls(16, 16, 1, 1, 0, 1) == "gemm"
    assert cls(32, 32, 1, 1, 0, 2) == "gemm"
    assert cls(16, 16, 1, 1, 0, 1, layout="sliced") == "conv"  # rows do not collapse into one stride
    assert cls(16, 16, 1, 2, 0, 1) == "conv"
    assert cls(16, 16, 3, 1, 1, 1) == "conv"


def test_dot_precision_follows_the_new_fp32_precision_api():
    # Once cudnn.conv.fp32_precision differs from cudnn.rnn's, reading the legacy allow_tf32 raises.
    from resnet_fused.kernels.conv import dot_precision

    conv_api = getattr(torch.backends.cudnn, "conv", None)
    if getattr(conv_api, "fp32_precision", None) is None:
        pytest.skip(f"torch {torch.__version__} has no torch.backends.cudnn.conv.fp32_precision")
    previous = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        assert dot_precision(torch.float32) == "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.float16) == "tf32"
    finally:
        torch.backends.cudnn.allow_tf32 = previous  # the legacy setter resets conv and rnn alike


@needs_triton
def test_fp32_conv_under_the_new_fp32_precision_api():
    conv_api = getattr(torch.backends.cudnn, "conv", None)
    if getattr(conv_api, "fp32_precision", None) is None:
        pytest.skip(f"torch {torch.__version__} has no torch.backends.cudnn.conv.fp32_precision")
    previous = torch.backends.cudnn.allow_tf32
    x, weight, bias, res = conv_inputs(*CONV_CASES["3x3_s1"])
    try:
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        check_conv(x, weight, bias, res, 1, 1, 1, relu=True)
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32's 10 mantissa bits, to nearest with ties away from zero (cvt.rna.tf32.f32)."""
    rounded = ((t.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(t.abs() < float("inf"), rounded, t)


def test_round_to_tf32_reference():
    t = torch.tensor([1.0, 1 + 2**-11, 1 + 2**-12, -(1 + 2**-11), 3 * 2**-10, float("inf"), float("nan")])
    out = round_to_tf32(t)
    assert out[:5].tolist() == [1.0, 1 + 2**-10, 1.0, -(1 + 2**-10), 3 * 2**-10]
    assert out[5] == float("inf") and out[6].isnan()


@needs_triton
@pytest.mark.parametrize("case", ["3x3_s1", "1x1_s1_gemm"])
def test_fp32_tf32_rounds_operands_to_nearest(case):
    """With TF32 on, an fp32 conv is the exact conv of its operands rounded to nearest TF32. Tensor
    cores fed raw fp32 truncate instead: positive operands then come out ~1e-3 low, every layer."""
    x, weight, bias, res = conv_inputs(*CONV_CASES[case])
    x, weight = x.abs() + 0.1, weight.abs() + 0.01  # all products positive: a truncation bias adds up
    stride, padding, groups = CONV_CASES[case][6:9]
    args = dict(stride=stride, padding=padding, groups=groups, residual=res, relu=True)
    previous = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        out = ops.conv_bias_act(x, weight, bias, backend="triton", **args)
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    assert_close(out, reference_conv_bias_act(round_to_tf32(x), round_to_tf32(weight), bias, **args), rel=1e-5)
    unrounded = reference_conv_bias_act(x, weight, bias, **args)
    assert (out.double() - unrounded).abs().max() > 1e-5 * unrounded.abs().max(), "inputs had no bits to round"


def test_dot_precision_follows_tf32_switch():
    from resnet_fused.kernels.conv import dot_precision

    previous = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        torch.backends.cudnn.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.float16) == dot_precision(torch.bfloat16) == "tf32"
    finally:
        torch.backends.cudnn.allow_tf32 = previous


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced", "sliced_nchw"])
@pytest.mark.parametrize("shape", [(1, 16, 5, 7), (2, 200, 3, 3), (3, 5, 1, 11)])
def test_add_relu(shape, layout):
    x, res = make(shape, layout), make(shape, "channels_last")
    out = ops.add_relu(x, res, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, (x.double() + res.double()).relu())


@needs_triton
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("shape", [(1, 16, 5, 7), (2, 200, 3, 3)])
def test_bias_act(shape, layout, relu):
    x = make(shape, layout)
    bias = torch.randn(shape[1], device=DEVICE)
    out = ops.bias_act(x, bias, relu=relu, backend="triton")
    ref = x.double() + bias.double().view(1, -1, 1, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref.relu() if relu else ref)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pointwise_low_precision(dtype):
    x, res = make((2, 24, 5, 5), "channels_last", dtype), make((2, 24, 5, 5), "nchw", dtype)
    bias = torch.randn(24, dtype=dtype, device=DEVICE)
    assert_close(ops.add_relu(x, res, backend="triton"), (x.double() + res.double()).relu(), dtype)
    ref = (x.double() + bias.double().view(1, -1, 1, 1)).relu()
    assert_close(ops.bias_act(x, bias, backend="triton"), ref, dtype)


def _opcheck_samples():
    samples = []
    for layout, bias, residual, relu in [("channels_last", True, True, True), ("nchw", False, False, False),
                                         ("sliced", True, False, True)]:
        for case in ("stem_7x7_s2", "3x3_s2", "1x1_s1_gemm", "grouped_3x3_narrow"):
            *_, stride, padding, groups = CONV_CASES[case]
            x, weight, b, res = conv_inputs(*CONV_CASES[case], layout=layout, bias=bias, residual=residual)
            samples.append((x, weight, b, [stride] * 2, [padding] * 2, groups, res, relu))
    return samples


@needs_triton
def test_opcheck_conv_bias_act():
    for args in _opcheck_samples():
        torch.library.opcheck(torch.ops.resnet_fused_triton.conv_bias_act, args)


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_opcheck_pointwise(layout):
    x, res = make((2, 16, 5, 7), layout), make((2, 16, 5, 7), "channels_last")
    bias = torch.randn(16, device=DEVICE)
    torch.library.opcheck(torch.ops.resnet_fused_triton.add_relu, (x, res))
    torch.library.opcheck(torch.ops.resnet_fused_triton.bias_act, (x, bias, True))
    torch.library.opcheck(torch.ops.resnet_fused_triton.bias_act, (x, bias, False))


@needs_triton
def test_eager_calls_skip_the_custom_op_but_dispatch_modes_still_see_it():
    # Plain eager calls run the kernel directly (the custom op's dispatch cost more host time than
    # the rest of the call); anything intercepting ops must still see the op, not its insides.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, weight, bias, res = conv_inputs(*CONV_CASES["1x1_s1_gemm"])
    eager = ops.conv_bias_act(x, weight, bias, residual=res, backend="triton")
    with Record() as rec:
        seen = ops.conv_bias_act(x, weight, bias, residual=res, backend="triton")
        ops.add_relu(x, x, backend="triton")
    assert "resnet_fused_triton.conv_bias_act.default" in rec.ops
    assert "resnet_fused_triton.add_relu.default" in rec.ops
    assert torch.equal(seen, eager)


@needs_triton
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_fullgraph():
    x, weight, bias, res = conv_inputs(2, 16, 7, 7, 16, 3, 1, 1, 1)
    down = torch.randn(16, 16, 1, 1, device=DEVICE) / 4

    def block(x, res):
        y = ops.conv_bias_act(x, weight, bias, padding=1, backend="triton")
        y = ops.conv_bias_act(y, weight, bias, padding=1, residual=res, relu=False, backend="triton")
        y = ops.bias_act(y, bias, relu=False, backend="triton")
        return ops.add_relu(y, ops.conv_bias_act(x, down, None, relu=False, backend="triton"), backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        expected = block(x, res)
        torch.testing.assert_close(compiled(x, res), expected, rtol=0, atol=0)


@needs_triton
def test_fused_resnet18_matches_reference():
    import resnet_fused
    from resnet_fused.reference import random_model

    model = random_model("resnet18", num_classes=10, calibration_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = copy.deepcopy(model).double()(x.double())
        fused = resnet_fused.fuse(model.to(DEVICE), backend="triton")
        out = fused(x.to(DEVICE).contiguous(memory_format=torch.channels_last))
    assert not torch.allclose(ref[0], ref[1], rtol=1e-2), "degenerate model: output does not depend on the input"
    assert_close(out.cpu(), ref, torch.float32, rel=1e-5)


def run_python(code: str, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_reasons_without_triton_and_without_interpreter():
    # One process (importing torch costs seconds): first with triton missing, then present but
    # without TRITON_INTERPRET, where launching a kernel would fail with "0 active drivers".
    proc = run_python(
        """
        import sys
        sys.modules["triton"] = None  # every `import triton` now raises ImportError
        import torch
        import resnet_fused
        from resnet_fused import ops
        from resnet_fused.backends import triton
        print(triton.unavailable_reason("cpu", None))
        print(triton.unavailable_reason("cuda", torch.float16))
        print(resnet_fused.available_backends()["triton"])
        del sys.modules["triton"]
        print(triton.unavailable_reason("cpu", torch.float32))
        assert ops.resolve_backend(None, "cpu", torch.float32) != "triton"
        try:
            ops.conv_bias_act(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, backend="triton")
        except ops.BackendUnavailableError as e:
            print("refused:", e)
        """,
        TRITON_INTERPRET=None,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all("triton is not installed" in line for line in lines[:3]), proc.stdout
    assert "Triton needs a GPU; set TRITON_INTERPRET=1 before importing triton" in proc.stdout
    assert "refused: backend 'triton' cannot run on cpu" in proc.stdout


def test_unavailable_for_float64_and_other_devices():
    assert "float64" in triton_backend.unavailable_reason(DEVICE, torch.float64)
    assert triton_backend.unavailable_reason("mps", torch.float32) is not None


@needs_triton
def test_int64_offsets_in_inputs():
    # Inputs whose element offsets pass 2^31 although every stride fits in int32; only the few
    # touched pages of the 4 GiB storage are ever allocated. With int32 offset arithmetic the kernels
    # read wild addresses, so this runs in its own process.
    proc = run_python(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch
        from utils import assert_close, reference_conv_bias_act
        from resnet_fused import ops
        device = {DEVICE!r}
        step = 2**30 + 64
        storage = torch.empty(2 * step + 4096, dtype=torch.float16, device=device)
        x = storage.as_strided((3, 16, 5, 5), (step, 1, 80, 16))
        res = storage.as_strided((3, 16, 5, 5), (step, 1, 80, 16), storage_offset=2048)
        x.copy_(torch.randn(3, 16, 5, 5))
        res.copy_(torch.randn(3, 16, 5, 5))
        w = torch.randn(16, 16, 3, 3, dtype=torch.float16, device=device) / 12
        out = ops.conv_bias_act(x, w, None, padding=1, residual=res, backend="triton")
        assert_close(out, reference_conv_bias_act(x, w, None, padding=1, residual=res))
        assert_close(ops.add_relu(x, res, backend="triton"), (x.double() + res.double()).relu())
        print("ok")
        """
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, f"exit {proc.returncode}: {proc.stderr[-2000:]}"


def test_candidates_fit_the_problem():
    from resnet_fused.kernels import configs

    for cls in ("conv", "gemm", "flat"):
        cands = configs.candidates(cls, 49, 64, 48, 2, 228 * 1024)
        assert cands and len(set(cands)) == len(cands)
        assert all(c.block_m <= 64 and c.block_n <= 64 and c.block_k <= 64 for c in cands)
        assert all(min(c.block_m, c.block_n, c.block_k) >= 16 for c in cands)
    big = configs.candidates("gemm", 10**6, 2048, 1024, 4, 164 * 1024)
    assert all(c.num_stages * (c.block_m + c.block_n) * c.block_k * 4 <= 164 * 1024 for c in big)
    (tiny,) = configs.candidates("conv", 10**6, 512, 512, 4, 8 * 1024)
    assert tiny.num_stages == 1


def test_split_k_candidates_only_where_tiles_leave_sms_idle():
    from resnet_fused.kernels import configs

    def splits(m, n, k, taps, groups=1, sm_count=132):
        cands = configs.candidates("conv", m, n, k, 2, 227 * 1024, taps=taps, groups=groups, sm_count=sm_count)
        assert len(set(cands)) == len(cands)
        for c in cands:
            if c.split_k > 1:
                tiles = configs.cdiv(m, c.block_m) * configs.cdiv(n, c.block_n) * groups
                assert tiles * c.split_k <= sm_count
                assert taps * configs.cdiv(k, c.block_k) // c.split_k >= 4  # slices long enough to pipeline
                assert c._replace(split_k=1) in cands
        return [c for c in cands if c.split_k > 1]

    assert splits(49, 512, 512, 9)  # resnet50 layer4 3x3 at batch 1: 1-8 tiles, 4608-deep reduction
    assert splits(8 * 49, 2048, 512, 1)  # layer4 expand 1x1 at batch 8
    assert not splits(8 * 56 * 56, 64, 64, 9)  # layer1 at batch 8: plenty of tiles
    assert not splits(49, 512, 512, 9, sm_count=0)  # no device information: no split-K
    assert not splits(49, 64, 16, 1)  # a one-step reduction has nothing to split


# (n, c, h, w, k, kernel, stride, padding, groups) for split-K: every reduction walk, tiny.
SPLIT_CASES = {
    "conv_3x3": CONV_CASES["3x3_s2"],
    "gemm_1x1": CONV_CASES["1x1_s1_gemm"],
    "flat_stem": CONV_CASES["stem_7x7_s2"],
    "grouped_3x3": CONV_CASES["grouped_3x3_wide_s2"],
}


@needs_triton
@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("layout", ["channels_last", "sliced_nchw"])  # residual channel stride 1 or not
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_conv_split_k(case, layout, split_k):
    from resnet_fused.kernels import conv
    from resnet_fused.kernels.configs import LaunchConfig

    n, c, h, w, k, kernel, stride, padding, groups = SPLIT_CASES[case]
    x, weight, bias, res = conv_inputs(*SPLIT_CASES[case], layout=layout)
    cfg = LaunchConfig(16, 16, 16, 1, 4, split_k)
    args = pair(stride, "stride"), pair(padding, "padding"), groups
    out = conv.conv_bias_act(x, weight, bias, *args, res, True, config=cfg)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, reference_conv_bias_act(x, weight, bias, stride=stride, padding=padding, groups=groups,
                                              residual=res))
    again = conv.conv_bias_act(x, weight, bias, *args, res, True, config=cfg)
    assert torch.equal(out, again)
    plain = conv.conv_bias_act(x, weight, None, *args, None, False, config=cfg)
    assert_close(plain, reference_conv_bias_act(x, weight, None, stride=stride, padding=padding, groups=groups,
                                                relu=False))


@needs_triton
@pytest.mark.parametrize("split_k", [1, 2])
def test_conv_nan_propagates_like_eager(split_k):
    from resnet_fused.kernels import conv
    from resnet_fused.kernels.configs import LaunchConfig

    x, weight, bias, res = conv_inputs(1, 32, 5, 5, 16, 3, 1, 1, 1)
    x[0, 5, 2, 3] = float("nan")
    res[0, 7, 0, 0] = float("nan")
    cfg = LaunchConfig(16, 16, 16, 1, 4, split_k)
    out = conv.conv_bias_act(x, weight, bias, (1, 1), (1, 1), 1, res, True, config=cfg)
    ref = reference_conv_bias_act(x, weight, bias, padding=1, residual=res)
    assert ref.isnan().any() and not ref.isnan().all()
    assert torch.equal(out.isnan(), ref.isnan()), "NaN must reach exactly the outputs it reaches in eager"
    keep = ~ref.isnan()
    assert_close(out[keep], ref[keep])

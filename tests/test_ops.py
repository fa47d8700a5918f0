"""The op layer: validation, backend choice, and the CPU backends (torch, onednn) against float64."""

import gc
import warnings
import weakref

import pytest
import torch

from resnet_fused import ops
from utils import assert_close, assert_within_eager_error, reference_conv_bias_act

# (N, C, H, W, K, kernel, stride, padding, groups): every conv shape class of the ResNet family.
SHAPES = {
    "stem7x7s2": (2, 3, 23, 19, 16, 7, 2, 3, 1),
    "3x3s1": (2, 16, 9, 11, 16, 3, 1, 1, 1),
    "3x3s2": (1, 16, 13, 10, 24, 3, 2, 1, 1),
    "1x1s1": (3, 24, 7, 5, 40, 1, 1, 0, 1),
    "1x1s2": (2, 24, 9, 7, 48, 1, 2, 0, 1),
    "grouped3x3": (2, 32, 9, 9, 32, 3, 1, 1, 8),
    "grouped3x3s2": (1, 32, 11, 8, 64, 3, 2, 1, 4),
}
CPU_BACKENDS = [name for name in ("torch", "onednn") if ops.BACKENDS[name].unavailable_reason("cpu", torch.float32) is None]


def _case(shape, dtype=torch.float32, seed=0):
    n, c, h, w, k, r, stride, padding, groups = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c // groups, r, r, generator=g) / (c // groups * r * r) ** 0.5
    bias = torch.randn(k, generator=g)
    out_hw = ((h + 2 * padding - r) // stride + 1, (w + 2 * padding - r) // stride + 1)
    residual = torch.randn(n, k, *out_hw, generator=g)
    return [t.to(dtype) for t in (x, weight, bias, residual)], dict(stride=stride, padding=padding, groups=groups)


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # a non-contiguous view: every other channel of a wider tensor
        wide = torch.stack([t, torch.full_like(t, float("nan"))], dim=2).flatten(1, 2)
        return wide[:, ::2]
    return t.contiguous()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (False, False)])
def test_conv_bias_act_matches_float64(backend, shape, layout, residual, relu):
    (x, w, b, res), kw = _case(SHAPES[shape], seed=len(shape) + int(residual))
    x = _layout(x, layout)
    res_in = _layout(res, layout) if residual else None
    out = ops.conv_bias_act(x, w, b, residual=res_in, relu=relu, backend=backend, **kw)
    ref = reference_conv_bias_act(x, w, b, residual=res if residual else None, relu=relu, **kw)
    assert_close(out, ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bfloat16_within_eager_error(backend):
    if ops.BACKENDS[backend].unavailable_reason("cpu", torch.bfloat16):
        pytest.skip(ops.BACKENDS[backend].unavailable_reason("cpu", torch.bfloat16))
    (x, w, b, res), kw = _case(SHAPES["3x3s1"], dtype=torch.bfloat16)
    out = ops.conv_bias_act(x, w, b, residual=res, backend=backend, **kw)
    ref = reference_conv_bias_act(x, w, b, residual=res, **kw)
    eager = torch.relu(torch.nn.functional.conv2d(x, w, b, kw["stride"], kw["padding"], 1, kw["groups"]) + res)
    assert_within_eager_error(out, eager, ref)


def test_conv_without_bias_and_pair_arguments():
    (x, w, _, _), _ = _case(SHAPES["3x3s2"])
    out = ops.conv_bias_act(x, w, None, stride=(2, 1), padding=(1, 0), relu=False, backend="torch")
    assert_close(out, reference_conv_bias_act(x, w, None, stride=(2, 1), padding=(1, 0), relu=False))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_in_one_sample_stays_there(backend):
    (x, w, b, _), kw = _case(SHAPES["3x3s1"])
    x[0, 3, 4, 5] = float("nan")
    for relu in (True, False):
        out = ops.conv_bias_act(x, w, b, relu=relu, backend=backend, **kw)
        assert torch.isfinite(out[1]).all()
    # Without ReLU the NaN must reach the output (oneDNN's ReLU maps NaN to 0, PyTorch's keeps it).
    assert torch.isnan(out[0]).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    (x, w, b, _), kw = _case(SHAPES["3x3s2"])
    out = ops.conv_bias_act(x[:0], w, b, backend=backend, **kw)
    assert out.shape == (0, 24, 7, 5)
    assert ops.add_relu(x[:0], x[:0], backend=backend).shape == x[:0].shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_add_relu_and_bias_act(backend):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 6, 5, 7, generator=g), torch.randn(2, 6, 5, 7, generator=g)
    bias = torch.randn(6, generator=g)
    assert_close(ops.add_relu(x, y.contiguous(memory_format=torch.channels_last), backend=backend), (x.double() + y.double()).relu())
    assert_close(ops.bias_act(x, bias, relu=False, backend=backend), x.double() + bias.double().view(1, -1, 1, 1))
    assert_close(ops.bias_act(x, bias, backend=backend), (x.double() + bias.double().view(1, -1, 1, 1)).relu())


def _good():
    (x, w, b, res), kw = _case(SHAPES["3x3s1"])
    return dict(x=x, weight=w, bias=b, residual=res, **kw)


BAD = [
    ("x 3-D", dict(x=torch.randn(16, 9, 11)), ValueError, "x must be 4-D"),
    ("int x", dict(x=torch.ones(2, 16, 9, 11, dtype=torch.int32)), TypeError, "x must have a floating dtype"),
    ("dtype mix", dict(weight=torch.randn(16, 16, 3, 3, dtype=torch.float64)), TypeError, "weight has dtype torch.float64"),
    ("channels", dict(x=torch.randn(2, 8, 9, 11)), ValueError, "x has 8 channels but weight expects 16"),
    ("bias shape", dict(bias=torch.randn(15)), ValueError, r"bias must have shape \(16,\)"),
    ("residual shape", dict(residual=torch.randn(2, 16, 9, 10)), ValueError, "residual must have the output's shape"),
    ("groups", dict(groups=3), ValueError, "not divisible by groups=3"),
    ("stride", dict(stride=0), ValueError, "stride must be positive"),
    ("padding", dict(padding=-1), ValueError, "padding must be non-negative"),
    ("stride type", dict(stride="2"), TypeError, "stride must be an int or a pair"),
    ("too small", dict(x=torch.randn(2, 16, 1, 1), padding=0, residual=None), ValueError, "too small"),
    ("meta device", dict(residual=torch.randn(2, 16, 9, 11, device="meta")), ValueError, "residual is on meta"),
]


@pytest.mark.parametrize("name,override,exc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(name, override, exc, message):
    args = {**_good(), **override}
    x, w, b = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(exc, match=message):
        ops.conv_bias_act(x, w, b, backend="torch", **args)


def test_add_relu_shape_mismatch():
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ops.add_relu(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 4))


def test_input_requiring_grad_is_refused():
    args = _good()
    x = args.pop("x").requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only and x requires grad"):
        ops.conv_bias_act(x, args.pop("weight"), args.pop("bias"), backend="torch", **args)
    with torch.no_grad():  # fine without grad mode
        ops.conv_bias_act(x, *_case(SHAPES["3x3s1"])[0][1:3], padding=1, backend="torch")


def test_unknown_and_unavailable_backends():
    args = _good()
    x, w, b = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        ops.conv_bias_act(x, w, b, backend="cudnn", **args)
    unavailable = [n for n, m in ops.BACKENDS.items() if m.unavailable_reason("cpu", torch.float32)]
    for name in unavailable:
        reason = ops.BACKENDS[name].unavailable_reason("cpu", torch.float32)
        with pytest.raises(ops.BackendUnavailableError, match=f"backend '{name}' cannot run on cpu"):
            ops.conv_bias_act(x, w, b, backend=name, **args)
        assert reason in ops.available_backends()[name].reason or ops.available_backends()[name].available


def test_available_backends_reports_every_backend():
    status = ops.available_backends()
    assert set(status) == set(ops.BACKENDS)
    assert status["torch"].available and "cpu" in status["torch"].devices
    for s in status.values():
        assert s.available or s.reason


def test_environment_variable_sets_default(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.resolve_backend(None, "cpu", torch.float32) == "torch"
    monkeypatch.setenv(ops.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.resolve_backend(None, "cpu", torch.float32)
    monkeypatch.setenv(ops.ENV_VAR, "auto")
    assert ops.resolve_backend(None, "cpu", torch.float32) in ops.BACKENDS


class _Unavailable:
    NAME = "ghost"

    @staticmethod
    def unavailable_reason(device_type, dtype):
        return "ghost hardware not present"


def test_automatic_choice_warns_once_when_falling_back(monkeypatch):
    monkeypatch.setitem(ops.BACKENDS, "ghost", _Unavailable)
    monkeypatch.setitem(ops._PREFERENCE, "cpu", ("ghost", "torch"))
    ops._resolve.cache_clear()
    try:
        with pytest.warns(ops.BackendFallbackWarning, match="falls back to 'torch'.*ghost hardware not present"):
            assert ops.resolve_backend(None, "cpu", torch.float32) == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ops.resolve_backend(None, "cpu", torch.float32) == "torch"
    finally:
        ops._resolve.cache_clear()


def test_automatic_choice_on_cuda_prefers_the_extension_then_triton(monkeypatch):
    """The order the H200 measured (extension fastest); a CUDA machine is pretended, so this runs anywhere."""
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    for name in ("extension", "triton", "torch"):
        monkeypatch.setattr(ops.BACKENDS[name], "unavailable_reason", lambda device_type, dtype: None)
    ops._resolve.cache_clear()
    try:
        assert ops.resolve_backend(None, "cuda", torch.float16) == "extension"
        monkeypatch.setattr(ops.BACKENDS["extension"], "unavailable_reason", lambda device_type, dtype: "not built")
        ops._resolve.cache_clear()
        with pytest.warns(ops.BackendFallbackWarning, match="falls back to 'triton'.*'extension' unavailable: not built"):
            assert ops.resolve_backend(None, "cuda", torch.float16) == "triton"
    finally:
        ops._resolve.cache_clear()


@pytest.mark.skipif("onednn" not in CPU_BACKENDS, reason="oneDNN backend unavailable here")
def test_onednn_packed_weights_follow_the_weight():
    """The onednn backend caches reordered weights per weight: an in-place write and a
    ``p.data = t`` swap (same object, same version) must both be seen."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 16, 7, 6, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(32, 16, 3, 3, generator=g) / 12, torch.randn(32, generator=g)

    def check():
        out = ops.conv_bias_act(x, weight, bias, stride=2, padding=1, backend="onednn")
        assert_close(out, reference_conv_bias_act(x, weight, bias, stride=2, padding=1))

    check()
    weight.mul_(-2.0)
    check()
    weight.data = torch.randn(32, 16, 3, 3, generator=g)
    check()


def test_cached_checks_still_refuse_bad_calls():
    """The conv checks are cached per call signature: a valid call must not let a later invalid
    one through, and arguments that cannot be cached are still checked."""
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(8, 4, 3, 3)
    ops.conv_bias_act(x, weight, None, stride=[1, 1], padding=1, backend="torch")
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ops.conv_bias_act(x, weight, None, stride=[1, 1], padding=1, residual=torch.randn(1, 8, 4, 5), backend="torch")
    with pytest.raises(TypeError, match=r"stride must be an int or a pair of ints, got \[\[1\], \[1\]\]"):
        ops.conv_bias_act(x, weight, None, stride=[[1], [1]], padding=1, backend="torch")
    with pytest.raises(TypeError, match="bias must be a torch.Tensor, got list"):
        ops.conv_bias_act(x, weight, [0.0] * 8, padding=1, backend="torch")


# ---- BoundConvBiasAct: checks once per call signature, then straight to the backend.
AUTO_CPU = ops.resolve_backend(None, "cpu", torch.float32)


@pytest.mark.parametrize("backend", sorted({*CPU_BACKENDS, AUTO_CPU}))
@pytest.mark.parametrize("with_residual", [False, True])
def test_bound_conv_matches_float64(backend, with_residual):
    (x, weight, bias, residual), kw = _case(SHAPES["3x3s2"])
    bound = ops.BoundConvBiasAct(**kw, relu=True, backend=backend)
    res = residual if with_residual else None
    expected = reference_conv_bias_act(x, weight, bias, **kw, residual=res, relu=True)
    with torch.inference_mode():
        for seed in range(3):  # the first call plans, the later ones take the planned path
            x2 = x if seed == 0 else torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
            out = bound(x2, weight, bias, res)
            assert_close(out, expected if seed == 0 else reference_conv_bias_act(x2, weight, bias, **kw, residual=res))


def test_bound_conv_still_refuses_bad_calls():
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(8, 4, 3, 3)
    bound = ops.BoundConvBiasAct(padding=1, backend="torch")
    with torch.inference_mode():
        bound(x, weight, None)
        with pytest.raises(ValueError, match="residual must have the output's shape"):
            bound(x, weight, None, torch.randn(1, 8, 4, 5))
        with pytest.raises(ValueError, match="x has 5 channels but weight expects 4"):
            bound(torch.randn(1, 5, 5, 5), weight, None)
        with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has torch.float32"):
            bound(x, weight.double(), None)
        with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
            bound([[1.0]], weight, None)
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only and x requires grad"):
        bound(x, weight, None)


def test_bound_conv_follows_the_backend_variable(monkeypatch):
    calls = []
    for name in ("torch", AUTO_CPU):
        real = ops.BACKENDS[name].conv_bias_act
        monkeypatch.setattr(ops.BACKENDS[name], "conv_bias_act", lambda *a, name=name, real=real: calls.append(name) or real(*a))
    (x, weight, bias, _), kw = _case(SHAPES["1x1s1"])
    bound = ops.BoundConvBiasAct(**kw)
    with torch.inference_mode():
        monkeypatch.setenv(ops.ENV_VAR, "torch")
        bound(x, weight, bias)
        bound(x, weight, bias)
        monkeypatch.delenv(ops.ENV_VAR)
        out = bound(x, weight, bias)
    assert calls == ["torch", "torch", AUTO_CPU]
    assert_close(out, reference_conv_bias_act(x, weight, bias, **kw))


def test_bound_conv_plan_keeps_no_weight_alive():
    """The plan knows its weight by a weak reference: a model moved to another dtype or device
    does not keep the old weights in memory, and new weights are checked before they are used."""
    x, weight, bias = torch.randn(1, 4, 5, 5), torch.randn(8, 4, 3, 3), torch.randn(8)
    bound = ops.BoundConvBiasAct(padding=1, backend="torch")
    with torch.inference_mode():
        bound(x, weight, bias)
        bound(x, weight, bias)
    refs = weakref.ref(weight), weakref.ref(bias)
    del weight, bias
    gc.collect()
    assert [r() for r in refs] == [None, None]
    with torch.inference_mode(), pytest.raises(TypeError, match="weight has dtype torch.float64"):
        bound(x, torch.randn(8, 4, 3, 3, dtype=torch.float64), None)

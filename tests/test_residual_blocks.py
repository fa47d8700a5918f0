"""residual_blocks (a stage of residual blocks in one call) and FusedStage, which runs a fused
model's stages through it: results against float64, argument checks, and when the one-call path is
taken and when a changed stage falls back to its modules."""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import bench, ops
from resnet_fused.backends import extension
from resnet_fused.modules import FusedBasicBlock, FusedBottleneck, FusedStage
from resnet_fused.reference import random_model
from utils import assert_close, assert_within_eager_error, reference_conv_bias_act

needs_ext = pytest.mark.skipif(extension.load_error() is not None, reason="resnet_fused._C is not loaded")
FLAGS = set(bench.cpu_flags())
AMX = {"amx_tile", "amx_bf16"} <= FLAGS or (os.environ.get("RESNET_FUSED_AMX_EMULATE") == "1" and "avx512_bf16" in FLAGS)
CPU_BACKENDS = [n for n in ("torch", "onednn", "extension") if ops.BACKENDS[n].unavailable_reason("cpu", None) is None]

# Two blocks, the first with a strided projection shortcut, the second with the identity (or both
# with the identity):
# (in channels, out channels, kernel, stride, groups) per conv, projection first.
STAGES = {
    "bottleneck": {
        "blocks": [([(16, 16, 1, 1, 1), (16, 16, 3, 2, 2), (16, 32, 1, 1, 1)], (16, 32, 1, 2, 1)),
                   ([(32, 16, 1, 1, 1), (16, 16, 3, 1, 1), (16, 32, 1, 1, 1)], None)],
        "channels": 16,
    },
    "basic": {
        "blocks": [([(16, 32, 3, 2, 1), (32, 32, 3, 1, 1)], (16, 32, 1, 2, 1)),
                   ([(32, 32, 3, 1, 1), (32, 32, 3, 1, 1)], None)],
        "channels": 16,
    },
    # resnet18's layer1: the identity from the first block on, so the stage's input is a shortcut.
    "basic_identity": {
        "blocks": [([(32, 32, 3, 1, 1), (32, 32, 3, 1, 1)], None)] * 2,
        "channels": 32,
    },
}


def make_stage(kind: str, dtype: torch.dtype, generator: torch.Generator, batch: int = 2):
    """x and residual_blocks' keyword arguments for one of STAGES, He-scaled so values stay O(1)."""
    spec = STAGES[kind]
    args = {key: [] for key in ("weights", "biases", "strides", "paddings", "groups", "chain_lengths", "projections")}
    for chain, projection in spec["blocks"]:
        for c, k, r, stride, groups in ([projection] if projection else []) + chain:
            w = torch.randn(k, c // groups, r, r, generator=generator) * (2 / (c // groups * r * r)) ** 0.5
            args["weights"].append(w.to(dtype).contiguous(memory_format=torch.channels_last))
            args["biases"].append((0.1 * torch.randn(k, generator=generator)).to(dtype))
            args["strides"].append((stride, stride))
            args["paddings"].append((r // 2, r // 2))
            args["groups"].append(groups)
        args["chain_lengths"].append(len(chain))
        args["projections"].append(projection is not None)
    x = torch.randn(batch, spec["channels"], 9, 11, generator=generator).to(dtype)
    return x.contiguous(memory_format=torch.channels_last), args


def stage_by_definition(x, weights, biases, strides, paddings, groups, chain_lengths, projections, conv=None):
    """The blocks one conv at a time; each conv is `conv` (default: the float64 reference)."""
    conv = conv or reference_conv_bias_act
    i = 0
    for length, projection in zip(chain_lengths, projections):
        shortcut = x
        if projection:
            shortcut = conv(x, weights[i], biases[i], stride=strides[i], padding=paddings[i], groups=groups[i],
                            relu=False)
            i += 1
        for j in range(length):
            x = conv(x, weights[i], biases[i], stride=strides[i], padding=paddings[i], groups=groups[i],
                     residual=shortcut if j == length - 1 else None, relu=True)
            i += 1
    return x


def eager_conv(x, weight, bias, *, stride, padding, groups, residual=None, relu=True):
    out = F.conv2d(x, weight, bias, stride, padding, 1, groups)
    out = out if residual is None else out + residual
    return out.relu() if relu else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(STAGES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_residual_blocks_matches_float64(backend, kind, dtype):
    x, args = make_stage(kind, dtype, torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = ops.residual_blocks(x, **args, backend=backend)
        reference = stage_by_definition(x, **args)
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        if dtype == torch.float32:
            assert_close(out, reference)
        else:
            assert_within_eager_error(out, stage_by_definition(x, **args, conv=eager_conv), reference)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(STAGES))
def test_one_call_equals_conv_by_conv(kind, dtype):
    """The C++ loop wires shortcuts and chains as the modules do: the same kernels, the same bits."""
    x, args = make_stage(kind, dtype, torch.Generator().manual_seed(2))

    def conv(x, weight, bias, **kw):
        return ops.conv_bias_act(x.contiguous(memory_format=torch.channels_last), weight, bias, backend="extension", **kw)

    with torch.inference_mode():
        by_convs = stage_by_definition(x, **args, conv=conv)
        flat = {key: [v for pair in args[key] for v in pair] for key in ("strides", "paddings")}
        one_call = torch.ops.resnet_fused.residual_blocks(x, args["weights"], args["biases"], flat["strides"],
                                                          flat["paddings"], args["groups"], args["chain_lengths"],
                                                          args["projections"])
    assert torch.equal(one_call, by_convs)


def test_residual_blocks_argument_errors():
    x, args = make_stage("bottleneck", torch.float32, torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"one entry per weight \(7\), got \{'groups': 6\}"):
        ops.residual_blocks(x, **{**args, "groups": args["groups"][:-1]})
    with pytest.raises(ValueError, match="one entry per block, got 2 and 1"):
        ops.residual_blocks(x, **{**args, "projections": [True]})
    with pytest.raises(ValueError, match="chain_lengths must be positive ints"):
        ops.residual_blocks(x, **{**args, "chain_lengths": [3, 0]})
    with pytest.raises(ValueError, match="take 6 convs, got 7 weights"):
        ops.residual_blocks(x, **{**args, "projections": [False, False]})
    weights = list(args["weights"])
    weights[4] = weights[4][:, :8]  # block 1's first conv expects 8 channels, gets the stage's 32
    with pytest.raises(ValueError, match="block 1, conv 0: x has 32 channels but weight expects 8"):
        ops.residual_blocks(x, **{**args, "weights": weights})
    biases = list(args["biases"])
    biases[0] = biases[0].double()
    with pytest.raises(TypeError, match="block 0, projection: bias has dtype torch.float64"):
        ops.residual_blocks(x, **{**args, "biases": biases})
    with pytest.raises(RuntimeError, match="inference-only and x requires grad"):
        ops.residual_blocks(x.clone().requires_grad_(), **args)


@needs_ext
def test_residual_blocks_op_refuses_inconsistent_lists():
    x, args = make_stage("basic", torch.float32, torch.Generator().manual_seed(4))
    flat = [1] * (2 * len(args["weights"]))
    with pytest.raises(RuntimeError, match="one bias and groups, and two strides and paddings, per weight"):
        torch.ops.resnet_fused.residual_blocks(x, args["weights"], args["biases"], flat[:-2], flat, args["groups"],
                                               args["chain_lengths"], args["projections"])
    with pytest.raises(RuntimeError, match="the blocks take 4 convs, got 5 weights"):
        torch.ops.resnet_fused.residual_blocks(x, args["weights"], args["biases"], flat, flat, args["groups"],
                                               args["chain_lengths"], [False, False])


# ---- FusedStage in fused models.


def fused_model(name: str, dtype=torch.float32, seed: int = 0):
    return resnet_fused.fuse(random_model(name, seed=seed, calibration_size=16), backend="extension", dtype=dtype)


def by_modules(stage: FusedStage, x: torch.Tensor) -> torch.Tensor:
    for block in stage:
        x = block(x)
    return x


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_stage_calls_after_the_first(name, dtype, monkeypatch):
    model = fused_model(name, dtype)
    stages = [model.layer_1, model.layer_2, model.layer_3, model.layer_4]
    assert all(type(stage) is FusedStage for stage in stages)
    assert "layer_2.0.down_sample.0.weight" in model.state_dict()
    x = torch.randn(2, 3, 40, 36).to(dtype)
    with torch.inference_mode():
        first = model(x)
        assert all(stage._plan is not None for stage in stages)

        def not_called(self, x):
            raise AssertionError("a block module ran")

        monkeypatch.setattr(FusedBasicBlock, "forward", not_called)
        monkeypatch.setattr(FusedBottleneck, "forward", not_called)
        second = model(x)
    assert torch.equal(first, second)


@needs_ext
def test_a_changed_stage_runs_its_modules_again():
    model = fused_model("resnet50")
    stage = model.layer_2
    x = torch.randn(2, 256, 12, 10).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        stage(x)
        plan = stage._plan
        assert plan is not None

        calls = []
        handle = stage[1].conv_2.register_forward_hook(lambda m, i, o: calls.append(1))
        for _ in range(2):
            assert torch.equal(stage(x), by_modules(stage, x))
        assert len(calls) == 4, "a hook inside the stage runs on every call"
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(2))
        stage(x)
        assert calls.count(2) > 1, "a global hook sees the blocks"
        handle.remove()
        stage(x)
        assert stage._plan is not None and stage._plan is not plan

        # A new weight tensor (a buffer replaced), and a block replaced: both used at once.
        stage[0].conv_1.weight = stage[0].conv_1.weight * 0.5
        expected = by_modules(stage, x)
        assert torch.equal(stage(x), expected) and torch.equal(stage(x), expected)
        replaced = copy.deepcopy(stage[2])
        replaced.conv_3.bias = replaced.conv_3.bias + 1
        stage[2] = replaced
        expected2 = by_modules(stage, x)
        assert not torch.equal(expected, expected2)
        for _ in range(2):
            assert torch.equal(stage(x), expected2)

        other = torch.randn(1, 256, 7, 9).contiguous(memory_format=torch.channels_last)
        for _ in range(2):
            assert torch.equal(stage(other), by_modules(stage, other))
        assert stage._plan.key[0] == other.shape
    with torch.no_grad(), torch.enable_grad():
        assert torch.equal(stage(x), expected2)  # grad mode on: the modules run (and refuse nothing here)


@needs_ext
def test_stage_plan_is_not_saved_or_copied():
    model = fused_model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        before = model(x)
        model(x)
    assert model.layer_1._plan is not None
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        assert other.layer_1._plan is None
        with torch.inference_mode():
            assert torch.equal(other(x), before) and torch.equal(other(x), before)
        assert other.layer_1._plan is not None


def test_stage_without_a_one_call_kernel_runs_its_modules():
    model = resnet_fused.fuse(random_model("resnet18", seed=1, calibration_size=16), backend="torch")
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        first, second = model(x), model(x)
    assert model.layer_1._plan is None and torch.equal(first, second)


# The kernels a stage's convs are forced onto (no Winograd), and the profiler scope of a block's
# last conv when it writes its output over the shortcut; None: that kernel never does (the AVX2
# core parks partial sums in the output).
OVER_RESIDUAL = [
    pytest.param(torch.bfloat16, {}, "implicit_gemm_amx_over_residual", id="amx",
                 marks=pytest.mark.skipif(not AMX, reason="this CPU has no AMX-BF16 (nor emulated tiles)")),
    pytest.param(torch.bfloat16, {extension.CPU_ISA_ENV: "avx512"}, "implicit_gemm_bf16_over_residual",
                 id="avx512_bf16", marks=pytest.mark.skipif("avx512_bf16" not in FLAGS, reason="no AVX512-BF16")),
    pytest.param(torch.float32, {extension.CPU_ISA_ENV: "avx512", extension.GEMM_CORE_ENV: "own"},
                 "implicit_gemm_over_residual", id="avx512_fp32",
                 marks=pytest.mark.skipif("avx512f" not in FLAGS, reason="no AVX-512")),
    pytest.param(torch.float32, {extension.CPU_ISA_ENV: "avx2", extension.GEMM_CORE_ENV: "own"}, None,
                 id="avx2_fp32", marks=pytest.mark.skipif(not {"avx2", "fma"} <= FLAGS, reason="no AVX2 and FMA")),
]


@needs_ext
@pytest.mark.parametrize("dtype, environment, scope", OVER_RESIDUAL)
@pytest.mark.parametrize("kind", list(STAGES))
def test_stage_writes_over_its_own_shortcuts_only(kind, dtype, environment, scope, monkeypatch,
                                                  nan_filled_empty_exact_fp32):
    """A block's last conv writes its output over the shortcut where the op made that tensor (a
    projection's output, the previous block's output) and its kernel stores each output after
    reading its residual: never over the stage's input (the caller's), and with the same bits as
    the convs called one by one."""
    monkeypatch.setenv(extension.AVX2_CONV_ENV, "1")
    monkeypatch.setenv(extension.WINOGRAD_TILE_ENV, "off")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    x, args = make_stage(kind, dtype, torch.Generator().manual_seed(7))
    x_before = x.clone()
    flat = {key: [v for pair in args[key] for v in pair] for key in ("strides", "paddings")}

    def stage():
        return torch.ops.resnet_fused.residual_blocks(x, args["weights"], args["biases"], flat["strides"],
                                                      flat["paddings"], args["groups"], args["chain_lengths"],
                                                      args["projections"])

    def conv_by_conv(x, weight, bias, **kw):
        return ops.conv_bias_act(x.contiguous(memory_format=torch.channels_last), weight, bias, backend="extension",
                                 **kw)

    with torch.inference_mode():
        stage()  # packs the weights
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = stage()
        by_convs = stage_by_definition(x, **args, conv=conv_by_conv)
    names = [e.name for e in prof.events()]
    own_shortcuts = sum(p or b > 0 for b, p in enumerate(args["projections"]))
    assert sum(name.endswith("_over_residual") for name in names) == (own_shortcuts if scope else 0)
    assert scope is None or names.count(scope) == own_shortcuts
    assert torch.equal(out, by_convs)
    assert torch.isfinite(out).all()
    assert torch.equal(x, x_before), "the stage's input was written"
    # Under opcheck's schema check (a Python dispatch mode) no output may alias its residual.
    torch.library.opcheck(torch.ops.resnet_fused.residual_blocks.default,
                          (x, args["weights"], args["biases"], flat["strides"], flat["paddings"], args["groups"],
                           args["chain_lengths"], args["projections"]), test_utils=("test_schema",))

"""Triton backend on a GPU: real ResNet-50 layer shapes in fp32 (TF32 off), fp16 and bf16, tensors
past 2^31 elements, autotuning once per shape. Skipped without CUDA (see conftest)."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close, assert_within_eager_error, reference_conv_bias_act

from resnet_fused import ops
from resnet_fused.backends import torch_backend

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("nan_filled_empty_exact_fp32")]
pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# (c, h, w, k, kernel, stride, padding, groups, residual) at a 224x224 input.
RESNET50_LAYERS = {
    "stem_7x7_s2": (3, 224, 224, 64, 7, 2, 3, 1, False),
    "layer1_reduce_1x1": (256, 56, 56, 64, 1, 1, 0, 1, False),
    "layer1_3x3": (64, 56, 56, 64, 3, 1, 1, 1, False),
    "layer1_expand_1x1_residual": (64, 56, 56, 256, 1, 1, 0, 1, True),
    "layer2_3x3_s2": (128, 56, 56, 128, 3, 2, 1, 1, False),
    "layer2_downsample_1x1_s2": (256, 56, 56, 512, 1, 2, 0, 1, False),
    "layer3_3x3": (256, 14, 14, 256, 3, 1, 1, 1, False),
    "layer4_3x3_s2": (512, 14, 14, 512, 3, 2, 1, 1, False),
    "layer4_expand_1x1_residual": (512, 7, 7, 2048, 1, 1, 0, 1, True),
    "resnext50_layer1_grouped_3x3": (128, 56, 56, 128, 3, 1, 1, 32, False),
    "resnext50_layer4_grouped_3x3_s2": (1024, 14, 14, 1024, 3, 2, 1, 32, False),
}


def layer_inputs(batch, c, h, w, k, kernel, stride, padding, groups, residual, dtype, layout=torch.channels_last):
    x = torch.randn(batch, c, h, w, device="cuda").to(dtype=dtype, memory_format=layout)
    weight = (torch.randn(k, c // groups, kernel, kernel, device="cuda") / (kernel * kernel * c / groups) ** 0.5)
    weight = weight.to(dtype=dtype, memory_format=torch.channels_last)
    bias = torch.randn(k, device="cuda").to(dtype)
    p = (h + 2 * padding - kernel) // stride + 1
    q = (w + 2 * padding - kernel) // stride + 1
    res = torch.randn(batch, k, p, q, device="cuda").to(dtype=dtype, memory_format=layout) if residual else None
    return x, weight, bias, res


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("layer", RESNET50_LAYERS)
def test_resnet50_layers(layer, batch, dtype):
    c, h, w, k, kernel, stride, padding, groups, residual = RESNET50_LAYERS[layer]
    x, weight, bias, res = layer_inputs(batch, c, h, w, k, kernel, stride, padding, groups, residual, dtype)
    args = dict(stride=stride, padding=padding, groups=groups, residual=res, relu=True)
    out = ops.conv_bias_act(x, weight, bias, backend="triton", **args)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = reference_conv_bias_act(x, weight, bias, **args)
    assert_close(out, ref, dtype)
    if dtype != torch.float32:
        eager = torch_backend.conv_bias_act(x, weight, bias, (stride, stride), (padding, padding), groups, res, True)
        assert_within_eager_error(out, eager, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", ["stem_7x7_s2", "layer1_expand_1x1_residual", "layer2_3x3_s2"])
def test_resnet50_layers_nchw_input(layer, dtype):
    c, h, w, k, kernel, stride, padding, groups, residual = RESNET50_LAYERS[layer]
    x, weight, bias, res = layer_inputs(2, c, h, w, k, kernel, stride, padding, groups, residual, dtype,
                                        layout=torch.contiguous_format)
    weight = weight.contiguous()
    args = dict(stride=stride, padding=padding, groups=groups, residual=res, relu=False)
    out = ops.conv_bias_act(x, weight, bias, backend="triton", **args)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, reference_conv_bias_act(x, weight, bias, **args), dtype)


def test_fp32_follows_tf32_switch():
    x, weight, bias, _ = layer_inputs(8, *RESNET50_LAYERS["layer3_3x3"], torch.float32)
    ref = reference_conv_bias_act(x, weight, bias, padding=1)
    exact = ops.conv_bias_act(x, weight, bias, padding=1, backend="triton")
    torch.backends.cudnn.allow_tf32 = True
    tf32 = ops.conv_bias_act(x, weight, bias, padding=1, backend="triton")
    assert_close(exact, ref, torch.float32)
    assert_close(tf32, ref, torch.float32, rel=1e-2)
    assert not torch.equal(exact, tf32), "allow_tf32=True should run the reduction on TF32 tensor cores"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pointwise_resnet_shapes(dtype):
    x = torch.randn(8, 256, 56, 56, device="cuda").to(dtype=dtype, memory_format=torch.channels_last)
    res = torch.randn(8, 256, 56, 56, device="cuda").to(dtype)
    bias = torch.randn(256, device="cuda").to(dtype)
    assert torch.equal(ops.add_relu(x, res, backend="triton"), torch.add(x, res).relu())
    assert torch.equal(ops.bias_act(x, bias, relu=False, backend="triton"), x + bias.view(1, -1, 1, 1))


def test_automatic_choice_on_cuda_is_the_extension(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    for dtype in DTYPES:
        assert ops.resolve_backend(None, "cuda", dtype) == "extension"


@pytest.fixture
def fresh_tuner(monkeypatch, tmp_path):
    """A tuner with nothing tuned and its disk cache in a temporary directory."""
    from resnet_fused.kernels import configs

    tuner = configs.Tuner(cache=configs.DiskCache(str(tmp_path)))
    monkeypatch.setattr(configs, "TUNED", tuner)
    monkeypatch.delenv(configs.AUTOTUNE_ENV_VAR, raising=False)  # these tests count timings
    return tuner


def test_autotunes_once_per_shape(monkeypatch, fresh_tuner):
    from resnet_fused.kernels import configs

    benched = []

    def counting_bench(fn):
        benched.append(1)
        return torch_do_bench(fn)

    torch_do_bench = configs._do_bench
    monkeypatch.setattr(configs, "_do_bench", counting_bench)
    x, weight, bias, _ = layer_inputs(3, 48, 13, 13, 48, 3, 1, 1, 1, False, torch.float16)
    first = ops.conv_bias_act(x, weight, bias, padding=1, backend="triton")
    tuned = len(benched)
    assert tuned > 1
    for _ in range(3):
        assert torch.equal(ops.conv_bias_act(x, weight, bias, padding=1, backend="triton"), first)
    assert len(benched) == tuned


def test_tuned_configs_serve_the_next_process(tmp_path):
    # A second process with the same cache directory runs without timing anything.
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import torch
        from resnet_fused import ops
        from resnet_fused.kernels import configs
        timed = []
        real = configs._do_bench
        configs._do_bench = lambda fn: timed.append(1) or real(fn)
        x = torch.randn(2, 64, 9, 9, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(96, 64, 3, 3, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        ops.conv_bias_act(x, w, None, padding=1, backend="triton")
        torch.cuda.synchronize()
        print("timed", len(timed))
    """)
    env = dict(os.environ, RESNET_FUSED_CACHE_DIR=str(tmp_path))
    env.pop("RESNET_FUSED_AUTOTUNE", None)  # the first process must time
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    timed = [int(run.stdout.split()[-1]) for run in runs]
    assert timed[0] > 1 and timed[1] == 0, timed


# Layers that launch few output tiles at batch 1-8, where split-K is proposed on a 132-SM GPU.
DEEP_LAYERS = [("layer3_3x3", 1), ("layer3_3x3", 8), ("layer4_3x3_s2", 1), ("layer4_3x3_s2", 8),
               ("layer4_expand_1x1_residual", 1), ("layer4_expand_1x1_residual", 8),
               ("resnext50_layer4_grouped_3x3_s2", 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer,batch", DEEP_LAYERS)
def test_split_k_deep_layers(layer, batch, dtype):
    from resnet_fused.kernels import configs, conv

    c, h, w, k, kernel, stride, padding, groups, residual = RESNET50_LAYERS[layer]
    x, weight, bias, res = layer_inputs(batch, c, h, w, k, kernel, stride, padding, groups, residual, dtype)
    p, q = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    device = configs.device_info(x.device)
    k_chunk = c // groups
    cands = configs.candidates("gemm" if kernel == 1 and stride == 1 else "conv", batch * p * q, k // groups, k_chunk,
                               x.element_size(), device.shared_memory, taps=kernel * kernel, groups=groups,
                               sm_count=device.sm_count)
    splits = [cfg for cfg in cands if cfg.split_k > 1]
    assert splits, f"no split-K candidate for {layer} at batch {batch}"
    ref = reference_conv_bias_act(x, weight, bias, stride=stride, padding=padding, groups=groups, residual=res)
    args = (stride, stride), (padding, padding), groups, res, True
    for cfg in splits:
        out = conv.conv_bias_act(x, weight, bias, *args, config=cfg)
        assert_close(out, ref, dtype)
        assert torch.equal(conv.conv_bias_act(x, weight, bias, *args, config=cfg), out), "split-K is not deterministic"


def test_split_k_keeps_nan_like_eager():
    from resnet_fused.kernels import configs, conv

    x, weight, bias, res = layer_inputs(1, *RESNET50_LAYERS["layer4_expand_1x1_residual"], torch.float16)
    x[0, 7, 3, 3] = float("nan")
    res[0, 100, 0, 0] = float("nan")
    out = conv.conv_bias_act(x, weight, bias, (1, 1), (0, 0), 1, res, True,
                             config=configs.LaunchConfig(32, 64, 128, 3, 4, 8))
    eager = torch_backend.conv_bias_act(x, weight, bias, (1, 1), (0, 0), 1, res, True)
    assert torch.equal(out.isnan(), eager.isnan()) and eager.isnan().any()


def test_no_timing_inside_cuda_graph_capture(fresh_tuner):
    from resnet_fused.kernels import configs, conv

    c, h, w, k, kernel, stride, padding, groups, residual = RESNET50_LAYERS["layer3_3x3"]
    x, weight, bias, _ = layer_inputs(1, c, h, w, k, kernel, stride, padding, groups, residual, torch.float16)
    device = configs.device_info(x.device)
    first = configs.candidates("conv", 14 * 14, k, c, 2, device.shared_memory, taps=9, sm_count=device.sm_count)[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiled before capture, as any warm-up would
        conv.conv_bias_act(x, weight, bias, (1, 1), (1, 1), 1, None, True, config=first)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.conv_bias_act(x, weight, bias, padding=1, backend="triton")
    assert not fresh_tuner.best, "an untimed choice made during capture was stored as tuned"
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, reference_conv_bias_act(x, weight, bias, padding=1), torch.float16)
    ops.conv_bias_act(x, weight, bias, padding=1, backend="triton")  # outside capture: tuned now
    assert len(fresh_tuner.best) == 1


def test_fused_resnet50():
    import copy

    import resnet_fused
    from resnet_fused.reference import random_model

    model = random_model("resnet50", calibration_size=64).cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        ref = copy.deepcopy(model).double()(x.double())
        out32 = resnet_fused.fuse(model, backend="triton")(x.contiguous(memory_format=torch.channels_last))
        assert_close(out32, ref, torch.float32, rel=1e-4)
        out16 = resnet_fused.fuse(model, backend="triton", dtype=torch.float16)(x.half())
        eager16 = copy.deepcopy(model).half()(x.half())
        assert_within_eager_error(out16, eager16, ref)


GIB = 2**30


def free_gib() -> float:
    free, _ = torch.cuda.mem_get_info()
    return free / GIB


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "nchw"])
def test_pointwise_beyond_2_31_elements(layout):
    shape = (2, 64, 4100, 4100)  # 2,151,680,000 elements
    if free_gib() < 24:
        pytest.skip("needs about 24 GiB of free GPU memory")
    x = torch.randn(shape, device="cuda", dtype=torch.float16).contiguous(memory_format=layout)
    assert x.numel() > 2**31
    res = torch.randn(shape, device="cuda", dtype=torch.float16)
    out = ops.add_relu(x, res, backend="triton")
    assert torch.equal(out, torch.add(x, res).relu_())
    del out, res
    bias = torch.randn(64, device="cuda", dtype=torch.float16)
    out = ops.bias_act(x, bias, relu=True, backend="triton")
    assert torch.equal(out, (x + bias.view(1, -1, 1, 1)).relu_())


def test_conv_output_beyond_2_31_elements():
    # 129 x 64 x 512 x 512 = 2,164,260,864 output elements; the residual is just as large.
    if free_gib() < 24:
        pytest.skip("needs about 24 GiB of free GPU memory")
    dtype = torch.float16
    x, weight, bias, res = layer_inputs(129, 16, 512, 512, 64, 3, 1, 1, 1, True, dtype)
    out = ops.conv_bias_act(x, weight, bias, padding=1, residual=res, backend="triton")
    assert out.numel() > 2**31
    assert torch.isfinite(out).all(), "unwritten (NaN-filled) or overflowed output elements"
    for i in (0, 64, 128):
        image = slice(i, i + 1)
        ref = reference_conv_bias_act(x[image], weight, bias, padding=1, residual=res[image])
        assert_close(out[image], ref, dtype)

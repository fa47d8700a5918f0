"""fuse(): parity with the eager model across families, the input model untouched, clear refusals."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import resnet_fused
from resnet_fused import ops, reference
from resnet_fused.accuracy import judge, rel_error
from resnet_fused.modules import FusedBasicBlock, FusedBottleneck, FusedConvBNAct

timm = pytest.importorskip("timm")

CPU_BACKENDS = [n for n in ("torch", "onednn") if ops.BACKENDS[n].unavailable_reason("cpu", torch.float32) is None]
ARCHS = {
    "ours-resnet18": "resnet18",
    "ours-resnet50": "resnet50",
    "tv-resnet18": torchvision.models.resnet18,
    "tv-resnet50": torchvision.models.resnet50,
    "tv-resnext50_32x4d": torchvision.models.resnext50_32x4d,
    "tv-wide_resnet50_2": torchvision.models.wide_resnet50_2,
    "timm-resnet50": lambda num_classes: timm.create_model("resnet50", num_classes=num_classes),
}


def _outputs(model, fused, x):
    with torch.inference_mode():
        return model(x), fused(x), copy.deepcopy(model).double()(x.double())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_matches_eager_fp32(arch, backend):
    model = reference.random_model(ARCHS[arch], seed=7)
    fused = resnet_fused.fuse(model, backend=backend)
    x = torch.randn(3, 3, 67, 45)  # odd sizes, batch > 1
    eager, out, ref = _outputs(model, fused, x)
    verdict = judge(out, eager, ref)
    # Eager fp32 is itself ~1e-5 from float64 on the deeper models: the fused model must be as
    # close to float64 as 1e-5 or twice eager's own error, whichever is larger.
    assert verdict.ok, verdict
    assert verdict.argmax_agreement == 1.0
    assert (out[0] - out[1]).abs().max() > 1e-2 * out.abs().max(), "degenerate model: output ignores the input"


def test_fused_resnet18_within_1e5_of_eager():
    model = reference.random_model("resnet18", seed=2)
    x = torch.randn(2, 3, 67, 45)
    eager, out, _ = _outputs(model, resnet_fused.fuse(model), x)
    assert rel_error(out, eager) < 1e-5


def test_every_conv_bn_pair_is_fused():
    for arch in ("ours-resnet50", "tv-resnext50_32x4d", "timm-resnet50", "ours-resnet18"):
        fused = resnet_fused.fuse(reference.random_model(ARCHS[arch], calibration_size=32))
        kinds = {type(m) for m in fused.modules()}
        assert not kinds & {nn.BatchNorm2d, nn.Conv2d, nn.ReLU}, (arch, kinds)
        assert kinds & {FusedBasicBlock, FusedBottleneck}


def test_input_model_is_not_modified():
    model = reference.random_model("resnet18", calibration_size=32)
    before = copy.deepcopy(model.state_dict())
    structure = repr(model)
    resnet_fused.fuse(model, dtype=torch.float64, memory_format=torch.contiguous_format)
    assert repr(model) == structure
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert not model.training


def test_training_mode_is_refused():
    model = reference.resnet18().train()
    with pytest.raises(ValueError, match="eval mode.*model.eval"):
        resnet_fused.fuse(model)
    model.eval()
    model.layer_2[0].bn_1.train()
    with pytest.raises(ValueError, match="layer_2.0.bn_1"):
        resnet_fused.fuse(model)


class _Wrapper(nn.Module):
    """A user model holding ResNet blocks among modules the fuser does not know."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(3, 16, 3, padding=1)  # a conv without BN: left alone
        self.gelu = nn.GELU()
        self.block = reference.BasicBlock(16, 16)
        self.dilated = torchvision.models.resnet.Bottleneck(16, 4, dilation=2)  # dilation: not ours, left alone
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.dilated(self.block(self.gelu(self.pre(x)))))


def test_unknown_modules_are_left_as_they_are():
    model = _Wrapper()
    reference.randomize_bn(model)
    reference.calibrate_bn(model, size=16)
    fused = resnet_fused.fuse(model)
    assert isinstance(fused.block, FusedBasicBlock)
    assert type(fused.pre) is nn.Conv2d and type(fused.gelu) is nn.GELU
    assert type(fused.dilated) is torchvision.models.resnet.Bottleneck
    assert torch.equal(fused.pre.weight, model.pre.weight)
    x = torch.randn(2, 3, 15, 13)
    eager, out, ref = _outputs(model, fused, x)
    assert judge(out, eager, ref).ok


def test_a_block_alone_is_fused():
    block = reference.BottleNeck(32, 16, stride=2, down_sample=nn.Sequential(reference.conv1x1(32, 64, 2), nn.BatchNorm2d(64)))
    reference.randomize_bn(block)
    block.train()
    with torch.no_grad():
        block(torch.randn(8, 32, 9, 9))
    block.eval()
    fused = resnet_fused.fuse(block)
    assert isinstance(fused, FusedBottleneck) and isinstance(fused.down_sample[0], FusedConvBNAct)
    x = torch.randn(2, 32, 9, 9)
    eager, out, ref = _outputs(block, fused, x)
    assert judge(out, eager, ref).ok


def test_bfloat16_conversion_after_folding():
    model = reference.random_model("resnet18", calibration_size=32)
    fused = resnet_fused.fuse(model, dtype=torch.bfloat16)
    assert {b.dtype for b in fused.buffers() if b.is_floating_point()} == {torch.bfloat16}
    x = torch.randn(4, 3, 40, 36)
    with torch.inference_mode():
        eager = copy.deepcopy(model).bfloat16()(x.bfloat16())
        out = fused(x.bfloat16())
        ref = copy.deepcopy(model).double()(x.double())
    verdict = judge(out, eager, ref)
    assert verdict.ok, verdict


def test_channels_last_end_to_end():
    model = reference.random_model("resnet18", calibration_size=32)
    fused = resnet_fused.fuse(model)
    seen = []
    for m in fused.modules():
        if isinstance(m, FusedConvBNAct):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.is_contiguous(memory_format=torch.channels_last)))
    with torch.inference_mode():
        fused(torch.randn(2, 3, 33, 35))
    assert seen and all(seen)


def test_empty_batch_and_nan_isolation():
    model = reference.random_model("resnet18", calibration_size=32)
    fused = resnet_fused.fuse(model)
    with torch.inference_mode():
        assert fused(torch.randn(0, 3, 32, 32)).shape == (0, 1000)
        x = torch.randn(3, 3, 32, 32)
        x[1, 0, 5, 5] = float("nan")
        out = fused(x)
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


def test_fused_model_refuses_input_that_requires_grad():
    fused = resnet_fused.fuse(reference.random_model("resnet18", calibration_size=32))
    with pytest.raises(RuntimeError, match="inference-only"):
        fused(torch.randn(1, 3, 32, 32, requires_grad=True))


def test_fuse_argument_errors():
    model = reference.resnet18().eval()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        resnet_fused.fuse(model, backend="fast")
    with pytest.raises(TypeError, match="floating torch.dtype"):
        resnet_fused.fuse(model, dtype=torch.int8)
    with pytest.raises(TypeError, match="nn.Module"):
        resnet_fused.fuse("resnet18")
    with pytest.raises(ValueError, match="memory_format"):
        resnet_fused.fuse(model, memory_format=torch.preserve_format)


def test_wrong_dtype_input_names_the_problem():
    fused = resnet_fused.fuse(reference.random_model("resnet18", calibration_size=32), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dtype torch.bfloat16 but x has torch.float32"):
        with torch.inference_mode():
            fused(torch.randn(1, 3, 32, 32))


def test_fuse_inside_inference_mode_makes_normal_weights():
    """Inference tensors have no version counter, so kernels could not cache packed weights."""
    model = reference.random_model("resnet18", calibration_size=8)
    with torch.inference_mode():
        fused = resnet_fused.fuse(model)
    tensors = list(fused.buffers()) + list(fused.parameters())
    assert tensors and not any(t.is_inference() for t in tensors)


def test_fused_model_survives_torch_save(tmp_path):
    """A whole fused model (not only its state_dict) saves and loads, and computes the same after."""
    model = reference.random_model("resnet18", seed=3)
    fused = resnet_fused.fuse(model)
    x = torch.randn(2, 3, 40, 36)
    with torch.inference_mode():
        before = fused(x)
        torch.save(fused, tmp_path / "fused.pt")
        loaded = torch.load(tmp_path / "fused.pt", weights_only=False)
        after = loaded(x)
    assert torch.equal(before, after)

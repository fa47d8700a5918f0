import pytest
import torch
from torch import nn

from resnet_fused import fold_bn
from utils import REL_TOL, rel_error


def _random_bn(channels, *, affine=True, tiny_var=False, generator=None):
    bn = nn.BatchNorm2d(channels, affine=affine, eps=1e-3).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 2, generator=generator)
        var = torch.rand(channels, generator=generator) * 3 + 0.1
        if tiny_var:
            var[: channels // 2] = 1e-9  # eps dominates: the fold must use BN's own eps
        bn.running_var.copy_(var)
        if affine:
            bn.weight.normal_(1, 0.5, generator=generator)
            bn.bias.normal_(0, 1, generator=generator)
    return bn


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("tiny_var", [True, False])
def test_fold_matches_conv_then_bn(affine, conv_bias, tiny_var):
    g = torch.Generator().manual_seed(hash((affine, conv_bias, tiny_var)) % 1000)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=conv_bias)
    bn = _random_bn(10, affine=affine, tiny_var=tiny_var, generator=g)
    x = torch.randn(3, 6, 11, 9, generator=g, dtype=torch.float64)
    with torch.no_grad():
        expected = bn.double()(conv.double()(x))
        w, b = fold_bn(conv, bn)
        got = nn.functional.conv2d(x, w, b, stride=2, padding=1)
    assert w.dtype == torch.float64 and rel_error(got, expected) < REL_TOL[torch.float64] * 100


def test_fold_in_fp32_then_cast_beats_folding_in_half():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, bias=False)
    bn = _random_bn(32, tiny_var=True, generator=g)
    exact_w, exact_b = fold_bn(conv.double(), bn.double())
    w16, b16 = fold_bn(conv.half(), bn.half(), dtype=torch.float16)
    assert w16.dtype == b16.dtype == torch.float16
    # One rounding of the exact result: within half an fp16 ulp, relative.
    assert rel_error(w16, exact_w) < 2 ** -11 * 2
    assert rel_error(b16, exact_b) < 2 ** -11 * 2


def test_fold_does_not_modify_modules():
    conv, bn = nn.Conv2d(4, 8, 1), _random_bn(8)
    before = [t.clone() for t in (*conv.state_dict().values(), *bn.state_dict().values())]
    fold_bn(conv, bn)
    after = [*conv.state_dict().values(), *bn.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_fold_refuses_bn_without_running_stats():
    with pytest.raises(ValueError, match="no running statistics"):
        fold_bn(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8, track_running_stats=False))


def test_fold_refuses_channel_mismatch():
    with pytest.raises(ValueError, match="8 output channels but the BatchNorm has 6"):
        fold_bn(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(6))


def test_fold_refuses_wrong_types():
    with pytest.raises(TypeError, match="nn.Conv2d"):
        fold_bn(nn.Linear(4, 8), nn.BatchNorm2d(8))

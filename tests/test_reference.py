import pytest
import torch
import torchvision

from resnet_fused import reference as R

PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_match_torchvision(name):
    ours = sum(p.numel() for p in R.MODELS[name]().parameters())
    theirs = sum(p.numel() for p in getattr(torchvision.models, name)().parameters())
    assert ours == PARAMS[name] == theirs


def test_bottleneck_alias_and_attribute_names():
    assert R.Bottleneck is R.BottleNeck
    model = R.resnet50(num_classes=10)
    for name in ("conv_1", "bn_1", "relu", "max_pool", "layer_1", "layer_4", "avgpool", "fc"):
        assert hasattr(model, name)
    block = model.layer_2[0]
    assert isinstance(block, R.BottleNeck) and block.conv_2.stride == (2, 2) and block.down_sample is not None
    assert model.fc.out_features == 10


def test_initialisation_follows_design():
    model = R.resnet18()
    conv = model.layer_3[0].conv_1
    bound = (2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels)) ** 0.5
    assert conv.weight.min() >= 0 and conv.weight.max() <= bound
    assert conv.weight.max() > 0.9 * bound  # uniform over the whole range, not a narrower one
    bn = model.layer_3[0].bn_1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_calibrated_random_model_is_finite_and_input_dependent():
    model = R.random_model("resnet50", seed=3)
    assert not model.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    assert (out[0] - out[1]).abs().max() > 1e-3 * out.abs().max()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_weights_load_and_give_torchvision_outputs(name):
    tv = R.random_model(getattr(torchvision.models, name), seed=1)
    ours = R.MODELS[name]()
    ours.load_state_dict(R.convert_state_dict(tv.state_dict(), ours))
    ours.eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))


def test_convert_state_dict_lists_unknown_and_missing_keys():
    state = torchvision.models.resnet18().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    with pytest.raises(KeyError, match=r"unknown keys \['extra.weight'\].*missing keys \['fc.bias'\]"):
        R.convert_state_dict(state, R.resnet18())


def test_convert_state_dict_reports_shape_mismatch():
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    with pytest.raises(ValueError, match="fc.weight"):
        R.convert_state_dict(state, R.resnet18())

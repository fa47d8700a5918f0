"""Reference ResNet (BasicBlock / BottleNeck), the plain-PyTorch model every fused result is judged by.

Initialisation follows our design: every conv weight is drawn uniform in [0, sqrt(2/n)] with
n = kh * kw * out_channels, every BatchNorm starts with weight 1 and bias 0. Such a model in eval
mode with fresh BN statistics (mean 0, variance 1) grows its activations about tenfold per conv
(a fresh resnet50 outputs NaN), so any random model used for a comparison must first get
realistic statistics from :func:`calibrate_bn`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "conv3x3",
    "conv1x1",
    "BasicBlock",
    "BottleNeck",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "MODELS",
    "calibrate_bn",
    "randomize_bn",
    "random_model",
    "convert_state_dict",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, down_sample: nn.Module | None = None):
        super().__init__()
        self.conv_1 = conv3x3(in_planes, planes, stride)
        self.bn_1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv_2 = conv3x3(planes, planes)
        self.bn_2 = nn.BatchNorm2d(planes)
        self.down_sample = down_sample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down_sample is None else self.down_sample(x)
        out = self.relu(self.bn_1(self.conv_1(x)))
        out = self.bn_2(self.conv_2(out))
        return self.relu(out + identity)


class BottleNeck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, down_sample: nn.Module | None = None):
        super().__init__()
        self.conv_1 = conv1x1(in_planes, planes)
        self.bn_1 = nn.BatchNorm2d(planes)
        self.conv_2 = conv3x3(planes, planes, stride)
        self.bn_2 = nn.BatchNorm2d(planes)
        self.conv_3 = conv1x1(planes, planes * self.expansion)
        self.bn_3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.down_sample = down_sample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down_sample is None else self.down_sample(x)
        out = self.relu(self.bn_1(self.conv_1(x)))
        out = self.relu(self.bn_2(self.conv_2(out)))
        out = self.bn_3(self.conv_3(out))
        return self.relu(out + identity)


Bottleneck = BottleNeck


class ResNet(nn.Module):
    """ResNet with our design's initialisation (see the module docstring: calibrate BN before eval)."""

    def __init__(self, block: type[BasicBlock] | type[BottleNeck], layers: Iterable[int], num_classes: int = 1000):
        super().__init__()
        layers = list(layers)
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 stage depths, got {layers}")
        self.in_planes = 64
        self.conv_1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.max_pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer_1 = self._make_layer(block, 64, layers[0])
        self.layer_2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer_3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer_4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.uniform_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        down_sample = None
        if stride != 1 or self.in_planes != planes * block.expansion:
            down_sample = nn.Sequential(
                conv1x1(self.in_planes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.in_planes, planes, stride, down_sample)]
        self.in_planes = planes * block.expansion
        layers.extend(block(self.in_planes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.max_pool(self.relu(self.bn_1(self.conv_1(x))))
        x = self.layer_4(self.layer_3(self.layer_2(self.layer_1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(BottleNeck, [3, 4, 6, 3], num_classes)


def resnet101(num_classes: int = 1000) -> ResNet:
    return ResNet(BottleNeck, [3, 4, 23, 3], num_classes)


def resnet152(num_classes: int = 1000) -> ResNet:
    return ResNet(BottleNeck, [3, 8, 36, 3], num_classes)


MODELS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
}


@torch.no_grad()
def calibrate_bn(model: nn.Module, *, steps: int = 3, batch: int = 4, size: int = 64, seed: int = 0) -> nn.Module:
    """Give every BatchNorm of ``model`` realistic running statistics, in place, and return it in eval mode.

    Runs ``steps`` forward passes in training mode on random normal inputs with cumulative averaging
    (``momentum=None``), so each BN ends up with the mean and variance its inputs really have; the
    model's parameters are not touched. Meant for random models used in tests and benchmarks.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    model.train()
    try:
        for _ in range(steps):
            x = torch.randn(batch, 3, size, size, generator=generator).to(device)
            model(x)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.eval()
    return model


@torch.no_grad()
def randomize_bn(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Draw every BatchNorm's affine parameters at random, in place: weight U(0.5, 1.5), bias U(-0.1, 0.5).

    Folding must be exact for any affine parameters, not only the fresh (1, 0); the positive
    bias lean also keeps deep activations alive on small inputs.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.affine:
            bn.weight.copy_(torch.empty(bn.weight.shape).uniform_(0.5, 1.5, generator=generator))
            bn.bias.copy_(torch.empty(bn.bias.shape).uniform_(-0.1, 0.5, generator=generator))
    return model


def random_model(
    arch: str | Callable[..., nn.Module],
    *,
    num_classes: int = 1000,
    seed: int = 0,
    calibration_size: int = 64,
) -> nn.Module:
    """A reproducible random model for tests and benchmarks: seeded zero-mean conv weights, BN randomised and calibrated, in eval mode.

    ``arch`` is a name from :data:`MODELS` or any callable taking ``num_classes`` (a torchvision or
    timm builder, say). Outputs are finite and input-dependent in every dtype.
    """
    if isinstance(arch, str) and arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; choose from {', '.join(MODELS)}")
    builder = MODELS[arch] if isinstance(arch, str) else arch
    torch.manual_seed(seed)
    model = builder(num_classes=num_classes)
    # Our design's all-positive conv weights make the network a low-pass filter: past a few
    # blocks every input gives nearly the same output, and a comparison of such a model proves
    # nothing. Zero-mean weights of the same scale keep the output input-dependent.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    randomize_bn(model, seed=seed)
    return calibrate_bn(model, size=calibration_size, seed=seed)


# torchvision name -> our name, applied to each dotted component.
_TORCHVISION_NAMES = {
    "conv1": "conv_1",
    "conv2": "conv_2",
    "conv3": "conv_3",
    "bn1": "bn_1",
    "bn2": "bn_2",
    "bn3": "bn_3",
    "layer1": "layer_1",
    "layer2": "layer_2",
    "layer3": "layer_3",
    "layer4": "layer_4",
    "downsample": "down_sample",
    "maxpool": "max_pool",
}


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Map a torchvision ResNet state dict onto our reference names.

    Keys already in our naming pass through unchanged, so either kind of checkpoint can be given.
    With ``model`` given, the result is checked against ``model.state_dict()``: unknown or missing
    keys and shape mismatches raise a ``KeyError``/``ValueError`` listing every offending key.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    converted = {}
    for key, value in state_dict.items():
        new_key = ".".join(_TORCHVISION_NAMES.get(part, part) for part in key.split("."))
        converted[new_key] = value
    if model is not None:
        expected = model.state_dict()
        unknown = sorted(set(converted) - set(expected))
        missing = sorted(set(expected) - set(converted))
        if unknown or missing:
            raise KeyError(
                "checkpoint does not match the model: "
                f"unknown keys {unknown or 'none'}; missing keys {missing or 'none'}"
            )
        wrong = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in converted.items()
            if tuple(v.shape) != tuple(expected[k].shape)
        ]
        if wrong:
            raise ValueError("checkpoint shapes do not match the model: " + "; ".join(wrong))
    return converted

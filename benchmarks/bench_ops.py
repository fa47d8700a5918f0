"""One fused op (``resnet_fused.ops.conv_bias_act``) per backend against the eager sequence it replaces,
at every distinct conv shape of the models of ``--bench-models``: the 7x7/2 stem; per stage the 1x1
reduce, the 3x3 (stride 2 in the first block of stages 2-4), the last conv with the residual add
(1x1 expand, or the BasicBlock's second 3x3) and the 1x1 downsample.

Eager is conv -> BN -> ReLU, conv -> BN -> add -> ReLU, or conv -> BN (downsample), each with the
model's calibrated weights:

    pytest benchmarks/bench_ops.py --bench-models resnet50 --bench-batch 1
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn

import harness
from resnet_fused.bench import Variant, model_variants
from resnet_fused.convert import BLOCK_SPECS, STEM_SPECS
from resnet_fused.folding import fold_bn
from resnet_fused.modules import FusedConvBNAct


class OpSpec(NamedTuple):
    role: str  # stem | conv | conv+residual | downsample
    conv: str  # module paths in the model
    bn: str
    relu: bool
    residual: bool


class ConvBNAct(nn.Module):
    """The eager sequence one fused op replaces: conv -> BN (-> + residual) (-> ReLU)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool, residual: torch.Tensor | None):
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, relu
        self.register_buffer("residual", residual)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.residual is not None:
            y = y + self.residual
        return torch.relu_(y) if self.relu else y  # in place, like the blocks' nn.ReLU(inplace=True)


class FusedOp(nn.Module):
    """The same computation as one ``conv_bias_act`` call, in the module ``fuse()`` puts in a model."""

    def __init__(self, op: ConvBNAct, backend: str, dtype: torch.dtype):
        super().__init__()
        weight, bias = fold_bn(op.conv, op.bn, dtype=dtype)
        self.conv = FusedConvBNAct(weight, bias, stride=op.conv.stride, padding=op.conv.padding, groups=op.conv.groups,
                                   relu=op.relu, backend=backend)
        residual = None if op.residual is None else op.residual.to(dtype).contiguous(memory_format=torch.channels_last)
        self.register_buffer("residual", residual)

    def forward(self, x):
        return self.conv(x, residual=self.residual)


def _op_specs(net: nn.Module):
    """Every conv of a ResNet with its BN and what follows it: the stem, each block's convs, each downsample."""
    stem = STEM_SPECS.get(type(net))
    if stem is not None:
        yield OpSpec("stem", stem[0], stem[1], relu=True, residual=False)
    for path, block in net.named_modules():
        spec = BLOCK_SPECS.get(type(block))
        if spec is None:
            continue
        for i, (conv, bn) in enumerate(spec.convs):
            last = i == len(spec.convs) - 1
            yield OpSpec("conv+residual" if last else "conv", f"{path}.{conv}", f"{path}.{bn}", relu=True, residual=last)
        if getattr(block, spec.down_sample) is not None:
            yield OpSpec("downsample", f"{path}.{spec.down_sample}.0", f"{path}.{spec.down_sample}.1", relu=False, residual=False)


@functools.lru_cache(maxsize=None)
def _ops(model: str, size: int) -> dict[str, tuple[str, OpSpec]]:
    """label -> (arch, spec) for each distinct conv shape of ``model``, in network order."""
    arch, net, shapes = harness.traced(model, size)
    ops = {}
    for spec in _op_specs(net):
        conv = net.get_submodule(spec.conv)
        (_, c, h, w), (_, k, _, _) = shapes[spec.conv]
        (r, _), (s, _) = conv.kernel_size, conv.stride
        stage = spec.conv.split(".")[0] if spec.role != "stem" else ""
        label = f"{stage} {spec.role} {r}x{r}{f'/{s}' if s > 1 else ''} {c}->{k} {h}x{w}".strip()
        ops.setdefault(label, (arch, spec))
    return ops


def _variants(cfg: harness.Config, op, dtype, example):
    eager = model_variants(op, dtype=dtype, device=cfg.device, backends=[], example=example)

    def build_fused(backend):
        return FusedOp(op, backend, dtype).to(cfg.device)

    return eager + [Variant(f"fused {name}", functools.partial(build_fused, name), torch.channels_last, kind="fused",
                            backend=name) for name, _ in cfg.backends_for(dtype)]


def cases(cfg: harness.Config):
    subjects = {}
    for model in cfg.models:
        for label, (arch, spec) in _ops(model, cfg.size).items():
            subjects.setdefault(label, (label, arch, spec.conv))
    return harness.cases(cfg, "ops", list(subjects.values()), lambda dtype, batch: _variants(cfg, None, dtype, None))


def _eager_op(model: nn.Module, spec: OpSpec, output_shape, batch: int) -> ConvBNAct:
    residual = None
    if spec.residual:
        generator = torch.Generator().manual_seed(harness.SEED + 2)
        residual = torch.randn(batch, *output_shape[1:], generator=generator)
    return ConvBNAct(model.get_submodule(spec.conv), model.get_submodule(spec.bn), spec.relu, residual)


def test_op(case, measure, bench_config):
    _, spec = _ops(case.model, bench_config.size)[case.subject]
    in_shape, out_shape = harness.traced(case.model, bench_config.size)[2][spec.conv]
    op = _eager_op(harness.calibrated_model(case.model), spec, out_shape, case.batch)
    xs = harness.inputs(case.batch, tuple(in_shape[2:]), in_shape[1], case.dtype, bench_config.device)
    variant = harness.pick(_variants(bench_config, op, case.dtype, xs[0]), case)
    measure(case, variant, xs, harness.expected(case, op, xs[0]))

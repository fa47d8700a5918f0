"""Residual blocks at each stage's real shape: the reference block (eager, NCHW and channels_last)
against ``resnet_fused.fuse(block)`` on every backend.

Blocks are taken from the models of ``--bench-models`` (BasicBlock from resnet18/34, BottleNeck
from resnet50/101/152), one per distinct shape, with their calibrated weights:

    pytest benchmarks/bench_blocks.py --bench-models resnet50 --bench-batch 8
"""

from __future__ import annotations

import harness
from resnet_fused.bench import model_variants
from resnet_fused.convert import BLOCK_SPECS


def _variants(cfg: harness.Config, block, dtype, example):
    return model_variants(block, dtype=dtype, device=cfg.device, backends=[name for name, _ in cfg.backends_for(dtype)],
                          example=example)


def _subjects(cfg: harness.Config):
    seen = set()
    for model in cfg.models:
        arch, net, shapes = harness.traced(model, cfg.size)
        for path, block in net.named_modules():
            if type(block) not in BLOCK_SPECS:
                continue
            (_, c, h, w), (_, k, _, _) = shapes[path]
            key = (type(block), c, k, h, w, block.stride)
            if key not in seen:
                seen.add(key)
                stride = f"/{block.stride}" if block.stride > 1 else ""
                yield f"{arch}.{path} {type(block).__name__} {c}->{k}{stride} {h}x{w}", arch, path


def cases(cfg: harness.Config):
    return harness.cases(cfg, "blocks", list(_subjects(cfg)), lambda dtype, batch: _variants(cfg, None, dtype, None))


def test_block(case, measure, bench_config):
    block = harness.calibrated_model(case.model).get_submodule(case.path)
    (_, c, h, w), _ = harness.traced(case.model, bench_config.size)[2][case.path]
    xs = harness.inputs(case.batch, (h, w), c, case.dtype, bench_config.device)
    variant = harness.pick(_variants(bench_config, block, case.dtype, xs[0]), case)
    measure(case, variant, xs, harness.expected(case, block, xs[0]))

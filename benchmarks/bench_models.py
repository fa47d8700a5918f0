"""Whole models side by side: eager NCHW (the baseline), eager channels_last, torch.compile (inductor,
freezing on), on a CPU ONNX Runtime and OpenVINO running an ONNX export of the model (when installed:
``pip install 'resnet-fused[peers]'``), and the fused model on every backend; on a GPU at batch 1
also under CUDA-graph replay.

    pytest benchmarks/bench_models.py --bench-models resnet50 --bench-batch 1,8 --benchmark-json out.json
"""

from __future__ import annotations

import harness
from resnet_fused.bench import model_variants, peer_variants


def _variants(cfg: harness.Config, model, dtype, batch, example):
    variants = model_variants(model, dtype=dtype, device=cfg.device, backends=[name for name, _ in cfg.backends_for(dtype)],
                              example=example, compile=cfg.compile, cuda_graph=cfg.device.type == "cuda" and batch == 1)
    # Peers that cannot run here (not installed, not this dtype) are left out; `resnet-fused bench
    # --peers` and interleaved.py say why.
    return variants + peer_variants(model, dtype=dtype, device=cfg.device, example=example)[0]


def cases(cfg: harness.Config):
    # model_variants builds nothing until a variant is built: listing them needs no model.
    subjects = [(name, name, "") for name in cfg.models]
    return harness.cases(cfg, "models", subjects, lambda dtype, batch: _variants(cfg, None, dtype, batch, None))


def test_model(case, measure, bench_config):
    model = harness.calibrated_model(case.model)
    xs = harness.inputs(case.batch, (bench_config.size,) * 2, 3, case.dtype, bench_config.device)
    variant = harness.pick(_variants(bench_config, model, case.dtype, case.batch, xs[0]), case)
    measure(case, variant, xs, harness.expected(case, model, xs[0]))

"""The GPU tooling, on CPU: benchmarks/sm90_compile_check.py's enumeration, dedupe and sm_90 compile,
and benchmarks/gpu_check.sh's plan mode.

Each runs in a subprocess without TRITON_INTERPRET (conftest sets it on CPU-only machines; the
check needs Triton's compiler, not its interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "benchmarks" / "sm90_compile_check.py"


def _run(args, timeout=300, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RESNET_FUSED_AUTOTUNE")}
    environ.update(env)
    return subprocess.run(args, cwd=REPO, env=environ, capture_output=True, text=True, timeout=timeout)


def test_enumeration_offers_every_candidate_once():
    # Wraps configs.candidates to see what the tuner is offered; every offered config must be among
    # the recorded launches, and enumerating the same batches twice must add nothing.
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("check", {str(CHECK)!r})
        check = sys.modules["check"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
        spec.loader.exec_module(check)
        check._importable()
        from resnet_fused.kernels import configs
        offered = set()
        original = configs.candidates
        def recording(*args, **kwargs):
            cands = original(*args, **kwargs)
            offered.update((c.block_m, c.block_n, c.block_k, c.num_stages, c.num_warps) for c in cands)
            return cands
        configs.candidates = recording
        once = check.enumerate_launches(["resnet18"], ["fp16"], [1, 2], 32, progress=lambda s: None)
        twice = check.enumerate_launches(["resnet18"], ["fp16"], [1, 2, 1, 2], 32, progress=lambda s: None)
        launched = set()
        for launch in once.values():
            kw = launch.kwargs
            if launch.name == "conv_bias_act_kernel":
                launched.add((kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_stages"], kw["num_warps"]))
        print(json.dumps({{"once": sorted(once), "twice": sorted(twice), "offered": sorted(offered),
                          "launched": sorted(launched),
                          "names": sorted({{launch.name for launch in once.values()}}),
                          "seen_in": sorted({{s for launch in once.values() for s in launch.seen_in}})}}))
    """)
    proc = _run([sys.executable, "-c", script])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["once"] == result["twice"]
    assert len(result["once"]) == len(set(result["once"])) > 10
    assert result["offered"], "the tuner was never asked for candidates"
    assert set(map(tuple, result["offered"])) <= set(map(tuple, result["launched"]))
    assert {"conv_bias_act_kernel", "bias_residual_act_kernel"} <= set(result["names"])
    assert result["seen_in"] == ["resnet18 fp16 b1", "resnet18 fp16 b2"]


def test_compiles_for_sm90_and_reports(tmp_path):
    report = tmp_path / "report.json"
    proc = _run([sys.executable, str(CHECK), "--models", "resnet18", "--dtypes", "fp16", "--batches", "1",
                 "--size", "32", "--only", "bias_residual_act_kernel", "--limit", "1", "--jobs", "1",
                 "--json", str(report)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("sm90_compile_check: PASSED: 1 kernels, 0 failures"), last
    (kernel,) = json.loads(report.read_text())["kernels"]
    assert kernel["error"] is None
    assert 0 <= kernel["shared"] <= 232_448
    assert kernel["registers"] and kernel["registers"] > 0  # cuobjdump found and read
    assert kernel["wgmma"] is False  # an elementwise kernel has no MMA


def test_gpu_check_plan_mode(tmp_path):
    proc = _run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path)], timeout=300,
                GPU_CHECK_PLAN_ONLY="1", GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check plan (estimated seconds on the GPU machine" in proc.stdout
    assert "PLAN ONLY: nothing run" in proc.stdout
    planned = [line for line in proc.stdout.splitlines() if line.startswith("sm90_compile_check: PLAN ")]
    assert planned and int(planned[0].split()[2]) > 0, proc.stdout
    assert (tmp_path / "gpu_check.log").read_text().strip().endswith("PLAN ONLY: nothing run")

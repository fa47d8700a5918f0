"""The benchmark suites in benchmarks/ and their renderer, run once at a tiny size so that they cannot rot.

The suites run in one pytest subprocess (the benchmarks' conftest must not meet this one), on the
CPU, resnet18 at 32x32, batch 1, two timed runs per variant, torch.compile included.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnet_fused.backends import extension

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SUITES = ("bench_ops.py", "bench_blocks.py", "bench_models.py")
TINY = ["--bench-device", "cpu", "--bench-models", "resnet18", "--bench-size", "32", "--bench-batch", "1",
        "--bench-dtype", "fp32", "--bench-backends", "torch", "--bench-repeat", "2", "--bench-warmup", "0",
        "--bench-min-time", "0"]


@pytest.fixture(scope="module")
def render():
    # benchmarks/ is not a package: load render.py by path (registered, as its dataclasses need)
    spec = importlib.util.spec_from_file_location("benchmarks_render", BENCHMARKS / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite_results(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "results.json"
    # Triton's interpreter stays off: the suites never time it on a CPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *(f"benchmarks/{name}" for name in SUITES), *TINY,
         "--benchmark-json", str(path), "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"benchmark suites failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    return path


def test_every_suite_records_every_variant(suite_results):
    data = json.loads(suite_results.read_text())
    benchmarks = data["benchmarks"]
    assert {b["extra_info"]["suite"] for b in benchmarks} == {"ops", "blocks", "models"}
    for suite in ("ops", "blocks", "models"):
        variants = {b["extra_info"]["variant"] for b in benchmarks if b["extra_info"]["suite"] == suite}
        assert {"eager", "eager channels_last", "fused torch"} <= variants, suite
    assert any(b["extra_info"]["kind"] == "compile" for b in benchmarks)
    ops = {b["extra_info"]["subject"] for b in benchmarks if b["extra_info"]["suite"] == "ops"}
    assert {"stem 7x7/2 3->64 32x32", "layer_2 conv 3x3/2 64->128 8x8", "layer_2 conv+residual 3x3 128->128 4x4",
            "layer_2 downsample 1x1/2 64->128 8x8"} <= ops
    for b in benchmarks:
        info, stats = b["extra_info"], b["stats"]
        # pytest-benchmark holds exactly the times resnet_fused.bench.time_fn measured
        assert stats["rounds"] == 2 and b["options"]["timer"] == "resnet_fused.bench.time_fn"
        assert stats["median"] * 1000.0 == pytest.approx(info["median_ms"], rel=1e-9)
        assert info["rel_error_vs_fp64"] < 1e-4 and info["device"] == "cpu" and info["torch"]
        assert b["group"].startswith(f"{info['suite']}: {info['subject']}, batch 1, float32")
    assert data["machine_info"]["resnet_fused"]["torch"]


def test_render_suite_results(suite_results, render, tmp_path):
    assert render.main([str(suite_results), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    for title in ("## Whole models", "## Residual blocks", "## Fused ops", "![speedup over eager](speedup.png)"):
        assert title in text
    assert (tmp_path / "speedup.png").read_bytes().startswith(b"\x89PNG")


def _pytest_benchmark_json(rows, device="cuda", device_name="NVIDIA H100 80GB HBM3"):
    env = {"device": device, "device_name": device_name, "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
           "cudnn": 91400, "driver": "580.1", "capability": "9.0", "tf32_cudnn": True, "tf32_matmul": False}
    benchmarks = [
        {"extra_info": {"suite": "models", "subject": "resnet50", "batch": batch, "size": 224, "dtype": "float16",
                        "variant": variant, "kind": kind, "cuda_graph": "CUDA graph" in variant, "rel_error_vs_fp64": 1e-3},
         "stats": {"median": ms / 1000.0, "rounds": 10}}
        for batch, variant, kind, ms in rows
    ]
    return {"machine_info": {"resnet_fused": env}, "benchmarks": benchmarks, "datetime": "2026-11-28T10:00:00+00:00"}


def test_render_tiny_json(render, tmp_path):
    results = tmp_path / "in.json"
    results.write_text(json.dumps(_pytest_benchmark_json([
        (256, "eager", "eager", 100.0), (256, "torch.compile", "compile", 50.0),
        (256, "fused triton", "fused", 30.0), (256, "fused torch", "fused", 80.0),
        (1, "eager", "eager", 5.0), (1, "fused triton + CUDA graph", "fused", 1.25),
    ])))
    cli_record = {"model": "resnet18", "batch": 8, "size": 224, "dtype": "float32",
                  "environment": {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"},
                  "results": [{"variant": "eager", "kind": "eager", "median_ms": 9.0, "times_ms": [9.0]},
                              {"variant": "fused triton", "kind": "fused", "median_ms": 3.0, "times_ms": [3.0]}]}
    (tmp_path / "cli.json").write_text(json.dumps(cli_record))

    assert render.main([str(results), str(tmp_path / "cli.json"), "--results-root", str(tmp_path / "results"), "--summary"]) == 0
    out = tmp_path / "results" / "2026-11-28_nvidia-h100-80gb-hbm3"
    assert sorted(p.name for p in out.iterdir()) == ["cli.json", "in.json", "results.md", "speedup.png"]
    text = (out / "results.md").read_text()
    assert "| resnet50 | 256 | fp16 | 224x224 | fused triton | 30.000 | 8,533.3 | 3.33x | 1.67x | 1.0e-03 |" in text
    assert "| resnet18 | 8 | fp32 | 224x224 | fused triton | 3.000 | 2,666.7 | 3.00x | - | - |" in text
    assert "TF32: cuDNN convolutions on" in text and "driver 580.1" in text
    targets = [line for line in text.splitlines() if line.startswith("| resnet50 fp16 batch")]
    assert [line.rsplit("|", 2)[1].strip() for line in targets] == ["MET", "MET", "MISSED"]


def test_render_names_cpu_directories_and_refuses_mixed_machines(render, tmp_path):
    assert render.slug({"device": "cpu", "device_name": "AMD EPYC (2 threads)"}) == "cpu-amd-epyc-2t"
    assert render.slug({"device": "cpu", "device_name": "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.0GHz (16 threads)"}) \
        == "cpu-intel-xeon-platinum-8480-16t"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_pytest_benchmark_json([(1, "eager", "eager", 1.0)])))
    b.write_text(json.dumps(_pytest_benchmark_json([(1, "eager", "eager", 1.0)], "cpu", "AMD EPYC (2 threads)")))
    assert render.main([str(a), str(b), "--out", str(tmp_path / "mixed")]) == 1


@pytest.mark.parametrize("script", ["gpu_check.sh", "run_cpu.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(BENCHMARKS / script)]).returncode == 0


def test_time_interleaved_times_every_variant_each_round():
    from resnet_fused.bench import time_interleaved

    calls = []
    fns = {"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")}
    inputs = {"a": [torch.zeros(1)], "b": [torch.zeros(1)]}
    timings = time_interleaved(fns, inputs, rounds=3, per_round=2, warmup=1)
    assert {name: len(t.times_ms) for name, t in timings.items()} == {"a": 6, "b": 6}
    # warm-up of each, then rounds alternating a, a, b, b
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3


def test_time_interleaved_leaves_the_machine_idle_before_each_turn():
    from resnet_fused.bench import time_interleaved

    stamps = []  # (variant, start, end) of every call
    def fn(name):
        def call(x):
            start = time.perf_counter()
            time.sleep(0.001)
            stamps.append((name, start, time.perf_counter()))
        return call

    inputs = {"a": [torch.ones(1)], "b": [torch.ones(1)]}
    time_interleaved({"a": fn("a"), "b": fn("b")}, inputs, rounds=2, per_round=2, warmup=0, settle_s=0.05)
    assert [name for name, _, _ in stamps] == ["a", "a", "b", "b"] * 2
    for i in range(0, len(stamps), 2):  # each turn's first call starts >= 50 ms after the previous call ended
        if i > 0:
            assert stamps[i][1] - stamps[i - 1][2] >= 0.05
        assert stamps[i + 1][1] - stamps[i][2] < 0.05  # no pause within a turn


def _interleaved():
    spec = importlib.util.spec_from_file_location("benchmarks_interleaved", BENCHMARKS / "interleaved.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_switches(dtype: torch.dtype = torch.float32) -> set[str]:
    from resnet_fused import bench

    return set(_interleaved().extension_switches(bench.cpu_flags(), dtype))


def test_interleaved_compares_the_own_gemm_core_on_avx512_cpus():
    switches = _interleaved().extension_switches
    off = {"fused extension, own kernels off": ("RESNET_FUSED_AVX2_CONV", "0")}
    assert switches(["avx2", "fma", "f16c"]) == off
    avx512 = {**off, "fused extension, own GEMM core": ("RESNET_FUSED_GEMM_CORE", "own")}
    assert switches(["avx2", "fma", "avx512f", "avx512_bf16"]) == avx512
    assert switches(["avx2", "fma", "avx512f"], torch.bfloat16) == avx512
    assert switches(["avx2", "fma", "avx512f", "avx512_bf16"], torch.bfloat16) == {
        **avx512, "fused extension, bf16 on fp32 kernels": ("RESNET_FUSED_CPU_ISA", "avx2")}


def test_interleaved_script(tmp_path):
    # OpenVINO is made to look not installed (an import of it fails), to see the note it leaves;
    # ONNX Runtime runs when installed.
    script = ("import runpy, sys; sys.modules['openvino'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run(
        [sys.executable, "-c", script, str(BENCHMARKS / "interleaved.py"), "--models", "resnet18", "--batch", "1",
         "--size", "32", "--rounds", "1", "--runs", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    note = "OpenVINO skipped: openvino is not installed (pip install 'resnet-fused[peers]')"
    assert f"note: {note}" in result.stderr
    ort = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
    result = json.loads((tmp_path / "interleaved.json").read_text())
    rows, summary = result["rows"], result["summary"]
    assert note in result["notes"] and (ort or any("ONNX Runtime skipped" in n for n in result["notes"]))
    variants = {"eager", "torch.compile", "fused onednn", "fused extension", *_extension_switches()}
    variants |= {"ONNX Runtime"} if ort else set()
    assert {r["variant"] for r in rows} == variants and sorted(r["run"] for r in rows) == [0] * len(variants) + [1] * len(variants)
    assert all(r["median_ms"] > 0 and r["rel_error"] < 1e-4 for r in rows)
    assert {s["variant"] for s in summary} == variants and all(s["runs"] == 2 for s in summary)
    for s in summary:
        runs = [r for r in rows if r["variant"] == s["variant"]]
        for ratio in ("vs_compile", "vs_best_peer"):
            lo, hi = s[ratio + "_range"]
            assert lo == min(r[ratio] for r in runs) <= s[ratio] <= hi == max(r[ratio] for r in runs)
    for r in rows:
        peers = [p["median_ms"] for p in rows if p["run"] == r["run"] and p["kind"] in ("compile", "peer")]
        assert r["vs_best_peer"] == pytest.approx(min(peers) / r["median_ms"])
    text = (tmp_path / "interleaved.md").read_text()
    assert text.count("| resnet18 | 1 |") == len(summary) + 1  # the overview's row and one per variant
    overview = next(line for line in text.splitlines() if line.startswith("| model | batch | dtype | eager |"))
    assert ("| ONNX Runtime |" in overview) == ort and "OpenVINO" not in overview
    assert f"Note: {note}." in text and result["environment"]["cpu_model"] in text
    assert all(r["dtype"] == "fp32" and r["vs_eager_fp32"] == pytest.approx(
        next(e["median_ms"] for e in rows if e["run"] == r["run"] and e["variant"] == "eager") / r["median_ms"])
        for r in rows)
    if extension.load_error() is None:  # the kernels it ran, as a tuning file that runs them again
        saved = json.loads((tmp_path / "tuning.json").read_text())
        assert [c["description"] for c in saved["choices"]] == result["cpu_conv_choices"]


def test_interleaved_script_in_fresh_processes(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "interleaved.py"), "--models", "resnet18", "--batch", "1", "--size", "32",
         "--rounds", "1", "--runs", "1", "--processes", "2", "--no-peers", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "process 1/2" in result.stderr and "process 2/2" in result.stderr
    record = json.loads((tmp_path / "interleaved.json").read_text())
    rows, summary = record["rows"], record["summary"]
    variants = {r["variant"] for r in rows}
    # One run per process, numbered across them; every summary over both.
    assert sorted((r["process"], r["run"]) for r in rows) == [(0, 0)] * len(variants) + [(1, 1)] * len(variants)
    assert all(s["runs"] == 2 for s in summary)
    for s in summary:
        times = [r["median_ms"] for r in rows if r["variant"] == s["variant"]]
        assert s["median_ms"] == pytest.approx(statistics.median(times))
    assert len(record["cpu_conv_choices_per_process"]) == 2
    assert "medians over the 2 processes x 1 run(s)" in (tmp_path / "interleaved.md").read_text()
    if extension.load_error() is None:  # the first process's choices, as a tuning file
        saved = json.loads((tmp_path / "tuning.json").read_text())
        assert [c["description"] for c in saved["choices"]] == record["cpu_conv_choices"]
        assert record["cpu_conv_choices"] == record["cpu_conv_choices_per_process"][0] != []


def test_interleaved_script_in_bf16(tmp_path):
    from resnet_fused import bench, ops

    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "interleaved.py"), "--models", "resnet18", "--batch", "1", "--size", "32",
         "--rounds", "1", "--dtype", "bf16", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    result = json.loads((tmp_path / "interleaved.json").read_text())
    rows, notes = result["rows"], result["notes"]
    assert {r["dtype"] for r in rows} == {"bf16"}
    # bf16 variants, plus eager float32 as the baseline of "vs eager fp32"; ONNX Runtime runs float32 only.
    variants = {"eager fp32", "eager", "eager channels_last", "torch.compile", "fused extension",
                *_extension_switches(torch.bfloat16)}
    onednn_reason = ops.BACKENDS["onednn"].unavailable_reason("cpu", torch.bfloat16)
    if onednn_reason is None:
        variants.add("fused onednn")
    else:
        assert f"fused onednn skipped in bf16: {onednn_reason}" in notes
    peers = bench.peer_variants(None, dtype=torch.bfloat16, device="cpu", example=None)
    variants |= {v.name for v in peers[0]}
    assert set(peers[1]) <= set(notes) and "ONNX Runtime" not in {r["variant"] for r in rows}
    assert {r["variant"] for r in rows} == variants
    fp32 = next(r for r in rows if r["variant"] == "eager fp32")
    assert fp32["rel_error"] < 1e-5 < max(r["rel_error"] for r in rows)  # the bf16 rows carry bf16's error
    assert all(r["rel_error"] < 0.1 for r in rows)
    best = min(r["median_ms"] for r in rows if r["kind"] in ("compile", "peer"))
    for r in rows:
        assert r["vs_eager_fp32"] == pytest.approx(fp32["median_ms"] / r["median_ms"])
        assert r["vs_best_peer"] == pytest.approx(best / r["median_ms"])
    assert "| resnet18 | 1 | bf16 | eager fp32 |" in (tmp_path / "interleaved.md").read_text()
    if extension.load_error() is None:
        # The choices saved by this run, loaded by the next: nothing left to time, the same choices.
        again = tmp_path / "again"
        result = subprocess.run(
            [sys.executable, str(BENCHMARKS / "interleaved.py"), "--models", "resnet18", "--batch", "1", "--size", "32",
             "--rounds", "1", "--dtype", "bf16", "--no-peers", "--tuning", str(tmp_path / "tuning.json"),
             "--out", str(again)],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        saved = json.loads((tmp_path / "tuning.json").read_text())["choices"]
        assert f"loaded {len(saved)} CPU kernel choices" in result.stderr
        assert json.loads((again / "interleaved.json").read_text())["cpu_conv_choices"] == [c["description"] for c in saved]
        assert "kernel choices loaded from" in (again / "interleaved.md").read_text()


def test_peer_variants_say_why_a_peer_is_left_out(monkeypatch):
    from resnet_fused import bench

    installed = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "openvino"))
    # Nothing is exported or built until a variant is built: no model is needed to list them.
    variants, notes = bench.peer_variants(None, dtype=torch.float32, device="cuda", example=None)
    assert variants == [] and notes == ["ONNX Runtime, OpenVINO: compared on the CPU only, skipped on cuda"]
    if installed:
        variants, notes = bench.peer_variants(None, dtype=torch.float32, device="cpu", example=None)
        assert [(v.name, v.kind) for v in variants] == [("ONNX Runtime", "peer"), ("OpenVINO f32", "peer")] and notes == []
        variants, notes = bench.peer_variants(None, dtype=torch.float16, device="cpu", example=None)
        assert variants == [] and notes == ["ONNX Runtime skipped: it runs this model in float32 only, not float16",
                                            "OpenVINO skipped: compared in float32 and bfloat16 only"]
        import openvino

        bf16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        variants, notes = bench.peer_variants(None, dtype=torch.bfloat16, device="cpu", example=None)
        assert [v.name for v in variants] == (["OpenVINO bf16"] if bf16 else [])
        assert notes[0] == "ONNX Runtime skipped: it runs this model in float32 only, not bfloat16"
        assert notes[1:] == ([] if bf16 else
                             ["OpenVINO skipped: this CPU has no bf16 instructions OpenVINO uses (AVX512-BF16 or AMX)"])
    monkeypatch.setitem(sys.modules, "onnx", None)
    variants, notes = bench.peer_variants(None, dtype=torch.float32, device="cpu", example=None)
    assert variants == [] and notes == ["ONNX Runtime, OpenVINO skipped: onnx is not installed (pip install 'resnet-fused[peers]')"]


def test_peers_are_fed_float32_converted_before_timing():
    """A peer takes float32 images: a bf16 run converts its batch once (Variant.feed), not inside
    every timed call, where a fresh torch buffer each call cost OpenVINO 3.5-4.4 ms of 22 (resnet50 b1)."""
    from resnet_fused import bench

    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "openvino")):
        variants, _ = bench.peer_variants(None, dtype=torch.float32, device="cpu", example=None)
        assert len(variants) == 2 and all(v.input_dtype == torch.float32 for v in variants)
    peer = bench.Variant("peer", lambda: None, kind="peer", input_dtype=torch.float32)
    x = torch.randn(2, 3, 5, 4).to(torch.bfloat16)
    fed = peer.feed(x)
    assert fed.dtype == torch.float32 and torch.equal(fed, x.float())
    assert peer.feed(fed) is fed  # a float32 batch is taken as it is: the timed calls see one buffer
    fused = bench.Variant("fused", lambda: None, memory_format=torch.channels_last, kind="fused")
    assert fused.feed(x).dtype == torch.bfloat16 and fused.feed(x).is_contiguous(memory_format=torch.channels_last)
    assert fused.feed(x.float(), torch.bfloat16).dtype == torch.bfloat16  # no input dtype: the run's
    assert peer.feed(x, torch.bfloat16).dtype == torch.float32  # an input dtype wins over the run's


def test_environment_names_the_cpu_and_its_isa(monkeypatch, tmp_path):
    from resnet_fused import bench

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
                       "flags\t\t: fpu sse avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile avx512_fp16 avx_vnni\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    env = bench.environment("cpu")
    assert env["cpu_model"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert env["cpu_flags"] == ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx_vnni",
                                "amx_tile", "amx_bf16"]
    for module in bench.PEERS:
        assert (module in env) == (importlib.util.find_spec(module) is not None)


def _cpu_check(out, **env):
    env = {**os.environ, "PYTHON": sys.executable, "CPU_CHECK_MODELS": "resnet18", "CPU_CHECK_BATCH": "1",
           "CPU_CHECK_SIZE": "32", "CPU_CHECK_ROUNDS": "1", "CPU_CHECK_RUNS": "1",
           "CPU_CHECK_PROCESSES": "1", **env}
    return subprocess.run(["bash", str(BENCHMARKS / "cpu_check.sh"), str(out)], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env=env)


def test_cpu_check_script(tmp_path):
    # Every stage at a tiny size, bf16 forced (on CPUs without bf16 instructions it is not run by default).
    result = _cpu_check(tmp_path, CPU_CHECK_BF16="1", CPU_CHECK_TESTS="tests/test_folding.py")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "cpu_check.log").read_text()
    for stage in ("tests", "fp32", "bf16", "per_layer", "per_layer_bf16"):
        assert f"cpu_check: {stage}: exit 0 after" in log, log[-3000:]
    assert " passed" in (tmp_path / "tests.log").read_text()
    env = json.loads((tmp_path / "environment.json").read_text())
    assert f"ISA: {' '.join(env['cpu_flags']) or 'none of note'};" in log and "Model name" in (tmp_path / "lscpu.txt").read_text()
    for dtype in ("fp32", "bf16"):
        rows = json.loads((tmp_path / dtype / "interleaved.json").read_text())["rows"]
        assert {r["dtype"] for r in rows} == {dtype} and {r["model"] for r in rows} == {"resnet18"}
        assert f"| resnet18 | 1 | {dtype} |" in log  # the tables are printed at the end
    assert json.loads((tmp_path / "per_layer" / "per_layer.json").read_text())["model"] == "resnet18"
    assert json.loads((tmp_path / "per_layer_bf16" / "per_layer.json").read_text())["dtype"] == "bfloat16"


def test_cpu_check_script_runs_bf16_only_where_the_cpu_has_it(tmp_path):
    from resnet_fused import bench

    result = _cpu_check(tmp_path, CPU_CHECK_SKIP="tests fp32 bf16 per_layer per_layer_bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "cpu_check.log").read_text()
    has_bf16 = {"avx512_bf16", "amx_bf16"} & set(bench.cpu_flags())
    if has_bf16:
        assert "cpu_check: bf16: skipped (CPU_CHECK_SKIP)" in log
        assert "cpu_check: per_layer_bf16: skipped (CPU_CHECK_SKIP)" in log
    else:
        assert "cpu_check: bf16: not run: this CPU has neither avx512_bf16 nor amx_bf16" in log
        assert "per_layer_bf16" not in log
    assert not (tmp_path / "bf16").exists() and "cpu_check: done, exit 0" in log


def _per_layer(out, *args):
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "per_layer.py"), "--model", "resnet18", "--size", "32", "--rounds", "2",
         "--out", str(out), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )


def _installed(*modules) -> bool:
    return all(importlib.util.find_spec(m) for m in modules)


def test_per_layer_script(tmp_path):
    result = _per_layer(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "per_layer.json").read_text())
    expected = [label for label, modules in (("ONNX Runtime", ("onnx", "onnxruntime")),
                                             ("OpenVINO f32", ("onnx", "openvino"))) if _installed(*modules)]
    assert data["peers"] == expected
    for label in ("ONNX Runtime", "OpenVINO"):  # a note names each peer left out, and only those
        left_out = not any(peer.startswith(label) for peer in expected)
        assert any(label in note for note in data["notes"]) == left_out
    layers = data["layers"]
    assert len(layers) == 20  # resnet18: the stem, 16 3x3 convs, 3 strided 1x1 shortcuts
    assert [layer["weight"] for layer in layers[:2]] == [[64, 3, 7, 7], [64, 64, 3, 3]]
    assert sum(layer["residual"] for layer in layers) == 8  # each BasicBlock's second conv
    assert all(layer["ours_ms"] > 0 and layer["kernel"] != "?" for layer in layers)
    for label in expected:
        # Paired by shape, whatever order the peer ran them in (OpenVINO runs a block's shortcut first).
        assert all(layer["peers"][label]["weight"] == layer["weight"] and layer["peers"][label]["x"] == layer["x"]
                   and layer["peers"][label]["ms"] > 0 for layer in layers)
        assert len({layer["peers"][label]["node"] for layer in layers}) == 20
        assert data["peer_total_ms"][label] == pytest.approx(sum(layer["peers"][label]["ms"] for layer in layers))
    if "OpenVINO f32" in expected:
        assert all(layer["peers"]["OpenVINO f32"]["residual"] == layer["residual"] for layer in layers)
        assert {layer["peers"]["OpenVINO f32"]["kernel"] for layer in layers} != {"?"}
    assert data["ours_total_ms"] == pytest.approx(sum(layer["ours_ms"] for layer in layers))
    kinds = {e["kind"]: e for e in data["by_kind"]}
    assert {k: e["count"] for k, e in kinds.items()} == {"7x7 stem": 1, "3x3": 13, "3x3 stride 2": 3, "1x1 stride 2": 3}
    assert kinds["7x7 stem"]["macs"] == 16 * 16 * 64 * 3 * 49  # 32x32 -> 16x16, 64 filters of 3x7x7
    assert kinds["1x1 stride 2"]["macs"] == 4 * 4 * 128 * 64 + 2 * 2 * 256 * 128 + 1 * 1 * 512 * 256  # 8x8 -> 4x4 ...
    assert sum(e["ours_ms"] for e in kinds.values()) == pytest.approx(data["ours_total_ms"])
    for label in expected:
        assert sum(e["peer_ms"][label] for e in kinds.values()) == pytest.approx(data["peer_total_ms"][label])
    text = (tmp_path / "per_layer.md").read_text()
    assert text.count("\n| ") == len(layers) + 2 + len(kinds) + 2 and data["environment"]["device_name"] in text
    assert "| 7x7 stem | 1 | 0.002 |" in text


def test_per_layer_script_bf16(tmp_path):
    from resnet_fused import bench

    result = _per_layer(tmp_path, "--dtype", "bf16")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "per_layer.json").read_text())
    assert data["dtype"] == "bfloat16" and "ONNX Runtime" not in data["peers"]
    if _installed("onnx", "onnxruntime"):
        assert "ONNX Runtime skipped: it runs this model in float32 only, not bfloat16" in data["notes"]
    # OpenVINO runs bf16 where the CPU has the instructions for it, and says why not elsewhere.
    openvino_bf16 = _installed("onnx", "openvino") and bench.openvino_unsupported("bf16") is None
    assert data["peers"] == (["OpenVINO bf16"] if openvino_bf16 else [])
    assert all(layer["kernel"] != "?" and layer["ours_ms"] > 0 for layer in data["layers"])
    text = (tmp_path / "per_layer.md").read_text()
    assert "32x32 bfloat16" in text and all(f"Note: {note}" in text for note in data["notes"])


def test_head_in_forward_script():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "head_in_forward.py"), "--model", "resnet18", "--size", "64", "--rounds", "12",
         "--batch", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("resnet18 batch 2 fp32") and "fused " in line and "aten " in line

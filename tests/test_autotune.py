"""The Triton conv's autotuner and its disk cache, on CPU: an injected bench function stands in for
GPU timing, and benchmarks/triton_host_overhead.py's ``pretend_cuda`` runs the whole conv path as on
a GPU with the kernel launches stubbed out."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import warnings

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402

from resnet_fused import ops  # noqa: E402
from resnet_fused.kernels import configs  # noqa: E402
from resnet_fused.kernels.configs import AutotuneCacheWarning, DiskCache, LaunchConfig, Tuner  # noqa: E402

CANDS = [LaunchConfig(bm, 32, 32, 3, 4) for bm in (16, 32, 64)]


@pytest.fixture(autouse=True)
def autotuning_on(monkeypatch):
    """These tests count timings: a RESNET_FUSED_AUTOTUNE=0 in the environment must not leak in."""
    monkeypatch.delenv(configs.AUTOTUNE_ENV_VAR, raising=False)
TIMES = {16: 3.0, 32: 1.0, 64: 2.0}  # block_m -> "milliseconds": the 32-row config wins


class Recorder:
    """Launches and bench calls, with the timing of each config given by TIMES."""

    def __init__(self):
        self.launched, self.benched, self.listed = [], [], 0

    def candidates(self):
        self.listed += 1
        return CANDS

    def launch(self, cfg):
        self.launched.append(cfg)

    def bench(self, fn):
        fn()
        self.benched.append(self.launched[-1])
        return TIMES[self.launched[-1].block_m]


def test_tuner_benchmarks_once_per_key_and_lists_candidates_only_on_a_miss():
    rec = Recorder()
    tuner = Tuner(rec.bench)
    for _ in range(3):
        tuner.run(("shape", 1), rec.candidates, rec.launch)
    assert rec.benched == CANDS and rec.listed == 1
    assert rec.launched[3:] == [CANDS[1]] * 3
    tuner.run(("shape", 2), rec.candidates, rec.launch)
    assert len(rec.benched) == 6 and rec.listed == 2


def test_tuner_skips_configs_that_do_not_fit():
    good, bad = LaunchConfig(64, 64, 32, 3, 4), LaunchConfig(128, 128, 64, 3, 8)

    def launch(cfg):
        if cfg.block_m == 128:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")

    tuner = Tuner(lambda fn: fn() or 1.0)
    tuner.run("k", lambda: [bad, good], launch)
    assert tuner.best["k"] == good
    with pytest.raises(RuntimeError, match="no candidate config compiles") as info:
        tuner.run("k2", lambda: [bad, bad._replace(num_stages=2)], launch)
    assert "num_stages=2" in str(info.value) and "OutOfResources" in str(info.value)


def test_tuner_raises_a_real_fault_at_once():
    # e.g. an illegal memory access: later candidates would run on a poisoned context, and the
    # error raised at the end would be theirs, not this one.
    tried = []

    def launch(cfg):
        tried.append(cfg)
        if cfg is CANDS[0]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    tuner = Tuner(lambda fn: fn() or 1.0)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tuner.run("k", lambda: CANDS, launch)
    assert tried == [CANDS[0]] and "k" not in tuner.best


def test_no_timing_during_cuda_graph_capture(monkeypatch, tmp_path):
    rec = Recorder()
    cache = DiskCache(str(tmp_path))
    tuner = Tuner(rec.bench, cache)
    monkeypatch.setattr(configs, "_capturing", lambda: True)
    tuner.run("k", rec.candidates, rec.launch)
    assert rec.benched == [] and rec.launched == [CANDS[0]]
    assert "k" not in tuner.best and not os.path.exists(cache.path), "an untimed choice was stored as tuned"
    # A config tuned before (here: by another process) is used during capture.
    DiskCache(str(tmp_path)).put("tuned", CANDS[2])
    Tuner(rec.bench, DiskCache(str(tmp_path))).run("tuned", rec.candidates, rec.launch)
    assert rec.benched == [] and rec.launched[-1] == CANDS[2]
    monkeypatch.setattr(configs, "_capturing", lambda: False)
    tuner.run("k", rec.candidates, rec.launch)
    assert rec.benched == CANDS and tuner.best["k"] == CANDS[1]


def test_autotuning_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv(configs.AUTOTUNE_ENV_VAR, "0")
    rec = Recorder()
    cache = DiskCache(str(tmp_path))
    tuner = Tuner(rec.bench, cache)
    for _ in range(2):
        tuner.run("k", rec.candidates, rec.launch)
    assert rec.benched == [] and rec.launched == [CANDS[0]] * 2 and rec.listed == 1
    assert not os.path.exists(cache.path)


def test_disk_cache_serves_the_next_process(tmp_path):
    first = Recorder()
    Tuner(first.bench, DiskCache(str(tmp_path))).run(("dev", "torch.float16", (1, 2)), first.candidates, first.launch)
    assert first.benched == CANDS
    second = Recorder()
    tuner = Tuner(second.bench, DiskCache(str(tmp_path)))
    tuner.run(("dev", "torch.float16", (1, 2)), second.candidates, second.launch)
    assert second.benched == [] and second.launched == [CANDS[1]]
    tuner.run(("other device", "torch.float16", (1, 2)), second.candidates, second.launch)
    assert second.benched == CANDS


def test_cached_config_that_is_no_longer_a_candidate_is_a_miss(tmp_path):
    DiskCache(str(tmp_path)).put("k", LaunchConfig(256, 256, 64, 9, 8))
    rec = Recorder()
    tuner = Tuner(rec.bench, DiskCache(str(tmp_path)))
    tuner.run("k", rec.candidates, rec.launch)
    assert rec.benched == CANDS and tuner.best["k"] == CANDS[1]
    assert DiskCache(str(tmp_path)).get("k") == CANDS[1]


def _write(cache: DiskCache, text: str) -> None:
    os.makedirs(os.path.dirname(cache.path), exist_ok=True)
    with open(cache.path, "w") as f:
        f.write(text)


@pytest.mark.parametrize("content", [
    '{"format": 1, "triton": "',  # torn or corrupt
    "[1, 2, 3]",
    json.dumps({"format": 1, "triton": "0.0.1", "entries": {'"k"': [32, 32, 32, 3, 4, 1]}}),  # foreign version
    json.dumps({"format": 99, "triton": triton.__version__, "entries": {'"k"': [32, 32, 32, 3, 4, 1]}}),
])
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path, content):
    cache = DiskCache(str(tmp_path))
    _write(cache, content)
    rec = Recorder()
    with pytest.warns(AutotuneCacheWarning, match="ignoring"):
        Tuner(rec.bench, cache).run("k", rec.candidates, rec.launch)
    assert rec.benched == CANDS, "a config from an untrusted file was used"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file was replaced by a valid one
        assert DiskCache(str(tmp_path)).get("k") == CANDS[1]


def test_malformed_entries_are_dropped_and_the_rest_kept(tmp_path):
    cache = DiskCache(str(tmp_path))
    entries = {'"good"': list(CANDS[2]), '"short"': [32, 32], '"negative"': [-32, 32, 32, 3, 4, 1],
               '"text"': ["32", 32, 32, 3, 4, 1]}
    _write(cache, json.dumps({"format": 1, "triton": triton.__version__, "entries": entries}))
    with pytest.warns(AutotuneCacheWarning, match="3 malformed"):
        assert cache.get("good") == CANDS[2]
    assert cache.get("short") is None


def test_unwritable_cache_dir_warns_and_tuning_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rec = Recorder()
    tuner = Tuner(rec.bench, DiskCache(str(blocker / "cache")))
    with pytest.warns(AutotuneCacheWarning, match="cannot write"):
        tuner.run("k", rec.candidates, rec.launch)
    assert tuner.best["k"] == CANDS[1]


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(configs.CACHE_ENV_VAR, str(tmp_path / "mine"))
    assert DiskCache().path.startswith(str(tmp_path / "mine") + os.sep)
    assert triton.__version__ in os.path.basename(DiskCache().path)
    monkeypatch.delenv(configs.CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert configs.cache_dir() == str(tmp_path / "xdg" / "resnet_fused")


def _writer(directory: str, worker: int, count: int) -> None:
    cache = DiskCache(directory)
    for i in range(count):
        cache.put((worker, i), LaunchConfig(16, 16, 16, 1 + i % 4, 4, 1 + worker))


def test_concurrent_writers_lose_nothing(tmp_path):
    workers, count = 4, 25
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, count)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cache = DiskCache(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for w in range(workers):
            for i in range(count):
                assert cache.get((w, i)) == LaunchConfig(16, 16, 16, 1 + i % 4, 4, 1 + w)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == [], "a temporary file was left behind"


def _host_overhead_module():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "triton_host_overhead.py")
    spec = importlib.util.spec_from_file_location("triton_host_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pretend_cuda(monkeypatch):
    """The conv path as on a GPU, kernels stubbed; every candidates() call is counted."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the stand-in runs CPU tensors, which the triton backend takes only with TRITON_INTERPRET=1")
    bench = _host_overhead_module()
    for dtype in (torch.float32, torch.float16):
        ops.resolve_backend("triton", "cpu", dtype)  # cached while the interpreter is still visible
    listed = []
    real = configs.candidates

    def counting(*args, **kwargs):
        cands = real(*args, **kwargs)
        listed.append((args, kwargs, cands))
        return cands

    monkeypatch.setattr(configs, "candidates", counting)
    with bench.pretend_cuda() as tuner:
        yield tuner, listed


def test_conv_hit_path_does_not_list_candidates(pretend_cuda):
    tuner, listed = pretend_cuda
    x = torch.randn(1, 64, 7, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 64, 3, 3).contiguous(memory_format=torch.channels_last)
    bound = ops.BoundConvBiasAct(padding=1, backend="triton")
    with torch.inference_mode():
        for _ in range(3):
            ops.conv_bias_act(x, w, None, padding=1, backend="triton")
            bound(x, w, None)
    assert len(listed) == 1 and len(tuner.best) == 1


def test_autotune_key_separates_epilogues_and_layouts(pretend_cuda):
    # A downsample 1x1 and a residual 1x1 of one shape, or inputs of one shape and other strides,
    # compile to different kernels: each gets its own tuning.
    tuner, listed = pretend_cuda
    x = torch.randn(2, 64, 7, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 1, 1)
    b = torch.randn(64)
    res = torch.randn(2, 64, 7, 7)
    calls = [
        dict(bias=None, residual=None, relu=False),
        dict(bias=b, residual=None, relu=False),
        dict(bias=b, residual=None, relu=True),
        dict(bias=b, residual=res, relu=True),
        dict(bias=b, residual=res.contiguous(memory_format=torch.channels_last), relu=True),
    ]
    with torch.inference_mode():
        for kwargs in calls:
            ops.conv_bias_act(x, w, backend="triton", **kwargs)
        wider = torch.randn(2, 96, 7, 7).contiguous(memory_format=torch.channels_last)[:, :64]
        ops.conv_bias_act(wider, w, backend="triton", **calls[-1])  # same shape, other strides
        ops.conv_bias_act(x, w, backend="triton", **calls[0])  # seen before: a hit
    assert len(listed) == len(tuner.best) == len(calls) + 1
    for key in tuner.best:
        json.dumps(key)  # every key can go to the disk cache


def test_split_k_candidates_reach_the_tuner(pretend_cuda):
    tuner, listed = pretend_cuda
    x = torch.randn(1, 512, 7, 7).contiguous(memory_format=torch.channels_last)  # resnet50 layer4, batch 1
    w = torch.randn(512, 512, 3, 3).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ops.conv_bias_act(x, w, None, padding=1, backend="triton")
    ((args, kwargs, cands),) = listed
    assert kwargs["sm_count"] == 132 and kwargs["taps"] == 9
    assert any(c.split_k > 1 for c in cands)
    assert next(iter(tuner.best))[0] == "stand-in GPU (132 SMs)"

"""pytest-benchmark suites (bench_*.py): run them explicitly, e.g. ``pytest benchmarks/bench_models.py``.

They are not part of the default test run (pyproject's testpaths is tests/). Options: see
``pytest benchmarks --help`` under "resnet-fused benchmarks", and benchmarks/README.md.
"""

from __future__ import annotations

import functools

import pytest
import torch

import harness


def pytest_addoption(parser):
    harness.add_options(parser)


@functools.lru_cache(maxsize=None)
def _config(config) -> harness.Config:
    return harness.Config.from_options(config.option)


def pytest_configure(config):
    if _config(config).device.type == "cuda":
        # Eager at its best: cuDNN picks the fastest algorithm for each shape (during time_fn's
        # warm-up), as any serious GPU benchmark of eager PyTorch does. Recorded in the environment.
        torch.backends.cudnn.benchmark = True


def pytest_collect_file(file_path, parent):
    # The files are bench_*.py so that the default run never mistakes them for tests; files given on
    # the command line are collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    return _config(config).describe()


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", [case.param() for case in metafunc.module.cases(_config(metafunc.config))])


def pytest_collection_modifyitems(config, items):
    # Each benchmark gets its own replay clock (see harness.ReplayClock) and its group, so that
    # pytest-benchmark compares the variants of one model, batch and dtype with each other.
    for item in items:
        case = getattr(getattr(item, "callspec", None), "params", {}).get("case")
        if case is not None:
            item.add_marker(pytest.mark.benchmark(group=case.group, timer=harness.ReplayClock()))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["resnet_fused"] = harness.env_info(_config(config).device)


@pytest.fixture
def bench_config(request) -> harness.Config:
    return _config(request.config)


@pytest.fixture
def measure(request, benchmark, bench_config):
    """``measure(case, variant, inputs, expected)``: judge, time and record one variant (see harness.measure)."""
    clock = request.node.get_closest_marker("benchmark").kwargs["timer"]
    return functools.partial(harness.measure, benchmark, clock, bench_config)

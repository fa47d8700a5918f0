"""Launch configurations: a few candidates per shape class, tuned once per shape and cached.

Candidates follow the shapes PyTorch Inductor's conv template and mm heuristics favour on Ampere
and Hopper: 64-128 wide M/N tiles, K tiles of 32-64 (a whole ResNet channel block in one or two
steps), 3-4 pipeline stages, 4 warps, 8 for the 128x128 tiles (one warpgroup per 64 rows on
Hopper). Each is clamped to the problem (no 128-wide output-channel tile for a 64-channel layer,
no 64-deep K tile for 16 channels) and dropped when its pipeline would not fit in shared memory.
"""

from __future__ import annotations

from typing import Callable, Hashable, NamedTuple, Sequence

import torch
import triton
import triton.testing


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int


_CANDIDATES = {
    "conv": (
        LaunchConfig(128, 128, 64, 3, 8),
        LaunchConfig(128, 64, 64, 4, 4),
        LaunchConfig(64, 128, 64, 4, 4),
        LaunchConfig(64, 64, 64, 4, 4),
        LaunchConfig(128, 128, 32, 4, 4),
        # batch-1 late layers: a handful of output pixels, long reduction
        LaunchConfig(32, 64, 128, 3, 4),
    ),
    "gemm": (
        LaunchConfig(128, 128, 64, 3, 8),
        LaunchConfig(128, 256, 64, 3, 8),
        LaunchConfig(128, 64, 64, 4, 4),
        LaunchConfig(64, 128, 64, 4, 4),
        LaunchConfig(64, 64, 64, 4, 4),
        LaunchConfig(32, 64, 128, 3, 4),
    ),
    # Short reductions (the stem's 7*7*3 = 147, ResNeXt's 9 * 4..8): K tiles of 32 waste little.
    "flat": (
        LaunchConfig(128, 64, 32, 3, 4),
        LaunchConfig(256, 64, 32, 3, 8),
        LaunchConfig(64, 64, 32, 3, 4),
        LaunchConfig(128, 32, 32, 3, 4),
        LaunchConfig(64, 64, 64, 2, 4),
    ),
}


def _fit(block: int, size: int) -> int:
    """``block`` shrunk to the power of two covering ``size``, never below tl.dot's minimum of 16."""
    return min(block, max(16, triton.next_power_of_2(size)))


def candidates(cls: str, m: int, n: int, k: int, element_size: int, smem_bytes: int) -> list[LaunchConfig]:
    """Candidate configs of shape class ``cls`` for an (m x k) @ (k x n) problem, k the per-step reduction."""
    fitted = []
    for c in _CANDIDATES[cls]:
        cfg = c._replace(block_m=_fit(c.block_m, m), block_n=_fit(c.block_n, n), block_k=_fit(c.block_k, k))
        if cfg not in fitted:
            fitted.append(cfg)

    def smem(cfg: LaunchConfig) -> int:
        return cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * element_size

    fits = [cfg for cfg in fitted if smem(cfg) <= smem_bytes]
    return fits or [min(fitted, key=smem)._replace(num_stages=1)]


def interpreter_config(m: int, n: int, k: int) -> LaunchConfig:
    """One config for Triton's interpreter, where each program costs Python overhead: few, wide blocks."""
    return LaunchConfig(_fit(64, m), _fit(128, n), _fit(128, k), 1, 4)


def shared_memory(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


class Tuner:
    """Benchmarks each candidate the first time a key is seen and reuses the fastest for that key."""

    def __init__(self, bench: Callable[[Callable[[], None]], float] | None = None):
        self._bench = bench
        self.best: dict[Hashable, LaunchConfig] = {}

    def run(self, key: Hashable, candidates: Sequence[LaunchConfig], launch: Callable[[LaunchConfig], None]) -> None:
        cfg = self.best.get(key)
        if cfg is None:
            cfg = self._pick(candidates, launch)
            self.best[key] = cfg
        launch(cfg)

    def _pick(self, candidates, launch) -> LaunchConfig:
        if len(candidates) == 1:
            return candidates[0]
        bench = self._bench or _do_bench
        timings, errors = {}, []
        for cfg in candidates:
            try:
                timings[cfg] = bench(lambda: launch(cfg))
            except Exception as e:  # a config can exceed registers/shared memory on this GPU: skip it
                errors.append(e)
        if not timings:
            raise errors[-1]
        return min(timings, key=timings.get)


def _do_bench(fn: Callable[[], None]) -> float:
    # Short runs: a ResNet has a couple of dozen distinct layer shapes, each tuned on first use.
    return triton.testing.do_bench(fn, warmup=5, rep=20)


TUNED = Tuner()

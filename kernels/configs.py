"""Launch configurations: a few candidates per shape class, tuned once per shape and cached.

Candidates follow the shapes PyTorch Inductor's conv template and mm heuristics favour on Ampere
and Hopper: 64-128 wide M/N tiles, K tiles of 32-64 (a whole ResNet channel block in one or two
steps), 3-4 pipeline stages, 4 warps, 8 for the 128x128 tiles (one warpgroup per 64 rows on
Hopper). Each is clamped to the problem (no 128-wide output-channel tile for a 64-channel layer,
no 64-deep K tile for 16 channels) and dropped when its pipeline would not fit in shared memory.
Where a layer's output tiles leave most of the GPU's SMs idle (deep layers at batch 1-8), the two
most preferred configs also get a split-K twin.

The tuner (:data:`TUNED`) times the candidates once per key (device name, dtype, shapes, strides,
every kernel constexpr) and keeps the winner in memory and in an on-disk cache
(:class:`DiskCache`, ``$RESNET_FUSED_CACHE_DIR``), so the next process does not time them again.
``RESNET_FUSED_AUTOTUNE=0`` takes the first candidate without timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from typing import Callable, Hashable, NamedTuple, Sequence

import torch
import triton
import triton.compiler.errors
import triton.runtime.errors
import triton.testing


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    # > 1: the reduction is cut into this many slices whose fp32 partial sums a second kernel adds
    # up, in order, before the epilogue (see kernels.conv). Runtime-only: one compiled kernel serves
    # every split_k > 1 of a block config.
    split_k: int = 1


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


# Plain-integer twins of triton.cdiv and triton.next_power_of_2, which run through Triton's JIT
# wrappers on the host and cost ~2-12 us a call: too much on the per-call path.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """For n >= 1, as triton.next_power_of_2."""
    return 1 << max(0, n - 1).bit_length()


def _fit(block: int, size: int) -> int:
    """``block`` shrunk to the power of two covering ``size``, never below tl.dot's minimum of 16."""
    return min(block, max(16, next_power_of_2(size)))


# Split-K pays only where the output tiles leave most SMs idle and each slice keeps a reduction long
# enough to pipeline: ResNet's layers 3-4 at batch 1-8 launch 2-16 output tiles over 1024-4608 deep
# reductions on a 132-SM GPU.
_SPLIT_MIN_STEPS = 4
# Split-K twins of the first (most preferred) configs only: each is one more kernel to compile.
_SPLIT_MAX_CANDIDATES = 2


def _split_k(cfg: LaunchConfig, m: int, n: int, k: int, taps: int, groups: int, sm_count: int) -> int:
    """The split that fills the GPU with output tiles x slices, or 1 where splitting cannot pay."""
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n) * groups
    steps = taps * cdiv(k, cfg.block_k)
    split = 1
    while tiles * split * 2 <= sm_count and steps // (split * 2) >= _SPLIT_MIN_STEPS:
        split *= 2
    return split


def candidates(cls: str, m: int, n: int, k: int, element_size: int, smem_bytes: int, *, taps: int = 1,
               groups: int = 1, sm_count: int = 0) -> list[LaunchConfig]:
    """Candidate configs of shape class ``cls`` for ``groups`` (m x taps*k) @ (taps*k x n) problems.

    ``k`` is the reduction per step (a tap's channels; the whole reduction for "flat", with
    ``taps=1``). With the device's ``sm_count``, the first two configs whose output tiles leave most
    SMs idle get a split-K twin as well; without it (0) no split-K is proposed.
    """
    fitted = []
    for c in _CANDIDATES[cls]:
        cfg = c._replace(block_m=_fit(c.block_m, m), block_n=_fit(c.block_n, n), block_k=_fit(c.block_k, k))
        if cfg not in fitted:
            fitted.append(cfg)

    def smem(cfg: LaunchConfig) -> int:
        return cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * element_size

    fits = [cfg for cfg in fitted if smem(cfg) <= smem_bytes] or [min(fitted, key=smem)._replace(num_stages=1)]
    splits = []
    for cfg in fits:
        split = _split_k(cfg, m, n, k, taps, groups, sm_count)
        if split > 1 and len(splits) < _SPLIT_MAX_CANDIDATES:
            splits.append(cfg._replace(split_k=split))
    return fits + splits


def interpreter_config(m: int, n: int, k: int) -> LaunchConfig:
    """One config for Triton's interpreter, where each program costs Python overhead: few, wide blocks."""
    return LaunchConfig(_fit(64, m), _fit(128, n), _fit(128, k), 1, 4)


class Device(NamedTuple):
    name: str
    shared_memory: int  # bytes one block may opt into
    sm_count: int


_DEVICES: dict[int, Device] = {}


def device_info(device: torch.device) -> Device:
    """The GPU's name and limits, read once per device (the properties call costs microseconds)."""
    index = torch.cuda.current_device() if device.index is None else device.index
    info = _DEVICES.get(index)
    if info is None:
        props = torch.cuda.get_device_properties(index)
        info = _DEVICES[index] = Device(props.name, props.shared_memory_per_block_optin, props.multi_processor_count)
    return info


# Errors that mean "this config does not fit this GPU or compiler": the tuner skips such a config.
# Anything else (an illegal address, a launch failure) is a real fault and is raised at once.
CONFIG_ERRORS: tuple[type[Exception], ...] = (
    triton.runtime.errors.OutOfResources,
    triton.compiler.errors.CompilationError,
    *([triton.runtime.errors.PTXASError] if hasattr(triton.runtime.errors, "PTXASError") else []),
)

AUTOTUNE_ENV_VAR = "RESNET_FUSED_AUTOTUNE"


def _capturing() -> bool:
    # Timing synchronizes, which is illegal while a CUDA graph is being captured.
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Tuner:
    """Picks a config per key: from memory, else the disk cache, else by timing every candidate.

    ``candidates`` is a callable, called only on a miss: listing them costs far more host time than a
    launch. Untimed choices (inside CUDA graph capture, or with ``RESNET_FUSED_AUTOTUNE=0``) are the
    first candidate and never stored on disk; one made during capture is not kept at all, so the next
    call outside capture tunes properly.
    """

    def __init__(self, bench: Callable[[Callable[[], None]], float] | None = None, cache: DiskCache | None = None):
        self._bench = bench
        self.cache = cache
        self.best: dict[Hashable, LaunchConfig] = {}

    def run(self, key: Hashable, candidates: Callable[[], Sequence[LaunchConfig]],
            launch: Callable[[LaunchConfig], None]) -> None:
        cfg = self.best.get(key)
        if cfg is None:
            cfg = self._choose(key, candidates(), launch)
        launch(cfg)

    def _choose(self, key, cands: Sequence[LaunchConfig], launch) -> LaunchConfig:
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached in cands:  # a config that is no longer a candidate is a miss
                self.best[key] = cached
                return cached
        if len(cands) == 1:
            self.best[key] = cands[0]
            return cands[0]
        if _capturing():
            return cands[0]
        if os.environ.get(AUTOTUNE_ENV_VAR) == "0":
            self.best[key] = cands[0]
            return cands[0]
        cfg = self._pick(cands, launch)
        self.best[key] = cfg
        if self.cache is not None:
            self.cache.put(key, cfg)
        return cfg

    def _pick(self, candidates, launch) -> LaunchConfig:
        bench = self._bench or _do_bench
        timings, errors = {}, []
        for cfg in candidates:
            try:
                timings[cfg] = bench(lambda: launch(cfg))
            except CONFIG_ERRORS as e:  # too many registers or too much shared memory on this GPU
                errors.append(f"{cfg}: {type(e).__name__}: {e}")
        if not timings:
            raise RuntimeError("no candidate config compiles and fits this GPU:\n" + "\n".join(errors))
        return min(timings, key=timings.get)


def _do_bench(fn: Callable[[], None]) -> float:
    # Short runs: a ResNet has a couple of dozen distinct layer shapes, each tuned on first use.
    return triton.testing.do_bench(fn, warmup=5, rep=20)


class AutotuneCacheWarning(UserWarning):
    """The autotune cache file could not be read or written; tuning goes on without it."""


CACHE_ENV_VAR = "RESNET_FUSED_CACHE_DIR"
_CACHE_FORMAT = 1


def cache_dir() -> str:
    """``$RESNET_FUSED_CACHE_DIR``, else ``$XDG_CACHE_HOME/resnet_fused``, else ``~/.cache/resnet_fused``."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnet_fused")


class DiskCache:
    """Tuned configs kept across processes: one JSON file per Triton version in :func:`cache_dir`.

    Keys are the tuner's keys (device name, dtype, shapes, strides, every kernel constexpr) as JSON
    text. The file is read once, on the first lookup; each new entry is merged into the file as it
    is on disk then (under an advisory lock where the OS has one) and written atomically (a temporary
    file renamed over it), so concurrent processes never leave a torn file. A file that does not
    parse, belongs to another format or Triton version, or holds malformed entries is ignored (with
    a warning) entry by entry, never trusted: the tuner also checks a cached config is a current
    candidate before using it.
    """

    def __init__(self, directory: str | None = None):
        self._directory = directory  # None: cache_dir() at first use, so the variable may be set late
        self._entries: dict[str, LaunchConfig] | None = None
        self._disabled = False

    @property
    def path(self) -> str:
        return os.path.join(self._directory or cache_dir(), f"autotune-triton-{triton.__version__}.json")

    def get(self, key) -> LaunchConfig | None:
        if self._entries is None:
            self._entries = self._read(self.path)
        text = _key_text(key)
        return None if text is None else self._entries.get(text)

    def put(self, key, cfg: LaunchConfig) -> None:
        text = _key_text(key)
        if text is None or self._disabled:
            return
        if self._entries is None:
            self._entries = {}
        self._entries[text] = cfg
        path = self.path
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with _locked(path + ".lock"):
                entries = self._read(path)
                entries[text] = cfg
                _write_atomically(path, {
                    "format": _CACHE_FORMAT,
                    "triton": triton.__version__,
                    "entries": {k: list(v) for k, v in entries.items()},
                })
        except OSError as e:
            self._disabled = True
            warnings.warn(f"resnet_fused: cannot write the autotune cache {path} ({e}); tuned configs "
                          f"will not be kept for other processes", AutotuneCacheWarning, stacklevel=2)

    @staticmethod
    def _read(path: str) -> dict[str, LaunchConfig]:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, ValueError) as e:
            warnings.warn(f"resnet_fused: ignoring unreadable autotune cache {path} ({e})", AutotuneCacheWarning,
                          stacklevel=3)
            return {}
        if (not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT
                or data.get("triton") != triton.__version__):
            found = (data.get("format"), data.get("triton")) if isinstance(data, dict) else type(data).__name__
            warnings.warn(f"resnet_fused: ignoring autotune cache {path}: written by another format or Triton "
                          f"version ({found}, expected ({_CACHE_FORMAT}, {triton.__version__!r}))",
                          AutotuneCacheWarning, stacklevel=3)
            return {}
        raw = data.get("entries")
        entries, bad = {}, 0
        for text, fields in raw.items() if isinstance(raw, dict) else ():
            if (isinstance(fields, list) and len(fields) == len(LaunchConfig._fields)
                    and all(type(v) is int and v > 0 for v in fields)):
                entries[text] = LaunchConfig(*fields)
            else:
                bad += 1
        if bad or not isinstance(raw, dict):
            warnings.warn(f"resnet_fused: ignoring {bad if isinstance(raw, dict) else 'all'} malformed entries of "
                          f"the autotune cache {path}", AutotuneCacheWarning, stacklevel=3)
        return entries


def _key_text(key) -> str | None:
    try:
        return json.dumps(key, separators=(",", ":"))
    except (TypeError, ValueError):  # a key not made of plain values: kept in memory only
        return None


@contextlib.contextmanager
def _locked(lock_path: str):
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): the atomic rename still keeps the file whole
        yield
        return
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomically(path: str, data) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".autotune-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


TUNED = Tuner(cache=DiskCache())

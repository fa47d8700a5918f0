"""Turn benchmark JSON into a markdown table and a PNG chart of speedups.

Reads pytest-benchmark JSON written by the suites here (``--benchmark-json``) and the JSON of
``resnet-fused bench --json``, any mix of them from one machine:

    python benchmarks/render.py out.json                   # -> benchmarks/results/<date>_<device>/
    python benchmarks/render.py a.json b.json --out DIR    # -> DIR/results.md, DIR/speedup.png
    python benchmarks/render.py out.json --summary         # also print the headline table

With the default ``--results-root`` the input JSON is kept next to the table (as results.json when
there is one input), so a results directory holds everything its numbers came from.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
SUITES = {"models": "Whole models", "blocks": "Residual blocks", "ops": "Fused ops"}
SHORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


@dataclass
class Row:
    suite: str
    subject: str
    batch: int
    dtype: str
    size: int
    variant: str
    kind: str
    cuda_graph: bool
    median_ms: float
    rounds: int
    rel_error: float | None
    vs_eager: float | None = None
    vs_compile: float | None = None

    @property
    def group(self) -> tuple:
        return self.suite, self.subject, self.batch, self.dtype, self.size

    @property
    def images_per_s(self) -> float:
        return self.batch * 1000.0 / self.median_ms


@dataclass(frozen=True)
class Target:
    """A performance goal on one measurement of resnet50 (goals are set for an H100)."""

    text: str
    dtype: str
    batch: int
    cuda_graph: bool
    field: str  # vs_eager | vs_compile | median_ms
    goal: float

    def met(self, value: float) -> bool:
        return value <= self.goal if self.field == "median_ms" else value >= self.goal

    def best(self, rows: Sequence[Row]) -> Row | None:
        """The fused row of resnet50 that comes closest to the goal, if any was measured."""
        candidates = [r for r in rows if r.suite == "models" and r.subject.rpartition(":")[2] == "resnet50"
                      and r.kind == "fused" and r.dtype == self.dtype and r.batch == self.batch
                      and r.cuda_graph == self.cuda_graph and getattr(r, self.field) is not None]
        sign = -1 if self.field == "median_ms" else 1
        return max(candidates, key=lambda r: sign * getattr(r, self.field), default=None)


# The H100/H200 goals of the GPU issue (torch.compile: default mode, freezing on).
TARGETS = (
    Target("resnet50 fp16 batch 256: fused >= 3x eager fp16 NCHW", "float16", 256, False, "vs_eager", 3.0),
    Target("resnet50 fp16 batch 256: fused >= 1.3x torch.compile", "float16", 256, False, "vs_compile", 1.3),
    Target("resnet50 fp16 batch 1: fused + CUDA graph <= 0.5 ms", "float16", 1, True, "median_ms", 0.5),
)


def load(path: Path) -> tuple[dict, list[Row], str | None]:
    """(environment, rows, ISO time of the run) of one JSON file of either kind."""
    data = json.loads(path.read_text())
    if "benchmarks" in data:  # pytest-benchmark
        env = data.get("machine_info", {}).get("resnet_fused", {})
        rows = [
            Row(info["suite"], info["subject"], info["batch"], info["dtype"], info["size"], info["variant"], info["kind"],
                info.get("cuda_graph", False), b["stats"]["median"] * 1000.0, b["stats"]["rounds"], info.get("rel_error_vs_fp64"))
            for b in data["benchmarks"] if "suite" in (info := b.get("extra_info", {}))
        ]
        return env, rows, data.get("datetime")
    if "results" in data and "model" in data:  # resnet-fused bench --json
        rows = [
            Row("models", data["model"], data["batch"], data["dtype"], data["size"], r["variant"], r["kind"],
                "CUDA graph" in r["variant"], r["median_ms"], len(r.get("times_ms", [])), r.get("rel_error_vs_fp64"))
            for r in data["results"]
        ]
        return data.get("environment", {}), rows, None
    raise ValueError(f"{path}: neither pytest-benchmark JSON nor `resnet-fused bench --json` output")


def add_speedups(rows: Iterable[Row]) -> None:
    """Speedup of each row over eager NCHW and over torch.compile of its own group (same subject, batch, dtype, size)."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    for members in groups.values():
        eager = next((r.median_ms for r in members if r.variant == "eager"), None)
        compiled = next((r.median_ms for r in members if r.kind == "compile"), None)
        for r in members:
            r.vs_eager = eager / r.median_ms if eager else None
            r.vs_compile = compiled / r.median_ms if compiled else None


def slug(env: dict) -> str:
    """A directory-name form of the device: 'cpu-amd-epyc-2t', 'nvidia-h100-80gb-hbm3'."""
    name = env.get("device_name") or env.get("processor") or "unknown"
    threads = re.search(r"\((\d+) threads\)", name)
    name = re.sub(r"\(\d+ threads\)|\((r|tm)\)|@.*?ghz|\b\d+-core\b|\bprocessor\b|\bcpu\b", " ", name, flags=re.I)
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if str(env.get("device", "cpu")).startswith("cpu"):
        text = f"cpu-{text}" + (f"-{threads.group(1)}t" if threads else "")
    return text


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def _environment_lines(env: dict, when: str) -> list[str]:
    gpu = "capability" in env
    device = env.get("device_name", "unknown device")
    if gpu:
        device += f" (compute capability {env['capability']}), driver {env.get('driver') or 'unknown'}"
    else:
        device += f", {env.get('cpu_capability', '?')} kernels"
    lines = [
        f"- measured: {when}",
        f"- device: {device}",
        f"- software: torch {env.get('torch', '?')}, triton {env.get('triton', 'not installed')}, "
        f"CUDA {env.get('cuda') or '-'}, cuDNN {env.get('cudnn') or '-'}, Python {env.get('python', '?')}",
        f"- CPU threads used by torch: {env.get('threads', '?')}",
    ]
    if gpu:
        lines.append(f"- TF32: cuDNN convolutions {'on' if env.get('tf32_cudnn') else 'off'}, "
                     f"matmul {'on' if env.get('tf32_matmul') else 'off'} (float32 rows use "
                     f"{'TF32' if env.get('tf32_cudnn') else 'full fp32'} convolutions in eager and torch.compile)")
        lines.append(f"- cuDNN algorithm autotuning (torch.backends.cudnn.benchmark): "
                     f"{'on' if env.get('cudnn_benchmark') else 'off'}")
    return lines


def _suite_table(suite: str, rows: Sequence[Row]) -> list[str]:
    has_compile = any(r.vs_compile is not None for r in rows)
    label = {"models": "model", "blocks": "block", "ops": "op (input size)"}[suite]
    headers = [label, "batch", "dtype"] + (["input"] if suite == "models" else []) + \
        ["variant", "median ms", "images/s", "vs eager"] + (["vs compile"] if has_compile else []) + ["rel err vs fp64"]
    body = []
    for r in rows:
        cells = [r.subject, str(r.batch), SHORT_DTYPES.get(r.dtype, r.dtype)] + ([f"{r.size}x{r.size}"] if suite == "models" else [])
        cells += [r.variant, f"{r.median_ms:.3f}", f"{r.images_per_s:,.1f}", _num(r.vs_eager, ".2f", "x")]
        cells += [_num(r.vs_compile, ".2f", "x")] if has_compile else []
        cells += [_num(r.rel_error, ".1e")]
        body.append(cells)
    return _table(headers, body)


def target_rows(rows: Sequence[Row]) -> list[list[str]]:
    table = []
    for target in TARGETS:
        best = target.best(rows)
        if best is None:
            table.append([target.text, "not measured", "-"])
            continue
        value = getattr(best, target.field)
        shown = f"{value:.3f} ms" if target.field == "median_ms" else f"{value:.2f}x"
        table.append([target.text, f"{shown} ({best.variant})", "MET" if target.met(value) else "MISSED"])
    return table


def markdown(env: dict, rows: Sequence[Row], when: str, chart: str | None) -> str:
    lines = [f"# resnet-fused benchmarks: {env.get('device_name', 'unknown device')}", "", *_environment_lines(env, when), "",
             "Median of the timed runs of each variant (`resnet_fused.bench.time_fn`: warm-up, compilation and "
             "autotuning untimed; CUDA events on a GPU; inputs rotated). *vs eager*: eager NCHW in the same dtype "
             "divided by this row; *vs compile*: torch.compile (inductor, freezing on) divided by this row; above 1 "
             "is faster. *rel err*: max |out - float64| / max |float64| of this variant's output.", ""]
    if any(t.best(rows) for t in TARGETS):
        lines += ["## Targets (set for an H100)", "", *_table(["target", "measured (best fused variant)", "verdict"],
                                                             target_rows(rows)), ""]
    if chart:
        lines += [f"![speedup over eager]({chart})", ""]
    for suite, title in SUITES.items():
        members = [r for r in rows if r.suite == suite]
        if members:
            lines += [f"## {title}", "", *_suite_table(suite, members), ""]
    return "\n".join(lines)


def draw(env: dict, rows: Sequence[Row], path: Path) -> str | None:
    """Bar chart of each variant's speedup over eager, per model, batch and dtype; None when there is nothing to draw
    or no matplotlib."""
    models = [r for r in rows if r.suite == "models" and r.vs_eager is not None and r.variant != "eager"]
    if not models:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("render: matplotlib is not installed: no chart drawn", file=sys.stderr)
        return None
    groups = list(dict.fromkeys((r.subject, r.batch, r.dtype) for r in models))
    variants = list(dict.fromkeys(r.variant for r in models))
    speedup = {(r.subject, r.batch, r.dtype, r.variant): r.vs_eager for r in models}
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 0.4 * len(groups) * len(variants)), 4.5))
    for i, variant in enumerate(variants):
        xs = [g + (i - (len(variants) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [speedup.get((*group, variant), 0.0) for group in groups], width, label=variant)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{s}\nbatch {b}, {SHORT_DTYPES.get(d, d)}" for s, b, d in groups], fontsize=8)
    ax.set_ylabel("speedup over eager NCHW (same dtype)")
    ax.set_title(f"resnet-fused on {env.get('device_name', 'unknown device')}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def summary(env: dict, rows: Sequence[Row]) -> str:
    """The headline: each model group's eager time and best fused speedup, then the (GPU) targets."""
    lines = []
    for group in dict.fromkeys(r.group for r in rows if r.suite == "models"):
        members = [r for r in rows if r.group == group]
        eager = next((r for r in members if r.variant == "eager"), None)
        fused = max((r for r in members if r.kind == "fused" and r.vs_eager), key=lambda r: r.vs_eager, default=None)
        lines.append([f"{group[1]} b{group[2]} {SHORT_DTYPES.get(group[3], group[3])}",
                      _num(eager and eager.median_ms, ".3f"),
                      fused.variant if fused else "-", _num(fused and fused.median_ms, ".3f"),
                      _num(fused and fused.vs_eager, ".2f", "x"), _num(fused and fused.vs_compile, ".2f", "x")])
    text = _table(["model", "eager ms", "best fused", "fused ms", "vs eager", "vs compile"], lines) if lines else []
    if str(env.get("device", "")).startswith("cuda") or any(t.best(rows) for t in TARGETS):
        text += ["", *_table(["target", "measured", "verdict"], target_rows(rows))]
    return "\n".join(text)


def render(inputs: Sequence[Path], out: Path) -> tuple[list[Path], dict, list[Row]]:
    """Write ``out``/results.md (and speedup.png when there are whole-model results); return the files,
    the environment and the rows."""
    envs, rows, times = [], [], []
    for path in inputs:
        env, found, when = load(path)
        envs.append(env)
        rows += found
        times.append(when)
    names = {e.get("device_name") for e in envs}
    if len(names) > 1:
        raise ValueError(f"inputs come from different devices ({', '.join(map(str, names))}): render one machine at a time")
    if not rows:
        raise ValueError("no resnet-fused benchmark results in " + ", ".join(map(str, inputs)))
    add_speedups(rows)
    out.mkdir(parents=True, exist_ok=True)
    when = min((t for t in times if t), default=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    chart = draw(envs[0], rows, out / "speedup.png")
    (out / "results.md").write_text(markdown(envs[0], rows, when, chart))
    return [out / "results.md"] + ([out / chart] if chart else []), envs[0], rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="pytest-benchmark or `resnet-fused bench --json` files")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="write results.md and speedup.png here")
    where.add_argument("--results-root", type=Path, default=RESULTS_ROOT,
                       help="else into <this>/<date>_<device>/ with the input JSON copied alongside (default: %(default)s)")
    parser.add_argument("--summary", action="store_true", help="print the headline table and the targets")
    args = parser.parse_args(argv)
    try:
        if args.out is None:
            env, _, when = load(args.inputs[0])
            out = args.results_root / f"{(when or dt.date.today().isoformat())[:10]}_{slug(env)}"
        else:
            out = args.out
        written, env, rows = render(args.inputs, out)
        if args.out is None:  # a results directory keeps the JSON its numbers came from
            for path in args.inputs:
                target = out / ("results.json" if len(args.inputs) == 1 else path.name)
                if path.resolve() != target.resolve():
                    shutil.copyfile(path, target)
                    written.append(target)
    except (OSError, ValueError, KeyError) as exc:
        print(f"render: error: {exc}", file=sys.stderr)
        return 1
    print(f"render: wrote {', '.join(map(str, written))}")
    if args.summary:
        print(summary(env, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

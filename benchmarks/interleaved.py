"""Whole-model latency with the variants timed round-robin in one process (see
``resnet_fused.bench.time_interleaved``): the comparison to trust on a machine whose speed drifts.

    python benchmarks/interleaved.py --models resnet18,resnet50 --batch 1,8 --runs 3 --out DIR

Variants: eager NCHW (the baseline), torch.compile (inductor, freezing), ONNX Runtime and
OpenVINO on an ONNX export of the same model (when installed: ``pip install 'resnet-fused[peers]'``;
otherwise a note says they were left out; ``--no-peers`` leaves them out), and the fused model on
each CPU backend; the extension also with its own AVX2 kernels switched off
(``RESNET_FUSED_AVX2_CONV=0``), which isolates what they add. Every variant's output is checked
against the model in float64 first. "vs best peer" divides the fastest of torch.compile, ONNX
Runtime and OpenVINO by the row. Writes DIR/interleaved.json and DIR/interleaved.md.

``--runs N`` repeats the whole measurement (variants rebuilt; the extension's per-shape kernel
choices, made in the first run, stay for the process) N times and reports each ratio's median and
range over the runs: even interleaved, one run's ratios moved by up to 0.3 between runs on the
2-core development VM. The JSON also records those choices (``cpu_conv_choices``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from resnet_fused import bench
from resnet_fused.backends import extension
from resnet_fused.accuracy import judge, rel_error
from resnet_fused.reference import random_model

AVX2_OFF = "fused extension, own kernels off"
# What a user could run instead of us: "vs best peer" is the fastest of these divided by the row.
PEER_KINDS = ("compile", "peer")
RATIOS = ("vs_eager", "vs_compile", "vs_best_peer")


def _with_env(name: str, value: str, fn):
    def call(x):
        previous = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(x)
        finally:
            if previous is None:
                del os.environ[name]
            else:
                os.environ[name] = previous
    return call


def measure(arch: str, batch: int, rounds: int, size: int = 224, peers: bool = True) -> list[dict]:
    model = random_model(arch, seed=0, calibration_size=16)
    inputs = bench.make_inputs(batch, size, dtype=torch.float32, device="cpu")
    example = inputs[0].contiguous(memory_format=torch.channels_last)
    variants = bench.model_variants(model, dtype=torch.float32, device="cpu", backends=("onednn", "extension"),
                                    example=example, channels_last_eager=False, compile=True)
    if peers:
        variants += bench.peer_variants(model, dtype=torch.float32, device="cpu", example=inputs[0])[0]
    fns, feeds, kinds = {}, {}, {}
    for variant in variants:
        print(f"{arch} b{batch}: building {variant.name}", file=sys.stderr, flush=True)
        fns[variant.name] = variant.build()
        feeds[variant.name] = [x.contiguous(memory_format=variant.memory_format) for x in inputs]
        kinds[variant.name] = variant.kind
    fns[AVX2_OFF] = _with_env("RESNET_FUSED_AVX2_CONV", "0", fns["fused extension"])
    feeds[AVX2_OFF] = feeds["fused extension"]
    kinds[AVX2_OFF] = "fused"
    with torch.inference_mode():
        reference = copy.deepcopy(model).double()(inputs[0].double())
        eager_out = fns["eager"](inputs[0])
        errors = {}
        for name, fn in fns.items():
            out = fn(feeds[name][0])
            verdict = judge(out, eager_out, reference)
            if not verdict.ok:
                raise SystemExit(f"{arch} b{batch} {name}: output differs from float64: {verdict}")
            errors[name] = rel_error(out, reference)
    timings = bench.time_interleaved(fns, feeds, rounds=rounds, per_round=3 if batch == 1 else 1,
                                     settle_s=bench.CPU_SETTLE_S)
    medians = {name: t.median_ms for name, t in timings.items()}
    best_peer = min(ms for name, ms in medians.items() if kinds[name] in PEER_KINDS)
    return [
        {"model": arch, "batch": batch, "variant": name, "kind": kinds[name], "median_ms": ms,
         "runs": len(timings[name].times_ms), "vs_eager": medians["eager"] / ms, "vs_compile": medians["torch.compile"] / ms,
         "vs_best_peer": best_peer / ms, "rel_error": errors[name]}
        for name, ms in medians.items()
    ]


def summarize(rows: list[dict]) -> list[dict]:
    """Per (model, batch, variant): the median over runs of its median time and ratios, and their range."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"], r["variant"]), []).append(r)
    summary = []
    for (model, batch, variant), runs in groups.items():
        entry = {"model": model, "batch": batch, "variant": variant, "kind": runs[0]["kind"], "runs": len(runs),
                 "median_ms": statistics.median(r["median_ms"] for r in runs),
                 "rel_error": max(r["rel_error"] for r in runs)}
        for ratio in RATIOS:
            values = [r[ratio] for r in runs]
            entry[ratio] = statistics.median(values)
            entry[ratio + "_range"] = (min(values), max(values))
        summary.append(entry)
    return summary


def _ratio(entry: dict, ratio: str) -> str:
    low, high = entry[ratio + "_range"]
    return f"{entry[ratio]:.2f}x [{low:.2f}-{high:.2f}]"


def overview(summary: list[dict]) -> list[str]:
    """One row per model and batch, one column of median ms per variant, and the best fused variant vs the best peer."""
    variants = list(dict.fromkeys(r["variant"] for r in summary))
    lines = ["| model | batch | " + " | ".join(variants) + " | best fused vs best peer |",
             "|---|---|" + "---|" * (len(variants) + 1)]
    configs = dict.fromkeys((r["model"], r["batch"]) for r in summary)
    for model, batch in configs:
        group = {r["variant"]: r for r in summary if (r["model"], r["batch"]) == (model, batch)}
        best = max((r for r in group.values() if r["kind"] == "fused"), key=lambda r: r["vs_best_peer"])
        cells = [f"{group[v]['median_ms']:.1f}" if v in group else "-" for v in variants]
        lines.append(f"| {model} | {batch} | " + " | ".join(cells) + f" | {_ratio(best, 'vs_best_peer')} ({best['variant']}) |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole measurement this many times")
    parser.add_argument("--no-peers", action="store_true", help="leave out ONNX Runtime and OpenVINO")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    # Which peers cannot run here, and why (peer_variants builds nothing until a variant is built).
    notes = [] if args.no_peers else bench.peer_variants(None, dtype=torch.float32, device="cpu", example=None)[1]
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    rows = []
    for run in range(args.runs):
        for arch in args.models.split(","):
            for batch in (int(b) for b in args.batch.split(",")):
                rows += [dict(r, run=run) for r in measure(arch, batch, args.rounds, args.size, peers=not args.no_peers)]
                print(f"run {run + 1}/{args.runs}: {arch} b{batch} done", file=sys.stderr, flush=True)
    summary = summarize(rows)
    env = bench.environment("cpu")
    peers = ", ".join(f"{module} {env[module]}" for module in bench.PEERS if module in env)
    lines = [
        f"Interleaved timing (`benchmarks/interleaved.py --rounds {args.rounds} --runs {args.runs}`), {env['cpu_model']} "
        f"(ISA: {' '.join(env['cpu_flags']) or 'none of note'}; torch's kernels: {env['cpu_capability']}), "
        f"torch {torch.__version__}{', ' + peers if peers else ''}, {torch.get_num_threads()} threads, "
        f"fp32 {args.size}x{args.size}. Each run times the variants round-robin ({args.rounds} rounds); ms and ratios are "
        f"medians over the {args.runs} run(s), [min-max] over runs. *vs best peer*: the fastest of torch.compile, "
        "ONNX Runtime and OpenVINO divided by the row.",
        *(f"Note: {note}." for note in notes),
        "",
        *overview(summary),
        "",
        "| model | batch | variant | median ms | vs eager | vs compile | vs best peer | rel err vs fp64 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['batch']} | {r['variant']} | {r['median_ms']:.1f} | "
              + " | ".join(_ratio(r, ratio) for ratio in RATIOS) + f" | {r['rel_error']:.1e} |" for r in summary]
    args.out.mkdir(parents=True, exist_ok=True)
    # What the extension's per-shape timing picked (in the first run; they stay for the process).
    choices = extension.cpu_conv_choices()
    (args.out / "interleaved.json").write_text(json.dumps(
        {"environment": env, "notes": notes, "summary": summary, "rows": rows, "cpu_conv_choices": choices}, indent=1))
    (args.out / "interleaved.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

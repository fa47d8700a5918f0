"""Whole-model latency with the variants timed round-robin in one process (see
``resnet_fused.bench.time_interleaved``): the comparison to trust on a machine whose speed drifts.

    python benchmarks/interleaved.py --models resnet18,resnet50 --batch 1,8 --runs 3 --out DIR
    python benchmarks/interleaved.py --dtype bf16 --models resnet50 --batch 1,8 --out DIR

Variants: eager NCHW (the baseline), torch.compile (inductor, freezing), ONNX Runtime and
OpenVINO on an ONNX export of the same model (when installed: ``pip install 'resnet-fused[peers]'``;
otherwise a note says they were left out; ``--no-peers`` leaves them out), and the fused model on
each CPU backend; the extension also with its own AVX2 kernels switched off
(``RESNET_FUSED_AVX2_CONV=0``), which isolates what they add, and on CPUs with AVX-512 with every GEMM
on our AVX2 micro-kernel (``RESNET_FUSED_GEMM_CORE=own``: what oneDNN's AVX-512 brgemm under our
Winograd and implicit GEMM adds). Every variant's output is checked
against the model in float64 first. "vs best peer" divides the fastest of torch.compile, ONNX
Runtime and OpenVINO by the row. Writes DIR/interleaved.json and DIR/interleaved.md.

``--runs N`` repeats the whole measurement (variants rebuilt; the extension's per-shape kernel
choices, made in the first run, stay for the process) N times and reports each ratio's median and
range over the runs: even interleaved, one run's ratios moved by up to 0.3 between runs on the
2-core development VM. ``--processes P`` makes those runs in P fresh processes one after another
(``--runs`` each), and the medians and ranges are over all P x N runs. WHY: a process's own state
moves a whole result, not only the VM's speed: three processes of the same code, each timing
resnet50 bf16 batch 1 against OpenVINO bf16, read 0.98x, 0.98x and 1.19x its speed (Zen 4 EPYC),
so a ratio from one process is one draw. The JSON also records the choices
(``cpu_conv_choices``; per process in ``cpu_conv_choices_per_process``), and DIR/tuning.json holds
the (first) process's as a tuning file: ``--tuning DIR/tuning.json`` runs the same kernels again in
another process (resnet_fused/tuning.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from resnet_fused import bench, ops
from resnet_fused.backends import extension
from resnet_fused.accuracy import judge, rel_error
from resnet_fused.reference import random_model

AVX2_OFF = "fused extension, own kernels off"
OWN_CORE = "fused extension, own GEMM core"
NO_NATIVE_BF16 = "fused extension, bf16 on fp32 kernels"
EAGER_FP32 = "eager fp32"
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
BACKENDS = ("onednn", "extension")  # the CPU backends compared
# What a user could run instead of us: "vs best peer" is the fastest of these divided by the row.
PEER_KINDS = ("compile", "peer")
RATIOS = ("vs_eager_fp32", "vs_compile", "vs_best_peer")


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


def extension_switches(cpu_flags: list[str], dtype: torch.dtype = torch.float32) -> dict[str, tuple[str, str]]:
    """The fused extension again under environment switches (variant -> (variable, value)): with our
    own kernels off (oneDNN only); on CPUs with AVX-512 with every GEMM on our micro-kernel (AVX-512
    code there; oneDNN's brgemm, JIT-compiled for AVX-512 too, left out); in bf16 on CPUs with
    AVX512-BF16 without our native bf16 kernel (bf16 converted to fp32 for our fp32 kernels): what
    each adds on this CPU."""
    switches = {AVX2_OFF: ("RESNET_FUSED_AVX2_CONV", "0")}
    if "avx512f" in cpu_flags:
        switches[OWN_CORE] = ("RESNET_FUSED_GEMM_CORE", "own")
    if dtype == torch.bfloat16 and "avx512_bf16" in cpu_flags:
        switches[NO_NATIVE_BF16] = ("RESNET_FUSED_CPU_ISA", "avx2")
    return switches


def fused_backends(dtype: torch.dtype) -> tuple[list[str], list[str]]:
    """The CPU backends timed in ``dtype`` (the extension always: the comparison is about it), and a
    note for each left out."""
    names, notes = [], []
    for name in BACKENDS:
        reason = ops.BACKENDS[name].unavailable_reason("cpu", dtype)
        if reason is None or name == "extension":
            names.append(name)
        else:
            notes.append(f"fused {name} skipped in {DTYPES[dtype]}: {reason}")
    return names, notes


def measure(arch: str, batch: int, rounds: int, size: int = 224, peers: bool = True,
            dtype: torch.dtype = torch.float32) -> list[dict]:
    model = random_model(arch, seed=0, calibration_size=16)
    inputs = bench.make_inputs(batch, size, dtype=torch.float32, device="cpu")
    example = inputs[0].to(dtype).contiguous(memory_format=torch.channels_last)
    variants = bench.model_variants(model, dtype=dtype, device="cpu", backends=fused_backends(dtype)[0],
                                    example=example, channels_last_eager=dtype != torch.float32, compile=True)
    if dtype != torch.float32:  # the baseline of the low-precision targets, in the same run
        fp32_eager = bench.model_variants(model, dtype=torch.float32, device="cpu", backends=(), example=inputs[0],
                                          channels_last_eager=False)[0]
        variants.insert(0, dataclasses.replace(fp32_eager, name=EAGER_FP32, input_dtype=torch.float32))
    if peers:
        variants += bench.peer_variants(model, dtype=dtype, device="cpu", example=inputs[0])[0]
    fns, feeds, kinds = {}, {}, {}
    for variant in variants:
        print(f"{arch} b{batch} {DTYPES[dtype]}: building {variant.name}", file=sys.stderr, flush=True)
        fns[variant.name] = variant.build()
        # The float32 images as they are for a variant fed float32 (the fp32 baseline, the peers), else in dtype.
        feeds[variant.name] = [variant.feed(x, dtype) for x in inputs]
        kinds[variant.name] = variant.kind
    for name, (env, value) in extension_switches(bench.cpu_flags(), dtype).items():
        fns[name] = _with_env(env, value, fns["fused extension"])
        feeds[name] = feeds["fused extension"]
        kinds[name] = "fused"
    baseline = EAGER_FP32 if dtype != torch.float32 else "eager"
    with torch.inference_mode():
        reference = copy.deepcopy(model).double()(inputs[0].double())
        outs = {name: fn(feeds[name][0]) for name, fn in fns.items()}
        errors = {}
        # Each output is judged against eager's error in its own dtype (peers return float32 logits
        # computed at the dtype's precision: judged like the dtype).
        for name, out in outs.items():
            verdict = judge(out, outs[baseline if name == baseline else "eager"].to(out.dtype), reference)
            if not verdict.ok:
                raise SystemExit(f"{arch} b{batch} {DTYPES[dtype]} {name}: output differs from float64: {verdict}")
            errors[name] = rel_error(out, reference)
    timings = bench.time_interleaved(fns, feeds, rounds=rounds, per_round=3 if batch == 1 else 1,
                                     settle_s=bench.CPU_SETTLE_S)
    medians = {name: t.median_ms for name, t in timings.items()}
    best_peer = min(ms for name, ms in medians.items() if kinds[name] in PEER_KINDS)
    return [
        {"model": arch, "batch": batch, "dtype": DTYPES[dtype], "variant": name, "kind": kinds[name], "median_ms": ms,
         "runs": len(timings[name].times_ms), "vs_eager_fp32": medians[baseline] / ms,
         "vs_compile": medians["torch.compile"] / ms, "vs_best_peer": best_peer / ms, "rel_error": errors[name]}
        for name, ms in medians.items()
    ]


def summarize(rows: list[dict]) -> list[dict]:
    """Per (model, batch, dtype, variant): the median over runs of its median time and ratios, and their range."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"], r["dtype"], r["variant"]), []).append(r)
    summary = []
    for (model, batch, dtype, variant), runs in groups.items():
        entry = {"model": model, "batch": batch, "dtype": dtype, "variant": variant, "kind": runs[0]["kind"], "runs": len(runs),
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
    """One row per model, batch and dtype, one column of median ms per variant, and the best fused
    variant vs eager fp32 and vs the best peer."""
    variants = list(dict.fromkeys(r["variant"] for r in summary))
    lines = ["| model | batch | dtype | " + " | ".join(variants) + " | best fused vs eager fp32 | best fused vs best peer |",
             "|---|---|---|" + "---|" * (len(variants) + 2)]
    configs = dict.fromkeys((r["model"], r["batch"], r["dtype"]) for r in summary)
    for config in configs:
        group = {r["variant"]: r for r in summary if (r["model"], r["batch"], r["dtype"]) == config}
        best = max((r for r in group.values() if r["kind"] == "fused"), key=lambda r: r["vs_best_peer"])
        cells = [f"{group[v]['median_ms']:.1f}" if v in group else "-" for v in variants]
        lines.append("| " + " | ".join(str(v) for v in config) + " | " + " | ".join(cells)
                     + f" | {_ratio(best, 'vs_eager_fp32')} | {_ratio(best, 'vs_best_peer')} ({best['variant']}) |")
    return lines


def in_processes(args: argparse.Namespace) -> tuple[list[dict], list[list[str]]]:
    """The measurement ``args`` describe, made in ``args.processes`` fresh processes one after
    another: their rows (``run`` numbered across processes, ``process`` added) and each process's
    kernel choices. The first process's tuning file is kept as the output's."""
    options = ["--models", args.models, "--batch", args.batch, "--rounds", str(args.rounds), "--size", str(args.size),
               "--runs", str(args.runs), "--dtype", args.dtype]
    options += ["--no-peers"] if args.no_peers else []
    options += ["--tuning", str(args.tuning)] if args.tuning is not None else []
    rows, per_process = [], []
    with tempfile.TemporaryDirectory() as folder:
        for process in range(args.processes):
            out = Path(folder) / f"process{process}"
            print(f"process {process + 1}/{args.processes}", file=sys.stderr, flush=True)
            # Its tables go to its folder, its progress to our stderr.
            subprocess.run([sys.executable, __file__, *options, "--out", str(out)], check=True,
                           stdout=subprocess.DEVNULL)
            record = json.loads((out / "interleaved.json").read_text())
            rows += [dict(r, run=process * args.runs + r["run"], process=process) for r in record["rows"]]
            per_process.append(record["cpu_conv_choices"])
            if process == 0 and (out / "tuning.json").exists():
                args.out.mkdir(parents=True, exist_ok=True)
                shutil.copy(out / "tuning.json", args.out / "tuning.json")
    return rows, per_process


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole measurement this many times")
    parser.add_argument("--processes", type=int, default=1,
                        help="make the runs in this many fresh processes, one after another (--runs each)")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or both (comma-separated)")
    parser.add_argument("--no-peers", action="store_true", help="leave out ONNX Runtime and OpenVINO")
    parser.add_argument("--tuning", type=Path, default=None,
                        help="load the extension's CPU kernel choices from this tuning file first (no per-shape timing)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.processes < 1:
        parser.error(f"--runs and --processes take a positive count, got {args.runs} and {args.processes}")
    if args.tuning is not None and args.processes == 1:
        from resnet_fused import tuning

        print(f"loaded {tuning.load_tuning(args.tuning)} CPU kernel choices from {args.tuning}", file=sys.stderr)
    names = {name: dtype for dtype, name in DTYPES.items()}
    dtypes = [names.get(d) for d in args.dtype.split(",")]
    if None in dtypes:
        parser.error(f"--dtype: choose from {', '.join(names)}, got {args.dtype!r}")
    # Which peers cannot run here, and why (peer_variants builds nothing until a variant is built).
    notes = [note for dtype in dtypes for note in fused_backends(dtype)[1]]
    if not args.no_peers:
        notes += dict.fromkeys(
            note for dtype in dtypes for note in bench.peer_variants(None, dtype=dtype, device="cpu", example=None)[1])
    for note in notes if args.processes == 1 else ():  # else each process says them
        print(f"note: {note}", file=sys.stderr, flush=True)
    if args.processes > 1:
        rows, per_process = in_processes(args)
    else:
        rows = []
        for run in range(args.runs):
            for arch in args.models.split(","):
                for batch in (int(b) for b in args.batch.split(",")):
                    for dtype in dtypes:
                        rows += [dict(r, run=run) for r in measure(arch, batch, args.rounds, args.size,
                                                                   peers=not args.no_peers, dtype=dtype)]
                        print(f"run {run + 1}/{args.runs}: {arch} b{batch} {DTYPES[dtype]} done", file=sys.stderr,
                              flush=True)
        # What the extension's per-shape timing picked (in the first run; they stay for the process).
        per_process = [extension.cpu_conv_choices()]
    summary = summarize(rows)
    env = bench.environment("cpu")
    runs_text = (f"{args.processes} processes x {args.runs} run(s)" if args.processes > 1 else f"{args.runs} run(s)")
    peers = ", ".join(f"{module} {env[module]}" for module in bench.PEERS if module in env)
    lines = [
        f"Interleaved timing (`benchmarks/interleaved.py --rounds {args.rounds} --runs {args.runs}"
        f"{f' --processes {args.processes}' if args.processes > 1 else ''}"
        f"{'' if args.dtype == 'fp32' else ' --dtype ' + args.dtype}`), {env['cpu_model']} "
        f"(ISA: {' '.join(env['cpu_flags']) or 'none of note'}; torch's kernels: {env['cpu_capability']}), "
        f"torch {torch.__version__}{', ' + peers if peers else ''}, {torch.get_num_threads()} threads, "
        f"{args.dtype.replace(',', ' and ')} {args.size}x{args.size}"
        f"{f', kernel choices loaded from {args.tuning}' if args.tuning else ''}. Each run times the variants round-robin "
        f"({args.rounds} rounds); ms and ratios are medians over the {runs_text}, [min-max] over runs. "
        "*vs eager fp32*: eager float32 (NCHW) divided by the row; *vs best peer*: the fastest of torch.compile, "
        "ONNX Runtime and OpenVINO in the row's dtype divided by the row.",
        *(f"Note: {note}." for note in notes),
        "",
        *overview(summary),
        "",
        "| model | batch | dtype | variant | median ms | vs eager fp32 | vs compile | vs best peer | rel err vs fp64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['variant']} | {r['median_ms']:.1f} | "
              + " | ".join(_ratio(r, ratio) for ratio in RATIOS) + f" | {r['rel_error']:.1e} |" for r in summary]
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"environment": env, "notes": notes, "summary": summary, "rows": rows, "cpu_conv_choices": per_process[0]}
    if args.processes > 1:
        record["cpu_conv_choices_per_process"] = per_process
    (args.out / "interleaved.json").write_text(json.dumps(record, indent=1))
    (args.out / "interleaved.md").write_text("\n".join(lines) + "\n")
    if args.processes == 1 and extension.load_error() is None:
        from resnet_fused import tuning

        tuning.save_tuning(args.out / "tuning.json")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

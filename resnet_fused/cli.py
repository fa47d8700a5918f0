"""``resnet-fused info | verify | bench``: the command line of the package."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Sequence

import torch
from torch import nn

from . import __version__, ops, reference
from .accuracy import judge, rel_error
from .bench import Timing, environment, make_inputs, model_variants, time_fn, time_interleaved
from .convert import fuse

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


def _builder(name: str):
    family, _, arch = name.rpartition(":")
    if family == "":
        if arch not in reference.MODELS:
            raise UsageError(f"unknown model {name!r}; ours: {', '.join(reference.MODELS)}; "
                             "or torchvision:<name> / timm:<name>")
        return reference.MODELS[arch]
    if family == "torchvision":
        try:
            import torchvision.models as tvm
        except ImportError as exc:
            raise UsageError(f"model {name!r} needs torchvision: {exc}") from None
        if not hasattr(tvm, arch):
            raise UsageError(f"torchvision has no model {arch!r}")
        return getattr(tvm, arch)
    if family == "timm":
        try:
            import timm
        except ImportError as exc:
            raise UsageError(f"model {name!r} needs timm: {exc}") from None
        return lambda num_classes=1000: timm.create_model(arch, pretrained=False, num_classes=num_classes)
    raise UsageError(f"unknown model family {family!r} in {name!r}: use torchvision:<name> or timm:<name>")


def _load_weights(model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"weights file not found: {path}") from None
    except Exception as exc:  # an unsafe pickle or a corrupt file: refuse, never execute it
        raise UsageError(f"cannot load {path} as a plain-tensor checkpoint (weights_only=True): {exc}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds a {type(state).__name__}, not a state dict")
    if isinstance(model, reference.ResNet):
        try:
            state = reference.convert_state_dict(state, model)
        except (KeyError, ValueError) as exc:
            raise UsageError(f"{path}: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"{path} does not fit the model: {exc}") from None


def build_model(name: str, *, weights: str | None, seed: int, num_classes: int = 1000) -> nn.Module:
    """A float32 eval-mode model: random (seeded, BN calibrated) or loaded from ``weights``."""
    model = reference.random_model(_builder(name), num_classes=num_classes, seed=seed)
    if weights:
        _load_weights(model, weights)
    return model.eval()


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"bad device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda asked for, but PyTorch sees no CUDA device")
    return device


def _benchmarkable_backends(device: torch.device, dtype: torch.dtype, asked: Sequence[str] | None) -> list[str]:
    if asked:
        for name in asked:
            ops.resolve_backend(name, device, dtype)  # raises, with the reason, if it cannot run
        return list(asked)
    names = []
    for name, module in ops.BACKENDS.items():
        # The Triton interpreter on CPU is a correctness tool: far too slow to time whole models.
        if name == "triton" and device.type == "cpu":
            continue
        if module.unavailable_reason(device.type, dtype) is None:
            names.append(name)
    return names


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def cmd_info(args) -> int:
    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    print(f"resnet-fused {__version__}")
    for key in ("python", "torch", "triton", "cuda", "cudnn", "platform", "cpu_capability", "threads"):
        print(f"  {key:15} {env.get(key, 'not installed')}")
    extension = ops.BACKENDS["extension"]
    build = extension.build_info()
    print(f"  {'extension':15} {json.dumps(build) if build else extension.load_error()}")
    print("devices:")
    print(f"  cpu: {_cpu_line(env)}")
    for i in range(torch.cuda.device_count()):
        print(f"  cuda:{i}: {torch.cuda.get_device_name(i)}")
    if not torch.cuda.is_available():
        print("  cuda: none visible")
    print("backends:")
    rows = [[name, "yes" if s["available"] else "no", ",".join(s["devices"]) or "-", s["reason"] or "-"]
            for name, s in env["backends"].items()]
    print(_table(["backend", "available", "devices", "notes"], rows))
    return 0


def _cpu_line(env) -> str:
    return env["device_name"] if env["device"] == "cpu" else env["processor"]


def cmd_verify(args) -> int:
    device = _device(args.device)
    dtypes = [_dtype(d) for d in args.dtype]
    rows, failed = [], False
    for model_name in args.model:
        model = build_model(model_name, weights=args.weights, seed=args.seed).to(device)
        x = make_inputs(args.batch, args.size, dtype=torch.float32, device=device, count=1, seed=args.seed + 1)[0]
        with torch.inference_mode():
            ref = copy.deepcopy(model).double()(x.double())
        for dtype in dtypes:
            backends = args.backend or [ops.resolve_backend(None, device, dtype)]
            with torch.inference_mode():
                eager = copy.deepcopy(model).to(dtype)(x.to(dtype))
            for backend in backends:
                with torch.inference_mode():
                    out = fuse(model, backend=backend, dtype=dtype)(x.to(dtype))
                v = judge(out, eager, ref)
                failed |= not v.ok
                rows.append([model_name, backend, _SHORT.get(dtype, str(dtype)), f"{v.max_abs:.3g}", f"{v.error:.3g}",
                             f"{v.eager_error:.3g}", f"{v.bound:.3g}", f"{v.argmax_agreement:.0%}", "ok" if v.ok else "MISMATCH"])
    print(_table(["model", "backend", "dtype", "max abs vs eager", "rel err vs fp64", "eager rel err",
                  "bound", "argmax agree", "result"], rows))
    if failed:
        print("verify: MISMATCH: a fused model is further from the float64 reference than allowed", file=sys.stderr)
    return 1 if failed else 0


def run_bench(args, progress=True) -> dict:
    """Eager vs fused (and torch.compile with --compile) for one model/batch/dtype; returns the JSON record."""
    from tqdm.auto import tqdm

    device = _device(args.device)
    dtype = _dtype(args.dtype[0])
    backends = _benchmarkable_backends(device, dtype, args.backend)
    model = build_model(args.model[0], weights=args.weights, seed=args.seed)
    inputs = make_inputs(args.batch, args.size, dtype=dtype, device=device, seed=args.seed + 1)
    with torch.inference_mode():
        ref = copy.deepcopy(model).to(device).double()(inputs[0].double())
    variants = model_variants(model, dtype=dtype, device=device, backends=backends, example=inputs[0],
                              compile=args.compile, cuda_graph=args.cuda_graph)
    # All variants are built first and then timed round-robin (time_interleaved): a machine whose
    # speed drifts (shared, throttling) would otherwise turn drift into a false ratio.
    desc = f"{args.model[0]} b{args.batch} {_SHORT.get(dtype)}"
    fns, feeds, errors = {}, {}, {}
    for variant in tqdm(variants, desc=f"{desc}: build", unit="variant", disable=not progress):
        fns[variant.name] = variant.build()
        feeds[variant.name] = [x.contiguous(memory_format=variant.memory_format) for x in inputs]
        time_fn(fns[variant.name], feeds[variant.name], warmup=args.warmup, repeat=0)
        with torch.inference_mode():
            errors[variant.name] = rel_error(fns[variant.name](feeds[variant.name][0]), ref)
    timings = {name: Timing() for name in fns}
    for _ in tqdm(range(args.repeat), desc=f"{desc}: time", unit="round", disable=not progress):
        for name, part in time_interleaved(fns, feeds, rounds=1, per_round=1, warmup=0).items():
            timings[name].times_ms += part.times_ms
    results = [
        {"variant": v.name, "kind": v.kind, "median_ms": timings[v.name].median_ms, "times_ms": timings[v.name].times_ms,
         "images_per_s": timings[v.name].images_per_s(args.batch), "rel_error_vs_fp64": errors[v.name]}
        for v in variants
    ]
    base = results[0]["median_ms"]
    compiled = next((r["median_ms"] for r in results if r["kind"] == "compile"), None)
    for r in results:
        r["speedup_vs_eager"] = base / r["median_ms"]
        r["speedup_vs_compile"] = compiled / r["median_ms"] if compiled else None
    return {"model": args.model[0], "batch": args.batch, "size": args.size, "dtype": str(dtype).replace("torch.", ""),
            "environment": environment(device), "results": results}


def cmd_bench(args) -> int:
    record = run_bench(args, progress=not args.no_progress)
    env = record["environment"]
    print(f"\n{record['model']}, batch {record['batch']}, {record['size']}x{record['size']}, {record['dtype']}, "
          f"{env['device_name']}, torch {env['torch']}" + (f", TF32 cudnn={env['tf32_cudnn']}" if "tf32_cudnn" in env else ""))
    rows = [[r["variant"], f"{r['median_ms']:.2f}", f"{r['images_per_s']:.1f}", f"{r['speedup_vs_eager']:.2f}x",
             f"{r['speedup_vs_compile']:.2f}x" if r["speedup_vs_compile"] else "-", f"{r['rel_error_vs_fp64']:.2g}"]
            for r in record["results"]]
    print(_table(["variant", "median ms", "images/s", "vs eager", "vs compile", "rel err vs fp64"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _add_common(parser: argparse.ArgumentParser, *, batch: int, size: int) -> None:
    # Added to each subcommand separately: argparse parents share their actions, so one
    # subcommand's set_defaults would change the other's defaults.
    parser.add_argument("--model", nargs="+", default=["resnet50"],
                        help="resnet18..resnet152 (ours), torchvision:<name> or timm:<name> (default resnet50)")
    parser.add_argument("--batch", type=int, default=batch, help=f"batch size (default {batch})")
    parser.add_argument("--size", type=int, default=size, help=f"input height and width (default {size})")
    parser.add_argument("--dtype", nargs="+", default=["float32"], help="float32, float16, bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", nargs="+", default=None, help=f"any of {', '.join(ops.BACKENDS)} (default: automatic)")
    parser.add_argument("--weights", default=None, help="checkpoint (torchvision or our names), loaded with weights_only=True")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-fused", description="Fused ResNet inference: inspect, verify, benchmark.")
    parser.add_argument("--version", action="version", version=f"resnet-fused {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, backends").set_defaults(func=cmd_info)
    verify = sub.add_parser("verify", help="fused vs reference accuracy; exit 1 on mismatch")
    _add_common(verify, batch=2, size=64)
    verify.set_defaults(func=cmd_verify)
    bench = sub.add_parser("bench", help="eager vs fused latency table")
    _add_common(bench, batch=1, size=224)
    bench.add_argument("--repeat", type=int, default=10, help="timed runs per variant (rounds over all variants)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--compile", action="store_true", help="also time torch.compile (inductor, freezing on)")
    bench.add_argument("--cuda-graph", action="store_true", help="also time CUDA-graph replay (cuda only)")
    bench.add_argument("--json", default=None, help="write the results as JSON here")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("batch", "size", "repeat"):
        if getattr(args, name, 1) < 0 or (name != "batch" and getattr(args, name, 1) < 1):
            print(f"resnet-fused: error: --{name} must be positive", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (UsageError, ValueError, TypeError, ops.BackendUnavailableError) as exc:
        print(f"resnet-fused: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

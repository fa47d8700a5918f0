"""``resnet-fused info | verify | bench | tune | export``: the command line of the package.

Importing this module must stay light: ``--help`` and every mistake that can be seen in the
arguments alone answer before torch is imported (several seconds). The commands import torch,
torchvision, timm and the rest of the package inside their bodies, check what needs them (device,
backend, model names, the weights file) and only then start slow work.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Sequence

from . import __version__

if TYPE_CHECKING:
    import torch
    from torch import nn

# Names of what the package offers, kept here as plain strings so that the parser can check them
# without importing torch; tests/test_cli.py asserts they equal reference.MODELS and ops.BACKENDS.
MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
BACKEND_NAMES = ("torch", "onednn", "triton", "extension")
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def __getattr__(name: str):
    # DTYPES maps the names above to torch dtypes (benchmarks/harness.py uses it); built on first
    # use so that importing this module does not import torch.
    if name == "DTYPES":
        import torch

        value = {key: getattr(torch, canonical) for key, canonical in DTYPE_NAMES.items()}
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UsageError(argparse.ArgumentTypeError):
    """A problem with what the user asked for: printed as one line, exit status 2.

    An ArgumentTypeError, so the parser's type checks below raise it too and argparse shows its text.
    """


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _say(args, message: str) -> None:
    """A progress line on stderr: long steps say what they do as they start."""
    if not getattr(args, "no_progress", False):
        print(f"[{time.monotonic() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


_START = time.monotonic()


# --- checks on the arguments alone (no torch) -------------------------------------------------

def _whole_number(minimum: int, meaning: str):
    """An argparse type: an int of at least ``minimum``, refused as '``meaning``' otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise UsageError(f"must be {meaning}, got {value}")
        return value

    return parse


_positive = _whole_number(1, "at least 1")
_non_negative = _whole_number(0, "0 or more")


def _dtype_name(text: str) -> str:
    if text not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {text!r}; choose from {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[text]


def _model_name(text: str) -> str:
    family, _, arch = text.rpartition(":")
    if family == "":
        if arch not in MODEL_NAMES:
            raise UsageError(
                f"unknown model {text!r}{_did_you_mean(arch, MODEL_NAMES)}; ours: {', '.join(MODEL_NAMES)}, "
                "or torchvision:<name> / timm:<name>")
    elif family not in ("torchvision", "timm"):
        raise UsageError(f"unknown model family {family!r} in {text!r}: use torchvision:<name> or timm:<name>")
    elif not arch:
        raise UsageError(f"{text!r} names no model: write {family}:<name>")
    return text


def _backend_name(text: str) -> str:
    if text not in BACKEND_NAMES:
        raise UsageError(f"unknown backend {text!r}; known backends: {', '.join(BACKEND_NAMES)}")
    return text


def _device_name(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise UsageError(f"unknown device {text!r}; use cpu, cuda or cuda:N")
    return text


_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"  # torch.save writes a zip archive (the default) or, legacy, a pickle


def _weights_file(path: str) -> str:
    """The file exists, can be read and starts like a torch.save file; its content is read by read_checkpoint."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise UsageError(f"weights file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not a weights file") from None
    except OSError as exc:
        raise UsageError(f"cannot read weights file {path}: {exc.strerror}") from None
    if not (head.startswith(_ZIP) or head.startswith(_PICKLE)):
        raise UsageError(
            f"{path} is not a PyTorch checkpoint (a file written by torch.save, holding a state dict)")
    return path


def _output_file(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write to folder {folder}")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder; give a file name")
    return path


def _tuning_file(path: str) -> str:
    """An existing, readable file; whether it is a tuning file is read by resnet_fused.tuning.load_tuning."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder, not a tuning file")
    if not os.path.isfile(path):
        raise UsageError(f"tuning file not found: {path} (resnet-fused tune writes one)")
    if not os.access(path, os.R_OK):
        raise UsageError(f"cannot read tuning file {path}")
    return path


def _pt2_file(path: str) -> str:
    if not path.endswith(".pt2"):
        raise UsageError(f"{path!r} does not end in .pt2, the suffix torch.export and AOTInductor files have")
    return _output_file(path)


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# --- checks that need torch, done before any slow work ----------------------------------------

def _builder(name: str):
    """The function building ``name`` (unknown names raise UsageError; needs no weights)."""
    family, _, arch = name.rpartition(":")
    if family == "":
        from . import reference

        return reference.MODELS[arch]
    if family == "torchvision":
        try:
            import torchvision.models as tvm
        except ImportError as exc:
            raise UsageError(f"model {name!r} needs torchvision ({exc})") from None
        known = tvm.list_models(module=tvm)  # the classification models
        if arch not in known:
            raise UsageError(f"torchvision has no classification model {arch!r}{_did_you_mean(arch, known)}")
        return tvm.get_model_builder(arch)
    try:
        import timm
    except ImportError as exc:
        raise UsageError(f"model {name!r} needs timm ({exc})") from None
    if not timm.is_model(arch):
        raise UsageError(f"timm has no model {arch!r}{_did_you_mean(arch, timm.list_models())}")
    return lambda num_classes=1000: timm.create_model(arch, pretrained=False, num_classes=num_classes)


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checkpoint(path: str) -> dict:
    """The state dict in ``path``, loaded with ``weights_only=True`` (a pickle's code never runs)."""
    import pickle

    import torch

    _weights_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a page of advice; its last part names what was refused.
        refused = str(exc).rsplit("WeightsUnpickler error:", 1)[-1].split(". ")[0]
        raise UsageError(f"{path} holds more than tensors and is refused (loaded with weights_only=True, "
                         f"which never runs code from the file): {_one_line(refused, 200)}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file: torch raises several types, none of them telling
        detail = str(exc).split(". ")[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{path} is a damaged or unknown checkpoint: {_one_line(detail, 200)}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} holds a {type(state).__name__} that is not a state dict of tensors")
    return state


def _load_state(model: nn.Module, state: dict, path: str) -> None:
    from . import reference

    if isinstance(model, reference.ResNet):
        state = reference.convert_state_dict(state)  # torchvision's names -> ours; ours pass through
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected]
    wrong = [f"{k}: {_shape(v)} in the file, {_shape(expected[k])} in the model"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems = [f"{len(found)} {what}: {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}"
                for what, found in (("missing", missing), ("unknown", unknown), ("of the wrong shape", wrong)) if found]
    if problems:
        raise UsageError(f"{path} does not fit the model ({len(expected)} tensors): {'; '.join(problems)}")
    model.load_state_dict(state)


def _shape(tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def build_model(name: str, *, weights: str | None, seed: int, num_classes: int = 1000) -> nn.Module:
    """A float32 eval-mode model: random (seeded, BN calibrated) or with the state dict in checkpoint ``weights``."""
    import torch

    from . import reference

    builder = _builder(name)
    if weights is None:
        return reference.random_model(builder, num_classes=num_classes, seed=seed).eval()
    state = read_checkpoint(weights)
    # Every parameter and BN statistic comes from the checkpoint: no calibration needed.
    torch.manual_seed(seed)
    model = builder(num_classes=num_classes)
    _load_state(model, state, weights)
    return model.eval()


def _dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, _dtype_name(name))


def _device(name: str) -> torch.device:
    import torch

    device = torch.device(_device_name(name))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name} asked for, but PyTorch sees no CUDA device"
                             + ("" if torch.version.cuda else " (this torch is a CPU-only build)"))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {name} asked for, but there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def _checked(args) -> tuple:
    """Check what the arguments ask for that needs torch (device, backends, model names, weights): (device, dtypes).

    Runs before any model is built, so a mistake costs the imports, not minutes.
    """
    device = _device(args.device)
    dtypes = [_dtype(d) for d in args.dtype]
    for model_name in args.model:
        _builder(model_name)
    if args.weights:
        read_checkpoint(args.weights)  # read again per model: a second read costs far less than a model build
    from . import ops  # last: it loads every backend (the extension's library, Triton)

    for dtype in dtypes:
        for name in args.backend or ():
            ops.resolve_backend(name, device, dtype)  # BackendUnavailableError says why not
    return device, dtypes


def _benchmarkable_backends(device: torch.device, dtype: torch.dtype, asked: Sequence[str] | None) -> list[str]:
    from . import ops

    if asked:
        return list(asked)  # _checked made sure each can run
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


def _short(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return _SHORT.get(name, name)


def _weights_line(args) -> str:
    return f"weights from {args.weights}" if args.weights else f"random weights, seed {args.seed}"


def cmd_info(args) -> int:
    import json

    import torch

    from . import ops
    from .bench import environment

    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    print(f"resnet-fused {__version__}")
    for key in ("python", "torch", "triton", "onnxruntime", "openvino", "cuda", "cudnn", "platform", "cpu_capability",
                "threads"):
        print(f"  {key:15} {env.get(key, 'not installed')}")
    extension = ops.BACKENDS["extension"]
    build = extension.build_info()
    print(f"  {'extension':15} {json.dumps(build) if build else extension.load_error()}")
    print("devices:")
    print(f"  cpu: {_cpu_line(env)}")
    print(f"       ISA: {' '.join(env['cpu_flags']) or 'none of note'}")
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
    device, dtypes = _checked(args)  # before the package's imports: a mistake costs as little as can be

    import copy

    import torch

    from . import ops
    from .accuracy import judge
    from .bench import make_inputs
    from .convert import fuse

    rows, failed = [], False
    for model_name in args.model:
        _say(args, f"{model_name}: building the model ({_weights_line(args)})")
        model = build_model(model_name, weights=args.weights, seed=args.seed).to(device)
        x = make_inputs(args.batch, args.size, dtype=torch.float32, device=device, count=1, seed=args.seed + 1)[0]
        _say(args, f"{model_name}: float64 reference output, batch {args.batch}, {args.size}x{args.size}")
        with torch.inference_mode():
            ref = copy.deepcopy(model).double()(x.double())
        for dtype in dtypes:
            backends = args.backend or [ops.resolve_backend(None, device, dtype)]
            _say(args, f"{model_name} {_short(dtype)}: eager output")
            with torch.inference_mode():
                eager = copy.deepcopy(model).to(dtype)(x.to(dtype))
            for backend in backends:
                _say(args, f"{model_name} {_short(dtype)} {backend}: fusing and running")
                with torch.inference_mode():
                    out = fuse(model, backend=backend, dtype=dtype)(x.to(dtype))
                v = judge(out, eager, ref)
                failed |= not v.ok
                verdict = "ok" if v.ok else "MISMATCH"
                _say(args, f"{model_name} {_short(dtype)} {backend}: {verdict} (rel err {v.error:.3g}, bound {v.bound:.3g})")
                rows.append([model_name, backend, _short(dtype), f"{v.max_abs:.3g}", f"{v.error:.3g}",
                             f"{v.eager_error:.3g}", f"{v.bound:.3g}", f"{v.argmax_agreement:.0%}", verdict])
    print(_table(["model", "backend", "dtype", "max abs vs eager", "rel err vs fp64", "eager rel err",
                  "bound", "argmax agree", "result"], rows))
    if failed:
        print("verify: MISMATCH: a fused model is further from the float64 reference than allowed", file=sys.stderr)
    return 1 if failed else 0


def run_bench(args, progress=True) -> dict:
    """Eager vs fused (and torch.compile with --compile, ONNX Runtime and OpenVINO with --peers) for one
    model/batch/dtype; returns the JSON record."""
    device, (dtype,) = _checked(args)  # before the package's imports: a mistake costs as little as can be

    import copy

    import torch
    from tqdm.auto import tqdm

    from .accuracy import rel_error
    from .bench import (CPU_SETTLE_S, Timing, environment, make_inputs, model_variants, peer_variants, time_fn,
                        time_interleaved)

    backends = _benchmarkable_backends(device, dtype, args.backend)
    if args.tuning:
        _load_tuning(args, args.tuning)
    if device.type == "cuda":
        # Every variant (eager, torch.compile, ours where it calls cuDNN) with cuDNN's per-shape
        # algorithm search, as a GPU comparison of eager at its best runs; the JSON records the setting.
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    model_name = args.model[0]
    _say(args, f"{model_name}: building the model ({_weights_line(args)})")
    model = build_model(model_name, weights=args.weights, seed=args.seed)
    inputs = make_inputs(args.batch, args.size, dtype=dtype, device=device, seed=args.seed + 1)
    _say(args, f"{model_name}: float64 reference output, batch {args.batch}, {args.size}x{args.size}")
    with torch.inference_mode():
        ref = copy.deepcopy(model).to(device).double()(inputs[0].double())
    variants = model_variants(model, dtype=dtype, device=device, backends=backends, example=inputs[0],
                              compile=args.compile, cuda_graph=args.cuda_graph)
    notes = []
    if args.peers:
        peers, notes = peer_variants(model, dtype=dtype, device=device, example=inputs[0])
        first_fused = next(i for i, v in enumerate(variants) if v.kind == "fused")
        variants[first_fused:first_fused] = peers
    for note in notes:
        print(f"resnet-fused: note: {note}", file=sys.stderr, flush=True)
    # All variants are built first and then timed round-robin (time_interleaved): a machine whose
    # speed drifts (shared, throttling) would otherwise turn drift into a false ratio.
    desc = f"{model_name} b{args.batch} {_short(dtype)}"
    fns, feeds, errors = {}, {}, {}
    with tqdm(variants, desc=f"{desc}: build", unit="variant", disable=not progress) as bar:
        for variant in bar:
            bar.set_postfix_str(variant.name)  # a compile or an ONNX export takes a while: say which
            fns[variant.name] = variant.build()
            feeds[variant.name] = [variant.feed(x) for x in inputs]
            time_fn(fns[variant.name], feeds[variant.name], warmup=args.warmup, repeat=0)
            with torch.inference_mode():
                errors[variant.name] = rel_error(fns[variant.name](feeds[variant.name][0]), ref)
    timings = {name: Timing() for name in fns}
    settle_s = CPU_SETTLE_S if device.type == "cpu" else 0.0
    for _ in tqdm(range(args.repeat), desc=f"{desc}: time", unit="round", disable=not progress):
        for name, part in time_interleaved(fns, feeds, rounds=1, per_round=1, warmup=0, settle_s=settle_s).items():
            timings[name].times_ms += part.times_ms
    results = [
        {"variant": v.name, "kind": v.kind, "median_ms": timings[v.name].median_ms, "times_ms": timings[v.name].times_ms,
         "images_per_s": timings[v.name].images_per_s(args.batch), "rel_error_vs_fp64": errors[v.name]}
        for v in variants
    ]
    base = results[0]["median_ms"]
    compiled = next((r["median_ms"] for r in results if r["kind"] == "compile"), None)
    # The fastest thing a user could run instead of us: torch.compile or a peer runtime.
    best_peer = min((r["median_ms"] for r in results if r["kind"] in ("compile", "peer")), default=None)
    for r in results:
        r["speedup_vs_eager"] = base / r["median_ms"]
        r["speedup_vs_compile"] = compiled / r["median_ms"] if compiled else None
        r["speedup_vs_best_peer"] = best_peer / r["median_ms"] if best_peer else None
    return {"model": model_name, "batch": args.batch, "size": args.size, "dtype": str(dtype).replace("torch.", ""),
            "environment": environment(device), "notes": notes, "results": results}


def cmd_bench(args) -> int:
    import json

    for what, given in (("model", args.model), ("dtype", args.dtype)):
        if len(given) > 1:
            raise UsageError(f"bench times one {what} per run (one table, one JSON record); got {' '.join(given)}: "
                             "run it once for each")
    record = run_bench(args, progress=not args.no_progress)
    env = record["environment"]
    print(f"\n{record['model']}, batch {record['batch']}, {record['size']}x{record['size']}, {record['dtype']}, "
          f"{env['device_name']}, torch {env['torch']}" + (f", TF32 cudnn={env['tf32_cudnn']}" if "tf32_cudnn" in env else ""))
    ratio = lambda value: f"{value:.2f}x" if value else "-"  # noqa: E731
    rows = [[r["variant"], f"{r['median_ms']:.2f}", f"{r['images_per_s']:.1f}", ratio(r["speedup_vs_eager"]),
             ratio(r["speedup_vs_compile"]), ratio(r["speedup_vs_best_peer"]), f"{r['rel_error_vs_fp64']:.2g}"]
            for r in record["results"]]
    print(_table(["variant", "median ms", "images/s", "vs eager", "vs compile", "vs best peer", "rel err vs fp64"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _load_tuning(args, path: str) -> int:
    from . import tuning

    try:
        count = tuning.load_tuning(path)
    except tuning.TuningFileError as exc:
        raise UsageError(_one_line(exc)) from None
    _say(args, f"loaded {count} CPU kernel choices from {path}")
    return count


def cmd_tune(args) -> int:
    dtypes = [_dtype(d) for d in args.dtype]
    for model_name in args.model:
        _builder(model_name)
    if args.weights:
        read_checkpoint(args.weights)

    import torch
    from tqdm.auto import tqdm

    from . import ops, tuning
    from .backends import extension
    from .bench import make_inputs
    from .convert import fuse

    cpu = torch.device("cpu")
    for dtype in dtypes:
        ops.resolve_backend("extension", cpu, dtype)  # BackendUnavailableError says why not
    if os.path.exists(args.out):
        # Added to, not redone: a second run for more batch sizes extends the file.
        _say(args, f"{args.out} exists: its choices are kept and the shapes it lacks are timed (delete it to time all again)")
        _load_tuning(args, args.out)
    rows = []
    jobs = [(model_name, dtype, batch) for model_name in args.model for dtype in dtypes for batch in args.batch]
    with tqdm(jobs, desc="tune", unit="run", disable=args.no_progress) as bar:
        fused = {}
        for model_name, dtype, batch in bar:
            bar.set_postfix_str(f"{model_name} {_short(dtype)} b{batch}")
            if (model_name, dtype) not in fused:
                model = build_model(model_name, weights=args.weights, seed=args.seed)
                fused[model_name, dtype] = fuse(model, backend="extension", dtype=dtype)
            x = make_inputs(batch, args.size, dtype=dtype, device=cpu, count=1, seed=args.seed + 1,
                            memory_format=torch.channels_last)[0]
            before = len(extension.cpu_conv_choices())
            with torch.inference_mode():
                start = time.perf_counter()
                fused[model_name, dtype](x)  # each conv shape not chosen yet is timed here
                first = time.perf_counter() - start
            rows.append([model_name, _short(dtype), str(batch), str(len(extension.cpu_conv_choices()) - before),
                         f"{first:.2f}"])
    count = tuning.save_tuning(args.out)
    print(f"\nCPU kernel choices, {torch.get_num_threads()} threads, {args.size}x{args.size} inputs:")
    print(_table(["model", "dtype", "batch", "shapes timed", "first forward s"], rows))
    print(f"wrote {count} choices to {args.out}; load them with resnet_fused.load_tuning({args.out!r}) "
          f"or resnet-fused bench --tuning {args.out}")
    return 0


def cmd_export(args) -> int:
    device, (dtype,) = _checked(args)  # before the package's imports: a mistake costs as little as can be

    import copy

    import torch

    from . import export, ops
    from .accuracy import judge
    from .bench import make_inputs
    from .convert import fuse

    model_name = args.model[0]
    backend = args.backend[0] if args.backend else ops.resolve_backend(None, device, dtype)
    _say(args, f"{model_name}: building the model ({_weights_line(args)})")
    model = build_model(model_name, weights=args.weights, seed=args.seed).to(device)
    fused = fuse(model, backend=backend, dtype=dtype)
    example = make_inputs(args.batch, args.size, dtype=dtype, device=device, count=1, seed=args.seed + 1)[0]
    dynamic = not args.static_batch
    written = []
    _say(args, f"{model_name} {_short(dtype)} {backend}: torch.export, batch {args.batch}"
         + (" (any batch size)" if dynamic else "") + f" -> {args.out}")
    try:  # ExportError: this model or backend cannot be saved so; the message says what can
        written.append(("torch.export program", export.save_program(fused, (example,), args.out, dynamic_batch=dynamic)))
        if args.aoti is not None:
            path = _aoti_path(args.out) if args.aoti is True else args.aoti
            _say(args, f"{model_name} {_short(dtype)} {backend}: AOTInductor compile -> {path} (C++: a minute or more)")
            written.append(("AOTInductor package", export.save_aoti_package(fused, (example,), path, dynamic_batch=dynamic)))
    except export.ExportError as exc:
        raise UsageError(_one_line(exc) + "".join(f" ({path} was written)" for _, path in written)) from None
    # What was written counts only once it loads back and its outputs pass verify's test (against
    # float64, within the dtype's bound), on a fresh input; with a dynamic batch also on another size.
    _say(args, "computing reference outputs to check the written files")
    checks = []
    for batch in [args.batch, args.batch + 1] if dynamic else [args.batch]:
        x = make_inputs(batch, args.size, dtype=torch.float32, device=device, count=1, seed=args.seed + 2 + batch)[0]
        with torch.inference_mode():
            ref = copy.deepcopy(model).double()(x.double())
            eager = copy.deepcopy(model).to(dtype)(x.to(dtype))
            checks.append((batch, x.to(dtype), fused(x.to(dtype)), eager, ref))
    failed = False
    for what, path in written:
        _say(args, f"checking {path}: loading it and running it")
        loaded = export.load(path)
        for batch, x, direct, eager, ref in checks:
            with torch.inference_mode():
                out = loaded(x)
            v = judge(out, eager, ref)
            failed |= not v.ok
            print(f"{what} {path}, batch {batch}: rel err vs fp64 {v.error:.3g} (bound {v.bound:.3g}), "
                  f"max abs vs the fused model {(out.double() - direct.double()).abs().max():.3g}: "
                  + ("ok" if v.ok else "MISMATCH"))
    if failed:
        print("export: MISMATCH: a written file's outputs are further from float64 than allowed", file=sys.stderr)
    return 1 if failed else 0


def _aoti_path(out: str) -> str:
    stem, ext = os.path.splitext(out)
    return f"{stem}.aoti{ext or '.pt2'}"


_MODEL_HELP = f"{', '.join(MODEL_NAMES)} (ours), torchvision:<name> or timm:<name> (default resnet50)"
_DTYPE_HELP = "float32, float16 or bfloat16 (fp32, fp16, bf16)"


def _add_common(parser: argparse.ArgumentParser, *, batch: int, size: int, many: bool) -> None:
    # Added to each subcommand separately: argparse parents share their actions, so one
    # subcommand's set_defaults would change the other's defaults.
    nargs = "+" if many else 1  # a list either way
    parser.add_argument("--model", nargs=nargs, type=_model_name, default=["resnet50"],
                        help=_MODEL_HELP)
    parser.add_argument("--batch", type=_positive, default=batch, help=f"batch size (default {batch})")
    parser.add_argument("--size", type=_positive, default=size, help=f"input height and width (default {size})")
    parser.add_argument("--dtype", nargs=nargs, type=_dtype_name, default=["float32"],
                        help=_DTYPE_HELP)
    parser.add_argument("--device", type=_device_name, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--backend", nargs=nargs, type=_backend_name, default=None,
                        help=f"any of {', '.join(BACKEND_NAMES)} (default: automatic)")
    parser.add_argument("--weights", type=_weights_file, default=None,
                        help="checkpoint (torchvision or our names), loaded with weights_only=True")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines or bars on stderr")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="resnet-fused", description="Fused ResNet inference: inspect, verify, benchmark, tune, export.")
    parser.add_argument("--version", action="version", version=f"resnet-fused {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, backends").set_defaults(func=cmd_info)
    verify = sub.add_parser("verify", help="fused vs reference accuracy; exit 1 on mismatch")
    _add_common(verify, batch=2, size=64, many=True)
    verify.set_defaults(func=cmd_verify)
    bench = sub.add_parser("bench", help="eager vs fused latency table")
    _add_common(bench, batch=1, size=224, many=True)
    bench.add_argument("--repeat", type=_positive, default=10, help="timed runs per variant (rounds over all variants)")
    bench.add_argument("--warmup", type=_non_negative, default=3)
    bench.add_argument("--compile", action="store_true", help="also time torch.compile (inductor, freezing on)")
    bench.add_argument("--peers", action="store_true",
                       help="also time ONNX Runtime and OpenVINO on an ONNX export of the model (CPU; pip install resnet-fused[peers])")
    bench.add_argument("--cuda-graph", action="store_true", help="also time CUDA-graph replay (cuda only)")
    bench.add_argument("--no-cudnn-benchmark", action="store_true",
                       help="on cuda, leave torch.backends.cudnn.benchmark off (by default every variant runs with it on)")
    bench.add_argument("--json", type=_output_file, default=None, help="write the results as JSON here")
    bench.add_argument("--tuning", type=_tuning_file, default=None,
                       help="load the CPU kernel choices saved in this file (resnet-fused tune) before timing")
    bench.set_defaults(func=cmd_bench)
    tune = sub.add_parser("tune", help="time the CPU kernels for each conv shape of the models once and save the "
                                       "choices, so that later processes skip that timing")
    tune.add_argument("--model", nargs="+", type=_model_name, default=["resnet50"],
                      help=_MODEL_HELP)
    tune.add_argument("--batch", nargs="+", type=_positive, default=[1], help="batch sizes to tune for (default 1)")
    tune.add_argument("--size", type=_positive, default=224, help="input height and width (default 224)")
    tune.add_argument("--dtype", nargs="+", type=_dtype_name, default=["float32"],
                      help=_DTYPE_HELP)
    tune.add_argument("--weights", type=_weights_file, default=None,
                      help="checkpoint (torchvision or our names); the choices depend on shapes, not on weights")
    tune.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    tune.add_argument("--no-progress", action="store_true", help="no progress lines or bars on stderr")
    tune.add_argument("--out", type=_output_file, required=True,
                      help="the tuning file (JSON) to write; if it exists, its choices are kept and added to")
    tune.set_defaults(func=cmd_tune)
    export = sub.add_parser("export", help="write the fused model as a torch.export program (.pt2), checked by loading it back")
    _add_common(export, batch=1, size=224, many=False)
    export.add_argument("--out", type=_pt2_file, required=True, help="the .pt2 file to write")
    # const is not a string, so argparse does not pass it through type: --aoti alone means True
    export.add_argument("--aoti", nargs="?", const=True, default=None, type=_pt2_file,
                        metavar="PATH", help="also compile an AOTInductor package (default path: OUT with .aoti before its suffix)")
    export.add_argument("--static-batch", action="store_true", help="fix the batch size (default: any batch size)")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and argument errors (2), already printed
        return exc.code
    if args.command != "info":
        _say(args, "loading torch and the package")
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"resnet-fused {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError) as exc:
        from . import ops

        if not isinstance(exc, (ValueError, TypeError, ops.BackendUnavailableError)):
            raise
        print(f"resnet-fused {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

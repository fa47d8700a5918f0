"""Each conv of the fused model against the same conv in ONNX Runtime and OpenVINO, layer by layer,
inside whole forward passes, in one process: which layers a peer runs faster, and by how much.

    python benchmarks/per_layer.py --model resnet50 --batch 1 [--dtype bf16] --rounds 10 [--out DIR]

Ours: torch.profiler's time for each ``resnet_fused::conv_bias_act`` call of the fused model on the
extension backend (the op as a caller sees it: checks, the per-shape choice lookup, the output
buffer and the kernel), with the kernel our per-shape timing picked. ONNX Runtime (float32 only):
its node profiler's kernel time for each Conv node (its blocked-layout convs, with bias, ReLU and
the residual add fused in). OpenVINO (f32, or bf16 where the CPU has the instructions for it;
configured as benchmarks/interleaved.py runs it): its per-node counters (``PERF_COUNT``) for each
Convolution node, and the kernel it ran. A peer that is not installed, or cannot run the dtype
here, is left out with a note. Each peer conv is paired with ours by input and weight shape (and
residual), in whatever order the peer ran them (see _matched).

Why inside whole forwards: a conv repeated on its own runs faster than in a model, where its
weight, input and output are not left in the caches by the call before (measured here on an AMD
EPYC Zen 4, resnet50 batch 1 fp32: our convs summed to 33 ms repeated alone, 39.5-42.7 ms inside
forwards), so only in-model times compare layers fairly.

A caveat on ours: under torch.profiler, a conv our timing gave to oneDNN (kernel "direct") read
5.1 ms where wall-clock timing around the same module in a forward read 2.3 (bf16 resnet50 batch
8's first 1x1 conv, Zen 4 EPYC; not explained yet), so rows on that path may read high.

Medians over the rounds; each round idles 0.1 s, then runs the model twice and counts the second
(see _idle_then). Everything is warmed up first, so our per-shape kernel timing is not in the
numbers. The totals add up the convs only; whole-model latency is benchmarks/interleaved.py's job.
A second table sums the convs by kind (stem, 1x1, 3x3, strided), each with its rate in GMAC/s.
Writes DIR/per_layer.json and DIR/per_layer.md with --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

OP = "resnet_fused::conv_bias_act"
STAGE_OP = "resnet_fused::residual_blocks"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _idle_then(run) -> None:
    """One round: 0.1 s of idle (ONNX Runtime's threads spin after a run and take a core from
    whatever runs next), then `run` twice; only the second is counted, the steady state a serving
    loop sees. WHY: the first forward after the idle spell pays for waking the threads and cores up
    (fused resnet50 batch 1 fp32 here: 50.0 ms against 48.3 for the next; OpenVINO 41.7 and 41.6),
    and that cost lands on whichever layers run first."""
    time.sleep(0.1)
    run()
    run()


def _ours(fused, x, rounds: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(rounds):
            _idle_then(lambda: fused(x))
    # A fused model's stages call the convs from inside one residual_blocks op each.
    calls = [e for e in prof.events() if e.name == OP and (e.cpu_parent is None or e.cpu_parent.name == STAGE_OP)]
    per_forward = len(calls) // (2 * rounds)
    if per_forward == 0 or per_forward * 2 * rounds != len(calls):
        raise RuntimeError(f"expected the same number of {OP} calls per forward, got {len(calls)} in {2 * rounds}")
    counted = [calls[f * per_forward:(f + 1) * per_forward] for f in range(1, 2 * rounds, 2)]  # each round's second
    layers = []
    for i in range(per_forward):
        first = counted[0][i]
        stride = first.concrete_inputs[3] if len(first.concrete_inputs) > 3 else None
        padding = first.concrete_inputs[4] if len(first.concrete_inputs) > 4 else None
        layers.append({
            "x": list(first.input_shapes[0]),
            "weight": list(first.input_shapes[1]),
            "stride": list(stride) if isinstance(stride, (list, tuple)) else None,
            "padding": list(padding) if isinstance(padding, (list, tuple)) else None,
            "residual": bool(first.input_shapes[6]) if len(first.input_shapes) > 6 else False,
            "ours_ms": statistics.median(forward[i].cpu_time_total / 1e3 for forward in counted),
        })
    return layers


def _onnxruntime(onnx: bytes, x: torch.Tensor, rounds: int, warmup: int = 3) -> list[dict]:
    """Per Conv node, in graph order: its name, input and weight shapes and median kernel time."""
    import onnxruntime as ort

    from resnet_fused import bench

    with tempfile.TemporaryDirectory() as folder:
        options = bench.onnxruntime_options()  # as benchmarks/interleaved.py runs it, plus its profiler
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "ort")
        session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        for _ in range(warmup):
            session.run(None, feed)
        for _ in range(rounds):
            _idle_then(lambda: session.run(None, feed))
        events = json.loads(Path(session.end_profiling()).read_text())
    convs = [e for e in events if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "Conv"]
    per_run = len(convs) // (warmup + 2 * rounds)
    counted = [convs[(warmup + r) * per_run:(warmup + r + 1) * per_run] for r in range(1, 2 * rounds, 2)]
    layers = []
    for i in range(per_run):
        shapes = [next(iter(s.values())) for s in counted[0][i]["args"]["input_type_shape"]]
        layers.append({
            "node": counted[0][i]["name"].removesuffix("_kernel_time"),
            "x": shapes[0],
            "weight": shapes[1],
            "ms": statistics.median(run[i]["dur"] / 1e3 for run in counted),
        })
    return layers


def _openvino(onnx: bytes, x: torch.Tensor, precision: str, rounds: int, warmup: int = 3) -> list[dict]:
    """Per Convolution node, in execution order: its name, input and weight shapes, whether it adds
    a residual, the kernel OpenVINO ran and its median time."""
    from resnet_fused import bench

    compiled = bench.openvino_model(onnx, precision, PERF_COUNT="YES")
    nodes = {op.get_friendly_name(): op for op in compiled.get_runtime_model().get_ops()}
    request = compiled.create_infer_request()
    feed = {0: x.numpy()}
    for _ in range(warmup):
        request.infer(feed)
    times: dict[str, list[float]] = {}
    kernels: dict[str, str] = {}
    for _ in range(rounds):
        _idle_then(lambda: request.infer(feed))
        for info in request.get_profiling_info():
            if info.node_type == "Convolution":
                times.setdefault(info.node_name, []).append(info.real_time.total_seconds() * 1e3)
                kernels[info.node_name] = info.exec_type
    layers = []
    for name, ms in times.items():  # first seen first: the execution order
        node = nodes[name]
        layers.append({
            "node": name,
            "x": [int(d) for d in node.input(0).get_partial_shape().to_shape()],
            "weight": [int(d) for d in node.input(1).get_partial_shape().to_shape()],
            "residual": node.get_input_size() > 3,  # the fused sum's operand follows the bias
            "ms": statistics.median(ms),
            "kernel": kernels[name] or "?",
        })
    return layers


def peers(dtype: torch.dtype) -> tuple[dict, list[str]]:
    """The peers that can run here in ``dtype`` (label -> function of (onnx, x, rounds)), and a note
    for each one that cannot (resnet_fused.bench.runnable_peers, shared with the whole-model runs)."""
    from resnet_fused import bench

    runnable, notes = bench.runnable_peers(dtype)
    functions = {"onnxruntime": _onnxruntime,
                 "openvino": lambda onnx, x, rounds: _openvino(onnx, x, bench.OPENVINO_PRECISION[dtype], rounds)}
    return {label: functions[module] for module, label in runnable.items()}, notes


def _kernel_choices() -> dict[str, str]:
    from resnet_fused.backends import extension

    choices = {}
    for line in extension.cpu_conv_choices():
        key, _, kernel = line.partition(": ")
        choices[key] = kernel
    return choices


# How cpu_conv_choices() names a dtype (c10's names).
_C10_NAMES = {torch.float32: "Float", torch.bfloat16: "BFloat16"}


def _choice_for(layer: dict, choices: dict[str, str], dtype: torch.dtype) -> str:
    x, w = layer["x"], layer["weight"]
    stride = layer["stride"][0] if layer["stride"] else None
    padding = layer["padding"][0] if layer.get("padding") else None
    prefix = (f"x {'x'.join(map(str, x))}, weight {'x'.join(map(str, w))}, stride {stride}, padding {padding}"
              f"{', residual' if layer['residual'] else ''}, {_C10_NAMES[dtype]},")
    found = [kernel for key, kernel in choices.items() if key.startswith(prefix)]
    return found[0] if len(found) == 1 else "?"


def conv_kind(layer: dict) -> str:
    """The family a conv belongs to, which decides the kernel (ours and the peers')."""
    r, s = layer["weight"][2:]
    stride = layer["stride"][0] if layer["stride"] else 1
    if r * s > 9:
        return f"{r}x{s} stem"
    return f"{r}x{s}" + (f" stride {stride}" if stride != 1 else "")


def macs(layer: dict) -> int:
    """Multiply-adds of the direct convolution (ResNet padding: half the kernel)."""
    n, c, h, w = layer["x"]
    k, _, r, s = layer["weight"]
    stride = layer["stride"][0] if layer["stride"] else 1
    return n * ((h + 2 * (r // 2) - r) // stride + 1) * ((w + 2 * (s // 2) - s) // stride + 1) * k * c * r * s


def by_kind(layers: list[dict], labels: list[str]) -> list[dict]:
    kinds: dict[str, dict] = {}
    for layer in layers:
        kind = conv_kind(layer)
        entry = kinds.setdefault(kind, {"kind": kind, "count": 0, "macs": 0, "ours_ms": 0.0,
                                        "peer_ms": dict.fromkeys(labels, 0.0)})
        entry["count"] += 1
        entry["macs"] += macs(layer)
        entry["ours_ms"] += layer["ours_ms"]
        for label in labels:
            entry["peer_ms"][label] += layer["peers"][label]["ms"]
    return sorted(kinds.values(), key=lambda e: -e["ours_ms"])


def _matched(ours: list[dict], theirs: list[dict], label: str) -> list[dict]:
    """``theirs`` in the order of ``ours``: each of our convs paired with the first unpaired peer conv
    of the same input and weight shapes (and residual, where the peer says), as a peer may run
    independent convs (a block's shortcut and its first conv) in another order."""
    unpaired, paired = list(theirs), []
    for mine in ours:
        for j, peer in enumerate(unpaired):
            if (peer["x"], peer["weight"], peer.get("residual", mine["residual"])) == (mine["x"], mine["weight"], mine["residual"]):
                paired.append(unpaired.pop(j))
                break
        else:
            raise RuntimeError(f"{label} has no conv left for ours {mine['x']} * {mine['weight']}"
                               f"{' + residual' if mine['residual'] else ''}")
    if unpaired:
        raise RuntimeError(f"{len(unpaired)} {label} conv nodes match none of ours, the first {unpaired[0]['node']}")
    return paired


def measure(arch: str, batch: int, rounds: int, size: int = 224, dtype: torch.dtype = torch.float32) -> dict:
    import resnet_fused
    from resnet_fused import bench
    from resnet_fused.reference import random_model

    model = random_model(arch, seed=0, calibration_size=16)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    fused = resnet_fused.fuse(model, backend="extension", dtype=dtype)
    x_ours = x.to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(3):
            fused(x_ours)
    ours = _ours(fused, x_ours, rounds)
    runnable, notes = peers(dtype)
    onnx = bench.onnx_bytes(model, x) if runnable else None
    # Peers take the float32 images (OpenVINO's bf16 hint converts inside), as in interleaved.py.
    theirs = {label: _matched(ours, run(onnx, x, rounds), label) for label, run in runnable.items()}
    choices = _kernel_choices()
    rows = []
    for i, mine in enumerate(ours):
        rows.append({**mine, "kernel": _choice_for(mine, choices, dtype),
                     "peers": {label: layers[i] for label, layers in theirs.items()}})
    labels = list(theirs)
    return {
        "model": arch, "batch": batch, "size": size, "dtype": str(dtype).removeprefix("torch."), "rounds": rounds,
        "environment": bench.environment("cpu"),
        "notes": notes,
        "peers": labels,
        "ours_total_ms": sum(r["ours_ms"] for r in rows),
        "peer_total_ms": {label: sum(r["peers"][label]["ms"] for r in rows) for label in labels},
        "by_kind": by_kind(rows, labels),
        "layers": rows,
    }


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _has_kernels(result: dict, label: str) -> bool:
    return any("kernel" in r["peers"][label] for r in result["layers"])


def markdown(result: dict) -> str:
    from resnet_fused import bench

    env, labels = result["environment"], result["peers"]
    with_kernels = [label for label in labels if _has_kernels(result, label)]
    versions = "; ".join(f"{label} {env.get(module, '?')}" for module, label in
                         bench.PEERS.items() if any(p.startswith(label) for p in labels))
    header = ["#", "x", "weight", "stride", "residual", "ours ms",
              *[c for label in labels for c in (f"{label} ms", f"{label} / ours")],
              "our kernel", *[f"{label} kernel" for label in with_kernels]]
    lines = [
        f"# Per conv: fused (extension) vs {', '.join(labels) or 'no peer'}, {result['model']} batch "
        f"{result['batch']}, {result['size']}x{result['size']} {result['dtype']}",
        "",
        f"CPU: {env['device_name']} ({' '.join(env['cpu_flags'])}); torch {env['torch']}"
        f"{'; ' + versions if versions else ''}. Each conv's median over {result['rounds']} whole forwards; "
        "peer / ours > 1 means ours is faster.",
        "",
        *(f"Note: {note}" for note in result["notes"]),
        *([""] if result["notes"] else []),
        _row(header),
        _row(["---"] * len(header)),
    ]
    for i, r in enumerate(result["layers"]):
        peer = r["peers"]
        lines.append(_row([
            i, "x".join(map(str, r["x"])), "x".join(map(str, r["weight"])), r["stride"][0] if r["stride"] else "?",
            "yes" if r["residual"] else "", f"{r['ours_ms']:.3f}",
            *[c for label in labels for c in (f"{peer[label]['ms']:.3f}", f"{peer[label]['ms'] / r['ours_ms']:.2f}")],
            r["kernel"], *[peer[label]["kernel"] for label in with_kernels],
        ]))
    total = result["ours_total_ms"]
    lines += ["", f"Convs in all: ours {total:.2f} ms"
                  + "".join(f", {label} {ms:.2f} ms ({ms / total:.2f}x)" for label, ms in result["peer_total_ms"].items())
                  + ".", ""]
    header = ["kind", "convs", "GMAC", "ours ms", "ours GMAC/s",
              *[c for label in labels for c in (f"{label} ms", f"{label} GMAC/s", f"{label} / ours")]]
    lines += [
        "## By kind of conv",
        "",
        "GMAC/s: the direct convolution's multiply-adds per second (Winograd does fewer, so its rate can pass the "
        "machine's peak).",
        "",
        _row(header),
        _row(["---"] * len(header)),
    ]
    for e in result["by_kind"]:
        gmac = e["macs"] / 1e9
        lines.append(_row([
            e["kind"], e["count"], f"{gmac:.3f}", f"{e['ours_ms']:.2f}", f"{gmac / e['ours_ms'] * 1e3:.0f}",
            *[c for label in labels for c in (f"{e['peer_ms'][label]:.2f}", f"{gmac / e['peer_ms'][label] * 1e3:.0f}",
                                              f"{e['peer_ms'][label] / e['ours_ms']:.2f}")],
        ]))
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="our reference model: resnet18 .. resnet152")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, help="folder for per_layer.json and per_layer.md")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        parser.error("--batch and --rounds must be at least 1")
    result = measure(args.model, args.batch, args.rounds, args.size, DTYPES[args.dtype])
    text = markdown(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "per_layer.json").write_text(json.dumps(result, indent=1))
        (args.out / "per_layer.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

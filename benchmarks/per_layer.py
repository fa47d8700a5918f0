"""Each conv of the fused model against the same conv in ONNX Runtime, layer by layer, in one
process: which layers the peer runs faster, and by how much.

    python benchmarks/per_layer.py --model resnet50 --batch 1 --rounds 10 [--out DIR]

Ours: torch.profiler's time for each ``resnet_fused::conv_bias_act`` call of the fused model on the
extension backend (the op as a caller sees it: checks, the per-shape choice lookup, the output
buffer and the kernel). ONNX Runtime: its node profiler's kernel time for each Conv node (its
blocked-layout convs, with bias, ReLU and the residual add fused in), matched to ours in graph
order and checked by input and weight shape. Medians over the rounds; the two alternate, each
after 0.1 s of idle (ONNX Runtime's threads spin after a run and take a core from whatever runs
next). Both are warmed up first, so our per-shape kernel timing is not in the numbers.
The totals add up the convs only; whole-model latency is benchmarks/interleaved.py's job. A second
table sums the convs by kind (stem, 1x1, 3x3, strided), each with its rate in GMAC/s for ours and
the peer. Writes DIR/per_layer.json and DIR/per_layer.md with --out.
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


def _ours(fused, x, rounds: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(rounds):
            time.sleep(0.1)
            fused(x)
    calls = [e for e in prof.events() if e.name == OP and e.cpu_parent is None]
    per_round = len(calls) // rounds
    if per_round == 0 or per_round * rounds != len(calls):
        raise RuntimeError(f"expected the same number of {OP} calls per forward, got {len(calls)} in {rounds} rounds")
    layers = []
    for i in range(per_round):
        first = calls[i]
        stride = first.concrete_inputs[3] if len(first.concrete_inputs) > 3 else None
        layers.append({
            "x": list(first.input_shapes[0]),
            "weight": list(first.input_shapes[1]),
            "stride": list(stride) if isinstance(stride, (list, tuple)) else None,
            "residual": bool(first.input_shapes[6]) if len(first.input_shapes) > 6 else False,
            "ours_ms": statistics.median(calls[i + r * per_round].cpu_time_total / 1e3 for r in range(rounds)),
        })
    return layers


def _onnxruntime(onnx: bytes, x, rounds: int, warmup: int = 3) -> list[dict]:
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
            time.sleep(0.1)
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    convs = [e for e in events if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "Conv"]
    per_run = len(convs) // (warmup + rounds)
    convs = convs[warmup * per_run:]
    layers = []
    for i in range(per_run):
        shapes = [next(iter(s.values())) for s in convs[i]["args"]["input_type_shape"]]
        layers.append({
            "node": convs[i]["name"].removesuffix("_kernel_time"),
            "x": shapes[0],
            "weight": shapes[1],
            "ort_ms": statistics.median(convs[i + r * per_run]["dur"] / 1e3 for r in range(rounds)),
        })
    return layers


def _kernel_choices() -> dict[str, str]:
    from resnet_fused.backends import extension

    choices = {}
    for line in extension.cpu_conv_choices():
        key, _, kernel = line.partition(": ")
        choices[key] = kernel
    return choices


def _choice_for(layer: dict, choices: dict[str, str]) -> str:
    x, w = layer["x"], layer["weight"]
    stride = layer["stride"][0] if layer["stride"] else None
    prefix = (f"x {'x'.join(map(str, x))}, weight {'x'.join(map(str, w))}, stride {stride}"
              f"{', residual' if layer['residual'] else ''}, Float,")
    found = [kernel for key, kernel in choices.items() if key.startswith(prefix)]
    return found[0] if len(found) == 1 else "?"


def conv_kind(layer: dict) -> str:
    """The family a conv belongs to, which decides the kernel (ours and the peer's)."""
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


def by_kind(layers: list[dict]) -> list[dict]:
    kinds: dict[str, dict] = {}
    for layer in layers:
        entry = kinds.setdefault(conv_kind(layer), {"kind": conv_kind(layer), "count": 0, "macs": 0,
                                                    "ours_ms": 0.0, "ort_ms": 0.0})
        entry["count"] += 1
        entry["macs"] += macs(layer)
        entry["ours_ms"] += layer["ours_ms"]
        entry["ort_ms"] += layer["ort_ms"]
    return sorted(kinds.values(), key=lambda e: -e["ours_ms"])


def measure(arch: str, batch: int, rounds: int, size: int = 224) -> dict:
    import resnet_fused
    from resnet_fused import bench
    from resnet_fused.reference import random_model

    model = random_model(arch, seed=0, calibration_size=16)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    fused = resnet_fused.fuse(model, backend="extension")
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(3):
            fused(x_cl)
    ours = _ours(fused, x_cl, rounds)
    theirs = _onnxruntime(bench.onnx_bytes(model, x), x, rounds)
    if len(ours) != len(theirs):
        raise RuntimeError(f"{len(ours)} fused convs but {len(theirs)} ONNX Runtime Conv nodes")
    choices = _kernel_choices()
    rows = []
    for mine, peer in zip(ours, theirs):
        if mine["x"] != peer["x"] or mine["weight"] != peer["weight"]:
            raise RuntimeError(f"layer order differs: ours {mine['x']} * {mine['weight']}, "
                               f"ONNX Runtime's {peer['node']} {peer['x']} * {peer['weight']}")
        rows.append({**mine, **peer, "kernel": _choice_for(mine, choices),
                     "ort_over_ours": peer["ort_ms"] / mine["ours_ms"]})
    return {
        "model": arch, "batch": batch, "size": size, "rounds": rounds,
        "environment": bench.environment("cpu"),
        "ours_total_ms": sum(r["ours_ms"] for r in rows),
        "ort_total_ms": sum(r["ort_ms"] for r in rows),
        "by_kind": by_kind(rows),
        "layers": rows,
    }


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# Per conv: fused (extension) vs ONNX Runtime, {result['model']} batch {result['batch']}, "
        f"{result['size']}x{result['size']} fp32",
        "",
        f"CPU: {env['device_name']} ({' '.join(env['cpu_flags'])}); "
        f"torch {env['torch']}; ONNX Runtime {env.get('onnxruntime', '?')}. "
        f"Medians of {result['rounds']} rounds; ONNX Runtime / ours > 1 means ours is faster.",
        "",
        "| # | x | weight | stride | residual | ours ms | ONNX Runtime ms | ORT / ours | our kernel |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(result["layers"]):
        stride = r["stride"][0] if r["stride"] else "?"
        lines.append(f"| {i} | {'x'.join(map(str, r['x']))} | {'x'.join(map(str, r['weight']))} | {stride} | "
                     f"{'yes' if r['residual'] else ''} | {r['ours_ms']:.3f} | {r['ort_ms']:.3f} | "
                     f"{r['ort_over_ours']:.2f} | {r['kernel']} |")
    lines += ["", f"Convs in all: ours {result['ours_total_ms']:.2f} ms, ONNX Runtime {result['ort_total_ms']:.2f} ms "
                  f"({result['ort_total_ms'] / result['ours_total_ms']:.2f}x).", ""]
    lines += [
        "## By kind of conv",
        "",
        "GMAC/s: the direct convolution's multiply-adds per second (Winograd does fewer, so its rate can pass the "
        "machine's FMA peak).",
        "",
        "| kind | convs | GMAC | ours ms | ours GMAC/s | ONNX Runtime ms | ORT GMAC/s | ORT / ours |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in result["by_kind"]:
        gmac = e["macs"] / 1e9
        lines.append(f"| {e['kind']} | {e['count']} | {gmac:.3f} | {e['ours_ms']:.2f} | {gmac / e['ours_ms'] * 1e3:.0f} | "
                     f"{e['ort_ms']:.2f} | {gmac / e['ort_ms'] * 1e3:.0f} | {e['ort_ms'] / e['ours_ms']:.2f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="our reference model: resnet18 .. resnet152")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, help="folder for per_layer.json and per_layer.md")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        parser.error("--batch and --rounds must be at least 1")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("per_layer.py needs ONNX Runtime: pip install 'resnet-fused[peers]'", file=sys.stderr)
        return 2
    result = measure(args.model, args.batch, args.rounds, args.size)
    text = markdown(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "per_layer.json").write_text(json.dumps(result, indent=1))
        (args.out / "per_layer.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

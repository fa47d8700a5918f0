"""A ResNet's head (global average pool + classifier) timed inside whole forwards: the fused head
(ops.global_avg_pool + ops.linear) against ATen's (nn.AdaptiveAvgPool2d + nn.Linear), alternating.

    python benchmarks/head_in_forward.py --model resnet50 --batch 1 --dtype bf16 [--rounds 70] [--size 224]

Why inside forwards: the classifier's weight (resnet50's: 8 MB in fp32) is read from DRAM on every
forward, and the pool's input was just written by the last conv; a head repeated on its own finds
both in the caches. So each round runs the fused model's body (the head's input captured, the
head itself skipped) and then times one head on that input. Medians over the rounds after the
first ten; the model is our reference copy with random weights (resnet_fused.reference).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import resnet_fused
from resnet_fused.reference import MODELS, random_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Capture(nn.Module):
    """Stands in for the pool: keeps its input and hands on a (N, C, 1, 1) placeholder."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features = x
        return x[:, :, :1, :1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=70)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]

    model = random_model(args.model)
    fused = resnet_fused.fuse(model, dtype=dtype)
    heads = {
        "fused": (fused.avgpool, fused.fc),
        "aten": (nn.AdaptiveAvgPool2d((1, 1)), copy.deepcopy(model.fc).to(dtype)),
    }
    body = copy.copy(fused)  # shares every layer with `fused`; only its head attributes differ
    body._modules = dict(fused._modules, avgpool=_Capture(), fc=nn.Identity())
    x = torch.randn(args.batch, 3, args.size, args.size).to(dtype).contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {name: [] for name in heads}
    with torch.inference_mode():
        for name, (pool, fc) in heads.items():  # the same logits, and every path warmed up
            body(x)
            torch.testing.assert_close(fc(torch.flatten(pool(body.avgpool.features), 1)), fused(x), rtol=0.02, atol=0.02)
        for i in range(args.rounds):
            for name in (heads if i % 2 else reversed(heads)):
                pool, fc = heads[name]
                body(x)
                features = body.avgpool.features
                start = time.perf_counter()
                fc(torch.flatten(pool(features), 1))
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t[10:]) * 1e3 for name, t in times.items()}
    print(
        f"{args.model} batch {args.batch} {args.dtype}, {torch.get_num_threads()} threads: head in a forward, "
        + ", ".join(f"{name} {ms:.3f} ms" for name, ms in medians.items())
    )


if __name__ == "__main__":
    main()

"""A head's own inference time, apart from the backbone: ms per image at batch 1 and 32.

Each head variant is built with the backbone's head defaults on random features of that
backbone's shapes (its default layers; random backbone weights, only the shapes are
read), prepared on 64 such images, and timed on its own in one process. Every variant
is timed once per round, in turn, so that the machine's drift falls on all of them; the
medians over the rounds are printed with the ratio to the first variant. Latency does not
depend on what the features hold, so this isolates what a change to a head costs (e.g.
``gmm:conditioning=position`` against ``gmm``) from the backbone's noise, which
``bench_inference.py`` (full model over backbone) cannot on a shared machine.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_head_latency.py
    [--backbone tf_efficientnet_lite0] [--heads gmm:conditioning=position,gmm] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from vitqc.backbones import create_backbone
from vitqc.bench.timing import time_per_image_ms
from vitqc.heads import create_head, head_defaults, parse_head

BATCHES = (1, 32)
TRAIN_IMAGES = 64


def feature_shapes(extractor: torch.nn.Module) -> tuple[list[int], list[tuple[int, int]]]:
    """Channels and grid of each feature map the extractor returns."""
    with torch.inference_mode():
        features = extractor(torch.rand(1, 3, *extractor.input_size))
    return [f.shape[1] for f in features], [tuple(f.shape[-2:]) for f in features]


def build_head(variant: str, backbone: str, family: str, channels, sizes) -> torch.nn.Module:
    name, options = parse_head(variant)
    kwargs = {**head_defaults(name, backbone, family)["head"], **options}
    head = create_head(name, channels, sizes, **kwargs)
    generator = torch.Generator().manual_seed(0)
    train = [
        torch.randn(TRAIN_IMAGES, c, *s, generator=generator)
        for c, s in zip(channels, sizes, strict=True)
    ]
    head.prepare(train)
    return head.eval()


def main(argv: list[str] | None = None) -> dict[str, dict[int, float]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--heads", default="gmm:conditioning=position,gmm")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.5, help="per timing")
    args = parser.parse_args(argv)
    extractor = create_backbone(args.backbone, weights="random").eval()
    channels, sizes = feature_shapes(extractor)
    variants = args.heads.split(",")
    heads = {v: build_head(v, extractor.name, extractor.family, channels, sizes) for v in variants}
    generator = torch.Generator().manual_seed(1)
    inputs = {
        b: [
            torch.randn(b, c, *s, generator=generator) for c, s in zip(channels, sizes, strict=True)
        ]
        for b in BATCHES
    }
    times: dict[str, dict[int, list[float]]] = {v: {b: [] for b in BATCHES} for v in variants}
    for _ in range(args.rounds):
        for variant, head in heads.items():
            for b, features in inputs.items():
                ms = time_per_image_ms(
                    lambda _, h=head, f=features: h(f), features[0], min_seconds=args.min_seconds
                )
                times[variant][b].append(ms)
    medians = {v: {b: statistics.median(t) for b, t in per.items()} for v, per in times.items()}
    print(
        f"{args.backbone}: features {channels} on {sizes}; {torch.get_num_threads()} thread(s), "
        f"median of {args.rounds} round(s), ms per image"
    )
    first = medians[variants[0]]
    print(f"{'head':<36}{'b1':>9}{'b32':>9}{'x first b1':>12}{'x first b32':>12}")
    for variant, ms in medians.items():
        ratios = "".join(f"{ms[b] / first[b]:>12.2f}" for b in BATCHES)
        print(f"{variant:<36}{ms[1]:>9.2f}{ms[32]:>9.2f}{ratios}")
    return medians


if __name__ == "__main__":
    main()

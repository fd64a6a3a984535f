"""VT-ADL training cost per image: where the time of one optimizer step goes.

Times one Adam step (forward + backward) at the training batch size for each preset and
a few cheaper variants, and the parts alone: encoder (forward + backward), decoder
(forward + backward from the tokens), SSIM (forward + backward) and the mixture NLL.
Multiply ms/img by the images per epoch (train + validation forward) to plan a run, or
cap it with ``vitqc fit --max-minutes``. Run on a quiet machine:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vtadl_step.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from pytorch_msssim import ssim

from vitqc.heads.vtadl import SSIM_DATA_RANGE, VTADLHead, describe

#: (label, image side, head options)
VARIANTS: list[tuple[str, int, dict]] = [
    ("mnist preset, 28 px", 28, {"preset": "mnist"}),
    ("cpu preset, 256 px", 256, {"preset": "cpu"}),
    ("cpu, patch_size=16", 256, {"preset": "cpu", "patch_size": 16}),
    ("cpu, reduction=sum", 256, {"preset": "cpu", "reduction": "sum"}),
]


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(size: int, options: dict, batch: int, channels: int, repeats: int) -> dict:
    torch.manual_seed(0)
    head = VTADLHead([channels], [(size, size)], **options)
    x = torch.rand(batch, channels, size, size) * 2 - 1
    head.prepare([x])
    head.train()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-4, weight_decay=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        head.loss([x]).backward()
        optimizer.step()

    tokens = head.embeddings(x).detach()
    target = (torch.rand_like(x) * 2 - 1).requires_grad_()
    win = min(11, (size - 1) // 2 * 2 + 1)
    parts = {
        "step": step,
        "encoder": lambda: head.embeddings(x).sum().backward(),
        "decoder": lambda: head.reconstruct_from_tokens(tokens).sum().backward(),
        "ssim": lambda: (
            ssim(target, x, data_range=SSIM_DATA_RANGE, size_average=False, win_size=win)
            .sum()
            .backward()
        ),
        "nll": lambda: head.patch_nll(tokens).sum().backward(),
    }
    out = {name: median_ms(fn, repeats) / batch for name, fn in parts.items()}
    out["params_m"] = describe(head)["total"] / 1e6
    out["grid"] = "x".join(map(str, head.grid))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8, help="VT-ADL's training batch")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"ms per training image, batch {args.batch_size}, {torch.get_num_threads()} thread(s)")
    header = f"{'variant':<22} {'grid':>5} {'params':>7} {'step':>7} "
    print(header + " ".join(f"{k:>8}" for k in ("encoder", "decoder", "ssim", "nll")))
    for label, size, options in VARIANTS:
        r = measure(size, options, args.batch_size, args.channels, args.repeats)
        print(
            f"{label:<22} {r['grid']:>5} {r['params_m']:6.2f}M {r['step']:7.1f} "
            + " ".join(f"{r[k]:8.1f}" for k in ("encoder", "decoder", "ssim", "nll"))
        )


if __name__ == "__main__":
    main()

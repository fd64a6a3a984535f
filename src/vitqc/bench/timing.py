"""What a model costs: inference latency, parameter counts, bundle size, machine facts.

Latency is measured the way a production line would see it: milliseconds per image at
batch 1 (one part at a time) and at batch 32 (throughput), for the backbone alone and
for the whole pipeline (preprocessing, backbone, head, upsampling, smoothing). Numbers
only compare across runs on the same machine, so every row carries the machine facts.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_BATCHES = (1, 32)


def count_parameters(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def backbone_parameters(extractor: nn.Module) -> int:
    """Parameters that actually run (the extractor prunes the unused tail and classifier)."""
    fn = getattr(extractor, "num_parameters", None)
    return int(fn()) if callable(fn) else count_parameters(extractor)


def dir_size(path: str | Path) -> int:
    """Bytes on disk of every file under ``path`` (a model bundle)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return int(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_image_ms(
    fn: Callable[[torch.Tensor], Any],
    example: torch.Tensor,
    warmup: int = 1,
    min_seconds: float = 0.2,
    max_repeats: int = 20,
    min_repeats: int = 3,
) -> float:
    """Median wall time of ``fn(example)`` divided by the batch size, in milliseconds.

    The median over repeats (at least ``min_repeats``, until ``min_seconds`` have passed)
    resists the noise of a shared machine better than the mean.
    """
    device = example.device
    with torch.inference_mode():
        for _ in range(warmup):
            fn(example)
        _sync(device)
        times: list[float] = []
        start_all = time.perf_counter()
        while len(times) < max_repeats and (
            len(times) < min_repeats or time.perf_counter() - start_all < min_seconds
        ):
            start = time.perf_counter()
            fn(example)
            _sync(device)
            times.append(time.perf_counter() - start)
    times.sort()
    return 1000.0 * times[len(times) // 2] / example.shape[0]


def measure_latency(
    model: nn.Module,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    device: str = "cpu",
    min_seconds: float = 0.2,
    max_repeats: int = 20,
    min_repeats: int = 3,
    errors: list[str] | None = None,
    images: torch.Tensor | None = None,
) -> dict[str, float]:
    """``{backbone_ms_b<N>, pipeline_ms_b<N>}`` for an ``AnomalyModel`` on ``device``.

    The input is ``images`` (``[M, 3, h, w]`` in [0, 1] at the input size, repeated to
    fill a batch) or random pixels: latency does not depend on image content. The model
    is moved back to the CPU afterwards. With an ``errors`` list, a measurement that
    fails (e.g. a part of the pipeline that does not run on that device) is reported
    there and the others are still returned.
    """
    dev = torch.device(device)
    model.eval()
    out: dict[str, float] = {}
    try:
        model.to(dev)
        h, w = model.input_size
        gen = torch.Generator().manual_seed(0)
        for bs in batch_sizes:
            if images is None:
                x = torch.rand(bs, 3, h, w, generator=gen).to(dev)
            else:
                x = images[torch.arange(bs) % images.shape[0]].to(dev)
            parts: tuple[tuple[str, Callable[[torch.Tensor], Any]], ...] = (
                ("backbone", model.features),
                ("pipeline", model),
            )
            for part, fn in parts:
                try:
                    out[f"{part}_ms_b{bs}"] = time_per_image_ms(
                        fn,
                        x,
                        min_seconds=min_seconds,
                        max_repeats=max_repeats,
                        min_repeats=min_repeats,
                    )
                except Exception as exc:
                    if errors is None:
                        raise
                    errors.append(f"{part} at batch {bs} on {device}: {type(exc).__name__}: {exc}")
    finally:
        model.to("cpu")
    return out


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: str = "cpu") -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 ...)``: what the latency was measured on."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return dev.type


def machine_facts(device: str = "cpu") -> dict[str, Any]:
    """Everything that makes timings comparable or not, stored with every run, and the
    host that ran it (a grid on a Ray cluster runs its cells on several machines)."""
    import socket

    import timm

    from vitqc import __version__

    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_name(device),
        "vitqc_version": __version__,
    }

"""What this CPU computes natively, for choices that depend on it."""

from __future__ import annotations

import torch


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 products in hardware (AMX or AVX512-BF16),
    where oneDNN's bfloat16 products and convolutions run faster than float32 ones."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)

"""What this CPU computes natively, for choices that depend on it."""

from __future__ import annotations

import torch


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 products in hardware (AMX or AVX512-BF16),
    where oneDNN's bfloat16 products and convolutions run faster than float32 ones."""
    return amx_tiles() or _supported("_is_avx512_bf16_supported")


def amx_tiles() -> bool:
    """Whether this CPU has AMX matrix tiles (Intel Xeon since Sapphire Rapids), where
    oneDNN's bfloat16 products outrun its int8 ones."""
    return _supported("_is_amx_tile_supported")


def native_int8() -> bool:
    """Whether this CPU computes int8 dot products in hardware (VNNI), where
    ``torch._int_mm`` outruns bfloat16 products on CPUs without AMX."""
    return _supported("_is_vnni_supported")


def _supported(check: str) -> bool:
    return bool(getattr(torch.cpu, check, lambda: False)())

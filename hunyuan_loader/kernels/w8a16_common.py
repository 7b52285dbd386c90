"""What the W8A16 kernels and the format share, free of Triton: the "cannot run here" signal, the
tuning buckets and the tuners' input, the grouped kernels' address units and the dequantization's
definition. Kept below both ``formats.w8a16`` and the kernels so neither imports the other."""

from __future__ import annotations

import torch


class Unsupported(RuntimeError):
    """This call cannot run on a W8A16 kernel (no safe config, a too large or misaligned weight): the
    caller takes the plain path. Here, not in the Triton modules, so that it imports without Triton."""


MAX_BUCKET = 4096
ALIGN = 16  # bytes: the grouped kernels address each expert's weight and scale in these units


def offset_units(tensors: list[torch.Tensor]) -> list[int]:
    """Each tensor's address from the lowest one's, in ALIGN units: how the grouped Triton kernels
    (``w8a16_grouped``, ``w8a16_dequant``) reach experts that stay separate parameters through one
    base pointer. The callers check the ALIGN alignment."""
    base = min(t.data_ptr() for t in tensors)
    return [(t.data_ptr() - base) // ALIGN for t in tensors]


def m_bucket(m: int) -> int:
    """Tuning key for a token count: the next power of two, 16..MAX_BUCKET."""
    return min(MAX_BUCKET, max(16, 1 << max(0, m - 1).bit_length()))


TUNE_SEED = 0x5EED  # the tuners' thrown-away input: the same values in every process


def tuning_input(rows: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[rows, k]`` normal values from a generator of its own seeded with ``TUNE_SEED``: what the
    kernel tuners run their candidates on instead of the call's input, so the first call of a key
    computes its output like every later call (the chosen config on the real input, not a tuning
    run), a non-finite input tunes like any other, and the global RNG (the image's noise) is
    untouched."""
    g = torch.Generator(device=device).manual_seed(TUNE_SEED)
    return torch.randn(rows, k, generator=g, device=device, dtype=dtype)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` per row, computed in fp32 and returned in ``dtype``."""
    return (q.float() * scale.float()[:, None]).to(dtype)

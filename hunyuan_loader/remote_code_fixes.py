"""Work-arounds for the official remote code, applied to a loaded model without editing its files."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

_MARK = "_hy3_mask_alignment"


def _align_attention_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor):
        return None
    ref = kwargs.get("inputs_embeds")
    if not isinstance(ref, torch.Tensor):
        ref = kwargs.get("input_ids")
    if not isinstance(ref, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
        ref = args[0]
    if not isinstance(ref, torch.Tensor) or ref.device == mask.device:
        return None
    kwargs["attention_mask"] = mask.to(ref.device, non_blocking=True)
    return args, kwargs


def install_mask_alignment(model: Any) -> bool:
    """Move a CPU-built attention mask to the device of the decoder's input.

    The base code builds its text-stage mask on the CPU (official hunyuan.py:2396,
    ``_prepare_attention_mask_for_generation``) and relies on accelerate's device-alignment
    hooks, which only a ``device_map="auto"`` load installs; on a single-device CUDA load the
    attention then fails ("attn_bias is on cpu", hunyuan.py:1285) for resolution "auto" and the
    think/recaption tasks. A keyword pre-hook on the decoder (``model.model``) does what those
    hooks do for this one tensor. Idempotent; returns True when installed now.
    """
    decoder = getattr(model, "model", None)
    if not isinstance(decoder, torch.nn.Module) or getattr(decoder, _MARK, False):
        return False
    decoder.register_forward_pre_hook(_align_attention_mask, with_kwargs=True)
    setattr(decoder, _MARK, True)
    log.debug("attention-mask alignment installed on %s", type(decoder).__name__)
    return True


def cpu_autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """The CPU counterpart of the autocast the official code relies on.

    Its pipeline runs every diffusion forward under ``torch.autocast("cuda", bfloat16)``
    (official hunyuan_image_3_pipeline.py:856), so float32 latents meet bf16 conv weights in
    patch_embed and the VAE only on CUDA; on a CPU that autocast is a no-op and the first conv
    fails ("Input type (float) and bias type (c10::BFloat16) should be the same", H:794 /
    M:810). On CPU with a bf16 model the pack runs the call under CPU autocast instead.
    """
    import contextlib

    if device.type == "cpu" and dtype == torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()

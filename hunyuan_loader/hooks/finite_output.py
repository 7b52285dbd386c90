"""The hook entry ``finite_output``: NaN or inf in the latents or in the decoded image stops the run.

A shard whose bytes were damaged (same size, so the size check passes) or a wrong quantization turns
the weights, and from them the latents, into NaN; the official pipeline then decodes them and its
postprocessing makes an all-black image without a word (base: hunyuan_image_3_pipeline.py:835 steps the
latents, :866 decodes them; Instruct: the same file's :873 and :905). The latents are checked after every scheduler step (generation's
``diffusion_progress`` calls ``check_finite``: the run stops at the first bad step, not minutes later)
and the VAE's input and output here, by wrapping ``model.vae.decode`` on the instance for one call
(the pipeline decodes with the model's vae: base hunyuan.py:1782 and Instruct
modeling_hunyuan_image_3.py:1788 pass ``vae=self.vae``). One ``isfinite`` reduction per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..core.errors import CheckpointError
from .registry import MethodWrap


class NonFiniteOutput(Exception):
    """Raised inside the model's call; generation turns it into the user's CheckpointError."""

    def __init__(self, what: str, step: int | None = None) -> None:
        super().__init__(what if step is None else f"{what} after step {step}")
        self.what, self.step = what, step


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a scheduler step or a VAE decode returned: itself, the first of a tuple, or ``.sample``
    / ``prev_sample`` of an output object."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return first_tensor(value[0])
    for key in ("prev_sample", "sample"):
        found = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
        if isinstance(found, torch.Tensor):
            return found
    return None


def check_finite(value: Any, what: str, step: int | None = None) -> None:
    tensor = first_tensor(value)
    if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteOutput(what, step)


class DecodeCheck(MethodWrap):
    """``model.vae.decode`` wrapped on the instance: its latents in and its image out must be finite."""

    def __init__(self, vae: Any) -> None:
        super().__init__(vae, "decode")
        self.vae = vae

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def decode(latents: Any, *args: Any, **kwargs: Any) -> Any:
            check_finite(latents, "latents")
            out = original(latents, *args, **kwargs)
            check_finite(out, "image")
            return out

        return decode


def non_finite_error(spec: Any, exc: NonFiniteOutput) -> CheckpointError:
    """The user's error: what went non-finite, which checkpoint, the two usual causes and their fixes."""
    quant = f"{spec.quant} {spec.int8_format}" if spec.quant == "int8" else spec.quant
    return CheckpointError(
        f"The model produced NaN/inf {exc} with the checkpoint {spec.path} ({quant}); no image was made. "
        "Usual causes: a damaged download (a shard whose bytes changed: compare each *.safetensors file's "
        "sha256 with the one Hugging Face lists, and download the ones that differ again) or a wrong "
        "quantization (a pre-quantized copy made by another tool or version: load the BF16 checkpoint, or "
        "write the copy again with `python -m hunyuan_loader quantize`)."
    )

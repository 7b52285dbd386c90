"""Generate node: prompt, seed, steps, guidance, resolution -> ComfyUI IMAGE."""

from __future__ import annotations

from typing import Any

from ..hunyuan_loader.cache import ModelHandle, get_cache
from ..hunyuan_loader.errors import HunyuanError
from ..hunyuan_loader.generation import (
    CUSTOM_MAX,
    CUSTOM_MIN,
    MAX_STEPS,
    GenerationRequest,
    generate,
    planned_size,
)
from ..hunyuan_loader.input_checks import check_queued_inputs, check_request, checkpoint_variant
from ..hunyuan_loader.placement import inference_bytes
from ..hunyuan_loader.resolution import resolution_buckets
from . import comfy_adapter, comfy_memory
from .loaders import CATEGORY, MODEL_TYPE


def resolution_choices() -> list[str]:
    """'auto', the buckets of every variant (Instruct's 37 include base's 33) as WIDTHxHEIGHT, and 'custom'."""
    buckets = sorted(resolution_buckets("instruct"), key=lambda wh: (wh[0] / wh[1], wh[0]))
    return ["auto"] + [f"{w}x{h}" for w, h in buckets] + ["custom"]


class HunyuanImage3Generate:
    """Text to image with the cached HunyuanImage-3 model."""

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = "Generates an image from a prompt with a HunyuanImage-3 model from one of the loaders."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        size = {"default": 1024, "min": CUSTOM_MIN, "max": CUSTOM_MAX, "step": 16}
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From a HunyuanImage-3 loader."}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What the image shows."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Same seed, same settings: same image."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": MAX_STEPS,
                                  "tooltip": "Diffusion steps (base/Instruct: 50; Distil: 8)."}),
                "guidance_scale": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                             "tooltip": "Classifier-free guidance (base/Instruct: 5.0; Distil: 2.5)."}),
                "resolution": (resolution_choices(), {"default": "1024x1024",
                    "tooltip": "auto: the model picks the aspect ratio. WIDTHxHEIGHT: one of the model's "
                               "buckets (base checkpoints lack 1280x720, 720x1280, 1024x768 and 768x1024 and "
                               "render the nearest). custom: width/height, snapped by the model to its nearest "
                               "bucket (the node's text says which)."}),
                "width": ("INT", dict(size, tooltip="Used when resolution is 'custom'.")),
                "height": ("INT", dict(size, tooltip="Used when resolution is 'custom'.")),
            },
            "optional": {
                "use_checkpoint_defaults": ("BOOLEAN", {"default": False,
                    "tooltip": "Ignore steps/guidance_scale and use the checkpoint's generation_config."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls, prompt: str | None = None, resolution: str | None = None, width: int | None = None,
        height: int | None = None,
    ) -> bool | str:
        # At queue time, before any node of the graph runs (nothing loads when this fails). These
        # inputs skip ComfyUI's own list/range checks, so the library check covers them too;
        # a linked input arrives as None. steps keep ComfyUI's min/max check.
        try:
            check_queued_inputs(prompt, resolution, width, height, resolution_choices())
        except HunyuanError as exc:
            return str(exc)
        return True

    def generate(
        self,
        model: ModelHandle,
        prompt: str,
        seed: int,
        steps: int,
        guidance_scale: float,
        resolution: str,
        width: int,
        height: int,
        use_checkpoint_defaults: bool = False,
    ) -> dict[str, Any]:
        request = GenerationRequest(
            prompt=prompt,
            seed=seed,
            steps=None if use_checkpoint_defaults else steps,
            guidance=None if use_checkpoint_defaults else guidance_scale,
            resolution=resolution,
            width=width,
            height=height,
        )
        check_request(request, checkpoint_variant(model.spec.path))  # guidance per variant, before any (re)load
        cache = get_cache()
        comfy_memory.make_room_on_gpu(cache.bytes_to_bring_back(model))  # ComfyUI's models yield first
        loaded = cache.get(model)
        size = planned_size(loaded, request)
        comfy_memory.make_room_on_gpu(inference_bytes(loaded, *size))
        total = request.steps or loaded.variant.default_steps
        result = generate(loaded, request, comfy_adapter.progress_callback(total), comfy_adapter.cancel_check())
        text = [f"{result.width}x{result.height}, {result.steps} steps, {result.seconds:.1f} s"] + result.notes
        return {"ui": {"text": text}, "result": (result.image,)}

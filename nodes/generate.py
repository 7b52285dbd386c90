"""Generate node: prompt (+ Instruct: reference images, bot_task) -> ComfyUI IMAGE and the model's text.

One node for text-to-image, editing (1 reference image) and multi-image fusion (2-3): the official
Instruct code does all three in the same generate_image call, and bot_task (think / recaption)
applies to text-to-image too, so a second node would repeat every widget and make switching
between them a rewiring job. Base checkpoints refuse images and text tasks before anything runs.
"""

from __future__ import annotations

from typing import Any

from ..hunyuan_loader.cache import ModelHandle, get_cache
from ..hunyuan_loader.core.errors import HunyuanError
from ..hunyuan_loader.core.step_cache_settings import CHOICES as STEP_CACHE_CHOICES
from ..hunyuan_loader.core.step_cache_settings import KNOBS as STEP_CACHE_KNOBS
from ..hunyuan_loader.core.step_cache_settings import StepCacheSettings, settings_from
from ..hunyuan_loader.generation import image_tensor_to_pils
from ..hunyuan_loader.input_checks import check_queued_inputs, check_request, checkpoint_variant
from ..hunyuan_loader.model.resolution import resolution_buckets
from ..hunyuan_loader.request import (
    BOT_TASKS,
    CUSTOM_MAX,
    CUSTOM_MIN,
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS,
    MAX_REFERENCE_IMAGES,
    MAX_STEPS,
    GenerationRequest,
    GenerationResult,
)
from . import comfy_adapter, comfy_memory

IMAGE_INPUTS = tuple(f"image_{i}" for i in range(1, MAX_REFERENCE_IMAGES + 1))
NODE_CACHE_KNOBS = STEP_CACHE_KNOBS[:4]  # interval, order, first and last steps (the CLI has all)


def step_cache_inputs() -> dict[str, Any]:
    """The optional step-cache inputs: the choice and its knobs (the official defaults)."""
    defaults = StepCacheSettings()
    inputs: dict[str, Any] = {"step_cache": (list(STEP_CACHE_CHOICES), {"default": "off",
        "tooltip": "off: every step runs the whole model. taylor: the official Taylor cache: about every 5th step "
                   "runs the model and the others are forecast from the last ones (~4x faster at 50 steps); the "
                   "image stays close to, but is not the same as, the one without it."})}
    for field, name, low, high, text in NODE_CACHE_KNOBS:
        inputs[name] = ("INT", {"default": getattr(defaults, field), "min": low, "max": high, "tooltip": text})
    return inputs


def resolution_choices() -> list[str]:
    """'auto', the buckets of every variant (Instruct's 37 include base's 33) as WIDTHxHEIGHT, and 'custom'."""
    buckets = sorted(resolution_buckets("instruct"), key=lambda wh: (wh[0] / wh[1], wh[0]))
    return ["auto"] + [f"{w}x{h}" for w, h in buckets] + ["custom"]


def result_text(result: GenerationResult) -> list[str]:
    """The node's UI text: size, steps, time (text stage / diffusion), notes, the model's text."""
    timing = f"{result.seconds:.1f} s"
    if result.text_tokens:
        timing += (f" (text {result.text_tokens} tokens {result.text_seconds:.1f} s, "
                   f"diffusion {result.diffusion_seconds:.1f} s)")
    lines = [f"{result.width}x{result.height}, {result.steps} steps, {timing}"] + result.notes
    if result.cot_text:
        lines.append(f"model text: {result.cot_text}")
    return lines


class HunyuanImage3Generate:
    """Text to image, editing and multi-image fusion with the cached HunyuanImage-3 model."""

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "text")
    FUNCTION = "generate"
    CATEGORY = comfy_adapter.CATEGORY
    DESCRIPTION = (
        "Generates an image from a prompt with a HunyuanImage-3 model from one of the loaders. Instruct "
        "checkpoints also take reference images (1 = edit, 2-3 = fusion) and can think / rewrite the prompt "
        "first (bot_task); that text is the 'text' output."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        size = {"default": 1024, "min": CUSTOM_MIN, "max": CUSTOM_MAX, "step": 16}
        images = {
            name: ("IMAGE", {"tooltip": f"Instruct only: reference image {i} (1 image = edit, 2-{MAX_REFERENCE_IMAGES} "
                                        "= multi-image fusion; each frame of a batch counts as one image). The prompt "
                                        "can refer to them as image 1, image 2, ..."})
            for i, name in enumerate(IMAGE_INPUTS, 1)
        }
        return {
            "required": {
                "model": (comfy_adapter.MODEL_TYPE, {"tooltip": "From a HunyuanImage-3 loader."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "What the image shows, or (with reference images) what to change."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Same seed, same settings: same image (and the same model text)."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": MAX_STEPS,
                                  "tooltip": "Diffusion steps (base/Instruct: 50; Distil: 8)."}),
                "guidance_scale": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                             "tooltip": "Classifier-free guidance (base/Instruct: 5.0; Distil: 2.5)."}),
                "resolution": (resolution_choices(), {"default": "1024x1024",
                    "tooltip": "auto: the model picks the aspect ratio (the usual choice for edits). WIDTHxHEIGHT: "
                               "one of the model's buckets (base checkpoints lack 1280x720, 720x1280, 1024x768 and "
                               "768x1024 and render the nearest). custom: width/height, snapped by the model to its "
                               "nearest bucket (the node's text says which)."}),
                "width": ("INT", dict(size, tooltip="Used when resolution is 'custom'.")),
                "height": ("INT", dict(size, tooltip="Used when resolution is 'custom'.")),
            },
            "optional": {
                "use_checkpoint_defaults": ("BOOLEAN", {"default": False,
                    "tooltip": "Ignore steps/guidance_scale and use the checkpoint's generation_config."}),
                **images,
                "bot_task": (list(BOT_TASKS), {"default": "image",
                    "tooltip": "Instruct only. image: draw directly. think: reason about the request first. "
                               "recaption: rewrite the prompt first. think_recaption: both. The model's text is the "
                               "'text' output and shows in this node."}),
                "max_new_tokens": ("INT", {"default": DEFAULT_MAX_NEW_TOKENS, "min": 1, "max": MAX_NEW_TOKENS,
                    "tooltip": "Instruct, think/recaption: the most tokens of text before drawing (progress shows "
                               "tokens written of this; Cancel stops within one token)."}),
                "infer_align_image_size": ("BOOLEAN", {"default": True,
                    "tooltip": "Instruct with reference images: give the output the reference image's aspect ratio "
                               "when the model picks that ratio (as the official README recommends)."}),
                **step_cache_inputs(),
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
        bot_task: str = "image",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        infer_align_image_size: bool = True,
        step_cache: str = "off",
        **images: Any,
    ) -> dict[str, Any]:
        cache_knobs = {name: images.pop(name, None) for _, name, *_ in NODE_CACHE_KNOBS}
        references = [pil for name in IMAGE_INPUTS if images.get(name) is not None
                      for pil in image_tensor_to_pils(images[name])]
        request = GenerationRequest(
            prompt=prompt,
            seed=seed,
            steps=None if use_checkpoint_defaults else steps,
            guidance=None if use_checkpoint_defaults else guidance_scale,
            resolution=resolution,
            width=width,
            height=height,
            bot_task=bot_task,
            images=references,
            max_new_tokens=max_new_tokens,
            infer_align_image_size=infer_align_image_size,
            step_cache=settings_from(step_cache, cache_knobs),
        )
        # Per variant (guidance; base: no images, no text task), from config.json before any (re)load:
        # the loaders leave the load to this call, so a request that cannot run loads nothing.
        variant = checkpoint_variant(model.spec.path)
        check_request(request, variant)
        total = request.steps or variant.default_steps
        progress, preview = comfy_adapter.step_reporters(total)
        result = get_cache().generate(model, request, progress, comfy_adapter.cancel_check(),
                                      make_room=comfy_memory.make_room_on_gpu, preview=preview,
                                      load_progress=comfy_adapter.progress_callback(100))
        text = result.cot_text or ""
        return {"ui": {"text": result_text(result)}, "result": (result.image, text)}

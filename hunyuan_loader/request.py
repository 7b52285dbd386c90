"""What a generation asks for and what it returns, and the checks that need no model: the request's own
values (prompt, steps, guidance, sizes, reference images, text task) and what a checkpoint's variant allows
(read from its config.json). Below the cache and the load, so the input checks run before anything loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .core.choices import BOT_TASKS, DEFAULT_MAX_NEW_TOKENS  # noqa: F401 - part of this interface
from .core.errors import InputError
from .core.step_cache_settings import StepCacheSettings, check_settings
from .model.variants import Variant

CUSTOM_MIN, CUSTOM_MAX, CUSTOM_ALIGN = 256, 4096, 16
MAX_STEPS = 200
TEXT_TASKS = BOT_TASKS[1:]
MAX_REFERENCE_IMAGES = 3  # official README: multi-image fusion "up to 3 inputs"
MAX_NEW_TOKENS = 8192  # the official generation_config's max_length is 12,800 tokens in all



@dataclass
class GenerationRequest:
    """What to generate. steps/guidance None: the checkpoint's generation_config defaults."""

    prompt: str
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    resolution: str = "1024x1024"  # "auto", "WIDTHxHEIGHT" or "custom" (width/height); the model snaps both
    width: int = 1024
    height: int = 1024
    bot_task: str | None = None  # Instruct: one of BOT_TASKS (None = "image")
    images: list[Any] = field(default_factory=list)  # Instruct: PIL reference images (1 edit, 2+ fusion)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # Instruct: bound of the think / recaption text
    infer_align_image_size: bool = True  # Instruct with images: output in the reference image's aspect
    step_cache: StepCacheSettings = field(default_factory=StepCacheSettings)  # off: every step in full

    @property
    def text_task(self) -> bool:
        return self.bot_task in TEXT_TASKS


@dataclass
class GenerationResult:
    """A ComfyUI IMAGE ([1, H, W, 3] float32 in 0..1) and what happened on the way."""

    image: torch.Tensor
    seconds: float
    steps: int
    notes: list[str] = field(default_factory=list)
    cot_text: str | None = None  # the model's think / recaption text (Instruct), else None
    text_seconds: float = 0.0  # the text stage: from the call to the last text token (0: none ran)
    diffusion_seconds: float = 0.0  # the rest: image-stage inputs, the diffusion steps, the VAE decode
    text_tokens: int = 0  # tokens the text stage generated

    @property
    def width(self) -> int:
        return int(self.image.shape[2])

    @property
    def height(self) -> int:
        return int(self.image.shape[1])


def parse_size(text: str) -> tuple[int, int]:
    """'1280x768' -> (1280, 768) (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().replace(" ", "").split("x"))
    except ValueError:
        raise InputError(f"resolution '{text}' is not WIDTHxHEIGHT, 'auto' or 'custom'.") from None
    return w, h


def validate_request(req: GenerationRequest) -> None:
    """Raise InputError naming the problem and the fix."""
    if not req.prompt or not req.prompt.strip():
        raise InputError("The prompt is empty: describe the image you want in the prompt box.")
    if req.steps is not None and not 1 <= req.steps <= MAX_STEPS:
        raise InputError(f"steps must be between 1 and {MAX_STEPS} (got {req.steps}).")
    if req.guidance is not None and req.guidance < 0:
        raise InputError(f"guidance_scale must be 0 or more (got {req.guidance}).")
    check_settings(req.step_cache, req.steps)
    if req.bot_task is not None and req.bot_task not in BOT_TASKS:
        raise InputError(f"bot_task '{req.bot_task}' is not one of {', '.join(BOT_TASKS)}.")
    if not 1 <= req.max_new_tokens <= MAX_NEW_TOKENS:
        raise InputError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS} (got {req.max_new_tokens}).")
    if len(req.images) > MAX_REFERENCE_IMAGES:
        raise InputError(
            f"{len(req.images)} reference images were given; the Instruct model is made for 1 (edit) to "
            f"{MAX_REFERENCE_IMAGES} (multi-image fusion): connect at most {MAX_REFERENCE_IMAGES} (a batch counts "
            "one image per frame)."
        )
    from PIL import Image

    for i, image in enumerate(req.images, 1):
        if not isinstance(image, Image.Image):
            raise InputError(f"reference image {i} is a {type(image).__name__}, not an image.")
        if min(image.size) < 16:
            raise InputError(f"reference image {i} is {image.size[0]}x{image.size[1]}: use one of at least 16x16 px.")
    if req.resolution == "custom":
        for name, value in (("width", req.width), ("height", req.height)):
            if not CUSTOM_MIN <= value <= CUSTOM_MAX:
                raise InputError(f"{name} {value} is out of range: use {CUSTOM_MIN}..{CUSTOM_MAX} px.")
            if value % CUSTOM_ALIGN:
                lower = value // CUSTOM_ALIGN * CUSTOM_ALIGN
                raise InputError(
                    f"{name} {value} is not a multiple of {CUSTOM_ALIGN}: use {lower} or {lower + CUSTOM_ALIGN}."
                )
    elif req.resolution != "auto":
        parse_size(req.resolution)


def target_size(req: GenerationRequest) -> tuple[int, int] | None:
    """The (width, height) asked for, or None for 'auto' (the model picks)."""
    if req.resolution == "auto":
        return None
    if req.resolution == "custom":
        return req.width, req.height
    return parse_size(req.resolution)


def check_variant_request(variant: Variant, req: GenerationRequest) -> None:
    """What a checkpoint's variant allows, from config.json alone (so it runs before loading):
    guidance (base / Instruct: > 1), and reference images and text tasks (Instruct only)."""
    check_variant_guidance(variant, req.guidance if req.guidance is not None else variant.default_guidance)
    if variant.returns_tuple:  # Instruct / Instruct-Distil
        return
    if req.images:
        raise InputError(
            f"{variant.name} checkpoints take no reference images (editing and multi-image fusion need "
            "HunyuanImage-3.0-Instruct or -Instruct-Distil): disconnect the image inputs, or load an Instruct "
            "checkpoint."
        )
    if req.text_task:
        raise InputError(
            f"bot_task '{req.bot_task}' needs an Instruct checkpoint: {variant.name} checkpoints do not return "
            "the model's text. Use bot_task 'image', or load HunyuanImage-3.0-Instruct or -Instruct-Distil."
        )


def check_variant_guidance(variant: Variant, guidance: float) -> None:
    """check_guidance from the variant alone (read from config.json), so it can run before loading."""
    if guidance <= 1.0 and not variant.cfg_distilled:
        raise InputError(
            f"guidance_scale {guidance:g} does not work with {variant.name} checkpoints: their code "
            "always runs the conditional and unconditional halves together (classifier-free guidance) and "
            "fails at 1.0 or below. Use a value above 1.0 (1.01 is as good as no guidance; the default is "
            f"{variant.default_guidance:g})."
        )

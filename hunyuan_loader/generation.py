"""One text-to-image generation: inputs checked, memory planned, per-step progress and
cancel hooked into the diffusion scheduler, the PIL result turned into a ComfyUI IMAGE.

What the official code does and this module works around (each pinned by a test that cites it):
- sizes always snap to the model's buckets (no exact custom size): the memory plan and the
  node's text use the size the model's own image processor will render;
- base / Instruct always build two CFG rows and fail at guidance_scale <= 1: refused first;
- the think / recaption text samples on the global torch RNG: it is seeded from ``seed``
  inside a forked RNG state, so the same seed gives the same text and image.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..memory import stats
from .errors import InputError, OutOfMemoryError
from .placement import run_placement
from .spec import LoadedModel
from .variants import Variant

log = logging.getLogger(__name__)

CUSTOM_MIN, CUSTOM_MAX, CUSTOM_ALIGN = 256, 4096, 16
MAX_STEPS = 200

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], None]


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
    bot_task: str | None = None


@dataclass
class GenerationResult:
    """A ComfyUI IMAGE ([1, H, W, 3] float32 in 0..1) and what happened on the way."""

    image: torch.Tensor
    seconds: float
    steps: int
    notes: list[str] = field(default_factory=list)
    cot_text: str | None = None

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


AUTO_PLAN_SIZE = (1024, 1024)  # every bucket is ~1 MP: what "auto" is planned for


def planned_size(loaded: LoadedModel, req: GenerationRequest) -> tuple[int, int]:
    """The (width, height) the model will really render (its image processor snaps every size)."""
    from .resolution import rendered_size

    asked = target_size(req)
    return AUTO_PLAN_SIZE if asked is None else rendered_size(loaded.model, *asked)


def check_guidance(loaded: LoadedModel, guidance: float) -> None:
    """Base / Instruct fail at guidance_scale <= 1: their code always builds two CFG rows
    (official modeling_hunyuan_image_3.py:2732, hunyuan.py:2263) while the pipeline batches
    1 + (g > 1) latents (hunyuan_image_3_pipeline.py:776). Instruct-Distil embeds guidance."""
    check_variant_guidance(loaded.variant, guidance)


def check_variant_guidance(variant: Variant, guidance: float) -> None:
    """check_guidance from the variant alone (read from config.json), so it can run before loading."""
    if guidance <= 1.0 and not variant.cfg_distilled:
        raise InputError(
            f"guidance_scale {guidance:g} does not work with {variant.name} checkpoints: their code "
            "always runs the conditional and unconditional halves together (classifier-free guidance) and "
            "fails at 1.0 or below. Use a value above 1.0 (1.01 is as good as no guidance; the default is "
            f"{variant.default_guidance:g})."
        )


@contextlib.contextmanager
def seeded_rng(loaded: LoadedModel, seed: int) -> Iterator[None]:
    """Seed torch's global RNG (CPU and the model's GPU) for one call, then restore it: the model's
    think / recaption text samples on it (official modeling_hunyuan_image_3.py:2762 seeds only
    the diffusion generator), so without this the same seed gives different text and images."""
    devices = [loaded.device.index or 0] if loaded.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) % (2**63))
        yield


@contextlib.contextmanager
def step_hooks(model: Any, total: int, progress: ProgressFn | None, cancel: CancelFn | None) -> Iterator[list[int]]:
    """Report progress and check cancel once per diffusion step.

    generate_image calls its pipeline without a step callback, so we wrap the scheduler's
    step() on the instance for this call (the pipeline is built lazily: build it first).
    """
    scheduler = model.pipeline.scheduler
    original = scheduler.step
    done = [0]

    def step(*args: Any, **kwargs: Any) -> Any:
        if cancel is not None:
            cancel()
        out = original(*args, **kwargs)
        done[0] += 1
        if progress is not None:
            progress(done[0], total)
        return out

    scheduler.step = step
    try:
        yield done
    finally:
        if scheduler.__dict__.get("step") is step:
            del scheduler.step


@contextlib.contextmanager
def generation_settings(model: Any, steps: int, guidance: float) -> Iterator[None]:
    """Write steps/guidance into generation_config (the Instruct code ignores kwargs)."""
    cfg = model.generation_config
    saved = {k: getattr(cfg, k, None) for k in ("diff_infer_steps", "diff_guidance_scale")}
    cfg.diff_infer_steps, cfg.diff_guidance_scale = steps, guidance
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(cfg, key, value)


def pil_to_image_tensor(image: Any) -> torch.Tensor:
    """PIL image -> ComfyUI IMAGE [1, H, W, 3] float32 in 0..1."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0).contiguous()


def _call_model(
    loaded: LoadedModel, req: GenerationRequest, size: tuple[int, int] | None, steps: int, guidance: float
) -> tuple[Any, str | None]:
    model, variant = loaded.model, loaded.variant
    image_size = "auto" if size is None else f"{size[1]}x{size[0]}"  # image_size is HEIGHTxWIDTH
    kwargs: dict[str, Any] = dict(seed=req.seed, image_size=image_size)
    if req.bot_task:
        kwargs["bot_task"] = req.bot_task
    if variant.honours_step_kwargs:
        kwargs.update(diff_infer_steps=steps, diff_guidance_scale=guidance)
    with torch.inference_mode(), seeded_rng(loaded, req.seed):
        out = model.generate_image(prompt=req.prompt, **kwargs)
    if variant.returns_tuple:
        cot, images = out
        cot_text = "\n".join(cot) if isinstance(cot, list | tuple) else cot
        return images[0], cot_text
    return out, None


def generate(
    loaded: LoadedModel,
    req: GenerationRequest,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> GenerationResult:
    """Generate one image with the cached model. Raises InputError / OutOfMemoryError."""
    validate_request(req)
    steps = req.steps if req.steps is not None else loaded.variant.default_steps
    guidance = req.guidance if req.guidance is not None else loaded.variant.default_guidance
    check_guidance(loaded, guidance)
    if cancel is not None:
        cancel()
    asked = target_size(req)
    rendered = None if asked is None else planned_size(loaded, req)
    size = rendered or AUTO_PLAN_SIZE
    start = time.perf_counter()
    notes: list[str] = []
    retried = False
    while True:
        oom_message = None
        try:
            with run_placement(loaded, size, notes, extra_margin=retried), generation_settings(
                loaded.model, steps, guidance
            ), step_hooks(loaded.model, steps, progress, cancel):
                image, cot = _call_model(loaded, req, rendered, steps, guidance)
            break
        except torch.OutOfMemoryError as exc:
            oom_message = str(exc).splitlines()[0]
        # Outside the except block: the traceback (and the activations it holds) is gone.
        gc.collect()
        stats.release_cached_memory()
        if retried or loaded.residency is None:
            snap = stats.snapshot()
            raise OutOfMemoryError(
                f"Out of GPU memory at {size[0]}x{size[1]} ({oom_message}); "
                f"{snap.cuda_free / stats.GIB:.1f} GiB free of {snap.cuda_total / stats.GIB:.1f} GiB after "
                "streaming more weights. Choices: a lower resolution, the smart offload mode or a smaller "
                "VRAM budget, or the NF4 loader. The model stays loaded."
            )
        retried = True
        notes.append(f"Out of memory at {size[0]}x{size[1]}: retrying once with more weights streamed.")
        log.warning(notes[-1])
    result = GenerationResult(pil_to_image_tensor(image), time.perf_counter() - start, steps, notes, cot)
    if asked is not None and (result.width, result.height) != asked:
        notes.append(
            f"{asked[0]}x{asked[1]} is not one of this checkpoint's sizes: its code rendered the nearest "
            f"bucket, {result.width}x{result.height}."
        )
    log.info("generated %dx%d in %.1f s (%d steps)", result.width, result.height, result.seconds, steps)
    return result

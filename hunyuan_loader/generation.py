"""One text-to-image generation: inputs checked, memory planned, per-step progress and
cancel hooked into the diffusion scheduler, the PIL result turned into a ComfyUI IMAGE."""

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
    resolution: str = "1024x1024"  # "auto", "WIDTHxHEIGHT" (snapped to the model's buckets) or "custom"
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
    """The (width, height) the model will render, or None for 'auto' (the model picks)."""
    from .resolution import snap_to_bucket

    if req.resolution == "auto":
        return None
    if req.resolution == "custom":
        return req.width, req.height
    return snap_to_bucket(*parse_size(req.resolution))


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


def _image_size_arg(model: Any, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
    if req.resolution == "auto":
        return "auto", {}
    w, h = target_size(req)  # type: ignore[misc]
    exact = req.resolution == "custom" and getattr(model, "supports_exact_image_size", False)
    # Code that does not declare exact sizes gets no unknown kwarg: it snaps to its buckets
    # and generate() says so in the node's text.
    return f"{h}x{w}", ({"snap_resolution": False} if exact else {})  # image_size is HEIGHTxWIDTH


def _call_model(loaded: LoadedModel, req: GenerationRequest, steps: int, guidance: float) -> tuple[Any, str | None]:
    model, variant = loaded.model, loaded.variant
    image_size, extra = _image_size_arg(model, req)
    kwargs: dict[str, Any] = dict(seed=req.seed, image_size=image_size, **extra)
    if req.bot_task:
        kwargs["bot_task"] = req.bot_task
    if variant.honours_step_kwargs:
        kwargs.update(diff_infer_steps=steps, diff_guidance_scale=guidance)
    with torch.inference_mode():
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
    if cancel is not None:
        cancel()
    size = target_size(req) or (1024, 1024)
    start = time.perf_counter()
    notes: list[str] = []
    retried = False
    while True:
        oom_message = None
        try:
            with run_placement(loaded, size, notes, extra_margin=retried), generation_settings(
                loaded.model, steps, guidance
            ), step_hooks(loaded.model, steps, progress, cancel):
                image, cot = _call_model(loaded, req, steps, guidance)
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
    if req.resolution == "custom" and (result.width, result.height) != size:
        notes.append(
            f"This checkpoint's code snapped the custom size {size[0]}x{size[1]} to its bucket "
            f"{result.width}x{result.height}."
        )
    log.info("generated %dx%d in %.1f s (%d steps)", result.width, result.height, result.seconds, steps)
    return result

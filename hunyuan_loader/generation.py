"""One generation: inputs checked, memory planned, progress and cancel hooked into the text stage
(once per generated token) and the diffusion scheduler (once per step), the PIL result turned into a
ComfyUI IMAGE, the model's think / recaption text returned.

Instruct / Instruct-Distil take reference images (1 = edit, 2 or more = multi-image fusion; the
official README documents up to 3) and a ``bot_task`` (image, think, recaption, think_recaption):
the model writes text (its reasoning and / or a rewritten prompt) before it draws. Base checkpoints
take neither: refused before anything runs.

What the official code does and this module works around (each pinned by a test that cites it):
- sizes always snap to the model's buckets (no exact custom size): the memory plan and the
  node's text use the size the model's own image processor will render;
- base / Instruct always build two CFG rows and fail at guidance_scale <= 1: refused first;
- the think / recaption text samples on the global torch RNG: it is seeded from ``seed``
  inside a forked RNG state, so the same seed gives the same text and image;
- the text stage is transformers' generate, called with the extra kwargs of generate_image
  (official modeling_hunyuan_image_3.py generate_image -> self.generate(**model_inputs, **kwargs)):
  a StoppingCriteria passed as ``stopping_criteria`` runs once per generated token, which is where
  text progress and cancel hook in (nothing of the checkpoint's code is edited);
- reference images are planned for: their tokens (VAE tokens at the size the model's image
  processor snaps them to, plus its ViT tokens) enter the memory estimate and the OOM retry.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..memory import stats
from .core.errors import HunyuanError, InputError, NotEnoughRAMError, NotEnoughVRAMError, OutOfMemoryError
from .core.spec import LoadedModel
from .core.step_cache_settings import StepCacheSettings, check_settings
from .hooks.finite_output import NonFiniteOutput, check_finite, non_finite_error
from .hooks.registry import MethodWrap
from .hooks.standard import call_hooks
from .load.per_run import MakeRoom, run_placement
from .model.resolution import rendered_size
from .preview.stream import PreviewFn, PreviewStream
from .request import (  # noqa: F401 - re-exported: the request is part of this module's interface
    BOT_TASKS,
    CUSTOM_ALIGN,
    CUSTOM_MAX,
    CUSTOM_MIN,
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS,
    MAX_REFERENCE_IMAGES,
    MAX_STEPS,
    TEXT_TASKS,
    GenerationRequest,
    GenerationResult,
    check_variant_guidance,
    check_variant_request,
    parse_size,
    target_size,
    validate_request,
)

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], None]


AUTO_PLAN_SIZE = (1024, 1024)  # every bucket is ~1 MP: what "auto" is planned for


def planned_size(loaded: LoadedModel, req: GenerationRequest) -> tuple[int, int]:
    """The (width, height) the model will really render (its image processor snaps every size)."""
    asked = target_size(req)
    return AUTO_PLAN_SIZE if asked is None else rendered_size(loaded.model, *asked)


def check_guidance(loaded: LoadedModel, guidance: float) -> None:
    """Base / Instruct fail at guidance_scale <= 1: their code always builds two CFG rows
    (official modeling_hunyuan_image_3.py:2732, hunyuan.py:2263) while the pipeline batches
    1 + (g > 1) latents (hunyuan_image_3_pipeline.py:776). Instruct-Distil embeds guidance."""
    check_variant_guidance(loaded.variant, guidance)


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
def step_hooks(
    model: Any, total: int, progress: ProgressFn | None, cancel: CancelFn | None,
    previews: tuple[PreviewStream, PreviewFn] | None = None, *, cache: StepCacheSettings | None = None,
    notes: list[str] | None = None, text_stage: bool = False,
) -> Iterator[list[int]]:
    """Report progress and check cancel once per diffusion step; with ``previews`` (a stream and the
    reporter that takes the preview with the progress), the x0 preview of the step too; ``cache``:
    the step cache's settings (its count goes to ``notes``); ``text_stage``: the text stage's
    per-token entry is listed for the call. Every hook goes on in one call (hooks/standard.py).

    generate_image calls its pipeline without a step callback, so we wrap the scheduler's
    step() on the instance for this call (the pipeline is built lazily: build it first). The preview
    wrap goes on first, inside the progress wrap (HOOK_ORDER), so a step's preview is started before
    its progress is reported.
    """
    scheduler = model.pipeline.scheduler
    stream = None
    if previews is not None:  # the progress report carries the step's preview
        stream, report = previews
        progress = lambda done, steps: report(done, steps, stream.take())  # noqa: E731
    hook = _StepProgress(scheduler, total, progress, cancel)
    with call_hooks(model, scheduler, hook, preview=stream, cache=cache, steps=total, notes=notes,
                    text_stage=text_stage):
        yield hook.done


class _StepProgress(MethodWrap):
    """The hook registry's entry ``diffusion_progress``: ``scheduler.step`` wrapped on the instance."""

    def __init__(self, scheduler: Any, total: int, progress: ProgressFn | None, cancel: CancelFn | None) -> None:
        super().__init__(scheduler, "step")
        self.scheduler = scheduler
        self.done = [0]
        self._args = total, progress, cancel

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        total, progress, cancel = self._args
        done = self.done

        def step(*args: Any, **kwargs: Any) -> Any:
            if cancel is not None:
                cancel()
            out = original(*args, **kwargs)
            done[0] += 1
            check_finite(out, "latents", done[0])
            if progress is not None:
                progress(done[0], total)
            return out

        return step


@contextlib.contextmanager
def generation_settings(model: Any, steps: int, guidance: float, *, full_length: bool = False) -> Iterator[None]:
    """Write steps/guidance into generation_config (the Instruct code ignores kwargs).

    ``full_length`` (Instruct): for this call, let the input be as long as the model's positions
    (``config.max_position_embeddings``) where generation_config's ``max_length`` is shorter. The
    official code refuses a longer input (tokenization_hunyuan_image_3.py:1448-1452) and reads
    max_length only from generation_config; with the real sizes (12,800 vs 22,800) two or three
    reference images plus the system prompt, the text and the image already pass 12,800 tokens."""
    cfg = model.generation_config
    keys = ("diff_infer_steps", "diff_guidance_scale", "max_length")
    saved = {k: getattr(cfg, k, None) for k in keys}
    cfg.diff_infer_steps, cfg.diff_guidance_scale = steps, guidance
    positions = getattr(model.config, "max_position_embeddings", None)
    if full_length and positions and saved["max_length"] is not None and saved["max_length"] < positions:
        cfg.max_length = int(positions)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(cfg, key, value)


def pil_to_image_tensor(image: Any) -> torch.Tensor:
    """PIL image -> ComfyUI IMAGE [1, H, W, 3] float32 in 0..1."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0).contiguous()


def image_tensor_to_pils(image: torch.Tensor) -> list[Any]:
    """ComfyUI IMAGE [B, H, W, C] (0..1) -> one RGB PIL image per frame (a batch is several images)."""
    from PIL import Image

    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise InputError(f"an image input has shape {tuple(image.shape)}; expected a ComfyUI IMAGE [B, H, W, 3].")
    frames = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    out = []
    for frame in frames:
        frame = np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame[..., :3]
        out.append(Image.fromarray(np.ascontiguousarray(frame), mode="RGB"))
    return out


def open_reference_images(paths: list[str]) -> list[Any]:
    """Image files -> RGB PIL images (the CLI's --image); InputError naming the file and the problem."""
    import os

    from PIL import Image, UnidentifiedImageError

    if len(paths) > MAX_REFERENCE_IMAGES:
        raise InputError(
            f"{len(paths)} --image files were given; the Instruct model is made for 1 (edit) to "
            f"{MAX_REFERENCE_IMAGES} (multi-image fusion): give at most {MAX_REFERENCE_IMAGES}."
        )
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"--image {path}: no such file; give the path of a PNG, JPEG or WebP image.")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"--image {path}: not an image PIL can read ({exc.__class__.__name__}).") from None
    return images


def reference_image_tokens(model: Any, images: list[Any]) -> int:
    """Tokens the reference images add to one sequence, as the model's own image processor will
    build them (official image_processor.py get_image_with_size / vit_process_image): VAE tokens at
    the bucket ``vae_reso_group.get_target_size`` snaps each image to, plus ``vit_info.max_token_length``
    ViT tokens each. The estimator adds the per-image special tokens and the CFG doubling."""
    from ..memory.estimator import reference_image_tokens as count

    if not images:
        return 0
    proc = model.image_processor
    sizes = [tuple(int(v) for v in proc.vae_reso_group.get_target_size(*image.size)) for image in images]
    factors = (int(proc.vae_info.h_factor), int(proc.vae_info.w_factor))
    return count(sizes, vae_factors=factors, vit_tokens=int(proc.vit_info.max_token_length))


def extra_tokens(loaded: LoadedModel, req: GenerationRequest) -> int:
    """Tokens per sequence beyond the prompt and the target image: reference images, and the
    think / recaption text the image stage is conditioned on (at most max_new_tokens)."""
    if not loaded.variant.returns_tuple:
        return 0
    text = req.max_new_tokens if req.text_task else 0
    return reference_image_tokens(loaded.model, req.images) + text


@dataclass
class _TextStage:
    """What the text-stage hook saw: tokens generated, when the last one came."""

    tokens: int = 0
    last_token_at: float | None = None


def text_stage_criteria(
    stage: _TextStage, total: int | None, progress: ProgressFn | None, cancel: CancelFn | None
) -> Any:
    """A transformers StoppingCriteriaList whose hook runs once per generated token: it checks
    cancel (raising stops the text stage within one token), reports ``progress(tokens, total)``
    (``total`` None: no progress, e.g. the one-token ratio pick of "auto") and never stops the
    generation itself."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class TextStageHook(StoppingCriteria):
        def __init__(self) -> None:
            self.prompt_length: int | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            length = int(input_ids.shape[1])
            if self.prompt_length is None or length <= self.prompt_length:  # a new generate call
                self.prompt_length = length - 1
            stage.tokens = length - self.prompt_length
            stage.last_token_at = time.perf_counter()
            if cancel is not None:
                cancel()
            if progress is not None and total:
                progress(min(stage.tokens, total), total)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([TextStageHook()])


def _call_model(
    loaded: LoadedModel,
    req: GenerationRequest,
    size: tuple[int, int] | None,
    steps: int,
    guidance: float,
    stage: _TextStage,
    text_progress: ProgressFn | None,
    cancel: CancelFn | None,
) -> tuple[Any, str | None]:
    model, variant = loaded.model, loaded.variant
    image_size = "auto" if size is None else f"{size[1]}x{size[0]}"  # image_size is HEIGHTxWIDTH
    kwargs: dict[str, Any] = dict(seed=req.seed, image_size=image_size)
    if variant.returns_tuple:  # Instruct: images, task, text bound, and the per-token hook
        kwargs.update(bot_task=req.bot_task or "image", max_new_tokens=req.max_new_tokens)
        if req.images:
            kwargs.update(image=list(req.images), infer_align_image_size=req.infer_align_image_size)
        total = req.max_new_tokens if req.text_task else None
        kwargs["stopping_criteria"] = text_stage_criteria(stage, total, text_progress, cancel)
    elif req.bot_task:
        kwargs["bot_task"] = req.bot_task
    if variant.honours_step_kwargs:
        kwargs.update(diff_infer_steps=steps, diff_guidance_scale=guidance)
    with torch.inference_mode(), seeded_rng(loaded, req.seed):  # the per-token entry: step_hooks(text_stage=)
        try:
            out = model.generate_image(prompt=req.prompt, **kwargs)
        except ValueError as exc:
            message = str(exc)
            if "Expected a torch.device with a specified index" in message and loaded.device.type == "cpu":
                # The model's own MoE calls torch.cuda.set_device(hidden_states.device.index) (official
                # modeling_hunyuan_image_3.py:1173, hunyuan.py:1110): it cannot run on a CPU.
                raise InputError(
                    "moe_impl 'reference' runs the model's own MoE code, which needs a CUDA GPU (it calls "
                    "torch.cuda.set_device). On a CPU use moe_impl 'gather_scatter' (the default)."
                ) from None
            if message.startswith("Unknown ratio token id") and size is None:
                raise InputError(
                    f"The model's text stopped at max_new_tokens ({req.max_new_tokens}) before it chose the image's "
                    "aspect ratio (resolution 'auto'): raise max_new_tokens, or pick a resolution."
                ) from None
            too_long = re.match(r"Encoded token length (\d+) exceeds max_length (\d+)", message)
            if too_long:
                refs = f"{len(req.images)} reference image(s), " if req.images else ""
                raise InputError(
                    f"The model's input would be {too_long[1]} tokens ({refs}the prompt, the model's text and the "
                    f"image), more than it takes ({too_long[2]}): use fewer reference images, a lower max_new_tokens "
                    "or a smaller resolution."
                ) from None
            raise
    if variant.returns_tuple:
        cot, images = out
        cot_text = "\n".join(cot) if isinstance(cot, list | tuple) else cot
        return images[0], cot_text
    return out, None


def preview_projection(loaded: LoadedModel) -> Any:
    """The model's preview projection (fitted from its VAE on first use, hunyuan_loader/preview), or None
    when it cannot be had: previews are then off for this call, the image is made as usual."""
    from .preview.vae_fit import projection_for

    try:
        return projection_for(loaded.model)
    except torch.OutOfMemoryError:
        gc.collect()
        stats.release_cached_memory()
        log.warning("no previews for this image: the VAE ran out of memory fitting the preview projection")
    except Exception as exc:  # the preview is an extra: never the reason an image fails
        log.warning("no previews for this image: %s: %s", type(exc).__name__, exc)
    return None


RunPlacement = Callable[[tuple[int, int], list[str], bool, int], contextlib.AbstractContextManager]


def _out_of_memory(
    size: tuple[int, int], req: GenerationRequest, oom_message: str | None, retry_refused: Exception | None
) -> OutOfMemoryError:
    """The user's error after a CUDA out-of-memory that the one retry did not cure; it quotes CUDA's
    message (and why the retry could not place the run, when that is what failed)."""
    snap = stats.snapshot()
    refs = f" with {len(req.images)} reference image(s)" if req.images else ""
    retry = f" The retry could not place the run: {retry_refused}" if retry_refused is not None else ""
    return OutOfMemoryError(
        f"Out of GPU memory at {size[0]}x{size[1]}{refs} (CUDA: {oom_message}); "
        f"{snap.cuda_free / stats.GIB:.1f} GiB free of {snap.cuda_total / stats.GIB:.1f} GiB after "
        "streaming more weights. Choices: a lower resolution, fewer reference images, the smart offload "
        "mode or a smaller VRAM budget, or the NF4 loader; close other programs using the GPU. "
        f"The model stays loaded.{retry}"
    )


def generate(
    loaded: LoadedModel,
    req: GenerationRequest,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    text_progress: ProgressFn | None = None,
    placement: RunPlacement | None = None,
    preview: PreviewFn | None = None,
    preview_every: int = 1,
    make_room: MakeRoom | None = None,
) -> GenerationResult:
    """Generate one image with the cached model. Raises InputError / OutOfMemoryError.

    ``preview(step, steps, image)`` replaces ``progress`` for the diffusion steps: the same report, with
    a PIL preview of the image forming (None at most steps; at most one every ``preview_every`` steps),
    from the model's own VAE (hunyuan_loader/preview). The image is the same with or without it.

    ``progress(step, steps)`` follows the diffusion steps; ``text_progress(tokens, max_new_tokens)``
    the think / recaption text (default: ``progress``); ``cancel()`` is checked once per token and
    once per step (it raises to stop; the model stays usable). ``placement(size, notes, retried,
    extra_tokens)`` places each attempt (default: the offload policy's run placement, which first lets
    ``make_room(bytes)`` have ComfyUI's own models yield)."""
    if placement is None:
        cache_order = req.step_cache.order if req.step_cache is not None and req.step_cache.enabled else None

        def placement(size: tuple[int, int], notes: list[str], retried: bool, tokens: int):
            return run_placement(loaded, size, notes, extra_margin=retried, make_room=make_room, extra_tokens=tokens,
                                 step_cache_order=cache_order)

    validate_request(req)
    check_variant_request(loaded.variant, req)
    steps = req.steps if req.steps is not None else loaded.variant.default_steps
    guidance = req.guidance if req.guidance is not None else loaded.variant.default_guidance
    check_variant_guidance(loaded.variant, guidance)  # what check_guidance checks
    check_settings(req.step_cache, steps)
    if cancel is not None:
        cancel()
    asked = target_size(req)
    rendered = None if asked is None else rendered_size(loaded.model, *asked)  # as planned_size
    size = rendered or AUTO_PLAN_SIZE
    tokens = extra_tokens(loaded, req)
    start = time.perf_counter()
    projection = preview_projection(loaded) if preview is not None else None
    notes: list[str] = []
    retried = False
    oom_message = None  # CUDA's first line of the first out-of-memory error of this call
    while True:
        stage = _TextStage()
        call_start = time.perf_counter()
        retry_refused: HunyuanError | None = None
        try:
            with placement(size, notes, retried, tokens), generation_settings(
                loaded.model, steps, guidance, full_length=loaded.variant.returns_tuple
            ), step_hooks(loaded.model, steps, progress, cancel,
                          None if projection is None else (PreviewStream(projection, preview_every, steps), preview),
                          cache=req.step_cache, notes=notes, text_stage=loaded.variant.returns_tuple):
                image, cot = _call_model(
                    loaded, req, rendered, steps, guidance, stage, text_progress or progress, cancel
                )
            break
        except NonFiniteOutput as exc:
            raise non_finite_error(loaded.spec, exc) from None
        except torch.OutOfMemoryError as exc:
            oom_message = oom_message or str(exc).splitlines()[0]
        except (NotEnoughVRAMError, NotEnoughRAMError) as exc:
            if not retried:
                raise
            retry_refused = exc  # the retry's placement could not make room: report the OOM behind it
        # Outside the except block: the traceback (and the activations it holds) is gone.
        gc.collect()
        stats.release_cached_memory()
        if retried or loaded.residency is None:
            raise _out_of_memory(size, req, oom_message, retry_refused) from None
        retried = True
        notes.append(f"Out of memory at {size[0]}x{size[1]}: retrying once with more weights streamed.")
        log.warning("%s (%s)", notes[-1], oom_message)
    end = time.perf_counter()
    text_end = stage.last_token_at if (stage.tokens and req.text_task) else None
    result = GenerationResult(
        pil_to_image_tensor(image), end - start, steps, notes, cot,
        text_seconds=(text_end - call_start) if text_end else 0.0,
        diffusion_seconds=end - (text_end or call_start),
        text_tokens=stage.tokens if req.text_task else 0,
    )
    if asked is not None and (result.width, result.height) != asked:
        aligned = req.images and req.infer_align_image_size and loaded.variant.returns_tuple
        if aligned and (result.width, result.height) != rendered:
            notes.append(
                f"rendered {rendered[0]}x{rendered[1]}, then resized to {result.width}x{result.height}: the reference "
                "image's aspect ratio (infer_align_image_size)."
            )
        else:
            notes.append(
                f"{asked[0]}x{asked[1]} is not one of this checkpoint's sizes: its code rendered the nearest "
                f"bucket, {result.width}x{result.height}."
            )
    if req.text_task:
        log.info("text stage: %d tokens in %.1f s", result.text_tokens, result.text_seconds)
    log.info("generated %dx%d in %.1f s (%d steps)", result.width, result.height, result.seconds, steps)
    return result

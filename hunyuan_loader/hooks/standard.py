"""The hooks every loaded model gets, in one call: the loader's MoE dispatch, the remote-code fixes
and block streaming; and those one Generate call gets, in one call: the step preview, the step
progress, the decode's NaN/inf check, the step cache and the text stage's per-token entry (each a
named entry of the registry, which keeps their documented order whatever order they are installed
in: docs/hooks.md)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..core.step_cache_settings import StepCacheSettings
from ..preview.stream import PreviewStream, flow_x0
from .finite_output import DecodeCheck
from .moe_dispatch import install_moe_dispatch
from .needless_work import install_cache_end_once, install_rope_cache, last_logits
from .registry import Hook, MethodWrap, NamedOnly, registry
from .remote_code_fixes import (
    install_cache_kwarg_name,
    install_cpu_input_casts,
    install_mask_alignment,
    install_static_cache_init,
    install_vision_input_alignment,
    install_vit_return_tensors,
)
from .step_cache import step_cache
from .streaming import connect_streaming

log = logging.getLogger(__name__)


def install_load_hooks(model: nn.Module, moe_impl: str, device: torch.device, managers: Sequence[Any]) -> None:
    """What a load installs on the model once its weights are placed; ``managers``: the residency
    managers whose streamers the registry attaches from now on."""
    install_moe_dispatch(model, moe_impl)
    install_static_cache_init(model)
    install_cache_end_once(model)
    install_cache_kwarg_name(model)
    install_vit_return_tensors(model)
    install_rope_cache(model)
    install_mask_alignment(model)
    install_vision_input_alignment(model)
    if device.type == "cpu":
        install_cpu_input_casts(model)
    connect_streaming(model, managers)


def replica_hooks(moe_impl: str) -> Callable[[nn.Module], None]:
    """What a CFG-parallel decoder replica gets installed (the model's own come from install_load_hooks)."""
    return lambda decoder: install_moe_dispatch(decoder, moe_impl)


@contextlib.contextmanager
def call_hooks(
    model: Any, scheduler: Any, progress: Hook, *, preview: PreviewStream | None = None,
    cache: StepCacheSettings | None = None, steps: int = 0, notes: list[str] | None = None,
    text_stage: bool = False,
) -> Iterator[None]:
    """The hooks of one generate call, on for the ``with`` block and off after it: the x0 preview of
    each step into ``preview`` (its stream), ``progress`` (the diffusion_progress wrap of
    ``scheduler.step``), the NaN/inf check of the VAE decode (a bare decoder has no VAE), the step
    cache (``cache``, for ``steps`` steps; its count goes to ``notes``) and, with ``text_stage``, the
    per-token entry of the text stage's StoppingCriteria and the last position's logits only. Installed in that order, so the preview
    wrap sits inside the progress wrap (HOOK_ORDER) and a step's preview is started before its
    progress is reported; taken off in the reverse order."""
    check = DecodeCheck(model.vae) if getattr(model, "vae", None) is not None else None
    step_preview = StepPreview(scheduler, preview) if preview is not None else None
    reg = registry(model)
    with contextlib.ExitStack() as stack:
        if step_preview is not None:
            stack.enter_context(reg.active("diffusion_preview", step_preview))
        stack.enter_context(reg.active("diffusion_progress", progress))
        if check is not None:
            stack.enter_context(reg.active("finite_output", check))
        if cache is not None:
            stack.enter_context(step_cache(model, cache, steps, notes))
        if text_stage:
            stack.enter_context(reg.active("text_progress", NamedOnly()))
            head = last_logits(model)
            if head is not None:
                stack.enter_context(reg.active("last_logits", head))
        yield


class StepPreview(MethodWrap):
    """The hook registry's entry ``diffusion_preview``: ``scheduler.step`` wrapped on the instance for one
    call; after each step that is due, x0 goes to the stream. A failure turns previews off for the rest
    of the run (logged once) and never reaches the image."""

    def __init__(self, scheduler: Any, stream: PreviewStream) -> None:
        super().__init__(scheduler, "step")
        self.scheduler, self.stream = scheduler, stream
        self.steps = 0

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        scheduler, stream = self.scheduler, self.stream

        def step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.steps += 1
            if stream.due(self.steps):
                try:
                    model_output = kwargs["model_output"] if "model_output" in kwargs else args[0]
                    timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
                    sample = kwargs["sample"] if "sample" in kwargs else args[2]
                    stream.submit(self.steps, flow_x0(scheduler, model_output, timestep, sample))
                except Exception as exc:  # a preview must never cost the image
                    stream.failed = True
                    log.warning("previews stopped: %s: %s", type(exc).__name__, exc)
            return out

        return step

"""The offload policy per Generate: make room (ComfyUI's own models first), estimate the inference
memory of the target size and stream just enough extra blocks for that run (INT8 auto-switch above
1.2 MP, a bigger margin on an OOM retry). Load time is placement.py's; both read the LoadSpec.
Path of a Generate: node -> cache.generate -> generation.generate -> run_placement (each attempt) -> residency.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from ...memory import stats
from ...memory.estimator import estimate_inference_gb, megapixels
from ...memory.residency.planner import InsufficientVRAMError, Placement, ResidencyPlan
from ...memory.residency.protocol import Residency
from ..core.spec import LoadedModel, LoadSpec

log = logging.getLogger(__name__)

AUTO_SWITCH_MP = 1.2
OOM_RETRY_FACTOR = 1.5
MakeRoom = Callable[[int], Any]  # asks other users of the GPU (ComfyUI's models) to free N bytes


def needs_auto_switch(spec: LoadSpec, width: int, height: int) -> bool:
    """INT8 with offload disabled above 1.2 MP switches to smart offload for that run."""
    return spec.quant == "int8" and spec.offload == "disabled" and megapixels(width, height) > AUTO_SWITCH_MP


def inference_bytes(loaded: LoadedModel, width: int, height: int, extra_tokens: int = 0,
                    step_cache_order: int | None = None) -> int:
    """Estimated activation memory of one run at this size, for the active MoE implementation;
    ``extra_tokens`` per CFG half: reference images, think / recaption text (generation.extra_tokens);
    ``step_cache_order``: the step cache's order when it is on; plus the grouped W8A16 experts'
    workspace where they run that way (moe_grouped.workspace_bytes)."""
    from ..hooks.moe_dispatch import active_moe_impl
    from ..hooks.moe_grouped import workspace_bytes

    impl = active_moe_impl(loaded.model)
    gb = estimate_inference_gb(width, height, config=loaded.model.config, moe_impl=impl, extra_tokens=extra_tokens,
                               step_cache_order=step_cache_order)
    workspace = workspace_bytes(loaded.model) if impl == "gather_scatter" else 0
    return int(gb * stats.GIB) + workspace


@contextlib.contextmanager
def run_placement(
    loaded: LoadedModel,
    size: tuple[int, int],
    notes: list[str],
    *,
    extra_margin: bool = False,
    make_room: MakeRoom | None = None,
    extra_tokens: int = 0,
    step_cache_order: int | None = None,
) -> Iterator[None]:
    """For one run: make room (``make_room(bytes)``: ComfyUI's own models yield first), then
    stream just enough extra blocks that the inference memory fits; restore after the run."""
    width, height = size
    switch = needs_auto_switch(loaded.spec, width, height)
    manager: Residency | None = loaded.residency
    mp = megapixels(width, height)
    if manager is None:
        if switch:
            notes.append(
                f"INT8 at {mp:.2f} MP (> {AUTO_SWITCH_MP} MP): smart offload for this run; "
                "no GPU in use, so no weights had to move."
            )
        yield
        return
    need = inference_bytes(loaded, width, height, extra_tokens, step_cache_order) * (
        OOM_RETRY_FACTOR if extra_margin else 1.0)
    if make_room is not None:
        make_room(int(need))
    available, extra = manager.extra_needed(int(need), notes)  # each device of a model on several
    if not (switch or extra):
        yield
        return
    before = manager.plan.streamed_bytes if manager.plan is not None else 0
    with contextlib.ExitStack() as stack:
        short = ""
        try:
            plan = stack.enter_context(manager.stream_extra(extra))
        except InsufficientVRAMError:
            plan = stack.enter_context(_stream_every_block(manager))
            short = " (every block streamed and still short of the estimate: this run may run out of memory)"
        tokens_text = f" with {extra_tokens} reference-image / text tokens" if extra_tokens else ""
        text = (
            f"needs ~{need / stats.GIB:.1f} GiB for activations at {width}x{height}{tokens_text} "
            f"({available / stats.GIB:.1f} GiB free); streaming {(plan.streamed_bytes - before) / stats.GIB:.2f} GiB "
            f"more of weights ({len(plan.streamed)} of {len(plan.placements)} blocks) for this run{short}"
        )
        if switch:
            text = f"INT8 at {mp:.2f} MP (> {AUTO_SWITCH_MP} MP): smart offload for this run: " + text
        notes.append(text + ".")
        log.warning(notes[-1])
        yield


@contextlib.contextmanager
def _stream_every_block(manager: Any) -> Iterator[Any]:
    """The most VRAM the weights can give back without parking: stream all blocks for one run."""
    previous = manager.plan
    plan = ResidencyPlan.uniform(
        Placement.STREAM, manager.block_bytes, manager.other_bytes, prefetch_slots=manager.prefetch_slots
    )
    manager.apply(plan)
    try:
        yield plan
    finally:
        manager.apply(previous)

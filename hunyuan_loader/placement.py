"""Turns a LoadSpec and a target resolution into weight placement on the GPU.

The residency engine (memory/residency) executes plans; this module decides them from
the user's inputs: the loader's offload mode / VRAM budget at load time, and per run the
inference memory the estimator predicts for the target size (INT8 auto-switch above 1.2 MP,
streaming extra blocks when a resolution would not fit, a bigger margin on an OOM retry).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from ..memory import stats
from ..memory.estimator import estimate_inference_gb, megapixels
from ..memory.residency.planner import InsufficientVRAMError
from .spec import LoadedModel, LoadSpec

log = logging.getLogger(__name__)

AUTO_SWITCH_MP = 1.2
OOM_RETRY_FACTOR = 1.5


def decoder_blocks(model: Any) -> torch.nn.ModuleList:
    """model.model.layers of HunyuanImage3ForCausalMM."""
    return model.model.layers


def default_headroom_gb(model: Any) -> float:
    """Inference headroom for 1 MP with the active MoE implementation."""
    from .moe_dispatch import active_moe_impl

    return estimate_inference_gb(1024, 1024, config=model.config, moe_impl=active_moe_impl(model))


def place_for_spec(model: Any, spec: LoadSpec, device: torch.device) -> Any:
    """Create the model's ResidencyManager and apply the load-time plan.

    disabled: every block on the GPU. smart: the free VRAM is the budget. budget: the
    user's vram_budget_gb. Both keep the inference headroom (default: the 1 MP estimate).
    """
    from ..memory.residency import place_loaded_model

    budget_bytes = None
    headroom_gb = spec.headroom_gb if spec.headroom_gb is not None else default_headroom_gb(model)
    if spec.offload != "disabled":
        budget_bytes = (
            int(spec.vram_budget_gb * stats.GIB) if spec.vram_budget_gb is not None else stats.usable_vram()
        )
    manager = place_loaded_model(
        model, decoder_blocks(model), device, budget_bytes=budget_bytes, headroom_bytes=int(headroom_gb * stats.GIB)
    )
    log.info("placement for %s: %s", spec.describe(), manager.plan.describe())
    return manager


# Weight bytes on the GPU per bf16 byte on disk (int8: 1 byte + row scales; nf4: 4 bits +
# absmax; the unquantized router, shared expert, VAE and embeddings keep these above 0.5 / 0.25).
GPU_BYTES_PER_DISK_BYTE = {"bf16": 1.0, "int8": 0.52, "nf4": 0.30}


def load_gpu_bytes(spec: LoadSpec, disk_bytes: int) -> int:
    """Weight bytes a load of ``spec`` will put on the GPU (before the first run)."""
    weights = int(disk_bytes * GPU_BYTES_PER_DISK_BYTE[spec.quant])
    if spec.offload == "budget" and spec.vram_budget_gb is not None:
        return min(weights, int(spec.vram_budget_gb * stats.GIB))
    return weights


def needs_auto_switch(spec: LoadSpec, width: int, height: int) -> bool:
    """INT8 with offload disabled above 1.2 MP switches to smart offload for that run."""
    return spec.quant == "int8" and spec.offload == "disabled" and megapixels(width, height) > AUTO_SWITCH_MP


def inference_bytes(loaded: LoadedModel, width: int, height: int) -> int:
    """Estimated activation memory of one run at this size, for the active MoE implementation."""
    from .moe_dispatch import active_moe_impl

    gb = estimate_inference_gb(width, height, config=loaded.model.config, moe_impl=active_moe_impl(loaded.model))
    return int(gb * stats.GIB)


@contextlib.contextmanager
def run_placement(
    loaded: LoadedModel, size: tuple[int, int], notes: list[str], *, extra_margin: bool = False
) -> Iterator[None]:
    """For one run: stream just enough extra blocks that the inference memory fits; restore after."""
    width, height = size
    switch = needs_auto_switch(loaded.spec, width, height)
    manager = loaded.residency
    mp = megapixels(width, height)
    if manager is None:
        if switch:
            notes.append(
                f"INT8 at {mp:.2f} MP (> {AUTO_SWITCH_MP} MP): smart offload for this run; "
                "no GPU in use, so no weights had to move."
            )
        yield
        return
    need = inference_bytes(loaded, width, height) * (OOM_RETRY_FACTOR if extra_margin else 1.0)
    available = stats.usable_vram()
    extra = int(max(0.0, need - available))
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
        text = (
            f"needs ~{need / stats.GIB:.1f} GiB for activations at {width}x{height} "
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
    from ..memory.residency import Placement, ResidencyPlan

    previous = manager.plan
    plan = ResidencyPlan.uniform(
        Placement.STREAM, manager.block_bytes, manager.other_bytes, prefetch_slots=manager.prefetch_slots
    )
    manager.apply(plan)
    try:
        yield plan
    finally:
        manager.apply(previous)

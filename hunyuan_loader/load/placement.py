"""The offload policy at load time: where a LoadSpec's offload mode and budget put the model.

The residency engine (memory/residency) executes plans; this module decides them before any
weight is read (``plan_load``, one device; ``multi_gpu.plan_load_on_devices``, several): which
decoder blocks stay on the GPU and which stream from pinned RAM, refusing, with the numbers and
the choices, a plan whose VRAM (the planners) or host RAM (``check_load_ram``, after either) the
machine does not have. The plan is a
``LoadPlacement``, which the load pipeline reads, places and adopts the same way for one device
or several (``adopt.adopt``). Run time (each Generate) is per_run.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...memory import stats
from ...memory.estimator import estimate_inference_gb
from ...memory.residency.planner import InsufficientVRAMError, Placement, ResidencyPlan, plan_placement
from ..core import settings
from ..core.errors import NotEnoughRAMError, NotEnoughVRAMError
from ..core.spec import LoadSpec

log = logging.getLogger(__name__)

RAM_LIMIT_ENV = settings.RAM_LIMIT_GB
MIN_STREAMED_ENV = settings.MIN_STREAMED_BLOCKS  # tests and benches: stream at least this many blocks
RAM_MARGIN_BYTES = stats.GIB  # kept free for the process itself


def decoder_blocks(model: Any) -> torch.nn.ModuleList:
    """model.model.layers of HunyuanImage3ForCausalMM."""
    return model.model.layers


def uses_accelerate(spec: LoadSpec) -> bool:
    """Offload mode 'accelerate': transformers' device_map="auto" (what other packs do), no residency."""
    return spec.offload == "accelerate"


def accelerate_kwargs(spec: LoadSpec, device: torch.device) -> dict[str, Any]:
    """from_pretrained kwargs of the 'accelerate' mode: device_map auto within the budget."""
    budget_gb = spec.vram_budget_gb or torch.cuda.mem_get_info()[1] / stats.GIB * 0.85
    return {"device_map": "auto", "max_memory": {device.index or 0: int(budget_gb * stats.GIB), "cpu": "2000GiB"}}


def budget_bytes(spec: LoadSpec, usable: int | None = None) -> int | None:
    """The load-time VRAM budget: None (disabled: everything resident), the user's (budget) or
    the usable VRAM (smart: ``usable``, else what is usable now)."""
    if spec.offload == "disabled":
        return None
    if spec.vram_budget_gb is not None:
        return int(spec.vram_budget_gb * stats.GIB)
    return stats.usable_vram() if usable is None else usable


def headroom_bytes(spec: LoadSpec, config: Any) -> int:
    """Activation memory kept free: the user's, else the 1 MP estimate for the MoE implementation."""
    if spec.headroom_gb is not None:
        return int(spec.headroom_gb * stats.GIB)
    return int(estimate_inference_gb(1024, 1024, config=config, moe_impl=spec.moe_impl) * stats.GIB)


def available_ram() -> int:
    """Host RAM a load may use: what the OS reports available, capped by HUNYUAN_RAM_LIMIT_GB
    (act as if the machine had only this much; tests and trying a smaller box's plan)."""
    from ...memory.residency.ram import available_ram as os_available

    return within_ram_limit(os_available())


def within_ram_limit(avail: int) -> int:
    """``avail`` bytes, capped by HUNYUAN_RAM_LIMIT_GB when it is set."""
    limit = settings.get(RAM_LIMIT_ENV)
    return min(avail, int(limit * stats.GIB)) if limit is not None else avail


def min_streamed_blocks() -> int:
    """HUNYUAN_MIN_STREAMED_BLOCKS: with offload smart/budget, stream at least this many blocks
    (a small model would otherwise never stream: two streaming slots cost as much as two blocks)."""
    return settings.get(MIN_STREAMED_ENV)


def _gib(n: float) -> str:
    return f"{n / stats.GIB:.1f} GiB"


@dataclass(frozen=True)
class LoadPlacement:
    """Where a load puts the model, decided before any weight is read: on one device, or (the
    fields after ``staging_bytes``, set by ``multi_gpu.plan_load_on_devices``) on several."""

    device: torch.device  # the first device: the non-block parts (and every block on one device)
    plan: ResidencyPlan | None  # over all blocks; None: no residency manager (a CPU device: everything in RAM)
    ram_bytes: int  # host RAM the loaded model keeps: pinned streamed blocks (CPU device: all of it)
    staging_bytes: int  # the reader's ring while loading
    layout: str = "one"  # how the residency is built (adopt.py): "one", "split" or "cfg_parallel"
    devices: tuple[torch.device, ...] = ()  # every device used, ``device`` first (empty: ``device`` alone)
    block_devices: tuple[torch.device, ...] | None = None  # each block's device (None: ``device``)
    split: Any = None  # a split's memory.devices.SplitPlan: each device's run of blocks and its plan

    @property
    def streamed(self) -> list[int]:
        return [] if self.plan is None else self.plan.streamed

    def describe(self) -> str:
        where = self.plan.describe() if self.plan is not None else f"all weights on {self.device}"
        return f"{where}; RAM {_gib(self.ram_bytes)} kept + {_gib(self.staging_bytes)} staging"


def plan_load(
    spec: LoadSpec,
    block_bytes: Sequence[int],
    other_bytes: int,
    device: torch.device,
    config: Any,
    *,
    staging_bytes: int = 0,
    vram_usable: int | None = None,
    log_plan: bool = True,
) -> LoadPlacement:
    """Decide the placement from sizes and budget; raise NotEnoughVRAMError (with the numbers and the
    choices) when the GPU cannot hold it. Reads no weight. ``vram_usable``: the VRAM to plan with
    (default: what is usable now). Whether the host RAM holds it is the next step's (``check_load_ram``)."""
    total = int(other_bytes) + sum(int(b) for b in block_bytes)
    if device.type != "cuda":
        placement = LoadPlacement(device, None, total, staging_bytes)
    else:
        budget = budget_bytes(spec, vram_usable)
        if budget is not None:
            headroom = headroom_bytes(spec, config)
            try:
                plan = plan_placement(list(block_bytes), int(other_bytes), budget, headroom,
                                      min_streamed=min(min_streamed_blocks(), len(block_bytes)))
            except InsufficientVRAMError as exc:
                raise NotEnoughVRAMError(
                    f"{exc} Choices: a larger vram_budget_gb, a smaller inference_headroom_gb, or the "
                    "NF4 / INT8 loaders, whose weights are 4x / 2x smaller."
                ) from None
        else:
            plan = ResidencyPlan.uniform(Placement.GPU, list(block_bytes), int(other_bytes))
            usable = stats.usable_vram() if vram_usable is None else vram_usable
            if plan.gpu_weight_bytes > usable:
                raise NotEnoughVRAMError(
                    f"{spec.describe()} needs {_gib(plan.gpu_weight_bytes)} of VRAM for its weights but "
                    f"{_gib(usable)} is usable. Choices: offload_mode smart (streams the blocks that do not "
                    "fit from RAM), or the NF4 / INT8 loaders, whose weights are 4x / 2x smaller."
                )
        placement = LoadPlacement(device, plan, plan.streamed_bytes, staging_bytes)
    if log_plan:
        log.info("load plan for %s: %s", spec.describe(), placement.describe())
    return placement


def check_load_ram(spec: LoadSpec, placement: LoadPlacement, ram_available: int | None = None) -> None:
    """Refuse, before any read, a placement (of either planner) whose host RAM the machine does not
    have: ``ram_available`` bytes (default: ``available_ram()``)."""
    need = placement.ram_bytes + placement.staging_bytes + RAM_MARGIN_BYTES
    avail = available_ram() if ram_available is None else int(ram_available)
    if need <= avail:
        return
    if placement.plan is None:
        what = "all weights live in RAM on a machine without a CUDA GPU"
        choices = "the NF4 or INT8 loader (4x / 2x smaller), or more RAM"
    else:
        what = f"{len(placement.plan.streamed)} of {len(placement.plan.placements)} blocks stream from pinned RAM"
        choices = ("the NF4 loader (4x smaller blocks) or INT8 (2x), a larger VRAM budget (fewer blocks "
                   "stream), or closing programs that use RAM")
    raise NotEnoughRAMError(
        f"Not enough RAM to load {spec.describe()}: {what}, which needs {_gib(need)} "
        f"({_gib(placement.ram_bytes)} of weights + {_gib(placement.staging_bytes)} read buffer + "
        f"{_gib(RAM_MARGIN_BYTES)} margin) but {_gib(avail)} is available. Nothing was read. "
        f"Choices: {choices}."
    )


def adopt_load(model: Any, placement: LoadPlacement, packed: Mapping[int, Any]) -> Any:
    """After a block-order load: a ResidencyManager that owns the placed blocks (resident ones on
    the GPU, streamed ones already in their pinned buffers ``packed``), with the planned placement
    re-counted on the real tensor sizes. None on a CPU device."""
    if placement.plan is None:
        return None
    from ...memory.residency.manager import ResidencyManager

    planned = placement.plan

    def recounted(mgr: Any) -> ResidencyPlan:
        plan = ResidencyPlan(planned.placements, tuple(mgr.block_bytes), mgr.other_bytes, planned.prefetch_slots,
                             planned.budget_bytes, planned.headroom_bytes)
        if planned.budget_bytes is not None and plan.gpu_bytes > planned.budget_bytes:
            log.warning("placed weights are %s larger than planned from the headers (%s > budget %s)",
                        _gib(plan.gpu_weight_bytes - planned.gpu_weight_bytes), _gib(plan.gpu_bytes),
                        _gib(planned.budget_bytes))
        return plan

    return ResidencyManager.adopt(model, decoder_blocks(model), placement.device, packed, recounted)


def place_for_spec(model: Any, spec: LoadSpec, device: torch.device, moe_impl: str) -> Any:
    """Today's path (from_pretrained on the CPU, then placement): create the model's
    ResidencyManager and apply the load-time plan (disabled: every block on the GPU; smart: the
    usable VRAM is the budget; budget: the user's; both keep the inference headroom, by default
    the 1 MP estimate for ``moe_impl``, the model's active MoE implementation)."""
    from ...memory.residency.manager import ResidencyManager

    headroom_gb = (spec.headroom_gb if spec.headroom_gb is not None
                   else estimate_inference_gb(1024, 1024, config=model.config, moe_impl=moe_impl))
    budget = budget_bytes(spec)
    try:
        manager = ResidencyManager(model, decoder_blocks(model), device)
        if budget is None:
            plan = ResidencyPlan.uniform(Placement.GPU, manager.block_bytes, manager.other_bytes)
        else:
            plan = manager.plan_for_budget(budget, int(headroom_gb * stats.GIB),
                                           min_streamed=min(min_streamed_blocks(), len(manager.block_bytes)))
        manager.apply(plan)
    except InsufficientVRAMError as exc:
        raise NotEnoughVRAMError(
            f"{exc} Choices: a larger vram_budget_gb, a smaller inference_headroom_gb, or the "
            "NF4 / INT8 loaders, whose weights are 4x / 2x smaller."
        ) from None
    log.info("placement for %s: %s", spec.describe(), manager.plan.describe())
    return manager


def load_gpu_bytes(spec: LoadSpec, disk_bytes: int, *, pre_quantized: bool = False) -> int:
    """Weight bytes a load of ``spec`` will put on the GPU (before the first run): the BF16 bytes on
    disk times its weight format's ``disk_ratio`` (formats/registry.py); a pre-quantized checkpoint
    is on disk as it will be on the GPU."""
    from ..formats.registry import for_load  # the built-ins are registered: pipeline imports formats.builtin

    weights = int(disk_bytes * (1.0 if pre_quantized else for_load(spec.quant, spec.int8_format).disk_ratio))
    if spec.offload == "budget" and spec.vram_budget_gb is not None:
        return min(weights, int(spec.vram_budget_gb * stats.GIB))
    return weights

"""The offload policy: the ONE place that reads a LoadSpec's offload mode and budget.

The residency engine (memory/residency) executes plans; this module decides them, for both
load time and run time:
- load time (``plan_load``): from the checkpoint's header sizes, before any weight is read,
  which decoder blocks stay on the GPU and which stream from pinned RAM; refuses, with the
  numbers and the choices, a plan whose VRAM or host RAM the machine does not have.
  ``adopt_load`` hands the loaded blocks to a ResidencyManager;
- run time (``run_placement``): per Generate, make room (ComfyUI's own models first), estimate
  the inference memory of the target size and stream just enough extra blocks for that run
  (INT8 auto-switch above 1.2 MP, a bigger margin on an OOM retry).
Path of a Generate: node -> cache.prepare_run -> run_placement -> residency, each once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...memory import stats
from ...memory.estimator import estimate_inference_gb, megapixels
from ...memory.residency.planner import InsufficientVRAMError, Placement, ResidencyPlan, plan_placement
from ..core.errors import NotEnoughRAMError, NotEnoughVRAMError
from ..core.spec import LoadedModel, LoadSpec

log = logging.getLogger(__name__)

AUTO_SWITCH_MP = 1.2
OOM_RETRY_FACTOR = 1.5
RAM_LIMIT_ENV = "HUNYUAN_RAM_LIMIT_GB"
MIN_STREAMED_ENV = "HUNYUAN_MIN_STREAMED_BLOCKS"  # tests and benches: stream at least this many blocks
RAM_MARGIN_BYTES = stats.GIB  # kept free for the process itself
MakeRoom = Callable[[int], Any]  # asks other users of the GPU (ComfyUI's models) to free N bytes


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


def budget_bytes(spec: LoadSpec) -> int | None:
    """The load-time VRAM budget: None (disabled: everything resident), the user's (budget) or
    the usable VRAM now (smart)."""
    if spec.offload == "disabled":
        return None
    return int(spec.vram_budget_gb * stats.GIB) if spec.vram_budget_gb is not None else stats.usable_vram()


def headroom_bytes(spec: LoadSpec, config: Any) -> int:
    """Activation memory kept free: the user's, else the 1 MP estimate for the MoE implementation."""
    if spec.headroom_gb is not None:
        return int(spec.headroom_gb * stats.GIB)
    return int(estimate_inference_gb(1024, 1024, config=config, moe_impl=spec.moe_impl) * stats.GIB)


def default_headroom_gb(model: Any) -> float:
    """Inference headroom for 1 MP with the model's active MoE implementation."""
    from ..hooks.moe_dispatch import active_moe_impl

    return estimate_inference_gb(1024, 1024, config=model.config, moe_impl=active_moe_impl(model))


def available_ram() -> int:
    """Host RAM a load may use: what the OS reports available, capped by HUNYUAN_RAM_LIMIT_GB
    (act as if the machine had only this much; tests and trying a smaller box's plan)."""
    from ...memory.residency.ram import available_ram as os_available

    avail = os_available()
    limit = os.environ.get(RAM_LIMIT_ENV, "").strip()
    return min(avail, int(float(limit) * stats.GIB)) if limit else avail


def min_streamed_blocks() -> int:
    """HUNYUAN_MIN_STREAMED_BLOCKS: with offload smart/budget, stream at least this many blocks
    (a small model would otherwise never stream: two streaming slots cost as much as two blocks)."""
    value = os.environ.get(MIN_STREAMED_ENV, "").strip()
    return max(0, int(value)) if value else 0


def _gib(n: float) -> str:
    return f"{n / stats.GIB:.1f} GiB"


@dataclass(frozen=True)
class LoadPlacement:
    """Where a load puts the model, decided before any weight is read."""

    device: torch.device
    plan: ResidencyPlan | None  # None: no residency manager (a CPU device: everything in RAM)
    ram_bytes: int  # host RAM the loaded model keeps: pinned streamed blocks (CPU device: all of it)
    staging_bytes: int  # the reader's ring while loading

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
    ram_available: int | None = None,
    vram_usable: int | None = None,
) -> LoadPlacement:
    """Decide the placement from sizes and budget; raise NotEnoughVRAMError / NotEnoughRAMError
    (with the numbers and the choices) when the machine cannot hold it. Reads no weight."""
    total = int(other_bytes) + sum(int(b) for b in block_bytes)
    if device.type != "cuda":
        placement = LoadPlacement(device, None, total, staging_bytes)
    else:
        headroom = headroom_bytes(spec, config)
        budget = budget_bytes(spec)
        if budget is None:
            plan = ResidencyPlan.uniform(Placement.GPU, list(block_bytes), int(other_bytes))
            usable = stats.usable_vram() if vram_usable is None else vram_usable
            if plan.gpu_weight_bytes > usable:
                raise NotEnoughVRAMError(
                    f"{spec.describe()} needs {_gib(plan.gpu_weight_bytes)} of VRAM for its weights but "
                    f"{_gib(usable)} is usable. Choices: offload_mode smart (streams the blocks that do not "
                    "fit from RAM), or the NF4 / INT8 loaders, whose weights are 4x / 2x smaller."
                )
        else:
            try:
                plan = plan_placement(list(block_bytes), int(other_bytes), budget, headroom,
                                      min_streamed=min(min_streamed_blocks(), len(block_bytes)))
            except InsufficientVRAMError as exc:
                raise NotEnoughVRAMError(
                    f"{exc} Choices: a larger vram_budget_gb, a smaller inference_headroom_gb, or the "
                    "NF4 / INT8 loaders, whose weights are 4x / 2x smaller."
                ) from None
        placement = LoadPlacement(device, plan, plan.streamed_bytes, staging_bytes)
    check_load_ram(spec, placement, ram_available)
    log.info("load plan for %s: %s", spec.describe(), placement.describe())
    return placement


def check_load_ram(spec: LoadSpec, placement: LoadPlacement, ram_available: int | None = None) -> None:
    """Refuse, before any read, a placement whose host RAM the machine does not have."""
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
    from ...memory.residency import ResidencyManager

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


def place_for_spec(model: Any, spec: LoadSpec, device: torch.device) -> Any:
    """Today's path (from_pretrained on the CPU, then placement): create the model's
    ResidencyManager and apply the load-time plan (disabled: every block on the GPU; smart: the
    usable VRAM is the budget; budget: the user's; both keep the inference headroom)."""
    from ...memory.residency import ResidencyManager

    headroom_gb = spec.headroom_gb if spec.headroom_gb is not None else default_headroom_gb(model)
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


# Weight bytes on the GPU per bf16 byte on disk (int8: 1 byte + row scales; nf4: 4 bits +
# absmax; the unquantized router, shared expert, VAE and embeddings keep these above 0.5 / 0.25).
GPU_BYTES_PER_DISK_BYTE = {"bf16": 1.0, "int8": 0.52, "nf4": 0.30}


def load_gpu_bytes(spec: LoadSpec, disk_bytes: int, *, pre_quantized: bool = False) -> int:
    """Weight bytes a load of ``spec`` will put on the GPU (before the first run); a
    pre-quantized checkpoint is on disk as it will be on the GPU."""
    weights = int(disk_bytes * (1.0 if pre_quantized else GPU_BYTES_PER_DISK_BYTE.get(spec.quant, 0.52)))
    if spec.offload == "budget" and spec.vram_budget_gb is not None:
        return min(weights, int(spec.vram_budget_gb * stats.GIB))
    return weights


def needs_auto_switch(spec: LoadSpec, width: int, height: int) -> bool:
    """INT8 with offload disabled above 1.2 MP switches to smart offload for that run."""
    return spec.quant == "int8" and spec.offload == "disabled" and megapixels(width, height) > AUTO_SWITCH_MP


def inference_bytes(loaded: LoadedModel, width: int, height: int, extra_tokens: int = 0) -> int:
    """Estimated activation memory of one run at this size, for the active MoE implementation;
    ``extra_tokens`` per CFG half: reference images, think / recaption text (generation.extra_tokens);
    plus the grouped W8A16 experts' workspace where they run that way (moe_grouped.workspace_bytes)."""
    from ..hooks.moe_dispatch import active_moe_impl
    from ..hooks.moe_grouped import workspace_bytes

    impl = active_moe_impl(loaded.model)
    gb = estimate_inference_gb(width, height, config=loaded.model.config, moe_impl=impl, extra_tokens=extra_tokens)
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
) -> Iterator[None]:
    """For one run: make room (``make_room(bytes)``: ComfyUI's own models yield first), then
    stream just enough extra blocks that the inference memory fits; restore after the run."""
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
    need = inference_bytes(loaded, width, height, extra_tokens) * (OOM_RETRY_FACTOR if extra_margin else 1.0)
    if make_room is not None:
        make_room(int(need))
    available = stats.usable_vram()
    extra = int(max(0.0, need - available))
    if hasattr(manager, "extra_needed"):  # issue 13 hook: a model on several GPUs checks each (multi_gpu.py)
        available, extra = manager.extra_needed(int(need), notes)
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

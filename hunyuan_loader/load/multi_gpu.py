"""One model on several GPUs: the loaders' ``devices`` and ``multi_gpu`` inputs, and the load on them.

- ``devices``: "auto" (every visible GPU, the current one first) or a list such as
  "cuda:0,cuda:1", checked against the machine before anything loads (``resolve_devices``).
- ``multi_gpu``: auto | split | cfg_parallel | off (``memory.devices.choose_mode``): auto runs the
  CFG halves in parallel when every GPU holds the model with nothing streamed (and the checkpoint
  has CFG rows), keeps the model on the first GPU when it fits there, and splits it otherwise.
- ``plan_load_on_devices``: the load plan for those devices, a ``placement.LoadPlacement`` that the
  one load pipeline (pipeline.py) reads, places and adopts (adopt.py) as it does for one device.
  split: each decoder block is read straight to its GPU (the non-block parts to the first),
  streamed blocks to pinned RAM; ``split_exec.SplitExecution`` moves the activations at the
  boundaries. cfg_parallel: the model on the first GPU, a replica of the decoder on each other
  (``cfg_parallel.CfgParallelResidency``).

``HUNYUAN_LOGICAL_DEVICES=1`` also accepts "cpu" and a GPU named twice ("cuda:0,cuda:0": two
logical parts on one card): for the tests and the one-GPU benchmark, never needed by a user.
The Budget loader's ``vram_budget_gb`` applies to each GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...memory import devices as dv
from ...memory.residency.planner import InsufficientVRAMError, ResidencyPlan
from ..core.devices import (  # noqa: F401 - part of this module's interface
    LOGICAL_ENV,
    default_device,
    handled_here,
    logical_devices_allowed,
    normalise_devices,
    parse_devices,
    primary_device,
    resolve_devices,
)
from ..core.errors import InputError, NotEnoughVRAMError
from .placement import LoadPlacement

log = logging.getLogger(__name__)

MODES = dv.MODES
CPU_ROOM = 1 << 50  # a logical CPU "device" (tests): no memory limit


# -- the plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MultiPlan:
    """What a load on several devices does."""

    mode: str  # "split" (also one device: "off") or "cfg_parallel"
    devices: tuple[torch.device, ...]  # the devices used, the first holding the non-block parts
    reason: str
    split: dv.SplitPlan | None = None
    cfg_plan: ResidencyPlan | None = None

    def describe(self) -> str:
        if self.mode == "cfg_parallel" and self.cfg_plan is not None:
            text = f"CFG-parallel over {', '.join(map(str, self.devices))}"
            if self.cfg_plan.streamed:
                text += f" ({len(self.cfg_plan.streamed)} blocks streamed on each)"
        elif self.split is not None:
            text = self.split.describe()
        else:
            text = self.mode
        return f"{text} ({self.reason})"


def device_room(spec: Any, device: torch.device) -> int:
    """Bytes weights and activations may use on ``device``: the budget (per GPU), else what is free."""
    if device.type != "cuda":
        return CPU_ROOM
    if spec.offload == "budget" and spec.vram_budget_gb is not None:
        return int(spec.vram_budget_gb * dv.GIB)
    return dv.usable_vram(device)


def _headrooms(spec: Any, config: Any) -> tuple[int, int]:
    """Activation headroom of the full batch (a split runs both rows on every device) and of one row
    (a CFG-parallel replica): the user's, else the 1 MP estimate."""
    from ...memory.estimator import estimate_inference_gb

    if spec.headroom_gb is not None:
        full = int(spec.headroom_gb * dv.GIB)
        return full, full
    est = [estimate_inference_gb(1024, 1024, config=config, moe_impl=spec.moe_impl, cfg=cfg) for cfg in (True, False)]
    return int(est[0] * dv.GIB), int(est[1] * dv.GIB)


def plan_devices(
    spec: Any,
    block_bytes: Sequence[int],
    other_bytes: int,
    config: Any,
    *,
    devices: Sequence[torch.device],
    replica_other_bytes: int | None = None,
    replicable: bool = True,
    rooms: Sequence[int] | None = None,
) -> MultiPlan:
    """Choose the mode and the placement (NotEnoughVRAMError / InputError with the numbers and the
    choices). ``replicable``: the weight format can be copied to a replica (not bitsandbytes);
    ``devices``: the spec's, resolved (``resolve_devices``); ``rooms`` default to what each has free
    (or the budget)."""
    found = list(devices)
    names = [str(d) for d in found]
    rooms = list(rooms) if rooms is not None else [device_room(spec, d) for d in found]
    gpu_rooms = [r for d, r in zip(found, rooms) if d.type == "cuda"]
    if gpu_rooms:  # a logical CPU part beside GPUs (tests) counts as one more card of the same size
        rooms = [r if d.type == "cuda" else max(gpu_rooms) for d, r in zip(found, rooms)]
    allow = spec.offload != "disabled"
    full, half = _headrooms(spec, config)
    distilled = bool(getattr(config, "cfg_distilled", False) or getattr(config, "use_meanflow", False))

    def split_over(n: int, streaming: bool) -> dv.SplitPlan:
        return dv.plan_split(block_bytes, other_bytes, names[:n], rooms[:n], full, allow_streaming=streaming)

    try:
        split_over(1, False)
        single_resident = True
    except InsufficientVRAMError:
        single_resident = False
    cfg_kwargs = dict(replica_other_bytes=replica_other_bytes)
    cfg_resident = cfg_any = None
    if replicable and len(found) > 1:
        cfg_resident = dv.plan_cfg_parallel(block_bytes, other_bytes, rooms, half, allow_streaming=False, **cfg_kwargs)
        cfg_any = cfg_resident or dv.plan_cfg_parallel(block_bytes, other_bytes, rooms, half,
                                                       allow_streaming=allow, **cfg_kwargs)
    try:
        choice = dv.choose_mode(spec.multi_gpu, len(found), cfg_batch=not distilled,
                                single_fits_resident=single_resident, cfg_fits_resident=cfg_resident is not None,
                                cfg_fits=cfg_any is not None)
    except ValueError as exc:
        extra = "" if replicable else " (and its weight format, bitsandbytes, cannot be replicated: use BF16 or INT8 w8a16)"
        raise InputError(f"multi_gpu cfg_parallel cannot run on {', '.join(names)}: {exc}{extra}. "
                         "Use multi_gpu auto or split.") from None
    if choice.mode == "cfg_parallel":
        return MultiPlan("cfg_parallel", tuple(found), choice.reason, cfg_plan=cfg_any)
    n = 1 if choice.mode == "off" else len(found)
    try:
        split = split_over(n, allow)
    except InsufficientVRAMError as exc:
        where = names[0] if n == 1 else f"{n} GPUs ({', '.join(names)})"
        choices = ("offload_mode smart (streams the blocks that do not fit from RAM), " if not allow else
                   "a larger vram_budget_gb, a smaller inference_headroom_gb, ")
        raise NotEnoughVRAMError(
            f"{spec.describe()} does not fit {where}: {exc} Choices: {choices}more GPUs in devices, or the "
            "NF4 / INT8 loaders, whose weights are 4x / 2x smaller."
        ) from None
    return MultiPlan("split", tuple(found[:n]), choice.reason, split=split)


# -- the load on several devices -----------------------------------------------------------------
def _replica_other_bytes(sk: Any, units: Sequence[Any]) -> int:
    """Non-block bytes a decoder replica carries (model.wte, model.ln_f), from the headers."""
    from .blocks import placed_nbytes

    return sum(placed_nbytes(sk, e) for u in units if u.block is None for e in u.entries
               if e.name.startswith("model."))


def plan_load_on_devices(
    spec: Any,
    sk: Any,
    units: Sequence[Any],
    block_bytes: Sequence[int],
    other_bytes: int,
    *,
    devices: Sequence[torch.device],
    replicable: bool = True,
    staging_bytes: int = 0,
) -> LoadPlacement:
    """``placement.plan_load`` for the spec's ``devices`` (several, or one that is not the current;
    resolved by ``resolve_devices``): the mode and each device's plan (``plan_devices``), as a
    LoadPlacement the load pipeline checks (``check_load_ram``), reads, places and adopts like a
    one-device one; refused (VRAM) before any read. ``replicable``: the weight format's (whether CFG
    replicas can copy its modules)."""
    replica_other = _replica_other_bytes(sk, units)
    mp = plan_devices(spec, block_bytes, other_bytes, sk.config, replicable=replicable,
                      replica_other_bytes=replica_other, devices=devices)
    log.info("load plan for %s: %s", spec.describe(), mp.describe())
    return placement_of(mp, block_bytes, other_bytes, staging_bytes=staging_bytes)


def placement_of(
    mp: MultiPlan,
    block_bytes: Sequence[int],
    other_bytes: int,
    *,
    staging_bytes: int = 0,
) -> LoadPlacement:
    """A multi-device plan as the LoadPlacement the pipeline follows."""
    primary = mp.devices[0]
    if mp.mode == "cfg_parallel":
        plan = mp.cfg_plan
        assert plan is not None
        placement = LoadPlacement(primary, plan, plan.streamed_bytes, staging_bytes, layout="cfg_parallel",
                                  devices=mp.devices)
    else:
        split = mp.split
        assert split is not None
        whole = ResidencyPlan(split.placements, tuple(int(b) for b in block_bytes), int(other_bytes))
        placement = LoadPlacement(primary, whole, split.streamed_bytes, staging_bytes, layout="split",
                                  devices=mp.devices, block_devices=tuple(torch.device(d) for d in split.block_devices),
                                  split=split)
    return placement

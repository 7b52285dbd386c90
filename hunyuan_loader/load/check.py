"""What a loader checks at once, before the model is built or any weight is read.

The loader nodes return a handle after this check (cache.ModelHandle); the weights load when
Generate first needs them, after Generate's own checks passed with the variant read here. So a
request that can never run (a reference image on a base checkpoint, a folder without config.json,
bitsandbytes missing, a plan this machine cannot hold) fails in seconds, not after minutes of
loading.

The memory plan here is made against this machine's capacity (each GPU's whole memory, within
HUNYUAN_VRAM_LIMIT_GB; all of its RAM, within HUNYUAN_RAM_LIMIT_GB): the most room a load could
ever get, because the load itself first asks ComfyUI's models (and a cached model of another spec)
to give their memory back. What this check refuses, the load would refuse too; what other programs
hold at the time is checked again when the weights load (pipeline.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil
import torch

from ...memory import stats
from ..checkpoint.inspection import inspect_for_load
from ..checkpoint.layout import TensorEntry, load_units
from ..checkpoint.validate import CheckpointInfo
from ..core.devices import handled_here, primary_device, resolve_devices
from ..core.spec import LoadSpec
from ..core.units import aligned
from ..formats.quantization import ROUTER_SUFFIX, is_quantizable
from ..formats.registry import WeightFormat
from ..model.variants import Variant
from . import multi_gpu
from .blocks import gpu_staging_bytes, header_nbytes
from .placement import LoadPlacement, check_load_ram, plan_load, uses_accelerate, within_ram_limit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadCheck:
    """What the check found: the folder, its variant, and the plan at this machine's capacity
    (None for offload mode accelerate, which plans with accelerate's own device map)."""

    info: CheckpointInfo
    variant: Variant
    placement: LoadPlacement | None


def check_load(spec: LoadSpec) -> LoadCheck:
    """Everything about loading ``spec`` that can be known without building the model or reading a
    weight: the load's own inspection (checkpoint/inspection.py: the folder and its config.json, the
    headers, the model code's imports, the weight format, the variant) and the memory plan. Raises the
    load's own errors (CheckpointError, DependencyError, NotEnoughVRAMError, NotEnoughRAMError, InputError)."""
    found = inspect_for_load(spec.path, spec.quant, spec.int8_format)
    placement = None if uses_accelerate(spec) else plan_at_capacity(
        spec, found.info, found.layout, found.weight_format, found.pre_quantized)
    log.info("checked %s (%s): %s; the weights load at the first Generate", spec.describe(), found.variant.name,
             placement.describe() if placement is not None else "placed by accelerate")
    return LoadCheck(found.info, found.variant, placement)


def placed_bytes(entry: TensorEntry, fmt: WeightFormat, quantizes: bool) -> int:
    """Bytes one checkpoint tensor takes once placed, from its header: as the load plans it before the
    skeleton (``header_nbytes``) when nothing is quantized; else the format's size model where the skip
    rules quantize (formats/quantization.py), bf16 elsewhere (a router float32)."""
    if not quantizes:
        return header_nbytes(entry)
    module, _, leaf = entry.name.rpartition(".")
    if leaf == "weight" and len(entry.shape) == 2 and is_quantizable(module):
        return fmt.placed_bytes(entry.shape, entry.dtype.itemsize, True)
    if entry.dtype.is_floating_point and entry.dtype.itemsize > 1:
        itemsize = 4 if module.endswith(ROUTER_SUFFIX) else 2
        return aligned(entry.nbytes // entry.dtype.itemsize * itemsize)
    return aligned(entry.nbytes)


def header_sizes(layout: dict[str, TensorEntry], fmt: WeightFormat, quantizes: bool) -> tuple[list[int], int, int]:
    """(placed bytes of each decoder block, of the non-block parts, of those a CFG replica carries
    (``model.*``)), from the headers (``placed_bytes``)."""
    units = load_units(layout)
    block_bytes = [0] * (1 + max((u.block for u in units if u.block is not None), default=-1))
    other_bytes = replica_other = 0
    for u in units:
        sizes = [placed_bytes(e, fmt, quantizes) for e in u.entries]
        if u.block is None:
            other_bytes = sum(sizes)
            replica_other = sum(n for e, n in zip(u.entries, sizes) if e.name.startswith("model."))
        else:
            block_bytes[u.block] = sum(sizes)
    return block_bytes, other_bytes, replica_other


def capacity_vram(device: torch.device) -> int:
    """All of a GPU's memory, within HUNYUAN_VRAM_LIMIT_GB (0 for a CPU)."""
    if device.type != "cuda":
        return 0
    total = int(torch.cuda.mem_get_info(device)[1])
    limit = stats.vram_limit_bytes()
    return min(total, limit) if limit is not None else total


def capacity_ram() -> int:
    """All of this machine's RAM, within HUNYUAN_RAM_LIMIT_GB."""
    return within_ram_limit(int(psutil.virtual_memory().total))


def plan_at_capacity(spec: LoadSpec, info: CheckpointInfo, layout: dict[str, TensorEntry], fmt: WeightFormat,
                     pre_quantized: bool) -> LoadPlacement:
    """The load plan from the headers with this machine's whole memory as the room: the load's own
    planners (``placement.plan_load``, ``multi_gpu.plan_devices``) and RAM check, raising as they do."""
    block_bytes, other_bytes, replica_other = header_sizes(layout, fmt, fmt.quantized and not pre_quantized)
    device = primary_device(spec)
    staging = gpu_staging_bytes(layout) if device.type == "cuda" else 0
    if not handled_here(spec):
        placement = plan_load(spec, block_bytes, other_bytes, device, info.config, staging_bytes=staging,
                              vram_usable=capacity_vram(device), log_plan=False)
    else:
        devices = resolve_devices(spec.devices)
        rooms = [_room(spec, d) for d in devices]
        mp = multi_gpu.plan_devices(spec, block_bytes, other_bytes, info.config, replicable=fmt.replicable,
                                    replica_other_bytes=replica_other, devices=devices, rooms=rooms)
        placement = multi_gpu.placement_of(mp, block_bytes, other_bytes, staging_bytes=staging)
    check_load_ram(spec, placement, capacity_ram())
    return placement


def _room(spec: LoadSpec, device: torch.device) -> int:
    """A device's room in a multi-GPU plan at capacity: the budget when one is set, else its memory."""
    if device.type == "cuda" and spec.offload == "budget" and spec.vram_budget_gb is not None:
        return int(spec.vram_budget_gb * stats.GIB)
    return capacity_vram(device) if device.type == "cuda" else multi_gpu.CPU_ROOM

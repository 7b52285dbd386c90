"""Weight residency: which decoder blocks live on the GPU, which stream, which are parked.

Why our own offload: accelerate's hooks copy every tensor synchronously from unpinned
memory with no prefetch (~690 ms added per 5 GB block on an H200, bench/offload.py); a block
streamed from one flat pinned buffer on a side CUDA stream, prefetched while the previous block
computes, costs 91 ms, 1.01x its copy at 55.3 GB/s (README, Measured). bnb layers also need
their quantization state carried by hand.

Public API
----------
weights (``weights.py``)
    ``weight_tensors(module_or_modules, *, recurse=True) -> list[WeightTensor]`` every
    distinct tensor (params, buffers, Int8Params.CB/SCB, Linear8bitLt.state.CB/SCB,
    Params4bit.quant_state absmax/code/offset/state2) with all references to it.
    ``module_weight_bytes(module) -> int``;
    ``move_module_weights(module, device, *, pin=False, non_blocking=False) -> int`` moves
    it all bit-exactly without ``module.to()``.
planning (``planner.py``)
    ``plan_placement(block_bytes, other_bytes, budget_bytes, headroom_bytes, *,
    prefetch_slots=2, min_streamed=0) -> ResidencyPlan`` streams the fewest blocks,
    spread evenly over the depth; raises ``InsufficientVRAMError`` with the numbers.
    ``ResidencyPlan``: ``placements`` (``Placement.GPU | STREAM | CPU``), ``resident``,
    ``streamed``, ``gpu_weight_bytes``, ``gpu_bytes``, ``slot_bytes``, ``describe()``.
streaming (``streaming.py``)
    ``BlockStreamer(blocks, packed, device, n_slots)``: forward hooks that copy each
    streamed block's flat pinned buffer into a reusable GPU slot on a copy stream,
    one block ahead, with events; bit-identical output. ``StreamingUnavailableError``.
    ``set_parts(idx, parts, wanted)`` / ``fetch(idx, ids)``: a small forward copies the block's
    base plus the parts it fetches (a MoE block's experts); ``copies``, ``part_copies``,
    ``copied_bytes`` count what moved.
parts (``parts.py``)
    ``block_parts(packed, block, groups) -> (BlockParts | None, why)``: a packed block's buffer
    split into a base and one byte range set per group (expert); shared tensors stay in the base.
manager (``manager.py``)
    ``ResidencyManager(model, blocks, device, *, prefetch_slots=2)`` with
    ``apply(plan)``, ``plan_for_budget(budget_bytes, headroom_bytes)``,
    ``stream_extra(bytes_needed)`` (context manager: one run with more blocks streamed),
    ``park(pin=True, available_ram_bytes=None) -> ParkReport`` (soft unload, RAM checked
    first, GPU release verified), ``restore() -> seconds``, ``state`` (``ResidencyState``),
    ``gpu_bytes()``, ``close()``.
    ``place_loaded_model(model, blocks, device, *, budget_bytes=None, headroom_bytes=0,
    plan=None, prefetch_slots=2, available_ram_bytes=None) -> ResidencyManager`` for the
    loader: after a CPU (mmap) load, resident parts go to the GPU and streamed blocks
    straight into pinned RAM. ``InsufficientRAMError`` when CPU RAM is short (nothing moved).
protocol (``protocol.py``)
    ``Residency``: what the cache, the offload policy and the unload nodes call on a model's
    residency, one device (``ResidencyManager``), a split (``multi.MultiDeviceResidency``) or
    CFG-parallel replicas alike (``extra_needed``, ``gpu_bytes_by_device``, ``managers``, ...).
"""

from __future__ import annotations

from .manager import ResidencyManager, place_loaded_model
from .packed import HostBuffer, PackedBlock
from .planner import InsufficientVRAMError, Placement, ResidencyPlan, evenly_spaced, plan_placement
from .protocol import ParkReport, Residency, ResidencyState
from .ram import InsufficientRAMError, available_ram, check_ram
from .streaming import BlockStreamer, StreamingUnavailableError
from .weights import (
    TensorRef,
    WeightTensor,
    module_weight_bytes,
    move_module_weights,
    move_weight_tensors,
    normalize_bnb_state,
    weight_tensors,
)

__all__ = [
    "BlockStreamer",
    "HostBuffer",
    "InsufficientRAMError",
    "InsufficientVRAMError",
    "PackedBlock",
    "ParkReport",
    "Placement",
    "Residency",
    "ResidencyManager",
    "ResidencyPlan",
    "ResidencyState",
    "StreamingUnavailableError",
    "TensorRef",
    "WeightTensor",
    "available_ram",
    "check_ram",
    "evenly_spaced",
    "module_weight_bytes",
    "move_module_weights",
    "move_weight_tensors",
    "normalize_bnb_state",
    "place_loaded_model",
    "plan_placement",
    "weight_tensors",
]

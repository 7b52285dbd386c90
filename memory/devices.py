"""Several GPUs: what each device can hold, and where the decoder blocks go.

Planning is pure (sizes in, plans out, no CUDA call), so the CPU tests plan 1, 2 and 4 cards of
24-96 GB with the real model's block sizes:

- ``plan_split``: the decoder blocks in contiguous runs, one run per device, the non-block parts
  on the first device. When the devices together hold every block, the runs are sized in
  proportion to each device's room (every card keeps the same share free), nothing streams and
  the only cost is one activation copy per device boundary. When they do not, the other devices
  are filled and ONE device streams the rest from pinned RAM through its slots (one set of
  slots: the fewest blocks streamed); which one is chosen by the fewest bytes streamed.
- ``plan_cfg_parallel``: one placement every device can hold with a replica of the decoder
  (the conditional and unconditional halves of each step run on different devices), or None.
- ``choose_mode``: what ``multi_gpu="auto"`` picks from those plans.

Readings (``usable_vram``, ``allocated_by_device``) take an explicit device: ``memory.stats``
reads only the current one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..hunyuan_loader.core import settings
from ..hunyuan_loader.core.devices import MODES
from ..hunyuan_loader.core.units import GIB
from .residency.planner import InsufficientVRAMError, Placement, ResidencyPlan, evenly_spaced, plan_placement

VRAM_LIMIT_ENV = settings.VRAM_LIMIT_GB


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


# -- readings -------------------------------------------------------------------------------------
def usable_vram(device: torch.device | str) -> int:
    """Bytes new allocations on ``device`` can still get: free plus the allocator's cached free
    blocks, capped by HUNYUAN_VRAM_LIMIT_GB (which then applies to each GPU). 0 for a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    free, _total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    usable = free + torch.cuda.memory_reserved(device) - allocated
    limit = settings.get(VRAM_LIMIT_ENV)
    if limit is not None:
        usable = min(usable, int(limit * GIB) - allocated)
    return max(0, int(usable))


def allocated_by_device() -> dict[str, int]:
    """torch.cuda.memory_allocated of every visible GPU ({} without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": int(torch.cuda.memory_allocated(i)) for i in range(torch.cuda.device_count())}


def describe_allocated_change(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """One line per GPU: allocated before -> after (Force Unload's report on several GPUs)."""
    return [
        f"{dev}: {before.get(dev, 0) / GIB:.2f} -> {after.get(dev, 0) / GIB:.2f} GiB allocated"
        for dev in sorted(set(before) | set(after))
    ]


# -- split ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitPlan:
    """Decoder blocks over several devices: a contiguous run each, and each run's residency plan."""

    devices: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]  # [start, stop) of each device's blocks, in block order
    plans: tuple[ResidencyPlan, ...]  # one per device over its run (the first holds the other parts)

    def __post_init__(self) -> None:
        if not (len(self.devices) == len(self.ranges) == len(self.plans)):
            raise ValueError("devices, ranges and plans differ in length")
        pos = 0
        for (start, stop), plan in zip(self.ranges, self.plans):
            if start != pos or stop < start or len(plan.placements) != stop - start:
                raise ValueError(f"ranges {self.ranges} are not contiguous runs matching their plans")
            pos = stop

    @property
    def n_blocks(self) -> int:
        return self.ranges[-1][1] if self.ranges else 0

    def device_index(self, block: int) -> int:
        for d, (start, stop) in enumerate(self.ranges):
            if start <= block < stop:
                return d
        raise IndexError(f"block {block} is not in the plan ({self.n_blocks} blocks)")

    @property
    def block_devices(self) -> list[str]:
        return [self.devices[d] for d, (a, b) in enumerate(self.ranges) for _ in range(a, b)]

    @property
    def placements(self) -> tuple[Placement, ...]:
        return tuple(p for plan in self.plans for p in plan.placements)

    @property
    def streamed(self) -> list[int]:
        return [start + i for (start, _), plan in zip(self.ranges, self.plans) for i in plan.streamed]

    @property
    def streamed_bytes(self) -> int:
        return sum(plan.streamed_bytes for plan in self.plans)

    @property
    def gpu_bytes_by_device(self) -> list[int]:
        """Weights, slots and activation headroom each device needs."""
        return [plan.gpu_bytes for plan in self.plans]

    @property
    def gpu_weight_bytes_by_device(self) -> list[int]:
        return [plan.gpu_weight_bytes for plan in self.plans]

    def describe(self) -> str:
        parts = []
        for dev, (start, stop), plan in zip(self.devices, self.ranges, self.plans):
            if stop == start:
                parts.append(f"{dev}: no blocks" + (" (non-block parts)" if plan.other_bytes else ""))
                continue
            text = f"{dev}: blocks {start}-{stop - 1}"
            if plan.streamed:
                text += f" ({len(plan.streamed)} streamed)"
            parts.append(text + f", {_gib(plan.gpu_weight_bytes)} of weights")
        streamed = f"; {len(self.streamed)} blocks ({_gib(self.streamed_bytes)}) stream from pinned RAM" \
            if self.streamed else "; nothing streams"
        return "split over " + ", ".join(parts) + streamed


def _per_device(value: int | Sequence[int], n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def _proportional_runs(sizes: Sequence[int], caps: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous runs whose bytes are in proportion to ``caps`` (a block goes where its middle falls)."""
    total, room = sum(sizes), sum(max(0, c) for c in caps)
    ends, acc = [], 0.0
    for c in caps:
        acc += max(0, c) / room * total if room else 0.0
        ends.append(acc)
    runs, d, start, pos = [], 0, 0, 0.0
    for i, s in enumerate(sizes):
        while d < len(caps) - 1 and pos + s / 2 > ends[d]:
            runs.append((start, i))
            start, d = i, d + 1
        pos += s
    runs.append((start, len(sizes)))
    while len(runs) < len(caps):
        runs.append((len(sizes), len(sizes)))
    return runs


def _greedy_runs(sizes: Sequence[int], caps: Sequence[int]) -> list[tuple[int, int]]:
    """Fill the devices in order; the last takes what is left."""
    runs, start = [], 0
    for d, cap in enumerate(caps):
        stop, used = start, 0
        if d == len(caps) - 1:
            stop = len(sizes)
        else:
            while stop < len(sizes) and used + sizes[stop] <= cap:
                used += sizes[stop]
                stop += 1
        runs.append((start, stop))
        start = stop
    return runs


def _fits(sizes: Sequence[int], runs: Sequence[tuple[int, int]], caps: Sequence[int]) -> bool:
    return all(sum(sizes[a:b]) <= cap for (a, b), cap in zip(runs, caps))


def plan_split(
    block_bytes: Sequence[int],
    other_bytes: int,
    devices: Sequence[str],
    rooms: Sequence[int],
    headroom: int | Sequence[int],
    *,
    prefetch_slots: int = 2,
    allow_streaming: bool = True,
) -> SplitPlan:
    """Spread the decoder blocks over ``devices`` (each may use ``rooms[d]`` bytes for weights
    plus ``headroom[d]`` of activations; every device runs the full batch through its blocks).

    Raises InsufficientVRAMError, with the numbers, when the devices cannot hold the plan."""
    sizes = [int(b) for b in block_bytes]
    n, nd = len(sizes), len(devices)
    if nd == 0 or len(rooms) != nd:
        raise ValueError("one room per device is needed")
    heads = _per_device(headroom, nd)
    others = [int(other_bytes)] + [0] * (nd - 1)
    caps = [int(rooms[d]) - heads[d] - others[d] for d in range(nd)]
    if caps[0] < 0:
        raise InsufficientVRAMError(
            f"{devices[0]} cannot hold the model's non-block parts ({_gib(other_bytes)}) plus the activation "
            f"headroom ({_gib(heads[0])}) in its {_gib(rooms[0])}."
        )

    def build(runs: Sequence[tuple[int, int]], placements: dict[int, ResidencyPlan] | None = None) -> SplitPlan:
        plans = []
        for d, (a, b) in enumerate(runs):
            plan = (placements or {}).get(d)
            if plan is None:
                plan = ResidencyPlan((Placement.GPU,) * (b - a), tuple(sizes[a:b]), others[d], prefetch_slots,
                                     int(rooms[d]), heads[d])
            plans.append(plan)
        return SplitPlan(tuple(devices), tuple(runs), tuple(plans))

    for runs in (_proportional_runs(sizes, caps), _greedy_runs(sizes, caps)):
        if _fits(sizes, runs, caps):
            return build(runs)
    if not allow_streaming:
        raise InsufficientVRAMError(
            f"the {n} decoder blocks ({_gib(sum(sizes))}) do not fit {nd} device(s) without streaming: they hold "
            + ", ".join(f"{dev} {_gib(max(0, c))}" for dev, c in zip(devices, caps))
            + f" for blocks (after {_gib(other_bytes)} of non-block parts on {devices[0]} and the activation headroom)."
        )
    best: SplitPlan | None = None
    for s in range(nd):  # the device that streams: every other one is filled with resident blocks
        front = _greedy_runs(sizes, caps[:s] + [0]) if s else [(0, 0)]
        start = front[-1][0] if s else 0
        runs = front[:-1]
        stop, used, d_end = n, 0, []
        for d in range(nd - 1, s, -1):  # fill the later devices from the end
            b = stop
            while b > start and used + sizes[b - 1] <= caps[d]:
                used += sizes[b - 1]
                b -= 1
            d_end.append((b, stop))
            stop, used = b, 0
        mid = (start, stop)
        try:
            local = plan_placement(sizes[start:stop], others[s], int(rooms[s]), heads[s], prefetch_slots=prefetch_slots)
        except InsufficientVRAMError:
            continue
        plan = build([*runs, mid, *reversed(d_end)], {s: local})
        if best is None or plan.streamed_bytes < best.streamed_bytes:
            best = plan
    if best is None:
        raise InsufficientVRAMError(
            f"no device can stream the blocks that do not fit: each needs room for its streaming slots "
            f"({prefetch_slots} x {_gib(max(sizes, default=0))}) beside its activation headroom; rooms: "
            + ", ".join(f"{dev} {_gib(r)}" for dev, r in zip(devices, rooms)) + "."
        )
    return best


# -- CFG-parallel ---------------------------------------------------------------------------------
def plan_cfg_parallel(
    block_bytes: Sequence[int],
    other_bytes: int,
    rooms: Sequence[int],
    headroom: int | Sequence[int],
    *,
    replica_other_bytes: int | None = None,
    prefetch_slots: int = 2,
    allow_streaming: bool = True,
) -> ResidencyPlan | None:
    """One placement of the blocks that the first device (the whole model) and every other
    device (a replica of the decoder: blocks plus ``replica_other_bytes``, by default all non-block
    bytes) can each hold with ``headroom`` of activations for its half of the batch; streamed
    blocks share one pinned copy. None when no placement fits (or one would stream and
    ``allow_streaming`` is False)."""
    sizes = [int(b) for b in block_bytes]
    n, nd = len(sizes), len(rooms)
    heads = _per_device(headroom, nd)
    rep_other = int(other_bytes if replica_other_bytes is None else replica_other_bytes)
    others = [int(other_bytes)] + [rep_other] * (nd - 1)
    for k in range(n + 1):
        if k and not allow_streaming:
            return None
        streamed = set(evenly_spaced(n, k))
        placements = tuple(Placement.STREAM if i in streamed else Placement.GPU for i in range(n))
        plans = [ResidencyPlan(placements, tuple(sizes), others[d], prefetch_slots, int(rooms[d]), heads[d])
                 for d in range(nd)]
        if all(p.gpu_bytes <= p.budget_bytes for p in plans):
            return plans[0]
    return None


# -- the choice -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModeChoice:
    mode: str  # "off" (the first device alone), "split" or "cfg_parallel"
    reason: str


def choose_mode(
    requested: str,
    n_devices: int,
    *,
    cfg_batch: bool,
    single_fits_resident: bool,
    cfg_fits_resident: bool,
    cfg_fits: bool,
) -> ModeChoice:
    """What runs where. ``requested`` is the user's multi_gpu; ``cfg_batch``: the checkpoint runs
    a conditional and an unconditional row per step (not a CFG-distilled one);
    ``single_fits_resident``: the whole model fits the first device with nothing streamed;
    ``cfg_fits_resident`` / ``cfg_fits``: every device holds a replica with nothing streamed / with
    its plan. Raises ValueError for a mode the devices cannot run (the caller words the error)."""
    if requested not in MODES:
        raise ValueError(f"multi_gpu must be one of {', '.join(MODES)}, got {requested!r}")
    if n_devices <= 1 or requested == "off":
        return ModeChoice("off", "one device" if n_devices <= 1 else "multi_gpu off: the first device only")
    if requested == "split":
        return ModeChoice("split", "multi_gpu split")
    if requested == "cfg_parallel":
        if not cfg_batch:
            raise ValueError("this checkpoint is CFG-distilled: it runs one row per step, so there are no "
                             "conditional and unconditional halves to run in parallel")
        if not cfg_fits:
            raise ValueError("not every GPU can hold a replica of the model")
        return ModeChoice("cfg_parallel", "multi_gpu cfg_parallel")
    if cfg_batch and cfg_fits_resident:
        return ModeChoice("cfg_parallel", "every GPU holds the whole model: the CFG halves run in parallel")
    if single_fits_resident:
        return ModeChoice("off", "the whole model fits the first GPU (nothing to gain from a split)")
    return ModeChoice("split", "the model does not fit one GPU: its blocks are split over the GPUs")

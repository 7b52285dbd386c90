"""Residency of a model split over several devices: one ResidencyManager per device, one facade.

Each device's manager owns a contiguous run of decoder blocks (resident, or streamed from
pinned RAM through that device's own slots); the first also owns every non-block module.
``MultiDeviceResidency`` offers what the cache, the offload policy and the unload nodes use
of a ResidencyManager (``state``, ``plan``, ``gpu_bytes``, ``park``, ``restore``,
``stream_extra``, ``apply``, ``close``), summed or split per device, plus
``gpu_bytes_by_device`` and ``extra_needed`` (the activation shortfall of each device).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..devices import SplitPlan, usable_vram
from .manager import ResidencyManager
from .planner import Placement, ResidencyPlan
from .protocol import ParkReport, ResidencyState
from .ram import check_ram

log = logging.getLogger(__name__)

UNLIMITED = 1 << 50  # room of a CPU device


class ModuleSet(nn.Module):
    """A fixed set of modules seen as one (``modules()`` yields exactly them): lets a
    ResidencyManager own part of a model without the rest of it."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        object.__setattr__(self, "_members", list(modules))  # not registered as children

    def modules(self) -> Iterator[nn.Module]:  # type: ignore[override]
        yield from self._members


@dataclass(frozen=True)
class CombinedPlan:
    """The per-device plans seen as one plan over all blocks (what run_placement reads)."""

    parts: tuple[ResidencyPlan, ...]

    @property
    def placements(self) -> tuple[Placement, ...]:
        return tuple(p for part in self.parts for p in part.placements)

    @property
    def block_bytes(self) -> tuple[int, ...]:
        return tuple(b for part in self.parts for b in part.block_bytes)

    @property
    def other_bytes(self) -> int:
        return sum(part.other_bytes for part in self.parts)

    @property
    def streamed(self) -> list[int]:
        return [i for i, p in enumerate(self.placements) if p is Placement.STREAM]

    @property
    def resident(self) -> list[int]:
        return [i for i, p in enumerate(self.placements) if p is Placement.GPU]

    @property
    def streamed_bytes(self) -> int:
        return sum(part.streamed_bytes for part in self.parts)

    @property
    def gpu_weight_bytes(self) -> int:
        return sum(part.gpu_weight_bytes for part in self.parts)

    @property
    def gpu_bytes(self) -> int:
        return sum(part.gpu_bytes for part in self.parts)

    @property
    def headroom_bytes(self) -> int:
        return max((part.headroom_bytes for part in self.parts), default=0)

    @property
    def budget_bytes(self) -> int | None:
        budgets = [part.budget_bytes for part in self.parts]
        return None if any(b is None for b in budgets) else sum(budgets)  # type: ignore[misc]

    @property
    def parked(self) -> bool:
        return all(part.parked for part in self.parts)

    def describe(self) -> str:
        return "; ".join(part.describe() for part in self.parts)


class MultiDeviceResidency:
    """Decoder blocks split over devices by a SplitPlan, each run owned by its device's manager."""

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], split: SplitPlan, *,
                 prefetch_slots: int = 2, **manager_kwargs) -> None:
        self.model = model
        self.blocks = list(blocks)
        if split.n_blocks != len(self.blocks):
            raise ValueError(f"the split plans {split.n_blocks} blocks, the model has {len(self.blocks)}")
        self.split = split
        self.devices = [torch.device(d) for d in split.devices]
        self.prefetch_slots = prefetch_slots
        in_blocks = {id(m) for b in self.blocks for m in b.modules()}
        others = [m for m in model.modules() if id(m) not in in_blocks]
        self.managers: list[ResidencyManager] = []
        for d, (start, stop) in enumerate(split.ranges):
            run = self.blocks[start:stop]
            members = (others if d == 0 else []) + [m for b in run for m in b.modules()]
            self.managers.append(ResidencyManager(ModuleSet(members), run, self.devices[d],
                                                  prefetch_slots=prefetch_slots, **manager_kwargs))
        self._short: list[int] | None = None

    # -- what callers read -----------------------------------------------------------------
    @property
    def block_bytes(self) -> list[int]:
        return [b for m in self.managers for b in m.block_bytes]

    @property
    def other_bytes(self) -> int:
        return sum(m.other_bytes for m in self.managers)

    @property
    def device(self) -> torch.device:
        return self.devices[0]

    @property
    def plan(self) -> CombinedPlan | None:
        if any(m.plan is None for m in self.managers):
            return None
        return CombinedPlan(tuple(m.plan for m in self.managers))  # type: ignore[misc]

    @property
    def state(self) -> ResidencyState:
        states = {m.state for m in self.managers}
        if ResidencyState.PARKED in states:
            return ResidencyState.PARKED
        return ResidencyState.STREAMING if ResidencyState.STREAMING in states else ResidencyState.RESIDENT

    def gpu_bytes(self) -> int:
        return sum(m.gpu_bytes() for m in self.managers)

    def gpu_bytes_by_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dev, m in zip(self.devices, self.managers):
            out[str(dev)] = out.get(str(dev), 0) + m.gpu_bytes()
        return out

    def describe(self) -> str:
        return self.split.describe()

    # -- plans -----------------------------------------------------------------------------
    def _parts(self, plan: ResidencyPlan | CombinedPlan) -> list[ResidencyPlan]:
        if isinstance(plan, CombinedPlan):
            return list(plan.parts)
        if len(plan.placements) != len(self.blocks):
            raise ValueError(f"plan has {len(plan.placements)} blocks, model has {len(self.blocks)}")
        parts = []
        for m, (start, stop) in zip(self.managers, self.split.ranges):
            parts.append(ResidencyPlan(plan.placements[start:stop], tuple(m.block_bytes), m.other_bytes,
                                       plan.prefetch_slots, None, plan.headroom_bytes))
        return parts

    def apply(self, plan: ResidencyPlan | CombinedPlan, *, available_ram_bytes: int | None = None) -> None:
        """Apply a plan over all blocks (cut along the split) or a CombinedPlan."""
        parts = self._parts(plan)
        to_pack = sum(m.block_bytes[i] for m, part in zip(self.managers, parts) for i in part.streamed
                      if m.plan is None or m.plan.placements[i] is not Placement.STREAM)
        check_ram(to_pack, "stream blocks from pinned CPU RAM", available_bytes=available_ram_bytes)
        for m, part in zip(self.managers, parts):
            m.apply(part, available_ram_bytes=available_ram_bytes)

    def apply_split(self) -> None:
        """Apply the split's own per-device plans (re-counted on the real tensor sizes)."""
        self.apply(CombinedPlan(tuple(
            ResidencyPlan(p.placements, tuple(m.block_bytes), m.other_bytes, p.prefetch_slots, p.budget_bytes,
                          p.headroom_bytes)
            for m, p in zip(self.managers, self.split.plans)
        )))

    # -- one run ---------------------------------------------------------------------------
    def usable_by_device(self) -> list[int]:
        """Usable VRAM of each device (a CPU device, in tests: unlimited)."""
        return [usable_vram(dev) if dev.type == "cuda" else UNLIMITED for dev in self.devices]

    def extra_needed(self, need: int, notes: list[str] | None = None) -> tuple[int, int]:
        """Every device runs the full batch through its blocks: the shortfall of activation memory
        on each (remembered for ``stream_extra``). Returns (the least usable bytes, the largest
        shortfall)."""
        usable = self.usable_by_device()
        self._short = [max(0, int(need) - u) for u in usable]
        return min(usable), max(self._short)

    @contextlib.contextmanager
    def stream_extra(self, bytes_needed: int) -> Iterator[CombinedPlan]:
        """For one run, stream more blocks on each device that is short (``extra_needed``; without
        it, ``bytes_needed`` on every device), then restore."""
        short = self._short if self._short is not None else [int(bytes_needed)] * len(self.managers)
        self._short = None
        with contextlib.ExitStack() as stack:
            for m, s in zip(self.managers, short):
                if s > 0 and m.blocks:
                    stack.enter_context(m.stream_extra(s))
            yield self.plan  # type: ignore[misc]

    # -- soft unload -----------------------------------------------------------------------
    def park(self, *, pin: bool = True, available_ram_bytes: int | None = None) -> ParkReport:
        """Every device's weights to CPU RAM (RAM checked for all first); a failure moves back
        what was parked."""
        need = sum(sum(m.block_bytes[i] for i in range(len(m.blocks)) if i not in m._packed) + m.other_bytes
                   for m in self.managers if m.state is not ResidencyState.PARKED)
        check_ram(need, "park the model in CPU RAM", available_bytes=available_ram_bytes)
        t0 = time.perf_counter()
        done: list[ResidencyManager] = []
        moved = freed = 0
        try:
            for m in self.managers:
                report = m.park(pin=pin, available_ram_bytes=None if available_ram_bytes is None else 1 << 62)
                moved += report.moved_bytes
                freed += report.freed_bytes
                done.append(m)
        except BaseException:
            for m in done:
                m.restore()
            raise
        return ParkReport(moved, freed, time.perf_counter() - t0)

    def restore(self, *, available_ram_bytes: int | None = None) -> float:
        t0 = time.perf_counter()
        for m in self.managers:
            if m.state is ResidencyState.PARKED or m.plan is None:
                m.restore(available_ram_bytes=available_ram_bytes)
        return time.perf_counter() - t0

    def wait_released(self) -> None:
        for m in self.managers:
            m.wait_released()

    def close(self) -> None:
        for m in self.managers:
            m.close()

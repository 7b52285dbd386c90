"""Decide which decoder blocks stay on the GPU and which stream from pinned memory.

Streamed blocks are copied into ``prefetch_slots`` reusable GPU slots, each the size of
the largest streamed block, so a plan costs::

    other_bytes + sum(resident blocks) + slots * max(streamed block) + headroom <= budget

Which blocks stream: SPREAD EVENLY over the depth (ending at the last block). The copy
engine is the bottleneck (one 5 GB block copies in ~90 ms, computes in ~16.5 ms on an H200), so what
matters is keeping it busy: with streamed blocks interleaved between resident ones, the
copy of the next streamed block overlaps the compute of the resident blocks before it,
and a slot is freed well before it is needed again. Streaming the LAST K blocks instead
lets only the first ``slots`` copies hide behind resident compute; the rest run
copy-bound back to back. Plans are cheap values: the manager can switch plans between
generations without reloading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from ...hunyuan_loader.core.units import GIB


class Placement(str, Enum):
    """Where a block's weights live: on the compute device, streamed, or parked in CPU RAM."""

    GPU = "gpu"
    STREAM = "stream"
    CPU = "cpu"


class InsufficientVRAMError(MemoryError):
    """Even with every block streamed the model does not fit the budget."""


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def evenly_spaced(n_blocks: int, k: int) -> list[int]:
    """``k`` block indices spread evenly over ``n_blocks``, the last one always included."""
    if k <= 0:
        return []
    return sorted({(j + 1) * n_blocks // k - 1 for j in range(k)})


@dataclass(frozen=True)
class ResidencyPlan:
    """Placement of each decoder block and the GPU bytes that placement uses."""

    placements: tuple[Placement, ...]
    block_bytes: tuple[int, ...]
    other_bytes: int
    prefetch_slots: int = 2
    budget_bytes: int | None = None
    headroom_bytes: int = 0

    def __post_init__(self) -> None:
        if len(self.placements) != len(self.block_bytes):
            raise ValueError("placements and block_bytes differ in length")

    @classmethod
    def uniform(
        cls, placement: Placement, block_bytes: Sequence[int], other_bytes: int, *, prefetch_slots: int = 2
    ) -> ResidencyPlan:
        return cls(
            tuple(placement for _ in block_bytes), tuple(block_bytes), other_bytes, prefetch_slots
        )

    @property
    def resident(self) -> list[int]:
        return [i for i, p in enumerate(self.placements) if p is Placement.GPU]

    @property
    def streamed(self) -> list[int]:
        return [i for i, p in enumerate(self.placements) if p is Placement.STREAM]

    @property
    def parked(self) -> bool:
        return all(p is Placement.CPU for p in self.placements)

    @property
    def n_slots(self) -> int:
        return min(self.prefetch_slots, len(self.streamed))

    @property
    def slot_bytes(self) -> int:
        return max((self.block_bytes[i] for i in self.streamed), default=0)

    @property
    def gpu_weight_bytes(self) -> int:
        """Weights resident on the GPU plus the streaming slots (no activations)."""
        if self.parked:
            return 0
        resident = sum(self.block_bytes[i] for i in self.resident)
        return self.other_bytes + resident + self.n_slots * self.slot_bytes

    @property
    def gpu_bytes(self) -> int:
        """What the plan needs on the GPU: weights, slots and the activation headroom."""
        return self.gpu_weight_bytes + (0 if self.parked else self.headroom_bytes)

    @property
    def streamed_bytes(self) -> int:
        return sum(self.block_bytes[i] for i in self.streamed)

    def with_slots(self, prefetch_slots: int) -> ResidencyPlan:
        return ResidencyPlan(
            self.placements, self.block_bytes, self.other_bytes, prefetch_slots,
            self.budget_bytes, self.headroom_bytes,
        )

    def describe(self) -> str:
        n = len(self.placements)
        if self.parked:
            return f"parked: all {n} blocks and other modules in CPU RAM, 0 GiB on the GPU"
        s = self.streamed
        text = (
            f"{n - len(s)}/{n} blocks resident, {len(s)} streamed"
            + (f" {s}" if s else "")
            + (f" via {self.n_slots} x {_gib(self.slot_bytes)} slots" if s else "")
            + f"; GPU weights {_gib(self.gpu_weight_bytes)} + headroom {_gib(self.headroom_bytes)}"
        )
        if self.budget_bytes is not None:
            text += f" of budget {_gib(self.budget_bytes)}"
        return text


def plan_placement(
    block_bytes: Sequence[int],
    other_bytes: int,
    budget_bytes: int,
    headroom_bytes: int,
    *,
    prefetch_slots: int = 2,
    min_streamed: int = 0,
) -> ResidencyPlan:
    """Stream the fewest blocks (at least ``min_streamed``) that make the plan fit the budget.

    Raises InsufficientVRAMError, with the numbers, when even all-streamed does not fit.
    """
    if prefetch_slots < 1:
        raise ValueError("prefetch_slots must be >= 1")
    n = len(block_bytes)
    sizes = tuple(int(b) for b in block_bytes)
    for k in range(max(0, min_streamed), n + 1):
        streamed = set(evenly_spaced(n, k))
        plan = ResidencyPlan(
            tuple(Placement.STREAM if i in streamed else Placement.GPU for i in range(n)),
            sizes, int(other_bytes), prefetch_slots, int(budget_bytes), int(headroom_bytes),
        )
        if plan.gpu_bytes <= budget_bytes:
            return plan
    slots = min(prefetch_slots, n)
    floor = other_bytes + slots * max(sizes, default=0) + headroom_bytes
    raise InsufficientVRAMError(
        f"the model does not fit a GPU budget of {_gib(budget_bytes)} even with all {n} blocks "
        f"streamed: it needs {_gib(floor)} = non-block modules {_gib(other_bytes)} + {slots} "
        f"streaming slots x {_gib(max(sizes, default=0))} + activation headroom {_gib(headroom_bytes)}."
    )

"""What every residency offers, whatever the model's layout: one device (``ResidencyManager``), a
split over several (``multi.MultiDeviceResidency``) or a CFG-parallel replica per device
(hunyuan_loader/hooks/cfg_parallel.py). The cache, the offload policy and the unload nodes call
only this, so none of them asks which kind it holds. A leaf: the types callers name live here."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import torch


class ResidencyState(str, Enum):
    RESIDENT = "resident"
    STREAMING = "streaming"
    PARKED = "parked"


@dataclass(frozen=True)
class ParkReport:
    moved_bytes: int
    freed_bytes: int  # drop of torch.cuda.memory_allocated (0 on CPU)
    seconds: float


@runtime_checkable
class Residency(Protocol):
    """Where a loaded model's weights live, and the moves between GPU, pinned RAM and parked."""

    block_bytes: list[int]  # placed bytes of each decoder block
    other_bytes: int  # placed bytes of everything else
    prefetch_slots: int

    @property
    def device(self) -> torch.device:
        """The first device: the non-block parts, where a run's inputs and outputs live."""
        ...

    @property
    def plan(self) -> Any:
        """The plan over all blocks now (a ResidencyPlan or one that reads like it); None if none yet."""
        ...

    @property
    def state(self) -> ResidencyState: ...

    @property
    def managers(self) -> list[Any]:
        """The ResidencyManagers doing the work (one per device that streams)."""
        ...

    def gpu_bytes(self) -> int:
        """Weight bytes held on the GPUs now, all devices together."""
        ...

    def gpu_bytes_by_device(self) -> dict[str, int]: ...

    def describe(self) -> str: ...

    def extra_needed(self, need: int, notes: list[str] | None = None) -> tuple[int, int]:
        """For one run needing ``need`` bytes of activations: (the usable bytes the answer is
        measured against, the bytes of weights to stream on top of the plan for that run).
        May add a line for the user to ``notes``; ``stream_extra`` follows with the shortfall."""
        ...

    def stream_extra(self, bytes_needed: int) -> AbstractContextManager[Any]:
        """Stream more blocks for one run (the plan used is yielded), then restore."""
        ...

    def apply(self, plan: Any, *, available_ram_bytes: int | None = None) -> None: ...

    def park(self, *, pin: bool = True, available_ram_bytes: int | None = None) -> ParkReport: ...

    def restore(self, *, available_ram_bytes: int | None = None) -> float: ...

    def wait_released(self) -> None: ...

    def close(self) -> None: ...

"""What to load (LoadSpec, the cache key) and what was loaded (LoadedModel, owned by the cache)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .choices import INT8_FORMATS, MOE_IMPLS, OFFLOAD_MODES  # noqa: F401 - part of this interface
from .errors import InputError
from .quants import QUANTS, known_quants  # noqa: F401 - QUANTS is part of this module's interface


@dataclass(frozen=True)
class LoadSpec:
    """Everything that decides how a model is loaded; equal specs share one cached model."""

    path: str
    quant: str = "bf16"
    offload: str = "disabled"
    vram_budget_gb: float | None = None
    headroom_gb: float | None = None
    moe_impl: str = "gather_scatter"
    int8_format: str = "w8a16"
    # Several GPUs (issue 13, hunyuan_loader/multi_gpu.py): "auto" = every visible GPU, or "cuda:0,cuda:1";
    # multi_gpu: auto | split | cfg_parallel | off.
    devices: str = "auto"
    multi_gpu: str = "auto"

    def __post_init__(self) -> None:
        if self.quant not in known_quants():  # a registered weight format adds its own (formats/registry.py)
            raise InputError(f"quantization '{self.quant}' is not one of {', '.join(known_quants())}.")
        if self.offload not in OFFLOAD_MODES:
            raise InputError(f"offload_mode '{self.offload}' is not one of {', '.join(OFFLOAD_MODES)}.")
        if self.moe_impl not in MOE_IMPLS:
            raise InputError(f"moe_impl '{self.moe_impl}' is not one of {', '.join(MOE_IMPLS)}.")
        if self.int8_format not in INT8_FORMATS:
            raise InputError(f"int8_format '{self.int8_format}' is not one of {', '.join(INT8_FORMATS)}.")
        if self.quant != "int8":  # one cache key per model: the format means nothing for bf16 / nf4
            object.__setattr__(self, "int8_format", INT8_FORMATS[0])
        if self.vram_budget_gb is not None and self.vram_budget_gb <= 0:
            raise InputError(f"vram_budget_gb must be positive (got {self.vram_budget_gb}).")
        if self.headroom_gb is not None and self.headroom_gb < 0:
            raise InputError(f"inference_headroom_gb must be 0 or more (got {self.headroom_gb}).")
        self._check_devices()

    def _check_devices(self) -> None:
        """devices: syntax and existence on this machine (normalised: the cache key); multi_gpu."""
        from .devices import MODES, normalise_devices, resolve_devices

        if self.multi_gpu not in MODES:
            raise InputError(f"multi_gpu '{self.multi_gpu}' is not one of {', '.join(MODES)}.")
        object.__setattr__(self, "devices", normalise_devices(self.devices))
        if self.devices != "auto":
            resolve_devices(self.devices)  # a device this machine does not have: InputError before anything loads
        if self.offload == "accelerate" and self.devices != "auto":
            raise InputError("offload_mode accelerate places the model with accelerate's own device map: leave "
                             "devices on auto, or use offload_mode disabled / smart / budget with devices.")

    def describe(self) -> str:
        quant = f"{self.quant} {self.int8_format}" if self.quant == "int8" else self.quant
        text = f"{Path(self.path).name} [{quant}, offload {self.offload}"
        if self.vram_budget_gb is not None:
            text += f", budget {self.vram_budget_gb:g} GB"
        if self.devices != "auto":
            text += f", devices {self.devices}"
        if self.multi_gpu != "auto":
            text += f", multi_gpu {self.multi_gpu}"
        return text + f", moe {self.moe_impl}]"


@dataclass
class LoadedModel:
    """A model the cache owns. Only the cache holds this object."""

    model: Any
    spec: LoadSpec
    info: Any  # checkpoint.validate.CheckpointInfo (core imports nothing above it)
    variant: Any  # model.variants.Variant
    device: torch.device
    load_seconds: float
    residency: Any = None  # memory.residency.ResidencyManager on CUDA, else None
    load_stats: Any = None  # block_loader.LoadStats: where the load's time went (phases)
    notes: list[str] = field(default_factory=list)

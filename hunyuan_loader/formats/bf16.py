"""BF16: nothing quantized; every weight loads as the checkpoint stores it (routers float32)."""

from __future__ import annotations

from .registry import WeightFormat, register


class Bf16Format(WeightFormat):
    """The BF16 loader: no quantization_config, no modules of its own, sizes as stored."""

    name = "bf16"
    quant = "bf16"
    quantized = False
    disk_ratio = 1.0


register(Bf16Format())

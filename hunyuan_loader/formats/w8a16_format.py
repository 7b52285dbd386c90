"""W8A16 in the registry: the INT8 loader's default format (w8a16.py: the format and its Linear;
w8a16_transformers.py: the transformers quantization method that builds and fills it)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .registry import WeightFormat, register
from .w8a16 import FORMAT, QUANT_METHOD, SCALE_DTYPE, Int8WeightOnlyLinear

SCALE_SUFFIX = ".weight_scale"  # a pre-quantized copy's bf16 row scales beside each int8 weight


class W8A16Format(WeightFormat):
    """``Int8WeightOnlyLinear``: an int8 weight and bf16 row scales per quantized Linear."""

    name = FORMAT
    quant = "int8"
    option = FORMAT
    disk_ratio = 0.52

    def parts(self, numel: int, rows: int) -> tuple[int, ...]:
        return (numel, SCALE_DTYPE.itemsize * rows)  # int8 weight + bf16 row scales (weight_scale)

    def prepare(self) -> None:
        from . import w8a16_transformers

        w8a16_transformers.register()  # transformers then reads quant_method hy3_w8a16 (fresh or pre-quantized)

    def quantization_config(self, skip_modules: list[str]) -> Any:
        from .w8a16_transformers import quantization_config

        return quantization_config(skip_modules)

    def owns(self, module: Any) -> bool:
        return isinstance(module, Int8WeightOnlyLinear)

    def recognises(self, qc: dict) -> bool:
        return qc.get("quant_method") == QUANT_METHOD

    def stored_modules(self, tensor_names: Iterable[str]) -> set[str]:
        return {n[: -len(SCALE_SUFFIX)] for n in tensor_names if n.endswith(SCALE_SUFFIX)}


register(W8A16Format())

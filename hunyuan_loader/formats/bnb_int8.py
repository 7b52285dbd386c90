"""bitsandbytes LLM.int8 (``Linear8bitLt``): the INT8 loader with ``int8_format="bnb"``.

Stored per quantized Linear: the int8 ``weight`` and its float32 row scales ``SCB`` (+ a
``weight_format`` marker that becomes a python value on load). bitsandbytes is imported only
when a model already holds its modules (``owns``) or a load needs it (``prepare``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..core.errors import CheckpointError
from .quantization import bnb_quantization_config, require_bitsandbytes
from .registry import WeightFormat, instance_of, modules_with, register

STATE_SUFFIXES = (".SCB", ".weight_format")  # a pre-quantized copy's tensors beside each int8 weight


class BnbInt8Format(WeightFormat):
    name = "bnb_int8"
    quant = "int8"
    option = "bnb"
    replicable = False  # bnb int8 state (CB/SCB, MatmulLtState) is not copied by the CFG replicas
    disk_ratio = 0.52

    def parts(self, numel: int, rows: int) -> tuple[int, ...]:
        return (numel, 4 * rows)  # int8 weight + float32 row scales (SCB)

    def stored_bytes(self, name: str, nbytes: int) -> int:
        return 0 if name.endswith("weight_format") else super().stored_bytes(name, nbytes)

    def prepare(self) -> None:
        require_bitsandbytes(self.quant)

    def quantization_config(self, skip_modules: list[str]) -> Any:
        return bnb_quantization_config("int8", skip_modules)

    def owns(self, module: Any) -> bool:
        return instance_of(module, "bitsandbytes.nn", "Linear8bitLt")

    def recognises(self, qc: dict) -> bool:
        if qc.get("quant_method", "bitsandbytes") != "bitsandbytes":
            return False
        if not qc.get("load_in_8bit") and not qc.get("load_in_4bit"):
            raise CheckpointError("config.json has a bitsandbytes quantization_config with neither 8-bit nor 4-bit "
                                  "set. Re-download or re-create the quantized copy.")
        return bool(qc.get("load_in_8bit"))

    def stored_modules(self, tensor_names: Iterable[str]) -> set[str]:
        return modules_with(tensor_names, STATE_SUFFIXES)


register(BnbInt8Format())

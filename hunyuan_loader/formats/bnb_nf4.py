"""bitsandbytes NF4 (``Linear4bit``, double-quantized): the NF4 loader.

Stored per quantized Linear: the packed 4-bit ``weight`` and ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map`` and
``weight.quant_state.bitsandbytes__nf4`` (the packed metadata becomes python values on load)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..core.errors import CheckpointError
from .quantization import bnb_quantization_config, require_bitsandbytes
from .registry import WeightFormat, instance_of, modules_with, register

STATE_SUFFIXES = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map")
QUANT_STATE = ".weight.quant_state."


class BnbNf4Format(WeightFormat):
    name = "bnb_nf4"
    quant = "nf4"
    replicable = False  # Params4bit.quant_state is not copied by the CFG replicas
    disk_ratio = 0.30

    def parts(self, numel: int, rows: int) -> tuple[int, ...]:
        blocks = -(-numel // 64)
        # 4-bit data, a uint8 absmax per 64 values; double quantization: the nested state's code
        # (16 float32) and offset, a float32 absmax per 256 absmax, the code (256 float32)
        return (-(-numel // 2), blocks, 16 * 4, 4, 4 * -(-blocks // 256), 256 * 4)

    def stored_bytes(self, name: str, nbytes: int) -> int:
        return 0 if ".quant_state." in name else super().stored_bytes(name, nbytes)

    def prepare(self) -> None:
        require_bitsandbytes(self.quant)

    def quantization_config(self, skip_modules: list[str]) -> Any:
        return bnb_quantization_config("nf4", skip_modules)

    def owns(self, module: Any) -> bool:
        return instance_of(module, "bitsandbytes.nn", "Linear4bit")  # LinearNF4 / LinearFP4 are Linear4bit too

    def recognises(self, qc: dict) -> bool:
        if qc.get("quant_method", "bitsandbytes") != "bitsandbytes" or not qc.get("load_in_4bit"):
            return False
        kind = qc.get("bnb_4bit_quant_type", "fp4")
        if kind != "nf4":
            raise CheckpointError(
                f"This checkpoint is quantized to bitsandbytes 4-bit '{kind}', which this pack does not load. "
                "Use the BF16 checkpoint with the NF4 loader, or an NF4 copy (`python -m hunyuan_loader quantize`)."
            )
        return True

    def stored_modules(self, tensor_names: Iterable[str]) -> set[str]:
        names = list(tensor_names)
        out = modules_with(names, STATE_SUFFIXES)
        return out | {n.split(QUANT_STATE)[0] for n in names if QUANT_STATE in n}


register(BnbNf4Format())

"""W8A16 as a transformers quantization method (``quant_method: "hy3_w8a16"``), transformers 4.57 and 5.x
(4.57 calls ``create_quantized_param``, 5.x the op ``get_quantize_ops`` returns; both quantize the same way).

With ``W8A16Config`` passed to ``from_pretrained`` the model is quantized tensor by tensor while
it loads, exactly where bitsandbytes int8 would be: each checkpoint weight of a converted
Linear is read (straight to the GPU with ``device_map={"": 0}``), quantized on the GPU when there
is one (bit-identical to the CPU, only faster) and stored on its device, so peak memory is the
int8 model plus one bf16 tensor in every placement. ``save_pretrained`` writes ``weight`` (int8)
and ``weight_scale`` (bf16) per Linear and the config below; ``from_pretrained`` of such a
folder loads it without re-quantizing, in any process that imported this module.

Which Linears are converted follows transformers' bitsandbytes rule with the same skip keys
(``modules_to_not_convert``): the pack's skip list gives the same module set as bnb int8.
Importing this module imports transformers: import it inside functions.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core import hf_compat
from .quantization import transformers_skips
from .w8a16 import QUANT_METHOD, Int8WeightOnlyLinear, config_entry, quantize_weight, replace_with_w8a16

log = logging.getLogger(__name__)


class W8A16Config(QuantizationConfigMixin):
    """``quantization_config`` of a W8A16 model (what config.json carries)."""

    def __init__(self, modules_to_not_convert: list[str] | None = None, **kwargs: Any) -> None:
        entry = config_entry(modules_to_not_convert or [])
        self.quant_method = QUANT_METHOD
        self.modules_to_not_convert = entry["modules_to_not_convert"]
        self.scale_dtype = entry["scale_dtype"]
        self.format_version = int(kwargs.get("format_version", entry["format_version"]))

    def to_dict(self) -> dict[str, Any]:
        return {**config_entry(self.modules_to_not_convert), "format_version": self.format_version}


def _is_w8a16(module: nn.Module) -> bool:
    return isinstance(module, Int8WeightOnlyLinear)


class W8A16Quantizer(HfQuantizer):
    """Converts the selected Linears to Int8WeightOnlyLinear and fills them while loading."""

    requires_calibration = False
    requires_parameters_quantization = True
    required_packages = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return torch.bfloat16 if dtype is None else dtype

    def update_device_map(self, device_map: Any) -> Any:
        if device_map is None:
            device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
        return device_map

    def adjust_target_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.int8  # sizes for device_map="auto"

    def update_missing_keys(self, model: Any, missing_keys: list[str], prefix: str) -> list[str]:
        if self.pre_quantized:
            return missing_keys
        # A bf16 checkpoint has no scales: create_quantized_param makes them from the weight.
        return [k for k in missing_keys if not k.endswith(".weight_scale")]

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        module, name = get_module_from_name(model, param_name)
        return _is_w8a16(module) and name == "weight"

    @property
    def quantized_element_size(self) -> float:  # 5.x: sizes for device_map="auto"
        return 1

    def create_quantized_param(
        self, model: Any, param_value: torch.Tensor, param_name: str, target_device: Any, **kwargs: Any
    ) -> None:
        module, _ = get_module_from_name(model, param_name)
        target = torch.device(target_device) if not isinstance(target_device, int) else torch.device("cuda", target_device)
        q, scale = _quantized(param_value)
        module._parameters["weight"] = nn.Parameter(q.to(target), requires_grad=False)
        module._parameters["weight_scale"] = nn.Parameter(scale.to(target), requires_grad=False)

    def get_quantize_ops(self) -> Any:
        """5.x: the op from_pretrained applies to each weight this quantizer converts (already on its device)."""
        def quantize(model: Any, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
            q, scale = _quantized(value)
            prefix = name.rpartition(".")[0]
            return {name: nn.Parameter(q.to(value.device), requires_grad=False),
                    f"{prefix}.weight_scale": nn.Parameter(scale.to(value.device), requires_grad=False)}

        return hf_compat.quantize_op(quantize)

    def _process_model_before_weight_loading(
        self, model: Any, device_map: Any = None, keep_in_fp32_modules: list[str] | None = None, **kwargs: Any
    ) -> None:
        if keep_in_fp32_modules is None:  # 5.x passes none: its bitsandbytes quantizers read the model's
            keep_in_fp32_modules = model._keep_in_fp32_modules
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert, keep_in_fp32_modules
        )
        skips = list(self.modules_to_not_convert)
        converted = replace_with_w8a16(model, lambda name: not transformers_skips(name, skips))
        log.debug("W8A16: %d Linear modules converted (pre-quantized: %s)", len(converted), self.pre_quantized)
        model.config.quantization_config = self.quantization_config

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        # 5.x loads a stored float scale as a Parameter that requires grad; quantized on load it does not
        for module in model.modules():
            if _is_w8a16(module):
                for param in module.parameters(recurse=False):
                    param.requires_grad_(False)
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _quantized(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, scale) of a bf16 weight, computed on the GPU when there is one (bit-identical)."""
    compute = value.device
    if compute.type != "cuda" and torch.cuda.is_available():
        compute = torch.device("cuda", torch.cuda.current_device())
    return quantize_weight(value, compute)


def register() -> None:
    """Make ``quant_method: hy3_w8a16`` known to transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(W8A16Config)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(W8A16Quantizer)


def quantization_config(modules_to_not_convert: list[str]) -> QuantizationConfigMixin:
    """The config to pass to ``from_pretrained`` for a fresh W8A16 quantization (registers first)."""
    register()
    return AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD](modules_to_not_convert=list(modules_to_not_convert))


register()

"""The weight-format registry: a format registered here, in the test, loads, streams, parks, comes
back and saves a pre-quantized copy without any module of the pack knowing its name.

The new format is BF16 stored under another name: the Linears the skip rules quantize become
``RenamedLinear`` (an ``nn.Linear`` of its own class, same bf16 weights) through a transformers
quantization method of its own, so a load must give the BF16 load's logits bit for bit. Every step
goes through the registry: a module that still lists the formats (a LoadSpec check, the loader's
quantization_config, the plan's sizes, the room asked before a load, the pre-quantized checks)
fails here."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from model_compare import logits
from torch import nn

from hunyuan_image3.hunyuan_loader.core.errors import CheckpointError, InputError
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.formats import registry
from hunyuan_image3.hunyuan_loader.formats.quantization import (
    is_quantizable,
    transformers_skips,
)
from hunyuan_image3.hunyuan_loader.formats.registry import WeightFormat, quantized_module_names
from hunyuan_image3.hunyuan_loader.load.pipeline import load_model, save_quantized_copy

NAME = "bf16_renamed"
QUANT_METHOD = "hy3_test_bf16_renamed"


class RenamedLinear(nn.Linear):
    """A BF16 Linear of the new format's own class."""


def _transformers_classes() -> tuple[type, type]:
    """The new format's transformers quantization config and quantizer (transformers imported late)."""
    from transformers.quantizers import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class RenamedConfig(QuantizationConfigMixin):
        def __init__(self, modules_to_not_convert: list[str] | None = None, **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            self.modules_to_not_convert = sorted(modules_to_not_convert or [])

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": QUANT_METHOD, "modules_to_not_convert": list(self.modules_to_not_convert)}

    class RenamedQuantizer(HfQuantizer):
        requires_calibration = False
        requires_parameters_quantization = False
        required_packages = None

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            return None

        def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
            return torch.bfloat16 if dtype is None else dtype

        def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
            return False  # stored and loaded as bf16: only the class differs

        def _process_model_before_weight_loading(self, model: Any, device_map: Any = None,
                                                 keep_in_fp32_modules: list[str] | None = None,
                                                 **kwargs: Any) -> None:
            skips = self.get_modules_to_not_convert(model, self.quantization_config.modules_to_not_convert,
                                                    keep_in_fp32_modules)
            for name, m in list(model.named_modules()):
                if type(m) is nn.Linear and not transformers_skips(name, skips):
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, RenamedLinear(
                        m.in_features, m.out_features, m.bias is not None, device="meta", dtype=m.weight.dtype))
            model.config.quantization_config = self.quantization_config

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            return model

        def is_serializable(self, safe_serialization: Any = None) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    return RenamedConfig, RenamedQuantizer


class RenamedFormat(WeightFormat):
    name = NAME
    quant = NAME
    disk_ratio = 1.0

    def parts(self, numel: int, rows: int) -> tuple[int, ...]:
        return (2 * numel,)  # bf16, as stored

    def prepare(self) -> None:
        from transformers.quantizers import register_quantization_config, register_quantizer
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

        config, quantizer = _transformers_classes()
        if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
            register_quantization_config(QUANT_METHOD)(config)
        if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
            register_quantizer(QUANT_METHOD)(quantizer)

    def quantization_config(self, skip_modules: list[str]) -> Any:
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

        return AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD](modules_to_not_convert=skip_modules)

    def owns(self, module: Any) -> bool:
        return isinstance(module, RenamedLinear)

    def recognises(self, qc: dict) -> bool:
        return qc.get("quant_method") == QUANT_METHOD

    def stored_modules(self, tensor_names: Iterable[str]) -> set[str]:
        return {n[: -len(".weight")] for n in tensor_names if n.endswith(".weight") and is_quantizable(n[:-7])}


@pytest.fixture
def renamed() -> Iterator[WeightFormat]:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    fmt = registry.register(RenamedFormat())  # the one line a format module has
    try:
        yield fmt
    finally:
        registry.unregister(NAME)
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)


def _renamed_modules(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, RenamedLinear))


def test_a_registered_format_loads_plans_and_saves_without_any_module_knowing_it(
    renamed: WeightFormat, base_checkpoint: Path, tmp_path: Path, one_thread
) -> None:
    from hunyuan_image3.hunyuan_loader.cli import card_plan as cp
    from hunyuan_image3.hunyuan_loader.load.placement import load_gpu_bytes

    bf16 = load_model(LoadSpec(str(base_checkpoint)))
    ref = logits(bf16.model)
    del bf16
    loaded = load_model(LoadSpec(str(base_checkpoint), quant=NAME))
    names = _renamed_modules(loaded.model)
    assert names and all(is_quantizable(n) for n in names)
    assert quantized_module_names(loaded.model) == names  # "is this module mine": the format says
    assert torch.equal(logits(loaded.model), ref)
    # sizes: the plan command's and the room asked before a load come from the format's size model
    sizes = cp.checkpoint_sizes(base_checkpoint)
    assert sizes.block_bytes[NAME] == sizes.block_bytes["bf16"] and sizes.total(NAME) == sizes.total("bf16")
    assert load_gpu_bytes(LoadSpec(str(base_checkpoint), quant=NAME), 10**9) == 10**9
    # a pre-quantized copy carries the format's quantization_config and loads without re-quantizing
    copy = save_quantized_copy(loaded, tmp_path / "renamed")
    assert json.loads((copy / "config.json").read_text())["quantization_config"]["quant_method"] == QUANT_METHOD
    again = load_model(LoadSpec(str(copy), quant=NAME))
    assert again.model.config.quantization_config is not None
    assert _renamed_modules(again.model) == names
    assert torch.equal(logits(again.model), ref)
    with pytest.raises(CheckpointError, match="loader was used"):
        load_model(LoadSpec(str(copy), quant="bf16"))


def test_a_registered_format_streams_parks_and_comes_back_on_the_cpu(
    renamed: WeightFormat, base_checkpoint: Path, one_thread
) -> None:
    """On the CPU: the residency manager's synchronous streaming, then park to RAM and back."""
    from hunyuan_image3.memory.residency import Placement, ResidencyManager, ResidencyPlan, ResidencyState

    loaded = load_model(LoadSpec(str(base_checkpoint), quant=NAME))
    model = loaded.model
    ref = logits(model)
    mgr = ResidencyManager(model, model.model.layers, "cpu", allow_cpu_streaming=True)
    n = len(mgr.blocks)
    mgr.apply(ResidencyPlan(tuple(Placement.STREAM if i >= n // 2 else Placement.GPU for i in range(n)),
                            tuple(mgr.block_bytes), mgr.other_bytes))
    assert mgr.state is ResidencyState.STREAMING
    assert torch.equal(logits(model), ref)
    mgr.park(available_ram_bytes=10**12)
    assert mgr.state is ResidencyState.PARKED
    mgr.restore()
    assert torch.equal(logits(model), ref)
    mgr.close()


@pytest.mark.gpu
def test_gpu_a_registered_format_streams_parks_and_comes_back(
    renamed: WeightFormat, base_checkpoint: Path, monkeypatch
) -> None:
    """On a GPU: half of the blocks streamed from pinned RAM by the loader's plan, the logits of the
    resident load; Soft Unload and back."""
    resident = load_model(LoadSpec(str(base_checkpoint), quant=NAME))
    ref = logits(resident.model)
    resident.residency.close()
    del resident
    n = json.loads((base_checkpoint / "config.json").read_text())["num_hidden_layers"]
    monkeypatch.setenv("HUNYUAN_MIN_STREAMED_BLOCKS", str(n // 2))
    smart = load_model(LoadSpec(str(base_checkpoint), quant=NAME, offload="budget", vram_budget_gb=1000.0,
                                headroom_gb=0.0))
    plan = smart.residency.plan
    assert 0 < len(plan.streamed) < len(plan.placements), plan.describe()
    assert torch.equal(logits(smart.model), ref)
    smart.residency.park()
    smart.residency.restore()
    assert torch.equal(logits(smart.model), ref)
    smart.residency.close()


def test_unknown_formats_are_errors_not_guesses() -> None:
    with pytest.raises(InputError, match="not one of"):
        LoadSpec("x", quant="fp8")
    with pytest.raises(InputError, match="not a known weight format"):
        registry.for_load("fp8")
    with pytest.raises(CheckpointError, match="'gptq'"):
        registry.for_config({"quant_method": "gptq"})
    with pytest.raises(CheckpointError, match="4-bit 'fp4'"):
        registry.for_config({"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(CheckpointError, match="neither 8-bit nor 4-bit"):
        registry.for_config({"quant_method": "bitsandbytes"})

    class Packed(nn.Module):  # integer weights of no registered format
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)

    with pytest.raises(CheckpointError, match="no weight format this pack knows"):
        quantized_module_names(nn.Sequential(Packed()))


def test_the_built_in_formats_and_their_lookups() -> None:
    assert registry.loader_quants()[:3] == ("bf16", "int8", "nf4")
    assert registry.for_load("int8", "w8a16").name == "w8a16"
    assert registry.for_load("int8", "bnb").name == "bnb_int8"
    assert registry.for_load("nf4", "w8a16").name == "bnb_nf4"
    assert registry.for_config(None) is None
    assert registry.for_config({"quant_method": "hy3_w8a16"}).name == "w8a16"
    assert registry.for_config({"load_in_8bit": True}).name == "bnb_int8"
    assert registry.for_config({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}).name == "bnb_nf4"
    with pytest.raises(ValueError, match="registered already"):
        registry.register(type(registry.get("bf16"))())
    # the size model: exact for the plan command, 256-byte aligned per tensor for the load plan
    nf4 = registry.get("bnb_nf4")
    assert nf4.placed_bytes((128, 64), 2, True, align=False) == 4096 + 128 + 64 + 4 + 4 + 1024
    assert nf4.placed_bytes((128, 64), 2, True) == 4096 + 4 * 256 + 1024
    assert registry.get("w8a16").placed_bytes((128, 64), 2, True, align=False) == 128 * 64 + 2 * 128
    assert registry.get("bnb_int8").placed_bytes((128, 64), 2, True, align=False) == 128 * 64 + 4 * 128
    assert registry.get("bf16").placed_bytes((128, 64), 2, True, align=False) == 2 * 128 * 64


@pytest.mark.parametrize("name", ["bf16", "w8a16", "bnb_int8", "bnb_nf4"])
def test_disk_ratio_is_the_size_model_on_the_real_model(name: str) -> None:
    """load_gpu_bytes' GPU bytes per BF16 disk byte agree (within 0.02) with the format's size model
    applied to the released model's shapes."""
    from hunyuan_image3.hunyuan_loader.cli import card_plan as cp

    fmt = registry.get(name)
    sizes = cp.real_model_sizes(fmt.option or "w8a16")
    assert fmt.disk_ratio == pytest.approx(sizes.total(fmt.quant) / sizes.total("bf16"), abs=0.02)

"""Loading a checkpoint through transformers (trust_remote_code) in bf16, int8 or nf4."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import torch

from ..memory import stats
from ..memory.unload import track_model
from . import quiet
from .checkpoint import check_code_dependencies, loadable_path, validate_checkpoint
from .errors import NotEnoughVRAMError
from .quantization import (
    check_quantized_modules,
    checkpoint_tensor_names,
    quantization_config,
    require_bitsandbytes,
    restore_float32_routers,
    skip_modules_for,
)
from .spec import LoadedModel, LoadSpec
from .variants import detect_variant, read_generation_config
from .w8a16 import resolve_int8_format

log = logging.getLogger(__name__)

def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_model(spec: LoadSpec) -> LoadedModel:
    """Validate, load through transformers, prepare MoE dispatch and weight placement.

    On any failure nothing stays loaded: the partial model is dropped and memory released.
    """
    quiet.install()  # before bitsandbytes is imported: its messages that do not concern the user
    info = validate_checkpoint(spec.path)
    int8_format = resolve_int8_format(spec.quant, spec.int8_format, info.config)  # w8a16 needs no bitsandbytes
    require_bitsandbytes("bf16" if int8_format == "w8a16" else spec.quant)
    check_code_dependencies(info.path)
    from transformers import AutoModelForCausalLM

    from .moe_dispatch import install_moe_dispatch
    from .remote_code_fixes import install_mask_alignment

    device = default_device()
    variant = detect_variant(info.config, read_generation_config(info.path))
    kwargs: dict[str, Any] = dict(
        trust_remote_code=True,
        dtype=torch.bfloat16,  # transformers >= 4.56 name (torch_dtype is deprecated)
        attn_implementation="sdpa",
        moe_impl="eager",
        low_cpu_mem_usage=True,
    )
    skips = skip_modules_for(checkpoint_tensor_names(info.path))
    if int8_format == "w8a16":  # issue 14: int8 weights x bf16 activations, quantized while loading
        from .w8a16_transformers import quantization_config as w8a16_quantization_config

        qconfig = w8a16_quantization_config(skips)
    else:
        qconfig = quantization_config(spec.quant, skips)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    streams = device.type == "cuda" and spec.offload in ("smart", "budget")
    if device.type != "cuda" or streams:
        kwargs["device_map"] = "cpu"  # the residency engine places blocks afterwards
    elif spec.offload == "accelerate":
        budget_gb = spec.vram_budget_gb or torch.cuda.mem_get_info()[1] / stats.GIB * 0.85
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {device.index or 0: int(budget_gb * stats.GIB), "cpu": "2000GiB"}
    else:
        kwargs["device_map"] = {"": device.index or 0}

    model = None
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(loadable_path(info)), **kwargs)
        model.eval()
        track_model(model)
        if qconfig is not None:
            check_quantized_modules(model)
            restore_float32_routers(model, info.path)
        if hasattr(model, "load_tokenizer"):
            model.load_tokenizer(str(info.path))
        install_moe_dispatch(model, spec.moe_impl)
        install_mask_alignment(model)
        loaded = LoadedModel(model, spec, info, variant, device, 0.0)
        if device.type == "cuda" and spec.offload != "accelerate":
            from ..memory.residency.planner import InsufficientVRAMError
            from .placement import place_for_spec

            try:
                loaded.residency = place_for_spec(model, spec, device)
            except InsufficientVRAMError as exc:
                raise NotEnoughVRAMError(
                    f"{exc} Choices: a larger vram_budget_gb, a smaller inference_headroom_gb, or the "
                    "NF4 / INT8 loaders, whose weights are 4x / 2x smaller."
                ) from None
        loaded.load_seconds = time.perf_counter() - start
        log.info("loaded %s in %.1f s (%s)", spec.describe(), loaded.load_seconds, variant.name)
        return loaded
    except BaseException:
        del model
        gc.collect()
        stats.release_cached_memory()
        raise

"""Loading a checkpoint through transformers (trust_remote_code) in bf16, int8 or nf4."""

from __future__ import annotations

import gc
import importlib.util
import logging
import time
import warnings
from typing import Any

import torch

from ..memory import stats
from ..memory.unload import track_model
from .checkpoint import loadable_path, validate_checkpoint
from .errors import DependencyError
from .spec import LoadedModel, LoadSpec
from .variants import detect_variant, read_generation_config

log = logging.getLogger(__name__)

# Kept in full precision when quantizing: quantizing them garbles output or fails.
# Substring match on module names (transformers' llm_int8_skip_modules semantics).
SKIP_QUANTIZATION = [
    "mlp.gate",
    "shared_mlp",
    "vae",
    "vision_model",
    "vision_aligner",
    "patch_embed",
    "final_layer",
    "time_embed",
    "timestep_emb",
    "lm_head",
    "wte",
]


def require_bitsandbytes(quant: str) -> None:
    """Raise a DependencyError naming the fix if bitsandbytes is not importable."""
    if quant == "bf16":
        return
    try:
        found = importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules entry is None (import blocked)
        found = False
    if not found:
        raise DependencyError(
            f"{quant.upper()} needs bitsandbytes, which is not installed in ComfyUI's Python. "
            "Install it with `python -m pip install bitsandbytes>=0.48` (the Python that runs ComfyUI), "
            "or use the BF16 loader, which works without it."
        )
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # a broken install raises all sorts of errors
        raise DependencyError(
            f"bitsandbytes is installed but does not import ({exc}). Reinstall it "
            "(`python -m pip install -U bitsandbytes`) or use the BF16 loader."
        ) from exc


def quantization_config(quant: str) -> Any:
    """The BitsAndBytesConfig for int8 / nf4, or None for bf16."""
    if quant == "bf16":
        return None
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_QUANTIZATION)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=SKIP_QUANTIZATION,
    )


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_model(spec: LoadSpec) -> LoadedModel:
    """Validate, load through transformers, prepare MoE dispatch and weight placement.

    On any failure nothing stays loaded: the partial model is dropped and memory released.
    """
    info = validate_checkpoint(spec.path)
    require_bitsandbytes(spec.quant)
    from transformers import AutoModelForCausalLM

    from .moe_dispatch import install_moe_dispatch

    device = default_device()
    variant = detect_variant(info.config, read_generation_config(info.path))
    kwargs: dict[str, Any] = dict(
        trust_remote_code=True,
        dtype=torch.bfloat16,  # transformers >= 4.56 name (torch_dtype is deprecated)
        attn_implementation="sdpa",
        moe_impl="eager",
        low_cpu_mem_usage=True,
    )
    if spec.quant == "int8":  # logged on every int8 matmul
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    qconfig = quantization_config(spec.quant)
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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
            model = AutoModelForCausalLM.from_pretrained(str(loadable_path(info)), **kwargs)
        model.eval()
        track_model(model)
        if hasattr(model, "load_tokenizer"):
            model.load_tokenizer(str(info.path))
        install_moe_dispatch(model, spec.moe_impl)
        loaded = LoadedModel(model, spec, info, variant, device, 0.0)
        if device.type == "cuda" and spec.offload != "accelerate":
            from .placement import place_for_spec

            loaded.residency = place_for_spec(model, spec, device)
        loaded.load_seconds = time.perf_counter() - start
        log.info("loaded %s in %.1f s (%s)", spec.describe(), loaded.load_seconds, variant.name)
        return loaded
    except BaseException:
        del model
        gc.collect()
        stats.release_cached_memory()
        raise

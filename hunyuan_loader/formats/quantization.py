"""What gets quantized (and what must not), the BitsAndBytesConfig, and the checks around it.

Only the decoder blocks' attention projections and routed experts are quantized. Everything
else stays in full precision: the router (``mlp.gate``), the shared expert, the VAE, the
vision encoder and aligner, the UNet-style patch_embed / final_layer, every timestep and
guidance embedder (the official TimestepEmbedder casts its input to ``mlp[0].weight.dtype``,
so a quantized one runs GELU on int8: official modeling_hunyuan_image_3.py:591), lm_head.

The skip list is derived from the checkpoint's own tensor names (the modules its code
defines), not written by hand, and holds under both rules transformers applies:
- 4.57: a module is skipped iff a key equals its full name or its last part, or ``key + "."``
  occurs in it (transformers/integrations/bitsandbytes.py, ``_replace_with_bnb_linear``);
- 5.x: iff a key (a regex) matches the full name from its start up to a module boundary, or the
  full name ends with the key (transformers/quantizers/quantizers_utils.py, ``should_convert_module``).
``time_embed`` therefore does NOT cover ``time_embed_2``: each embedder is listed by its own name;
an in-block module is listed by its path inside the block for 4.57 (``mlp.gate``) and by its full
relative path for 5.x (``mlp.gate.wg``), so a copy written on one version loads on the other.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..core import hf_compat
from ..core.errors import DependencyError

log = logging.getLogger(__name__)

# Inside a decoder block, these are the modules that are quantized; everything else is kept.
_QUANTIZED_IN_BLOCK = re.compile(r"^model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.experts\.\d+\.(gate_and_up_proj|down_proj))$")
_IN_BLOCK = re.compile(r"^model\.layers\.\d+\.(.+)$")
ROUTER_SUFFIX = ".mlp.gate.wg"


def is_quantizable(module_name: str) -> bool:
    """True for the modules the pack quantizes: attention projections and routed experts."""
    return bool(_QUANTIZED_IN_BLOCK.match(module_name))


def skips_v4(module_name: str, skip_keys: Iterable[str]) -> bool:
    """transformers 4.57's llm_int8_skip_modules rule for one module (full dotted name)."""
    short = module_name.rsplit(".", 1)[-1]
    return any(short == key or key == module_name or key + "." in module_name for key in skip_keys)


def skips_v5(module_name: str, skip_keys: Iterable[str]) -> bool:
    """transformers 5.x's rule (``should_convert_module``) for one module (full dotted name)."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{key}){boundary}", module_name) or module_name.endswith(key) for key in skip_keys)


def transformers_skips(module_name: str, skip_keys: Iterable[str]) -> bool:
    """The installed transformers' llm_int8_skip_modules rule for one module (full dotted name)."""
    return (skips_v5 if hf_compat.is_v5() else skips_v4)(module_name, skip_keys)


def checkpoint_tensor_names(path: Path) -> list[str]:
    """Every tensor name of a checkpoint folder, from its index or its safetensors headers."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    from safetensors import safe_open

    names: list[str] = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            names.extend(fh.keys())
    return sorted(names)


def _module_names(tensor_names: Iterable[str]) -> set[str]:
    """Owning module of every weight-like tensor (``x.weight`` -> ``x``); bnb state names folded in."""
    out = set()
    for name in tensor_names:
        base = name.split(".weight")[0] if ".weight" in name else name.rsplit(".", 1)[0]
        out.add(base)
    return out


def skip_modules_for(tensor_names: Iterable[str]) -> list[str]:
    """llm_int8_skip_modules that keep every module but attention and routed experts in full precision.

    Keys: each top-level module other than ``model`` by its own name (vae, vision_model,
    time_embed, time_embed_2, guidance_emb, ...), ``lm_head``, the non-block parts of
    ``model`` (wte, ln_f, ...), and the in-block modules other than attention/experts by their
    path inside the block (``mlp.gate``, ``mlp.shared_mlp``, ... and ``mlp.gate.wg``, ...). Verified
    against both rules transformers applies (4.57 and 5.x): no quantizable module is covered, every
    other module is.
    """
    modules = _module_names(tensor_names)
    keys: set[str] = {"lm_head"}
    for name in modules:
        parts = name.split(".")
        if parts[0] != "model":
            keys.add(parts[0])
            continue
        inner = _IN_BLOCK.match(name)
        if inner is None:
            keys.add(".".join(parts[:2]) if len(parts) > 1 else name)
            continue
        if is_quantizable(name):
            continue
        rel = inner.group(1).split(".")
        # 4.57: a group inside the block by its first two levels (mlp.gate, mlp.shared_mlp); a leaf
        # (input_layernorm, self_attn.query_layernorm) by its own name. 5.x: the whole path in the block.
        keys.add(".".join(rel[:2]) if len(rel) > 2 else rel[-1])
        keys.add(inner.group(1))
    keys = {k for k in keys if k}
    wrong = [m for m in modules if is_quantizable(m) and (skips_v4(m, keys) or skips_v5(m, keys))]
    missed = [m for m in modules if not is_quantizable(m) and not (skips_v4(m, keys) and skips_v5(m, keys))]
    if wrong or missed:  # fall back to exact names, which the rule always honours
        log.debug("skip keys %s cover %s / miss %s: using exact names", sorted(keys), wrong[:3], missed[:3])
        keys = {m for m in modules if not is_quantizable(m)} | {"lm_head"}
    return sorted(keys)


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


def bnb_quantization_config(quant: str, skip_modules: list[str]) -> Any:
    """The BitsAndBytesConfig for int8 / nf4 (formats/bnb_int8.py, bnb_nf4.py)."""
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=list(skip_modules),
    )


@torch.no_grad()
def restore_float32_routers(model: Any, path: Path) -> int:
    """Give the routers back the float32 precision the model code creates them with.

    Under a bitsandbytes quantization_config transformers casts every non-quantized float
    parameter to the model dtype (bf16), the router ``mlp.gate.wg`` too, although the official
    code creates it in float32 (modeling_hunyuan_image_3.py:1102) and routes in float32 when its
    weight is float32 (:1114). The bf16 load keeps it float32; this re-reads the router weights
    from the checkpoint so int8/nf4 route exactly like bf16. Returns the number restored.
    """
    from safetensors import safe_open

    routers = {
        name + ".weight": module
        for name, module in model.named_modules()
        if name.endswith(ROUTER_SUFFIX) and getattr(module, "weight", None) is not None
        and module.weight.dtype != torch.float32
    }
    if not routers:
        return 0
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    else:
        weight_map = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as fh:
                weight_map.update(dict.fromkeys(fh.keys(), file.name))
    by_file: dict[str, list[str]] = {}
    for key in routers:
        if key in weight_map:
            by_file.setdefault(weight_map[key], []).append(key)
    restored = 0
    for file, keys in by_file.items():
        with safe_open(str(path / file), framework="pt") as fh:
            for key in keys:
                module = routers[key]
                value = fh.get_tensor(key).to(device=module.weight.device, dtype=torch.float32)
                module.weight = torch.nn.Parameter(value, requires_grad=False)
                restored += 1
    log.debug("restored %d float32 routers", restored)
    return restored

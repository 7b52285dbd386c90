"""Compare two loaded models: module tree, every tensor (type, dtype, shape, device, values,
requires_grad, bitsandbytes state), config, generation_config and loader attributes."""

from __future__ import annotations

from typing import Any

import torch

LOADER_ATTRS = ("is_quantized", "is_loaded_in_8bit", "is_loaded_in_4bit", "quantization_method",
                "_keep_in_fp32_modules", "training")


def _bnb_state(module: torch.nn.Module, t: Any) -> tuple:
    """int8 scales (wherever bnb keeps them: weight.SCB before the first forward, module.state.SCB
    after it or after the residency engine normalised the layer) and the 4-bit quant_state."""
    scb = getattr(t, "SCB", None)
    state = module.__dict__.get("state")
    if scb is None and state is not None:
        scb = getattr(state, "SCB", None)
    qs = getattr(t, "quant_state", None)
    return (
        None if scb is None else tuple(scb.shape),
        None if qs is None else (qs.quant_type, qs.blocksize, tuple(qs.shape), str(qs.dtype), qs.nested),
    )


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """Everything about a model that a load decides, without the values."""
    out: dict[str, Any] = {}
    for name, m in model.named_modules():
        out[f"module {name}"] = (type(m).__name__, m.training)
        prefix = f"{name}." if name else ""
        for pname, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is None or (pname in m._buffers and pname in m._non_persistent_buffers_set):
                continue
            out[f"tensor {prefix}{pname}"] = (type(t).__name__, str(t.dtype), tuple(t.shape), t.device.type,
                                              getattr(t, "requires_grad", None), _bnb_state(m, t))
    for attr in LOADER_ATTRS:
        out[f"attr {attr}"] = repr(getattr(model, attr, "-"))
    out["class"] = type(model).__qualname__  # the module is named after the checkpoint folder
    out["config"] = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    out["generation_config"] = model.generation_config.to_dict()
    return out


def differences(a: torch.nn.Module, b: torch.nn.Module, *, values: bool = True) -> list[str]:
    """What differs between two models (empty: identical)."""
    da, db = describe(a), describe(b)
    diffs = [f"{k}: {da.get(k)!r} != {db.get(k)!r}" for k in sorted(set(da) | set(db), key=str)
             if da.get(k) != db.get(k)]
    if values:
        sa, sb = a.state_dict(), b.state_dict()
        for k in sa:
            if k in sb and isinstance(sa[k], torch.Tensor):
                x, y = sa[k], sb[k]
                if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x.cpu(), y.cpu()):
                    diffs.append(f"values of {k}")
    return diffs


def logits(model: torch.nn.Module, n: int = 12) -> torch.Tensor:
    """Logits of a fixed token sequence (a cheap forward through every block)."""
    ids = torch.arange(3, 3 + n).remainder(model.config.vocab_size)[None]
    device = model.model.wte.weight.device  # non-block parts are always on the compute device
    with torch.inference_mode():
        return model(input_ids=ids.to(device)).logits.float().cpu()

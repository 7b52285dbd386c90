"""Which HunyuanImage-3 variant a checkpoint is, from its config (never its folder name)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BASE, INSTRUCT, DISTIL = "base", "instruct", "instruct-distil"


@dataclass(frozen=True)
class Variant:
    """What the pack needs to know to drive a checkpoint."""

    name: str
    returns_tuple: bool  # Instruct: (cot_text, [images]); base: one image
    honours_step_kwargs: bool  # the Instruct code ignores diff_infer_steps kwargs
    cfg_distilled: bool
    default_steps: int
    default_guidance: float
    flow_shift: float


def _auto_model_target(config: dict) -> str:
    auto_map = config.get("auto_map") or {}
    return str(auto_map.get("AutoModelForCausalLM", ""))


def detect_variant(config: dict, generation_config: dict | None = None) -> Variant:
    """Tell base / Instruct / Instruct-Distil apart by auto_map, model_version and distil flags."""
    gen = generation_config or {}
    target = _auto_model_target(config).lower()
    version = str(config.get("model_version", "")).lower()
    instruct = "image_3" in target.split(".")[0] or "instruct" in version
    distilled = bool(config.get("cfg_distilled") or config.get("use_meanflow") or "distil" in version)
    name = DISTIL if (instruct and distilled) else INSTRUCT if instruct else BASE
    steps = int(gen.get("diff_infer_steps", 8 if distilled else 50))
    guidance = float(gen.get("diff_guidance_scale", 2.5 if distilled else 5.0))
    return Variant(
        name=name,
        returns_tuple=instruct,
        honours_step_kwargs=not instruct,
        cfg_distilled=distilled,
        default_steps=steps,
        default_guidance=guidance,
        flow_shift=float(gen.get("flow_shift", 3.0)),
    )


def read_generation_config(path: Path) -> dict:
    """generation_config.json of a checkpoint folder, or {} if it has none."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError:
        return {}

"""Force Unload and Soft Unload nodes."""

from __future__ import annotations

from typing import Any

from ..hunyuan_loader.cache import ModelHandle, get_cache
from . import comfy_adapter


class _AnyType(str):
    """'*' that ComfyUI's link validation accepts for every type (it tests `received != expected`)."""

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = str.__hash__


ANY = _AnyType("*")


class HunyuanImage3ForceUnload:
    """Drops the cached model and frees its VRAM and RAM; optionally hunts orphaned tensors."""

    RETURN_TYPES = (ANY, "STRING")
    RETURN_NAMES = ("trigger", "report")
    FUNCTION = "unload"
    CATEGORY = comfy_adapter.CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Unloads HunyuanImage-3 completely. nuke_orphaned_tensors also frees model memory left "
        "behind by an error (e.g. after a CUDA out-of-memory), without touching other models."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "nuke_orphaned_tensors": ("BOOLEAN", {"default": False,
                    "tooltip": "Also free HunyuanImage-3 tensors no cache owns (left by an OOM traceback)."}),
            },
            "optional": {"trigger": (ANY, {"tooltip": "Any output: runs this node after it."})},
        }

    @classmethod
    def IS_CHANGED(cls, **_: Any) -> float:
        return float("nan")  # always run

    def unload(self, nuke_orphaned_tensors: bool, trigger: Any = None) -> dict[str, Any]:
        report = get_cache().force_unload(nuke_orphaned_tensors).text()
        return {"ui": {"text": [report]}, "result": (trigger, report)}


class HunyuanImage3SoftUnload:
    """Parks the model in CPU RAM and frees the GPU; the next Generate brings it back in seconds."""

    RETURN_TYPES = (comfy_adapter.MODEL_TYPE, ANY)
    RETURN_NAMES = ("model", "trigger")
    FUNCTION = "unload"
    CATEGORY = comfy_adapter.CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Moves every weight of the model to (pinned) CPU RAM and frees the GPU for other work. "
        "The next Generate reloads it from RAM in seconds instead of minutes from disk."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"model": (comfy_adapter.MODEL_TYPE, {"tooltip": "The model to park in CPU RAM."})},
            "optional": {"trigger": (ANY, {"tooltip": "Any output: runs this node after it."})},
        }

    @classmethod
    def IS_CHANGED(cls, **_: Any) -> float:
        return float("nan")

    def unload(self, model: ModelHandle, trigger: Any = None) -> dict[str, Any]:
        cache = get_cache()
        if cache.loaded is not None and cache.loaded.spec == model.spec:
            report = cache.unload("park")
        else:
            report = "That model is not loaded; nothing to unload."
        return {"ui": {"text": [report]}, "result": (model, trigger)}

"""ComfyUI-HunyuanImage3: HunyuanImage-3.0 text-to-image nodes. Registers nodes only."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

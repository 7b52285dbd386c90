"""ComfyUI-HunyuanImage3: HunyuanImage-3.0 text-to-image nodes. Registers the nodes (nodes/ holds their
classes), our entry in ComfyUI's model folders and memory management, and the frontend extension in web/
(WEB_DIRECTORY) that shows the nodes' text on the canvas; nothing else."""


from .hunyuan_loader.cache import get_cache
from .nodes import comfy_adapter, comfy_memory
from .nodes.generate import HunyuanImage3Generate
from .nodes.loaders import (
    HunyuanImage3LoaderBF16,
    HunyuanImage3LoaderBudget,
    HunyuanImage3LoaderINT8,
    HunyuanImage3LoaderNF4,
)
from .nodes.unload import HunyuanImage3ForceUnload, HunyuanImage3SoftUnload

comfy_adapter.register_model_folder()
comfy_memory.register_with_comfy_memory(get_cache)

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "HunyuanImage3LoaderINT8": HunyuanImage3LoaderINT8,
    "HunyuanImage3LoaderNF4": HunyuanImage3LoaderNF4,
    "HunyuanImage3LoaderBF16": HunyuanImage3LoaderBF16,
    "HunyuanImage3LoaderBudget": HunyuanImage3LoaderBudget,
    "HunyuanImage3Generate": HunyuanImage3Generate,
    "HunyuanImage3SoftUnload": HunyuanImage3SoftUnload,
    "HunyuanImage3ForceUnload": HunyuanImage3ForceUnload,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "HunyuanImage3LoaderINT8": "HunyuanImage-3 Loader (INT8)",
    "HunyuanImage3LoaderNF4": "HunyuanImage-3 Loader (NF4)",
    "HunyuanImage3LoaderBF16": "HunyuanImage-3 Loader (BF16)",
    "HunyuanImage3LoaderBudget": "HunyuanImage-3 Loader (VRAM budget)",
    "HunyuanImage3Generate": "HunyuanImage-3 Generate",
    "HunyuanImage3SoftUnload": "HunyuanImage-3 Soft Unload (to RAM)",
    "HunyuanImage3ForceUnload": "HunyuanImage-3 Force Unload",
}

# The frontend extension that shows the nodes' text on the canvas (ComfyUI serves it under /extensions/).
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

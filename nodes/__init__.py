"""ComfyUI node classes (thin: inputs, outputs, tooltips) that call the library."""

from . import comfy_adapter, comfy_memory
from .generate import HunyuanImage3Generate
from .loaders import (
    HunyuanImage3LoaderBF16,
    HunyuanImage3LoaderBudget,
    HunyuanImage3LoaderINT8,
    HunyuanImage3LoaderNF4,
)
from .unload import HunyuanImage3ForceUnload, HunyuanImage3SoftUnload

comfy_adapter.register_model_folder()
comfy_memory.register_with_comfy_memory()

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

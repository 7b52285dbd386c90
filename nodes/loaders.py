"""Loader nodes: INT8, NF4, BF16 and Budget. Each returns a light HUNYUAN_IMAGE3 handle, checked at once;
the weights load when Generate first needs them, after its own checks (a request that can never run
fails in seconds, before minutes of loading)."""

from __future__ import annotations

import logging
from typing import Any

from ..hunyuan_loader.cache import ModelHandle, get_cache
from ..hunyuan_loader.core.spec import INT8_FORMATS, LoadSpec
from ..hunyuan_loader.load.multi_gpu import MODES as MULTI_GPU_MODES
from . import comfy_adapter, comfy_memory

log = logging.getLogger(__name__)

CATEGORY = comfy_adapter.CATEGORY
MODEL_TYPE = comfy_adapter.MODEL_TYPE

MODEL_NAME_TIP = (
    "Checkpoint folder (holding config.json) directly inside ComfyUI/models/HunyuanImage-3 "
    "or inside a folder listed for 'HunyuanImage-3' in extra_model_paths.yaml. A name, not a path."
)
OFFLOAD_TIP = (
    "disabled: all weights on the GPU (INT8 still streams a few blocks for a run above 1.2 MP). "
    "smart: keep as many decoder blocks on the GPU as fit, stream the rest from pinned RAM with overlap."
)
MOE_TIP = (
    "gather_scatter: memory linear in image size, same images. reference: the model's own "
    "dispatch (12 x MP^1.4 GB of activations)."
)


INT8_FORMAT_TIP = (
    "INT8 kernels. w8a16: int8 weights with bf16 activations, dequantized inside the matmul "
    "(fast; no bitsandbytes needed). bnb: bitsandbytes LLM.int8 (slower). A pre-quantized "
    "checkpoint loads in its own format."
)


def load_through_cache(spec: LoadSpec) -> tuple[ModelHandle]:
    """The handle of ``spec``, checked at once (folder, config.json, variant, weight format, the plan
    against this machine's memory); the weights load at the first Generate that needs them, after
    Generate's own checks (cache.HunyuanModelCache.handle)."""
    return (get_cache().handle(spec),)


def load_now(handle: ModelHandle) -> None:
    """Load the handle's weights here (ComfyUI's own models make room first), with the bytes read on
    ComfyUI's progress bar and its Cancel checked between blocks."""
    get_cache().bring_back(handle, comfy_memory.make_room_on_gpu, progress=comfy_adapter.progress_callback(100),
                           cancel=comfy_adapter.cancel_check())


SAVE_COPY_TIP = (
    "After loading a BF16 checkpoint, also write the quantized copy next to it as <name>-INT8 / <name>-NF4 "
    "(about 1/2 / 1/3 of the disk space). Pick that folder next time: it loads without re-quantizing, in a "
    "fraction of the time. Nothing is written if the folder exists or the checkpoint is already quantized. "
    "While it writes the copy, this loader loads the model itself instead of leaving that to Generate."
)


class _SavesQuantizedCopy:
    """INT8 / NF4 loaders: the optional save of the pre-quantized copy right after the load."""

    FUNCTION = "load_and_save"
    QUANT = "int8"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        types = super().INPUT_TYPES()  # type: ignore[misc]
        types["optional"]["save_quantized_copy"] = ("BOOLEAN", {"default": False, "tooltip": SAVE_COPY_TIP})
        return types

    def load_and_save(self, model_name: str, *args: Any, save_quantized_copy: bool = False,
                      **kwargs: Any) -> tuple[ModelHandle]:
        out = self.load(model_name, *args, **kwargs)  # type: ignore[attr-defined]
        if save_quantized_copy:
            from ..hunyuan_loader.checkpoint.prequantized import default_copy_path

            source = comfy_adapter.resolve_model_path(model_name)
            name = default_copy_path(source, self.QUANT).name
            dest = comfy_adapter.resolve_output_folder(name) if comfy_adapter.in_comfyui() \
                else default_copy_path(source, self.QUANT)
            if dest.exists():  # nothing to write: the load waits for Generate as usual
                log.info("quantized copy %s exists already: not written again", dest)
                return out
            load_now(out[0])  # the copy is written from the loaded model, so this load cannot wait
            written = get_cache().save_quantized_copy(out[0], dest, progress=comfy_adapter.progress_callback(100))
            if written is not None:
                log.info("wrote the quantized copy %s: choose '%s' in the loader next time", written, name)
        return out


DEVICES_TIP = (
    "GPUs for this model: auto = every visible GPU (ComfyUI's first), or a list such as cuda:0,cuda:1. "
    "One GPU that holds the model uses that GPU only."
)
MULTI_GPU_TIP = (
    "With several GPUs. auto: the CFG halves of each step run on different GPUs at once when every GPU holds "
    "the model, else the decoder blocks are split over the GPUs (no CPU offload when they hold it together). "
    "split / cfg_parallel: force one; off: the first GPU only. The Generate node's text says which ran."
)


def _common_optional() -> dict[str, Any]:
    return {
        "moe_impl": (["gather_scatter", "reference"], {"default": "gather_scatter", "tooltip": MOE_TIP}),
        # issue 13: several GPUs (hunyuan_loader/multi_gpu.py)
        "devices": ("STRING", {"default": "auto", "tooltip": DEVICES_TIP}),
        "multi_gpu": (list(MULTI_GPU_MODES), {"default": "auto", "tooltip": MULTI_GPU_TIP}),
    }


class _LoaderBase:
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    QUANT = "bf16"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model_name": (comfy_adapter.list_model_names(), {"tooltip": MODEL_NAME_TIP}),
                "offload_mode": (["disabled", "smart"], {"default": "disabled", "tooltip": OFFLOAD_TIP}),
            },
            "optional": _common_optional(),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model_name: str | None = None) -> bool | str:
        # Taking model_name turns off ComfyUI's own list check for it, so this applies the same
        # rule (a listed folder name, never a path) and says where models go.
        return comfy_adapter.check_model_name(model_name)

    def load(self, model_name: str, offload_mode: str, moe_impl: str = "gather_scatter", devices: str = "auto",
             multi_gpu: str = "auto") -> tuple[ModelHandle]:
        path = comfy_adapter.resolve_model_path(model_name)
        return load_through_cache(LoadSpec(str(path), quant=self.QUANT, offload=offload_mode, moe_impl=moe_impl,
                                           devices=devices, multi_gpu=multi_gpu))


class HunyuanImage3LoaderINT8(_SavesQuantizedCopy, _LoaderBase):
    """HunyuanImage-3 in INT8 (~81 GB for the real model)."""

    QUANT = "int8"
    DESCRIPTION = (
        "Loads HunyuanImage-3 quantized to INT8 (~81 GB of weights): int8 weights with bf16 "
        "activations by default, or bitsandbytes LLM.int8 (int8_format bnb)."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        types = super().INPUT_TYPES()
        types["optional"]["int8_format"] = (list(INT8_FORMATS), {"default": INT8_FORMATS[0], "tooltip": INT8_FORMAT_TIP})
        return types

    def load(
        self, model_name: str, offload_mode: str, moe_impl: str = "gather_scatter", int8_format: str = INT8_FORMATS[0],
        devices: str = "auto", multi_gpu: str = "auto",
    ) -> tuple[ModelHandle]:
        path = comfy_adapter.resolve_model_path(model_name)
        return load_through_cache(LoadSpec(str(path), quant=self.QUANT, offload=offload_mode, moe_impl=moe_impl,
                                           int8_format=int8_format, devices=devices, multi_gpu=multi_gpu))


class HunyuanImage3LoaderNF4(_SavesQuantizedCopy, _LoaderBase):
    """HunyuanImage-3 in bitsandbytes NF4 (~40-48 GB for the real model)."""

    QUANT = "nf4"
    DESCRIPTION = "Loads HunyuanImage-3 quantized to NF4 with bitsandbytes (~40-48 GB of weights)."


class HunyuanImage3LoaderBF16(_LoaderBase):
    """HunyuanImage-3 in full BF16 quality; 'smart' streams what does not fit."""

    QUANT = "bf16"
    DESCRIPTION = (
        "Loads HunyuanImage-3 in BF16 (full quality, ~160 GB). On a 96 GB card use offload_mode "
        "'smart': blocks that do not fit stream from pinned RAM, overlapped with compute."
    )


class HunyuanImage3LoaderBudget:
    """Any format, placed to fit a VRAM budget you give."""

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads HunyuanImage-3 so that weights plus inference headroom stay inside vram_budget_gb; "
        "decoder blocks that do not fit stream from pinned RAM."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model_name": (comfy_adapter.list_model_names(), {"tooltip": MODEL_NAME_TIP}),
                "quantization": (["bf16", "int8", "nf4"], {"default": "bf16", "tooltip": "Weight format."}),
                "vram_budget_gb": (
                    "FLOAT",
                    {"default": 80.0, "min": 1.0, "max": 1024.0, "step": 1.0,
                     "tooltip": "GPU memory this model may use in all, weights plus inference (on each GPU "
                                "when devices lists several)."},
                ),
                "inference_headroom_gb": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 512.0, "step": 0.5,
                     "tooltip": "Kept free for activations (on each GPU). 0 = the estimate for a 1 MP image."},
                ),
            },
            "optional": {
                **_common_optional(),
                "int8_format": (list(INT8_FORMATS), {"default": INT8_FORMATS[0], "tooltip": INT8_FORMAT_TIP}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model_name: str | None = None) -> bool | str:
        # Taking model_name turns off ComfyUI's own list check for it, so this applies the same
        # rule (a listed folder name, never a path) and says where models go.
        return comfy_adapter.check_model_name(model_name)

    def load(
        self,
        model_name: str,
        quantization: str,
        vram_budget_gb: float,
        inference_headroom_gb: float,
        moe_impl: str = "gather_scatter",
        int8_format: str = INT8_FORMATS[0],
        devices: str = "auto",
        multi_gpu: str = "auto",
    ) -> tuple[ModelHandle]:
        path = comfy_adapter.resolve_model_path(model_name)
        spec = LoadSpec(
            str(path),
            quant=quantization,
            offload="budget",
            vram_budget_gb=vram_budget_gb,
            headroom_gb=inference_headroom_gb or None,
            moe_impl=moe_impl,
            int8_format=int8_format,
            devices=devices,
            multi_gpu=multi_gpu,
        )
        return load_through_cache(spec)

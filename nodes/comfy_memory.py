"""Our model's entry in ComfyUI's memory management (comfy.model_management), one job.

ComfyUI frees memory by walking comfy.model_management.current_loaded_models (a list of
LoadedModel entries) and calling entry.model_unload(bytes) on each: from free_memory()
when one of its own models needs VRAM (load_models_gpu), from unload_all_models() on
POST /free and after a CUDA OOM. Our model is not a ModelPatcher, so we put ONE entry of
our own in that list (register_with_comfy_memory, called when the nodes register): a
LoadedModel subclass around a small duck-typed patcher whose sizes come from our cache and
whose unload calls our cache.
  * a finite request on a GPU (another model needs N bytes of VRAM): cache.free_gpu(N),
    which parks/streams our blocks to CPU RAM (never a drop); the next Generate brings them back;
  * everything (unload_all_models: /free, OOM recovery) or any request on a CPU-only
    ComfyUI (--cpu: the weights live in RAM): cache.unload("drop"); the next Generate
    reloads from disk through the handle.
The entry stays in the list for the life of the process (model_unload returns False, so
ComfyUI never pops it) and reports 0 bytes while nothing is loaded. make_room_on_gpu is
the other direction: ComfyUI's own models yield before ours loads or runs.
With nodes/comfy_adapter.py, the only module that touches ComfyUI (through
comfy_adapter.comfy_module, so every import stays guarded). See docs/comfyui_memory.md.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .comfy_adapter import comfy_module

log = logging.getLogger(__name__)


class _ComfyModelStub:
    """What ComfyUI sees as `patcher.model` (it logs its class name and weak-references it)."""

    def __repr__(self) -> str:
        return "HunyuanImage3 (cached by the ComfyUI-HunyuanImage3 pack)"


_ComfyModelStub.__name__ = "HunyuanImage3"


class HunyuanComfyPatcher:
    """The slice of comfy.model_patcher.ModelPatcher that model_management calls, backed by our cache."""

    parent = None

    def __init__(self, mm: ModuleType) -> None:
        self._mm = mm
        self.model = _ComfyModelStub()
        self.load_device = mm.get_torch_device()
        self.offload_device = mm.unet_offload_device()
        self.unloads: list[tuple[str, int, int]] = []  # (action, bytes requested, bytes freed), for tests

    @staticmethod
    def _cache() -> Any:
        return _cache_getter()

    def _on_cpu(self) -> bool:
        return getattr(self.load_device, "type", str(self.load_device)) == "cpu"

    # sizes ------------------------------------------------------------------------
    def model_size(self) -> int:
        return self._cache().total_bytes()

    def loaded_size(self) -> int:
        cache = self._cache()
        return cache.total_bytes() if self._on_cpu() else cache.gpu_bytes()

    def current_loaded_device(self):
        return self.load_device if self.loaded_size() > 0 else self.offload_device

    def model_dtype(self):
        import torch

        return torch.bfloat16

    # unloading (the part that matters) ----------------------------------------------
    def partially_unload(self, device_to=None, memory_to_free: int = 0) -> int:
        if self._on_cpu():
            return 0
        freed = int(self._cache().free_gpu(int(memory_to_free)))
        self.unloads.append(("free_gpu", int(memory_to_free), freed))
        return freed

    def detach(self, unpatch_all: bool = True) -> None:
        cache = self._cache()
        before = cache.total_bytes()
        if cache.loaded is not None:
            log.info("ComfyUI asked to unload models: dropping the cached HunyuanImage-3 model")
            cache.unload("drop")
        self.unloads.append(("drop", -1, before))

    # loading: ComfyUI never loads us (our nodes do); these keep load_models_gpu harmless
    def partially_load(self, device_to=None, extra_memory=0, force_patch_weights=False) -> int:
        return 0

    def model_patches_to(self, device) -> None:
        return None

    def model_patches_models(self) -> list:
        return []

    def lowvram_patch_counter(self) -> int:
        return 0

    def is_clone(self, other) -> bool:
        return other is self

    def clone_has_same_weights(self, other) -> bool:
        return other is self

    def get_free_memory(self, device) -> int:
        return int(self._mm.get_free_memory(device))


_EVERYTHING = 1e20  # unload_all_models() asks free_memory(1e30): anything this big means "all"
_comfy_patcher: HunyuanComfyPatcher | None = None
_comfy_entry = None


def _no_cache() -> Any:
    return None


_cache_getter: Callable[[], Any] = _no_cache  # set by register_with_comfy_memory


def _make_loaded_model_class(mm: ModuleType) -> type:
    class HunyuanLoadedModel(mm.LoadedModel):
        """A current_loaded_models entry that ComfyUI never pops; unloading goes to our cache."""

        def __init__(self, patcher: HunyuanComfyPatcher) -> None:
            super().__init__(patcher)
            self.real_model = weakref.ref(patcher.model)  # is_dead()/cleanup_models() read this
            self.model_finalizer = weakref.finalize(patcher.model, lambda: None)

        @property
        def currently_used(self) -> bool:  # keeps us out of loaded_models(only_currently_used=True)
            return False

        @currently_used.setter
        def currently_used(self, _value: bool) -> None:
            pass

        def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
            return self.model.model

        def model_use_more_vram(self, extra_memory, force_patch_weights=False) -> int:
            return 0

        def model_unload(self, memory_to_free=None, unpatch_weights=True) -> bool:
            patcher = self.model
            if patcher is None or patcher.model_size() == 0:
                return False
            everything = memory_to_free is None or memory_to_free >= _EVERYTHING
            if not everything and not patcher._on_cpu():
                # parking moves all our weights off the GPU: dropping would free no more VRAM
                patcher.partially_unload(patcher.offload_device, memory_to_free)
                return False
            patcher.detach(unpatch_weights)
            mm.soft_empty_cache()
            return False  # stay listed: the next load is tracked by the same entry

    return HunyuanLoadedModel


def make_room_on_gpu(bytes_needed: int) -> int:
    """Ask ComfyUI to unload its own models until ``bytes_needed`` are free on its GPU.

    Our own entry is kept (keep_loaded). Returns how many of ComfyUI's models went; 0
    outside ComfyUI or on a CPU-only ComfyUI.
    """
    mm = comfy_module("comfy.model_management")
    if mm is None or bytes_needed <= 0:
        return 0
    device = mm.get_torch_device()
    if getattr(device, "type", None) != "cuda":
        return 0
    keep = [_comfy_entry] if _comfy_entry is not None else []
    unloaded = mm.free_memory(int(bytes_needed), device, keep_loaded=keep)
    if unloaded:
        log.info("unloaded %d ComfyUI model(s) to make room for HunyuanImage-3", len(unloaded))
    return len(unloaded)


def register_with_comfy_memory(cache_getter: Callable[[], Any]) -> bool:
    """Put our cache (``cache_getter()`` returns it) into ComfyUI's memory management (idempotent). False
    outside ComfyUI. The getter is passed in so that this adapter does not import the library above it."""
    global _comfy_patcher, _comfy_entry, _cache_getter
    _cache_getter = cache_getter
    mm = comfy_module("comfy.model_management")
    if mm is None or not hasattr(mm, "current_loaded_models") or not hasattr(mm, "LoadedModel"):
        return False
    if _comfy_entry is not None and any(e is _comfy_entry for e in mm.current_loaded_models):
        return True
    try:
        if _comfy_patcher is None:
            _comfy_patcher = HunyuanComfyPatcher(mm)
            _comfy_entry = _make_loaded_model_class(mm)(_comfy_patcher)
        mm.current_loaded_models.append(_comfy_entry)
    except Exception:  # an incompatible ComfyUI must not stop the pack from loading
        log.exception("could not register HunyuanImage-3 with ComfyUI's memory management")
        return False
    return True


def comfy_memory_entry():
    """Our current_loaded_models entry (or None): for diagnostics and tests."""
    return _comfy_entry


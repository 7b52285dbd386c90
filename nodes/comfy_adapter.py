"""The only module that imports ComfyUI (comfy.*, folder_paths).

Every import is guarded, so the pack, its CLI and its tests also run without ComfyUI.
Outside ComfyUI, model folders come from the HUNYUAN_MODELS_DIR environment variable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ..hunyuan_loader.checkpoint import WHERE_MODELS_GO
from ..hunyuan_loader.errors import CheckpointError

log = logging.getLogger(__name__)

MODEL_FOLDER = "HunyuanImage-3"
NO_MODELS = "(no model folders found: see README, 'Where the model goes')"


def _import(name: str) -> ModuleType | None:
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


def in_comfyui() -> bool:
    """True when running inside a ComfyUI process."""
    return _import("folder_paths") is not None


def register_model_folder() -> None:
    """Make models/HunyuanImage-3 a ComfyUI model folder (extra_model_paths.yaml entries stay)."""
    fp = _import("folder_paths")
    if fp is None:
        return
    default = os.path.join(fp.models_dir, MODEL_FOLDER)
    fp.add_model_folder_path(MODEL_FOLDER, default)


def model_roots() -> list[Path]:
    """Folders that hold checkpoint folders."""
    fp = _import("folder_paths")
    if fp is not None:
        try:
            return [Path(p) for p in fp.get_folder_paths(MODEL_FOLDER)]
        except KeyError:
            return []
    env = os.environ.get("HUNYUAN_MODELS_DIR", "")
    return [Path(p) for p in env.split(os.pathsep) if p]


def list_model_names() -> list[str]:
    """Checkpoint folders (holding a config.json) under the model roots, sorted."""
    names: set[str] = set()
    for root in model_roots():
        if not root.is_dir():
            continue
        for child in root.iterdir():
            if (child / "config.json").is_file():
                names.add(child.name)
    return sorted(names) or [NO_MODELS]


def resolve_model_path(name: str) -> Path:
    """The folder for a model_name input (a name under the model roots, or an absolute path)."""
    if not name or name == NO_MODELS:
        raise CheckpointError(f"No HunyuanImage-3 model folder was chosen. {WHERE_MODELS_GO}")
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        return candidate
    roots = model_roots()
    for root in roots:
        if (root / name).exists():
            return root / name
    searched = ", ".join(str(r) for r in roots) or "no model folders are registered"
    raise CheckpointError(f"Model folder '{name}' not found (searched: {searched}). {WHERE_MODELS_GO}")


def progress_callback(total: int) -> Callable[[int, int], None] | None:
    """A per-step progress reporter driving ComfyUI's progress bar, or None outside ComfyUI."""
    utils = _import("comfy.utils")
    if utils is None:
        return None
    bar = utils.ProgressBar(total)
    return lambda done, total_: bar.update_absolute(done, total_)


def cancel_check() -> Callable[[], None] | None:
    """Raises ComfyUI's interrupt exception when the user pressed Cancel, or None outside ComfyUI."""
    mm = _import("comfy.model_management")
    if mm is None:
        return None
    return mm.throw_exception_if_processing_interrupted


# =====================================================================================
# ComfyUI memory integration (owner: e2e / ComfyUI-integration; see docs/comfyui_memory.md)
#
# ComfyUI frees memory by walking comfy.model_management.current_loaded_models (a list of
# LoadedModel entries) and calling entry.model_unload(bytes) on each: from free_memory()
# when one of its own models needs VRAM (load_models_gpu), from unload_all_models() on
# POST /free and after a CUDA OOM. Our model is not a ModelPatcher, so we put ONE entry of
# our own in that list, at import: a LoadedModel subclass around a small duck-typed
# patcher whose sizes come from our cache and whose unload calls our cache.
#   * a finite request on a GPU (another model needs N bytes of VRAM): cache.free_gpu(N),
#     which parks/streams our blocks to CPU RAM (never a drop); the next Generate brings them back;
#   * everything (unload_all_models: /free, OOM recovery) or any request on a CPU-only
#     ComfyUI (--cpu: the weights live in RAM): cache.unload("drop"); the next Generate
#     reloads from disk through the handle.
# The entry stays in the list for the life of the process (model_unload returns False, so
# ComfyUI never pops it) and reports 0 bytes while nothing is loaded.
# =====================================================================================

import weakref  # noqa: E402  (this section's own import)


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
    def _cache():  # imported lazily: the cache module pulls in torch-side helpers
        from ..hunyuan_loader.cache import get_cache

        return get_cache()

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
    mm = _import("comfy.model_management")
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


def register_with_comfy_memory() -> bool:
    """Put our cache into ComfyUI's memory management (idempotent). False outside ComfyUI."""
    global _comfy_patcher, _comfy_entry
    mm = _import("comfy.model_management")
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


register_with_comfy_memory()

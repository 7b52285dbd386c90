"""ComfyUI's folders, progress bar and cancel, for our nodes (one job).

With nodes/comfy_memory.py (our entry in ComfyUI's memory management), the only modules
that import ComfyUI (comfy.*, folder_paths). Every import goes through :func:`comfy_module`,
guarded, so the pack, its CLI and its tests also run without ComfyUI. Outside ComfyUI,
model folders come from the HUNYUAN_MODELS_DIR environment variable, and any path is
accepted (the user runs the CLI or the library on their own machine).

Inside ComfyUI a model_name is a NAME checked by the path rule in nodes/model_paths.py
(docs/security.md says why).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from ..hunyuan_loader.checkpoint.validate import WHERE_MODELS_GO
from ..hunyuan_loader.core import settings
from ..hunyuan_loader.core.errors import CheckpointError, HunyuanError
from . import model_paths

MODEL_FOLDER = "HunyuanImage-3"
CATEGORY = "HunyuanImage3"  # the node menu
MODEL_TYPE = "HUNYUAN_IMAGE3"  # the loaders' output type: a light handle into the one model cache
NO_MODELS = "(no model folders found: see README, 'Where the model goes')"


def comfy_module(name: str) -> ModuleType | None:
    """ComfyUI's module ``name`` (e.g. "comfy.model_management"), or None outside ComfyUI."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


def in_comfyui() -> bool:
    """True when running inside a ComfyUI process."""
    return comfy_module("folder_paths") is not None


def register_model_folder() -> None:
    """Make models/HunyuanImage-3 a ComfyUI model folder (extra_model_paths.yaml entries stay)."""
    fp = comfy_module("folder_paths")
    if fp is None:
        return
    default = os.path.join(fp.models_dir, MODEL_FOLDER)
    fp.add_model_folder_path(MODEL_FOLDER, default)


def model_roots() -> list[Path]:
    """Folders that hold checkpoint folders (ComfyUI's registered folders, else HUNYUAN_MODELS_DIR)."""
    fp = comfy_module("folder_paths")
    if fp is not None:
        try:
            return [Path(p) for p in fp.get_folder_paths(MODEL_FOLDER)]
        except KeyError:
            return []
    return list(settings.get(settings.MODELS_DIR))


def _not_a_checkpoint(path: Path) -> str | None:
    if not path.is_dir():
        return "is not a folder"
    if not (path / "config.json").is_file():
        return "has no config.json (not a checkpoint folder)"
    return None


def list_model_names() -> list[str]:
    """The checkpoint folders (holding config.json) that resolve_model_path accepts, sorted."""
    return model_paths.names_in_roots(model_roots(), _not_a_checkpoint) or [NO_MODELS]


def resolve_model_path(name: str) -> Path:
    """The folder for a model_name input.

    Inside ComfyUI: the name of a checkpoint folder directly inside a registered model folder
    (the path rule of nodes/model_paths.py); paths are refused. Outside ComfyUI: also any
    absolute path.
    """
    if not name or name == NO_MODELS:
        raise CheckpointError(f"No HunyuanImage-3 model folder was chosen. {WHERE_MODELS_GO}")
    if in_comfyui():
        return model_paths.resolve_name(name, model_roots(), _not_a_checkpoint, hint=WHERE_MODELS_GO)
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        return candidate
    roots = model_roots()
    for root in roots:
        if (root / name).exists():
            return root / name
    searched = ", ".join(str(r) for r in roots) or "no model folders are registered"
    raise CheckpointError(f"Model folder '{name}' not found (searched: {searched}). {WHERE_MODELS_GO}")


def resolve_output_folder(name: str) -> Path:
    """The folder for an input that names a folder to write (e.g. a quantized copy).

    Inside ComfyUI: the same rule as model_name (a name directly inside a registered model
    folder, never a path); a name no root has yet goes into the first registered folder.
    Outside ComfyUI: any path.
    """
    if in_comfyui():
        return model_paths.resolve_name(
            name, model_roots(), what="output folder", hint=WHERE_MODELS_GO, must_exist=False
        )
    return Path(name).expanduser()


def check_model_name(name: object) -> bool | str:
    """For VALIDATE_INPUTS: True, or the one-line reason ComfyUI shows (it names where models go).

    Accepts exactly the names list_model_names offers. None (the value came through a link,
    unknown before the run) passes here; the loader applies the same rule when it runs.
    """
    if name is None:
        return True
    try:
        resolve_model_path(str(name))
    except HunyuanError as exc:
        return str(exc)
    return True


def progress_callback(total: int) -> Callable[[int, int], None] | None:
    """A per-step progress reporter driving ComfyUI's progress bar, or None outside ComfyUI."""
    utils = comfy_module("comfy.utils")
    if utils is None:
        return None
    bar = utils.ProgressBar(total)
    return lambda done, total_: bar.update_absolute(done, total_)


def preview_size() -> int | None:
    """ComfyUI's preview setting: the largest side of a sampler preview (``--preview-size``), or None when
    previews are off (``--preview-method none``, ComfyUI's own default, or outside ComfyUI). Read when the
    node runs: newer ComfyUI versions set the method per queued prompt (the frontend's Live Preview
    setting) through the same ``args.preview_method``."""
    cli_args = comfy_module("comfy.cli_args")
    args = getattr(cli_args, "args", None)
    method = getattr(args, "preview_method", None)
    if method is None or str(getattr(method, "value", method)).lower() in ("none", "nopreviews"):
        return None
    return int(getattr(args, "preview_size", 512) or 512)


def step_reporters(total: int) -> tuple[Callable[[int, int], None] | None, Callable[[int, int, Any], None] | None]:
    """(progress, preview) for Generate, both driving one ComfyUI progress bar: ``progress(done, total)``
    (the text stage, and the steps without previews) and, when ComfyUI's preview setting is on,
    ``preview(done, total, image)``: the step's progress with a PIL preview (ComfyUI sends it to the
    browser as a ``b_preview`` image at ``--preview-size``). (None, None) outside ComfyUI."""
    utils = comfy_module("comfy.utils")
    if utils is None:
        return None, None
    bar = utils.ProgressBar(total)
    size = preview_size()

    def preview(done: int, total_: int, image: Any) -> None:
        bar.update_absolute(done, total_, None if image is None else ("JPEG", image, size))

    return (lambda done, total_: bar.update_absolute(done, total_)), (preview if size is not None else None)


def cancel_check() -> Callable[[], None] | None:
    """Raises ComfyUI's interrupt exception when the user pressed Cancel, or None outside ComfyUI."""
    mm = comfy_module("comfy.model_management")
    if mm is None:
        return None
    return mm.throw_exception_if_processing_interrupted

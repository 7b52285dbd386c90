"""Checks that run before any weights load, shared by the CLI and the Generate node.

The request itself is checked by ``generation.validate_request`` (prompt, steps, guidance,
custom sizes); this module adds what needs the checkpoint's variant (read from its
config.json, which loads nothing: guidance, its sizes), the exact-size check of the CLI's
``WIDTHxHEIGHT`` and the output file. Every failure is an InputError whose one-line message names the problem
and the fix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .checkpoint.validate import read_config
from .core.errors import InputError
from .model.variants import Variant, detect_variant, read_generation_config
from .request import (
    CUSTOM_MAX,
    CUSTOM_MIN,
    GenerationRequest,
    check_variant_request,
    parse_size,
    validate_request,
)

SEED_MAX = 0xFFFFFFFFFFFFFFFF


def checkpoint_variant(path: str | os.PathLike) -> Variant:
    """The variant of a checkpoint folder from its config files (no weights read).

    Raises CheckpointError when the folder or its config.json is missing.
    """
    folder = Path(path).expanduser()
    return detect_variant(read_config(folder), read_generation_config(folder))


def model_sizes(variant: Variant | None = None) -> list[tuple[int, int]]:
    """The (width, height) buckets the checkpoint renders; without a variant, those of any variant."""
    from .model.resolution import resolution_buckets
    from .model.variants import INSTRUCT

    return resolution_buckets(variant.name if variant is not None else INSTRUCT)  # Instruct's include base's


def nearest_sizes(width: int, height: int, sizes: list[tuple[int, int]], n: int = 3) -> list[tuple[int, int]]:
    """The ``n`` sizes nearest in height/width ratio (the model's own measure), then in area."""
    target = height / width
    return sorted(sizes, key=lambda wh: (abs(wh[1] / wh[0] - target), abs(wh[0] * wh[1] - width * height)))[:n]


def check_resolution(resolution: str, sizes: list[tuple[int, int]]) -> None:
    """A WIDTHxHEIGHT must be one of the model's sizes exactly: never silently snapped."""
    if resolution in ("auto", "custom"):
        return
    width, height = parse_size(resolution)
    if width <= 0 or height <= 0:
        raise InputError(f"resolution {resolution} must have a positive width and height.")
    if (width, height) in sizes:
        return
    near = ", ".join(f"{w}x{h}" for w, h in nearest_sizes(width, height, sizes))
    raise InputError(
        f"resolution {width}x{height} is not one of this model's {len(sizes)} sizes; the nearest are {near}. "
        f"Pick one of them, 'auto', or 'custom' with width/height for an exact size."
    )


def check_seed(seed: int) -> None:
    if not 0 <= seed <= SEED_MAX:
        raise InputError(f"seed must be between 0 and {SEED_MAX} (got {seed}).")


def check_request(req: GenerationRequest, variant: Variant | None = None) -> None:
    """Everything about one generation that can be checked before loading (with the variant:
    guidance too). Sizes are the model's to snap; ``check_resolution`` is the strict check."""
    validate_request(req)
    check_seed(req.seed)
    if variant is not None:  # guidance; base checkpoints: no reference images, no text task
        check_variant_request(variant, req)


def check_queued_inputs(
    prompt: str | None, resolution: str | None, width: int | None, height: int | None, choices: list[str]
) -> None:
    """What the Generate node can check when a prompt is queued; a linked input arrives as None.

    These inputs bypass ComfyUI's own list and range checks (they are VALIDATE_INPUTS arguments),
    so this covers those too."""
    if resolution is not None and resolution not in choices:
        raise InputError(f"resolution '{resolution}' is not one of the node's choices (auto, a listed size, custom).")
    for name, value in (("width", width), ("height", height)):
        if value is not None and not CUSTOM_MIN <= value <= CUSTOM_MAX:
            raise InputError(f"{name} {value} is out of range: use {CUSTOM_MIN}..{CUSTOM_MAX} px.")
    custom = resolution == "custom" and width is not None and height is not None
    validate_request(GenerationRequest(
        prompt="-" if prompt is None else prompt,
        resolution="custom" if custom else "auto",
        width=width or 1024,
        height=height or 1024,
    ))


def _writable_formats() -> dict[str, str]:
    """File extension -> PIL format, for the formats PIL can write."""
    from PIL import Image

    Image.init()
    return {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def check_output_path(path: str | os.PathLike, what: str = "--out") -> Path:
    """The image file can be written: a known image suffix in an existing, writable folder."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise InputError(f"{what} {out} is a folder: give a file name, e.g. {out / 'hunyuan_image3.png'}.")
    if out.suffix.lower() not in _writable_formats():
        raise InputError(
            f"{what} {out}: '{out.suffix or 'no suffix'}' is not an image format that can be written; "
            "end the name in .png, .jpg or .webp."
        )
    folder = out.parent
    if not folder.is_dir():
        raise InputError(f"{what} {out}: the folder {folder} does not exist; create it (mkdir -p {folder}) first.")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hy3-write-check-"):
            pass
    except OSError as exc:
        raise InputError(f"{what} {out}: cannot write into {folder} ({exc.strerror}); choose another folder.") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise InputError(f"{what} {out} exists and is not writable; choose another file name.")
    return out

"""Previews written as numbered PNG files (the CLI's ``--preview-dir``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import InputError

DEFAULT_SIZE = 512  # the largest side, as ComfyUI's default --preview-size


def check_preview_dir(folder: str) -> Path:
    """The folder for preview files, made if missing; InputError when it cannot be (before anything loads)."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"--preview-dir {folder}: a file is in the way; give a folder (it is made if missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--preview-dir {folder}: cannot make the folder ({exc.strerror}); give another.") from None
    return path


class PreviewFiles:
    """A ``preview(step, steps, image)`` reporter that saves each preview as ``preview_<step>.png``
    (scaled to ``size`` on its largest side) and then reports the step to ``progress``."""

    def __init__(self, folder: Path, progress: Any = None, size: int = DEFAULT_SIZE) -> None:
        self.folder, self.progress, self.size = folder, progress, size
        self.written: list[Path] = []

    def __call__(self, step: int, steps: int, image: Any) -> None:
        if image is not None:
            from PIL import Image, ImageOps

            path = self.folder / f"preview_{step:04d}.png"
            ImageOps.contain(image, (self.size, self.size), Image.Resampling.BILINEAR).save(path)
            self.written.append(path)
        if self.progress is not None:
            self.progress(step, steps)

"""Write the image atomically: to a temporary file in the same folder, then renamed over the name
asked for. A failed write (a full disk, a folder gone, no permission) leaves neither a truncated
image nor the temporary file, and is one line naming where and why."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any


class SaveError(Exception):
    """The image could not be written; the message is the one line to show."""


def save_image_atomically(image: Any, out: str | Path) -> Path:
    """Save the PIL ``image`` to ``out`` (format from its suffix) through a temporary file + rename."""
    out = Path(out)
    tmp = str(out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        # 0o666 less the umask, as a plain open() would make it (mkstemp's files are private)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise SaveError(f"could not write the image to {out}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format=_format(out))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        _remove(tmp)
        why = exc.strerror or str(exc)
        raise SaveError(f"could not write the image to {out}: {why}") from None
    except BaseException:
        _remove(tmp)
        raise
    return out


def _format(out: Path) -> str:
    from PIL import Image

    Image.init()
    return Image.EXTENSION.get(out.suffix.lower(), "PNG")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

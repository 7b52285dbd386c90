"""Host RAM check before weights are moved into CPU memory."""

from __future__ import annotations

from ...hunyuan_loader.core.units import GIB


class InsufficientRAMError(MemoryError):
    """Not enough free CPU RAM to hold the weights; nothing was moved."""


def available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def check_ram(
    needed_bytes: int, what: str, *, available_bytes: int | None = None, margin_bytes: int = GIB
) -> None:
    """Raise InsufficientRAMError unless ``needed_bytes`` + margin fit the available RAM."""
    if needed_bytes <= 0:
        return
    avail = available_ram() if available_bytes is None else int(available_bytes)
    if needed_bytes + margin_bytes > avail:
        raise InsufficientRAMError(
            f"cannot {what}: it needs {needed_bytes / GIB:.2f} GiB of CPU RAM "
            f"(+{margin_bytes / GIB:.2f} GiB margin) but only {avail / GIB:.2f} GiB is available. "
            "Nothing was moved; the model stays where it was. Free RAM or unload the model fully."
        )

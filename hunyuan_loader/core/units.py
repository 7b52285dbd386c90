"""Units and layout constants shared by the loader and memory/: each defined once here."""

from __future__ import annotations

GIB = 1024**3  # bytes in a GiB: every "GB" the pack prints or reads from a setting is this
MIB = 1024**2

# Byte alignment of each tensor inside a packed buffer (the streamed blocks' host copies, the reader's
# staging ring, and the header-based size model that must predict both): 256 bytes.
ALIGN = 256


def aligned(n: int, align: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align

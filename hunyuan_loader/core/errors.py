"""User-facing errors: each names the problem and the fix."""

from __future__ import annotations


class HunyuanError(Exception):
    """Base class for errors a ComfyUI user can act on (shown in the node's error)."""


class CheckpointError(HunyuanError):
    """The model folder is missing, incomplete or not a HunyuanImage-3 checkpoint."""


class DependencyError(HunyuanError):
    """A library needed for the chosen mode is not installed."""


class InputError(HunyuanError):
    """A node input is out of range or malformed."""


class OutOfMemoryError(HunyuanError):
    """Generation did not fit in GPU memory even after streaming more weights."""


class NotEnoughVRAMError(HunyuanError):
    """The VRAM budget cannot hold the model's fixed parts even with every block streamed."""


class NotEnoughRAMError(HunyuanError):
    """CPU RAM is too small for the requested placement; nothing was moved."""


class GenerationCancelled(HunyuanError):
    """The user interrupted the generation (ComfyUI's cancel)."""

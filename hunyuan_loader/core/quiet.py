"""Library messages that do not concern the user, filtered narrowly where they arise.

Each entry names one logger (or warning category) and the start of one message, and says
why the user can ignore it; nothing else from those libraries is hidden. ``install()`` is
called before the libraries are imported or used (model loading, the CLI). Verbose mode
(the CLI's ``--verbose``, or ``HUNYUAN_VERBOSE=1`` in ComfyUI's environment) shows them all.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

from . import settings


@dataclass(frozen=True)
class Noise:
    """One message that does not concern the user."""

    source: str | type[Warning]  # a logger name (log records) or a warning category (warnings.warn)
    starts_with: str  # the message's fixed beginning
    why: str


LOG_NOISE: tuple[Noise, ...] = (
    Noise(
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "logged when bitsandbytes is imported on a CPU with AVX512-BF16 and the optional `kernels` "
        "package is absent, or present (transformers 5.x brings it) but cannot fetch or trust the hub "
        "kernel (offline); bitsandbytes then uses its built-in CPU 4-bit path, and on a GPU neither is used.",
    ),
    Noise(
        "bitsandbytes.autograd._functions",
        "MatMul8bitLt: inputs will be cast from",
        "logged on every INT8 matmul: LLM.int8() quantizes bf16 activations through float16 by design.",
    ),
    Noise(
        "transformers.generation.configuration_utils",
        "The following generation flags are not valid and may be ignored:",
        "the checkpoint's own generation_config.json carries sampling flags (temperature, top_p, top_k) "
        "that the model code's greedy text step does not use; no input of the user is ignored.",
    ),
)
WARNING_NOISE: tuple[Noise, ...] = (
    Noise(
        UserWarning,
        "MatMul8bitLt: inputs will be cast from",
        "older bitsandbytes issue the same per-matmul note through warnings.warn.",
    ),
)

_verbose: bool | None = None  # None: HUNYUAN_VERBOSE decides; set_verbose (the CLI) overrides it


def set_verbose(on: bool) -> None:
    """Show every library message (call before ``install()`` for warnings.warn messages)."""
    global _verbose
    _verbose = bool(on)


def is_verbose() -> bool:
    return settings.get(settings.VERBOSE) if _verbose is None else _verbose


class NoiseFilter(logging.Filter):
    """Drops the records of one logger whose message starts with a known text, unless verbose."""

    def __init__(self, noise: Noise) -> None:
        super().__init__()
        self.noise = noise

    def filter(self, record: logging.LogRecord) -> bool:
        return is_verbose() or not record.getMessage().startswith(self.noise.starts_with)


def install() -> None:
    """Attach the filters where they are missing (idempotent, cheap; imports no library)."""
    for noise in LOG_NOISE:
        logger = logging.getLogger(str(noise.source))
        if not any(isinstance(f, NoiseFilter) and f.noise == noise for f in logger.filters):
            logger.addFilter(NoiseFilter(noise))
    if is_verbose():
        return
    for noise in WARNING_NOISE:
        assert isinstance(noise.source, type)
        pattern = re.escape(noise.starts_with)
        present = any(
            action == "ignore" and message is not None and message.pattern == pattern and category is noise.source
            for action, message, category, *_ in warnings.filters
        )
        if not present:
            warnings.filterwarnings("ignore", message=pattern, category=noise.source)

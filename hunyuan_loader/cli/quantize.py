"""``python -m hunyuan_loader quantize``: a BF16 checkpoint loaded quantized and written as a
pre-quantized copy (``checkpoint.prequantized`` writes it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ...memory.unload import collect_garbage
from ..checkpoint.prequantized import prequantized_format, save_prequantized
from ..core.errors import InputError
from ..core.spec import LoadSpec
from ..formats.builtin import for_load
from ..load.pipeline import load_model


def quantize_checkpoint(
    model_dir: str | Path,
    quant: str,
    out: str | Path,
    *,
    int8_format: str = "w8a16",
    offload: str = "smart",
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Load a BF16 checkpoint quantized (on the GPU when there is one; blocks that do not fit
    stream through pinned RAM) and write the pre-quantized copy ``out``. ``progress(stage,
    done, total)`` with stage 'read' / 'write'. The model is freed afterwards."""
    if not for_load(quant, int8_format).quantized:
        raise InputError(f"quantize writes quantized copies: int8 or nf4 (got '{quant}').")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists. Choose another --out folder or delete it first.")
    if not out.parent.is_dir():
        raise InputError(f"The parent folder of --out ({out.parent}) does not exist.")
    spec = LoadSpec(str(model_dir), quant=quant, offload=offload, int8_format=int8_format)
    if prequantized_format(json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
                           if (Path(model_dir) / "config.json").is_file() else {}):
        raise InputError(f"{model_dir} is already pre-quantized: quantize the BF16 checkpoint.")
    read = (lambda d, t: progress("read", d, t)) if progress is not None else None
    write = (lambda d, t: progress("write", d, t)) if progress is not None else None
    loaded = load_model(spec, progress=read)
    try:
        return save_prequantized(loaded.model, loaded.info.path, out, progress=write)
    finally:
        if loaded.residency is not None:
            loaded.residency.close()
        loaded.model = None
        del loaded
        collect_garbage()

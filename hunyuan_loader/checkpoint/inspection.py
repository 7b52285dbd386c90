"""Everything a load needs to know about a checkpoint folder before it builds anything: one step.

The files are checked (validate.py), their headers read (layout.py), the model's own code checked
for missing packages, the weight format settled (the checkpoint's own pre-quantized format, else the
loader's), and the variant read. Nothing of the model is built and no weight is read, so a wrong
folder, loader or install is refused here, in seconds, with nothing to clean up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats.quantization import skip_modules_for
from ..formats.registry import WeightFormat
from ..model.variants import Variant, detect_variant, read_generation_config
from .layout import TensorEntry, read_layout
from .prequantized import weight_format_for_load
from .validate import CheckpointInfo, check_code_dependencies, loadable_path, validate_checkpoint


@dataclass(frozen=True)
class Inspection:
    """A checkpoint folder as a load sees it."""

    info: CheckpointInfo
    layout: dict[str, TensorEntry]  # every tensor's header entry, by name
    loadable: Path  # the path from_pretrained gets (validate.loadable_path)
    weight_format: WeightFormat
    quantization_config: Any  # what the skeleton quantizes with; None when nothing is quantized on load
    pre_quantized: bool
    variant: Variant


def inspect_for_load(path: str | Path, quant: str, int8_format: str | None = None) -> Inspection:
    """Check the folder for a load with the ``quant`` loader (and ``int8_format``); raises
    CheckpointError / DependencyError naming the problem and the fix."""
    info = validate_checkpoint(path)
    layout = read_layout(info.shard_files)
    check_code_dependencies(info.path)
    loadable = loadable_path(info)
    fmt, pre_quantized = weight_format_for_load(info.config, quant, int8_format, info.path)
    fmt.prepare()  # its dependencies (bitsandbytes), its quant_method registered with transformers
    # A pre-quantized checkpoint brings its own config (None is passed, as to from_pretrained).
    qconfig = None if pre_quantized else fmt.quantization_config(skip_modules_for(sorted(layout)))
    variant = detect_variant(info.config, read_generation_config(info.path))
    return Inspection(info, layout, loadable, fmt, qconfig, pre_quantized, variant)

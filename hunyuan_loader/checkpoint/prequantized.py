"""Pre-quantized bitsandbytes checkpoints: recognise and check one, and write one.

The format is the published one that transformers reads and writes: config.json carries a
bitsandbytes ``quantization_config``; the safetensors hold, per quantized Linear, the int8
``weight`` + ``SCB`` (+ ``weight_format``) or the packed 4-bit ``weight`` + ``weight.absmax``,
``weight.quant_map``, ``weight.nested_*`` and ``weight.quant_state.bitsandbytes__nf4``.
A copy we write loads through our loaders (block order, any placement, no re-quantization)
and through plain ``AutoModelForCausalLM.from_pretrained``. Its shards are one per decoder
block (plus one for the rest), so a block-order load reads it front to back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CheckpointError, InputError
from ..core.units import GIB
from .layout import block_of

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors.index.json", "config.json")


def prequantized_format(config: dict) -> str | None:
    """The loader a pre-quantized config.json needs (its weight format's quant: 'int8' for bitsandbytes
    int8 or W8A16, 'nf4'), None for a full-precision checkpoint; CheckpointError for a format this
    pack cannot load (formats/registry.py)."""
    from ..formats.registry import (
        for_config,  # the built-ins are registered: pipeline imports formats.builtin
    )

    fmt = for_config(config.get("quantization_config"))
    return fmt.quant if fmt is not None else None


def weight_format_for_load(config: dict, quant: str, int8_format: str | None, path: Path) -> tuple[Any, bool]:
    """(the weight format a load uses, whether the checkpoint is pre-quantized): the checkpoint's own
    format when its config.json names one, else the loader's (``quant``, ``int8_format``), both from
    the format registry (formats/registry.py). A pre-quantized folder must be opened with the loader
    of its format."""
    # The built-ins are registered: the pipeline imports formats.builtin.
    from ..formats.registry import for_config, for_load

    pre = for_config(config.get("quantization_config"))
    if pre is None:
        return for_load(quant, int8_format), False
    if pre.quant != quant:
        raise CheckpointError(
            f"{path.name} is a pre-quantized {pre.quant.upper()} checkpoint, but the {quant.upper()} loader was "
            f"used. Load it with the {pre.quant.upper()} loader (its weights are already quantized), or pick the "
            "BF16 checkpoint for other formats."
        )
    return pre, True


def quantized_modules_in_checkpoint(names: Iterable[str], quantization_config: Any) -> set[str]:
    """Modules whose quantized weights the checkpoint holds (SCB, absmax, quant_state, weight_scale,
    ...), by the tensor names of its weight format (the one its ``quantization_config`` names)."""
    from ..formats.registry import (
        for_config,  # the built-ins are registered: pipeline imports formats.builtin
    )

    fmt = for_config(quantization_config)
    return fmt.stored_modules(names) if fmt is not None else set()


def check_prequantized(model: Any, names: Iterable[str]) -> None:
    """The checkpoint's quantized tensors and the model built from its quantization_config agree,
    and nothing that must stay full precision is quantized (a clear error naming the module)."""
    from ..formats.registry import check_quantized_modules, quantized_module_names

    in_file = quantized_modules_in_checkpoint(names, getattr(model.config, "quantization_config", None))
    in_model = set(quantized_module_names(model))
    check_quantized_modules(model)
    stray = sorted(in_file - in_model)
    if stray:
        from ..formats.quantization import is_quantizable

        bad = [m for m in stray if not is_quantizable(m)]
        first = (bad or stray)[0]
        raise CheckpointError(
            f"The checkpoint holds quantized weights for {len(stray)} module(s) that its quantization_config keeps "
            f"in full precision, first: {first}"
            + (" (quantizing the router, shared expert, embedders, VAE or vision parts garbles images or crashes)"
               if bad else "")
            + ". The quantized copy is broken: re-create it from the BF16 checkpoint with "
            "`python -m hunyuan_loader quantize`."
        )
    lacking = sorted(in_model - in_file)
    if lacking:
        raise CheckpointError(
            f"The checkpoint's quantization_config quantizes {len(lacking)} module(s) whose quantized weights are "
            f"not in the files, first: {lacking[0]}. The quantized copy is incomplete or broken: re-create it "
            "with `python -m hunyuan_loader quantize`."
        )


# -- writing --------------------------------------------------------------------------------------
def default_copy_path(source: Path, quant: str) -> Path:
    """Where the loader option puts a quantized copy: next to the source folder, ``<name>-INT8``.

    TODO(issue 15): route through the node-side path rule (nodes/model_paths.py) once it names
    output folders; this name already passes it (no dots, separators or leading dot).
    """
    source = Path(source)
    return source.parent / f"{source.name}-{quant.upper()}"


def _quantization_config_dict(model: Any) -> dict:
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        raise InputError("This model is not quantized: load it with the INT8 or NF4 loader to write a quantized copy.")
    if isinstance(qc, dict):
        return dict(qc)
    return json.loads(qc.to_json_string(use_diff=False))


def _refuse_cpu_repacked(model: Any) -> None:
    """bitsandbytes repacks 4-bit weights for its CPU kernels at the first CPU forward, and the way
    back is not exact (the absmax statistics come back in bf16): such a model would not save as
    its fresh quantization."""
    for name, module in model.named_modules():
        w = module._parameters.get("weight")
        qs = getattr(w, "quant_state", None) if w is not None else None
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            raise InputError(
                f"This NF4 model has run on the CPU, which repacks its weights for bitsandbytes' CPU kernels "
                f"({name} and others), and they no longer save exactly. Write the quantized copy right after "
                "loading, before generating (the CLI `quantize` command and the loader option do)."
            )


def _shards(state: dict[str, torch.Tensor]) -> list[tuple[str, list[str]]]:
    groups: dict[int | None, list[str]] = {}
    for key in state:
        groups.setdefault(block_of(key), []).append(key)
    order = ([None] if None in groups else []) + sorted(k for k in groups if k is not None)
    n = len(order)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", groups[k]) for i, k in enumerate(order)]


def save_prequantized(
    model: Any,
    source: Path,
    dest: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the loaded, quantized ``model`` as a pre-quantized checkpoint folder ``dest``.

    ``source`` is the folder it was loaded from: its code (*.py), tokenizer files,
    generation_config.json and other small files are copied; config.json is the source's plus
    the model's ``quantization_config``. Weights are written in any placement (resident,
    streamed or parked), one shard per decoder block. The folder appears atomically (written
    under a hidden name, then renamed); ``dest`` must not exist yet.
    """
    from safetensors.torch import save_file

    source, dest = Path(source), Path(dest).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"{dest} already exists. Choose another output folder or delete it first.")
    if not dest.parent.is_dir():
        raise InputError(f"The output folder's parent {dest.parent} does not exist.")
    qconfig = _quantization_config_dict(model)
    _refuse_cpu_repacked(model)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        state = model.state_dict()  # bnb layers add their quantization state (SCB, quant_state.*)
        total = sum(t.numel() * t.element_size() for t in state.values())
        done = 0
        weight_map: dict[str, str] = {}
        for fname, keys in _shards(state):
            shard = {}
            for key in keys:
                t = state[key].detach()
                # a standalone, dense CPU copy: host views of a streamed block share one buffer,
                # which safetensors refuses; GPU tensors come over one at a time
                shard[key] = t.to("cpu", copy=True).contiguous()
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, fname))
            done += sum(t.numel() * t.element_size() for t in shard.values())
            del shard
            if progress is not None:
                progress(done, total)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        config["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        for item in sorted(source.iterdir()):
            if item.is_file() and item.suffix != ".safetensors" and item.name not in WEIGHT_FILES:
                shutil.copy2(item, tmp / item.name)
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%.1f GiB) in %.1f s", dest, total / GIB, time.perf_counter() - t0)
    return dest

"""Helpers for the tiny HunyuanImage-3.0 test checkpoint: build one with config overrides,
load one straight through transformers. The session fixtures (base_checkpoint, ...) are in
conftest.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def build(tmp_path_factory: pytest.TempPathFactory, variant: str, **overrides: Any) -> Path:
    from hunyuan_image3.hunyuan_loader.test_model import make_test_model

    folder = tmp_path_factory.mktemp(f"hy3_{variant}") / f"HunyuanImage-3-{variant}"
    return make_test_model(folder, variant, config_overrides=overrides or None)


def load_test_model(path: Path, quant: str | None = None, **kwargs: Any):
    """Load the test checkpoint on CPU: quant None (bf16), "int8" or "nf4"; tokenizer loaded; with the
    pack's fixes of the official code for the installed transformers (with_version_fixes)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hunyuan_image3.hunyuan_loader.formats.builtin import quantization_config
    from hunyuan_image3.hunyuan_loader.formats.quantization import checkpoint_tensor_names, skip_modules_for

    if quant not in (None, "int8", "nf4"):
        raise ValueError(f"quant must be None, 'int8' or 'nf4', got {quant!r}")
    skips = skip_modules_for(checkpoint_tensor_names(path))  # the pack's own skip list
    qconfig = quantization_config(quant or "bf16", skips)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    model = AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, dtype=torch.bfloat16, device_map="cpu", **kwargs
    )
    model.load_tokenizer(str(path))
    return with_version_fixes(model)


def with_version_fixes(model):
    """The pack's load-time fixes of the official code that the installed transformers needs, and nothing
    else (each installs on 5.x only; none on 4.57): the test checkpoint's text stage, like the official
    one, runs its KV cache through them there (hooks/remote_code_fixes.py)."""
    from hunyuan_image3.hunyuan_loader.hooks.remote_code_fixes import (
        install_cache_kwarg_name,
        install_static_cache_init,
        install_vit_return_tensors,
    )

    install_static_cache_init(model)
    install_cache_kwarg_name(model)
    install_vit_return_tensors(model)
    return model


POISON = "POISON: the model code was imported"


def poisoned_copy(src: Path, dest: Path) -> Path:
    """A copy of a test checkpoint whose model code raises on import: a load shows POISON, so
    a test can prove that bad input was refused before anything loaded."""
    import shutil

    shutil.copytree(src, dest)
    for code in dest.glob("*.py"):
        code.write_text(code.read_text(encoding="utf-8") + f"\nraise RuntimeError({POISON!r})\n", encoding="utf-8")
    return dest


def portable_nf4_on_cpu(model):
    """Keep bitsandbytes' Linear4bit on its portable CPU path.

    On CPUs with AVX512-BF16 (and AMX), bitsandbytes 0.50 repacks a 4-bit weight at its first CPU
    forward into a CPU-only layout (nn/modules.py Linear4bit.forward -> _convert_weight_packed_for_cpu:
    new data, bf16 absmax, nested statistics dropped). The residency engine moves weights between
    devices, and the pack only does that on CUDA, where that layout never exists; the CPU tests of
    the engine therefore run the layout CUDA sees, on every CPU.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def damaged_copy(src: Path, dest: Path, tensor: str) -> Path:
    """A copy of a test checkpoint whose shard holding ``tensor`` has that tensor's bytes overwritten
    with 0xFF (a NaN in bf16 and float32): the shard keeps its size, so it passes the size check, as a
    real download damaged in place would."""
    import json
    import shutil
    import struct

    shutil.copytree(src, dest)
    for shard in sorted(dest.glob("*.safetensors")):
        with open(shard, "r+b") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            meta = json.loads(handle.read(length)).get(tensor)
            if meta is None:
                continue
            begin, end = meta["data_offsets"]
            handle.seek(8 + length + begin)
            handle.write(b"\xff" * (end - begin))
            return dest
    raise KeyError(f"{tensor} is in no shard of {src}")

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
    """Load the test checkpoint on CPU: quant None (bf16), "int8" or "nf4"; tokenizer loaded."""
    import torch
    from transformers import AutoModelForCausalLM

    from hunyuan_image3.hunyuan_loader.quantization import (
        checkpoint_tensor_names,
        quantization_config,
        skip_modules_for,
    )

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

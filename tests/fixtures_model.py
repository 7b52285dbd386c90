"""Pytest fixtures for the tiny HunyuanImage-3.0 test checkpoint (built once a session).

Use from a test module: ``from fixtures_model import hy3_base_path, load_test_model  # noqa: F401``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# Modules kept unquantized in int8 / nf4 loads (HUNYUAN3_FACTS.md).
QUANT_SKIP_MODULES = [
    "gate", "shared_mlp", "vae", "vision_model", "vision_aligner", "patch_embed",
    "final_layer", "time_embed", "time_embed_2", "timestep_emb", "lm_head", "wte",
]


def build(tmp_path_factory: pytest.TempPathFactory, variant: str, **overrides: Any) -> Path:
    from hunyuan_image3.hunyuan_loader.test_model import make_test_model

    return make_test_model(tmp_path_factory.mktemp(f"hy3_{variant}"), variant, config_overrides=overrides or None)


@pytest.fixture(scope="session")
def hy3_base_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory, "base")


@pytest.fixture(scope="session")
def hy3_instruct_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory, "instruct")


@pytest.fixture(scope="session")
def hy3_distil_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory, "distil")


def load_test_model(path: Path, quant: str | None = None, **kwargs: Any):
    """Load the test checkpoint on CPU: quant None (bf16), "int8" or "nf4"; tokenizer loaded."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP_MODULES)
    elif quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=QUANT_SKIP_MODULES,
        )
    elif quant is not None:
        raise ValueError(f"quant must be None, 'int8' or 'nf4', got {quant!r}")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, torch_dtype=torch.bfloat16, device_map="cpu", **kwargs
    )
    model.load_tokenizer(str(path))
    return model

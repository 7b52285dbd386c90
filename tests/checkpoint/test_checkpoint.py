"""Checkpoint folder checks: every bad input fails fast with a message naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hunyuan_image3.hunyuan_loader.checkpoint.validate import loadable_path, validate_checkpoint
from hunyuan_image3.hunyuan_loader.core.errors import CheckpointError

CONFIG = {
    "model_type": "hunyuan_image_3_moe",
    "architectures": ["HunyuanImage3ForCausalMM"],
    "auto_map": {"AutoModelForCausalLM": "hunyuan.HunyuanImage3ForCausalMM"},
}


def _folder(tmp_path: Path, name: str = "ckpt", shards: int = 2, config: dict | None = None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config or CONFIG))
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({f"w{i}": torch.randn(64, 64)}, str(folder / fname))
        weight_map[f"w{i}"] = fname
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_valid_folder_reports_shards_and_bytes(tmp_path: Path) -> None:
    info = validate_checkpoint(_folder(tmp_path, shards=3))
    assert len(info.shard_files) == 3
    assert info.weight_bytes == sum(f.stat().st_size for f in info.shard_files)


def test_missing_folder_names_it_and_where_models_go(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not found: .*nowhere.*models/HunyuanImage-3"):
        validate_checkpoint(tmp_path / "nowhere")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        validate_checkpoint(tmp_path / "empty")


def test_other_model_type_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, config={"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(CheckpointError, match="'llama' model .*not HunyuanImage-3"):
        validate_checkpoint(folder)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    folder = _folder(tmp_path, shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"1 are missing \(model-00002-of-00003.safetensors\)"):
        validate_checkpoint(folder)


def test_truncated_shard_is_named(tmp_path: Path) -> None:
    folder = _folder(tmp_path, shards=2)
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors .*truncated"):
        validate_checkpoint(folder)


def test_dotted_folder_gets_a_dot_free_unique_link(tmp_path: Path) -> None:
    info = validate_checkpoint(_folder(tmp_path, name="HunyuanImage-3.0"))
    link = loadable_path(info)
    assert "." not in link.name and link.name.isidentifier()
    assert link.resolve() == info.path.resolve()
    other = validate_checkpoint(_folder(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path,
                                        name="HunyuanImage-3.0"))
    assert loadable_path(other) != link  # same name, other folder: no shared module cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_code_that_allocates_on_cuda_is_a_clear_error_on_a_cpu(tmp_path_factory) -> None:
    """The official Instruct VAE does torch.empty(0, device="cuda") in its constructor
    (autoencoder_kl_3d.py:502): on a CPU-only machine the pack says so instead of a raw assertion."""
    from fixtures_model import build

    from hunyuan_image3.hunyuan_loader.core.errors import DependencyError
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
    from hunyuan_image3.hunyuan_loader.load.pipeline import load_model

    path = build(tmp_path_factory, "instruct")
    code = path / "modeling_hunyuan_image_3.py"
    text = code.read_text()
    guarded = "if torch.cuda.is_available():  # the real constructor allocates on CUDA unconditionally"
    assert guarded in text
    code.write_text(text.replace(guarded, "if True:"))
    with pytest.raises(DependencyError, match="needs a CUDA GPU"):
        load_model(LoadSpec(str(path)))

"""The loader nodes check at once and leave the load to the first Generate: a request that can never run
reads no weight; a good one loads once (queued runs reuse it), with the bytes read on the progress bar."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hunyuan_image3.hunyuan_loader.core.errors import CheckpointError, InputError, NotEnoughRAMError
from hunyuan_image3.nodes import comfy_adapter
from hunyuan_image3.nodes.generate import HunyuanImage3Generate
from hunyuan_image3.nodes.loaders import HunyuanImage3LoaderBF16, HunyuanImage3LoaderBudget
from hunyuan_image3.nodes.unload import HunyuanImage3ForceUnload, HunyuanImage3SoftUnload

GOOD = dict(prompt="a fox", seed=0, steps=1, guidance_scale=5.0, resolution="1024x1024", width=1024, height=1024)


@pytest.fixture
def models(tmp_path: Path, base_checkpoint: Path, monkeypatch) -> Path:
    """A models folder holding the base test checkpoint, as the loaders' HUNYUAN_MODELS_DIR."""
    root = tmp_path / "models"
    shutil.copytree(base_checkpoint, root / base_checkpoint.name)
    monkeypatch.setenv("HUNYUAN_MODELS_DIR", str(root))
    return root


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every load from disk (the cache's one call into the load pipeline), by checkpoint folder name."""
    from hunyuan_image3.hunyuan_loader import cache as cache_module

    calls: list[str] = []
    real = cache_module.load_model

    def spy(spec, **kwargs):
        calls.append(Path(spec.path).name)
        return real(spec, **kwargs)

    monkeypatch.setattr(cache_module, "load_model", spy)
    return calls


def test_base_handle_with_a_reference_image_is_refused_with_no_weight_read(models, base_checkpoint, cache,
                                                                            reads) -> None:
    loads = cache.load_count  # the process's loads so far (other tests load too)
    (handle,) = HunyuanImage3LoaderBF16().load(base_checkpoint.name, "disabled")
    assert cache.loaded is None and reads == []  # the loader checked, and loaded nothing
    image = torch.rand(1, 64, 64, 3)
    with pytest.raises(InputError, match="take no reference images"):
        HunyuanImage3Generate().generate(handle, **GOOD, image_1=image)
    with pytest.raises(InputError, match="bot_task"):
        HunyuanImage3Generate().generate(handle, **GOOD, bot_task="think")
    assert cache.loaded is None and reads == [] and cache.load_count == loads


def test_first_generate_loads_once_with_the_bytes_on_the_progress_bar(models, base_checkpoint, cache, reads,
                                                                       monkeypatch) -> None:
    bars: list[list[tuple[int, int]]] = []

    def progress_callback(total: int):
        bar: list[tuple[int, int]] = []
        bars.append(bar)
        return lambda done, total_: bar.append((done, total_))

    monkeypatch.setattr(comfy_adapter, "progress_callback", progress_callback)
    loads_before = cache.load_count
    (handle,) = HunyuanImage3LoaderBF16().load(base_checkpoint.name, "disabled")
    first = HunyuanImage3Generate().generate(handle, **GOOD)
    assert reads == [base_checkpoint.name]
    loads = [bar for bar in bars if bar and bar[-1][1] > 1000]  # bytes (the steps bar counts to 1)
    done, total = loads[0][-1] if len(loads) == 1 else (0, 0)
    assert done == total and 0.9 < total / cache.loaded.info.weight_bytes <= 1  # the tensors' bytes, all read
    assert any(line.startswith("loaded in") for line in first["ui"]["text"])
    # a queued run of the same model: ComfyUI reuses the loader's output, the cache its model
    (again,) = HunyuanImage3LoaderBF16().load(base_checkpoint.name, "disabled")
    second = HunyuanImage3Generate().generate(again, **(GOOD | {"seed": 1}))
    assert reads == [base_checkpoint.name] and cache.load_count == loads_before + 1
    assert not any(line.startswith("loaded in") for line in second["ui"]["text"])


def test_the_loader_refuses_at_once_what_can_never_load(models, base_checkpoint, cache, reads,
                                                        monkeypatch) -> None:
    (models / "no-config").mkdir()
    (models / "no-config" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="config.json"):
        HunyuanImage3LoaderBF16().load("no-config", "disabled")
    # the plan against this machine's memory: on the CPU every weight lives in RAM
    monkeypatch.setenv("HUNYUAN_RAM_LIMIT_GB", "0.001")
    with pytest.raises(NotEnoughRAMError, match="Nothing was read"):
        HunyuanImage3LoaderBudget().load(base_checkpoint.name, "bf16", 80.0, 0.0)
    assert reads == [] and cache.loaded is None


def test_unload_nodes_work_on_a_handle_loaded_or_not(models, base_checkpoint, cache, reads) -> None:
    (handle,) = HunyuanImage3LoaderBF16().load(base_checkpoint.name, "disabled")
    out = HunyuanImage3SoftUnload().unload(handle)
    assert out["ui"]["text"] == ["That model is not loaded; nothing to unload."] and reads == []
    assert "nothing cached" in HunyuanImage3ForceUnload().unload(False)["ui"]["text"][0]
    HunyuanImage3Generate().generate(handle, **GOOD)
    assert cache.loaded is not None
    report = HunyuanImage3ForceUnload().unload(False)["ui"]["text"][0]
    assert base_checkpoint.name in report and cache.loaded is None
    HunyuanImage3Generate().generate(handle, **GOOD)  # the same handle loads again after an unload
    assert reads == [base_checkpoint.name] * 2

"""One model cache: reuse, clean replacement, failures that leave nothing loaded, Force Unload
(both halves of the orphan hunt) and the bitsandbytes-missing path."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from hunyuan_image3.hunyuan_loader.cache import ModelHandle
from hunyuan_image3.hunyuan_loader.core.errors import CheckpointError, GenerationCancelled
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate
from hunyuan_image3.memory.unload import tracked_models

ROOT = Path(__file__).resolve().parents[1]


def _alive_models() -> int:
    gc.collect()
    return len(tracked_models())


def test_same_spec_reuses_other_spec_replaces(cache, base_checkpoint: Path) -> None:
    start = cache.load_count
    h1 = cache.load(LoadSpec(str(base_checkpoint)))
    first = weakref.ref(cache.get(h1).model)
    h2 = cache.load(LoadSpec(str(base_checkpoint)))
    assert h1 == h2 and cache.load_count == start + 1
    h3 = cache.load(LoadSpec(str(base_checkpoint), quant="nf4"))
    gc.collect()
    assert first() is None, "the replaced model is still alive"
    assert _alive_models() == 1
    assert cache.get(h3).spec.quant == "nf4"


def test_handle_is_light_and_reloads_after_a_drop(cache, base_checkpoint: Path) -> None:
    handle = cache.load(LoadSpec(str(base_checkpoint)))
    assert isinstance(handle, ModelHandle)
    assert not any(isinstance(v, torch.Tensor | torch.nn.Module) for v in vars(handle).values())
    cache.unload("drop")
    assert cache.loaded is None and _alive_models() == 0
    loaded = cache.get(handle)  # what Generate does after ComfyUI's /free
    assert loaded.spec == handle.spec


def test_failed_load_leaves_nothing_loaded(cache, base_checkpoint: Path, tmp_path: Path) -> None:
    cache.load(LoadSpec(str(base_checkpoint)))
    broken = tmp_path / "broken"
    shutil.copytree(base_checkpoint, broken)
    for tok in broken.glob("*tokenizer*.json"):
        tok.unlink()  # the model loads, then load_tokenizer fails
    with pytest.raises(Exception):  # noqa: B017 - whatever the remote code raises
        cache.load(LoadSpec(str(broken)))
    assert cache.loaded is None
    assert _alive_models() == 0
    with pytest.raises(CheckpointError, match="not found"):
        cache.load(LoadSpec(str(tmp_path / "missing")))
    assert cache.load(LoadSpec(str(base_checkpoint)))  # the next run works


def test_force_unload_frees_the_model_and_reports(cache, base_checkpoint: Path) -> None:
    handle = cache.load(LoadSpec(str(base_checkpoint)))
    ref = weakref.ref(cache.get(handle).model)
    report = cache.force_unload(nuke_orphaned_tensors=False)
    assert ref() is None and cache.loaded is None
    text = report.text()
    assert "dropped HunyuanImage-3-base" in text and "Before:" in text and "After:" in text


def _orphan_after_a_failed_generation(cache, checkpoint: Path) -> tuple[list, weakref.ref]:
    """An exception from inside the model's diffusion loop, kept alive like a logged
    traceback after an OOM, while the cache lets go of the model."""
    loaded = cache.get(cache.load(LoadSpec(str(checkpoint))))
    held: list = []

    def fail() -> None:
        raise GenerationCancelled("simulated failure mid-generation")

    try:
        generate(loaded, GenerationRequest("x", steps=3, resolution="1024x1024"), cancel=fail)
    except GenerationCancelled as exc:
        held.append(exc)  # e.g. kept by a logger or an error report
    ref = weakref.ref(loaded.model)
    del loaded
    cache.loaded = None  # ComfyUI's OOM handler drops references; the traceback still holds the model
    gc.collect()
    return held, ref


def test_nuke_frees_orphans_and_leaves_other_models_alone(cache, base_checkpoint: Path) -> None:
    other = torch.nn.Linear(64, 64)  # another model the process still uses
    x = torch.randn(4, 64)
    expected = other(x).detach().clone()

    held, ref = _orphan_after_a_failed_generation(cache, base_checkpoint)
    assert ref() is not None, "test setup: the traceback should keep the model alive"
    weights = [weakref.ref(p) for p in ref().parameters()]
    assert sum(w().numel() for w in weights) > 0

    cache.force_unload(nuke_orphaned_tensors=False)
    gc.collect()
    assert ref() is not None, "without the nuke the orphan survives"

    report = cache.force_unload(nuke_orphaned_tensors=True)
    gc.collect()
    alive = [w() for w in weights if w() is not None]
    assert sum(p.numel() for p in alive) == 0, "orphaned weights still hold memory"
    assert "Orphan hunt" in report.text()
    assert torch.equal(other(x), expected)
    assert other.weight.numel() == 64 * 64
    del held


def test_bitsandbytes_missing_gives_a_clear_error_and_bf16_still_works(base_checkpoint: Path, tmp_path: Path) -> None:
    code = f"""
import sys, os
sys.modules["bitsandbytes"] = None  # as if not installed
sys.path.insert(0, {str(ROOT)!r})
from hunyuan_loader.standalone import load_pack
load_pack()
from hunyuan_image3.hunyuan_loader.cache import get_cache
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.core.errors import DependencyError
cache = get_cache()
for quant, int8_format in (("int8", "bnb"), ("nf4", "w8a16")):
    try:
        cache.load(LoadSpec({str(base_checkpoint)!r}, quant=quant, int8_format=int8_format))
    except DependencyError as exc:
        print("ERR", quant, exc)
print("loaded after:", cache.loaded)
cache.load(LoadSpec({str(base_checkpoint)!r}, quant="bf16"))
print("BF16 OK", cache.loaded.spec.quant)
cache.load(LoadSpec({str(base_checkpoint)!r}, quant="int8"))  # W8A16 (the default INT8) needs no bitsandbytes
print("W8A16 OK", cache.loaded.spec.int8_format)
"""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ERR int8 INT8 needs bitsandbytes" in out.stdout and "pip install bitsandbytes" in out.stdout
    assert "ERR nf4 NF4 needs bitsandbytes" in out.stdout
    assert "loaded after: None" in out.stdout
    assert "BF16 OK bf16" in out.stdout
    assert "W8A16 OK w8a16" in out.stdout


def test_dotted_folder_name_loads(cache, base_checkpoint: Path, tmp_path: Path) -> None:
    dotted = tmp_path / "HunyuanImage-3.0"
    shutil.copytree(base_checkpoint, dotted)
    loaded = cache.get(cache.load(LoadSpec(str(dotted))))
    assert json.loads((dotted / "config.json").read_text())["model_type"] == loaded.model.config.model_type


def test_bytes_to_bring_back_estimates_a_reload_and_is_zero_when_loaded(cache, base_checkpoint: Path) -> None:
    from hunyuan_image3.hunyuan_loader.checkpoint.validate import validate_checkpoint

    disk = validate_checkpoint(base_checkpoint).weight_bytes
    bf16 = ModelHandle(LoadSpec(str(base_checkpoint)))
    nf4 = ModelHandle(LoadSpec(str(base_checkpoint), quant="nf4"))
    budget = ModelHandle(LoadSpec(str(base_checkpoint), offload="budget", vram_budget_gb=1e-4))
    assert cache.bytes_to_bring_back(bf16) == disk
    assert cache.bytes_to_bring_back(nf4) == int(disk * 0.30)
    assert cache.bytes_to_bring_back(budget) == int(1e-4 * 1024**3)
    assert cache.bytes_to_bring_back(ModelHandle(LoadSpec("/nowhere"))) == 0
    cache.load(bf16.spec)
    assert cache.bytes_to_bring_back(bf16) == 0  # loaded and resident (CPU)


def test_soft_unload_without_enough_ram_says_so_and_keeps_the_model(cache, base_checkpoint: Path) -> None:
    from hunyuan_image3.memory.residency import ResidencyManager

    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    # a manager whose RAM check can never pass (a margin of 1 PB)
    loaded.residency = ResidencyManager(loaded.model, loaded.model.model.layers, "cpu", ram_margin_bytes=10**15)
    before = [p.clone() for p in list(loaded.model.parameters())[:3]]
    text = cache.unload("park")
    assert text.startswith("Soft Unload skipped for HunyuanImage-3-base") and "Nothing was moved" in text
    assert loaded.residency.state.value == "resident"
    assert all(torch.equal(a, b) for a, b in zip(before, list(loaded.model.parameters())[:3]))
    loaded.residency = None
    assert generate(loaded, GenerationRequest("x", steps=1, resolution="1024x1024")).image.shape[1] == 1024

"""Previews on a GPU (skipped without CUDA): every loader and offload mode (streamed blocks included),
Instruct edit and Distil; the preview copy is asynchronous (pinned memory + an event), the image is
bit-identical with previews on or off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.generation import generate
from hunyuan_image3.hunyuan_loader.request import GenerationRequest

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _pair(loaded, **req):
    request = GenerationRequest(prompt="a lighthouse at dusk", seed=11, **req)
    plain = generate(loaded, request).image
    seen: list = []
    previewed = generate(loaded, request, preview=lambda d, t, img: seen.append((d, t, img))).image
    return plain, previewed, seen


@pytest.mark.parametrize("quant", ["bf16", "int8", "nf4"])
@pytest.mark.parametrize("offload", ["disabled", "smart"])
def test_previews_on_each_loader_keep_the_image(cache, base_checkpoint: Path, monkeypatch, quant, offload) -> None:
    if offload == "smart":
        monkeypatch.setenv("HUNYUAN_MIN_STREAMED_BLOCKS", "1")  # some blocks stream during the run
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint), quant=quant, offload=offload)))
    plain, previewed, seen = _pair(loaded, steps=5, resolution="1024x1024")
    if offload == "smart":
        assert loaded.residency.plan.streamed
    assert torch.equal(plain, previewed)
    images = [img for _, _, img in seen if img is not None]
    assert [(d, t) for d, t, _ in seen] == [(i, 5) for i in range(1, 6)]
    assert 1 <= len(images) <= 4 and all(img.size == (64, 64) for img in images)  # some arrive a step later


def test_instruct_edit_and_distil_previews_on_the_gpu(cache, instruct_checkpoint: Path, distil_checkpoint: Path) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(instruct_checkpoint))))
    plain, previewed, seen = _pair(loaded, steps=4, images=[Image.new("RGB", (96, 64), (200, 40, 40))],
                                   resolution="auto")
    assert torch.equal(plain, previewed) and any(img is not None for _, _, img in seen)
    loaded = cache.get(cache.load(LoadSpec(str(distil_checkpoint))))
    plain, previewed, seen = _pair(loaded, resolution="1024x1024")
    assert torch.equal(plain, previewed) and any(img is not None for _, _, img in seen)

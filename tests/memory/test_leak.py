"""20 cycles of load -> generate -> soft unload -> generate -> force unload leave memory flat."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch

from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate

CYCLES = 20


def _cycle(cache, spec: LoadSpec) -> None:
    handle = cache.load(spec)
    req = GenerationRequest("a small boat", seed=3, steps=1, resolution="custom", width=256, height=256)
    generate(cache.get(handle), req)
    cache.unload("park")
    generate(cache.get(handle), req)  # comes back from RAM
    cache.force_unload(nuke_orphaned_tensors=True)


@pytest.mark.parametrize("quant", ["bf16", "nf4"])
def test_repeated_cycles_do_not_leak(cache, base_checkpoint: Path, quant: str) -> None:
    spec = LoadSpec(str(base_checkpoint), quant=quant)
    proc = psutil.Process()
    _cycle(cache, spec)  # warm-up: imports, remote code, allocator pools
    rss, vram = [], []
    for _ in range(CYCLES):
        _cycle(cache, spec)
        rss.append(proc.memory_info().rss)
        vram.append(torch.cuda.memory_allocated() if torch.cuda.is_available() else 0)
    growth = (rss[-1] - rss[0]) / rss[0]
    assert growth < 0.02, f"RSS grew {growth:.1%} over {CYCLES} cycles: {[r >> 20 for r in rss]} MiB"
    assert vram[-1] <= vram[0] * 1.02 + 1024**2
    assert cache.loaded is None

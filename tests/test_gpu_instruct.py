"""GPU tests of Instruct editing and multi-image fusion (skipped without CUDA; run on an H200 by hand):

    .venv/bin/python -m pytest tests/test_gpu_instruct.py -q -s   # -s prints the stage times

Streaming on (smart offload, with HUNYUAN_VRAM_LIMIT_GB so that about half the blocks stream) gives
the same image and the same model text as every block resident; the text stage and the diffusion
stage are timed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, GenerationResult, generate
from hunyuan_image3.memory.residency import Placement, ResidencyPlan

pytestmark = pytest.mark.gpu
GIB = 1024**3


def _picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


TASKS = {
    "edit": dict(images=[_picture(640, 400, 1)], bot_task="image", resolution="1024x1024"),
    "fusion": dict(images=[_picture(640, 400, 1), _picture(360, 480, 2)], bot_task="think_recaption",
                   max_new_tokens=32, resolution="1024x1024"),
}


def _request(task: str) -> GenerationRequest:
    return GenerationRequest("the object of image 1 in the style of image 2", seed=21, steps=4, guidance=3.0,
                             **TASKS[task])


def _report(label: str, result: GenerationResult) -> None:
    print(f"\n{label}: {result.width}x{result.height}, total {result.seconds:.2f} s, text stage "
          f"{result.text_seconds:.2f} s ({result.text_tokens} tokens), diffusion stage {result.diffusion_seconds:.2f} s "
          f"({result.steps} steps); notes {result.notes}")


@pytest.mark.parametrize("quant", ["bf16", "int8", "nf4"])
@pytest.mark.parametrize("task", ["edit", "fusion"])
def test_smart_offload_streams_and_matches_resident(
    cache, instruct_checkpoint: Path, monkeypatch, quant: str, task: str
) -> None:
    req = _request(task)
    cache.force_unload()
    resident = cache.get(cache.load(LoadSpec(str(instruct_checkpoint), quant=quant)))
    manager = resident.residency
    assert manager is not None and not manager.plan.streamed
    first = generate(resident, req)
    _report(f"{task} {quant} resident", first)
    # smart offload on a card that holds the non-block modules, two slots and about half the blocks
    budget = manager.other_bytes + 2 * max(manager.block_bytes) + sum(manager.block_bytes) // 2
    cache.force_unload()
    baseline = torch.cuda.memory_allocated()
    monkeypatch.setenv("HUNYUAN_VRAM_LIMIT_GB", str((baseline + budget) / GIB))
    smart = cache.get(cache.load(LoadSpec(str(instruct_checkpoint), quant=quant, offload="smart", headroom_gb=1e-6)))
    manager = smart.residency
    assert manager.plan.streamed and manager.plan.resident, manager.plan.describe()
    states: list[str] = []
    streamed = generate(smart, req, progress=lambda d, t: states.append(manager.state.value))
    _report(f"{task} {quant} smart (streaming)", streamed)
    assert set(states) == {"streaming"}
    # the same weights, every block resident, no VRAM limit: bit-identical image and text
    monkeypatch.delenv("HUNYUAN_VRAM_LIMIT_GB")
    manager.apply(ResidencyPlan.uniform(Placement.GPU, manager.block_bytes, manager.other_bytes))
    again = generate(smart, req)
    assert torch.equal(streamed.image, again.image), "streamed output differs from resident output"
    assert streamed.cot_text == again.cot_text
    if quant == "bf16":  # bf16 weights are the same whichever way they were loaded
        assert torch.equal(streamed.image, first.image) and streamed.cot_text == first.cot_text
    if task == "fusion":
        assert streamed.cot_text.startswith("<think>") and streamed.text_seconds > 0


def test_reference_images_make_the_run_stream_more(cache, instruct_checkpoint: Path, monkeypatch) -> None:
    """The estimate counts the reference-image tokens: with a VRAM limit that fits the plain run, three
    reference images (and the reference MoE) make the run stream blocks, and say so."""
    spec = LoadSpec(str(instruct_checkpoint), moe_impl="reference")
    loaded = cache.get(cache.load(spec))
    from hunyuan_image3.hunyuan_loader.generation import extra_tokens
    from hunyuan_image3.hunyuan_loader.load.per_run import inference_bytes

    plain = GenerationRequest("x", seed=1, steps=1, guidance=2.0, resolution="1024x1024")
    three = GenerationRequest("x", seed=1, steps=1, guidance=2.0, resolution="1024x1024",
                              images=[_picture(512, 512, i) for i in range(3)])
    need_plain = inference_bytes(loaded, 1024, 1024)
    need_three = inference_bytes(loaded, 1024, 1024, extra_tokens(loaded, three))
    assert need_three > need_plain
    limit = torch.cuda.memory_allocated() + (need_plain + need_three) // 2
    monkeypatch.setenv("HUNYUAN_VRAM_LIMIT_GB", str(limit / GIB))
    assert generate(loaded, plain).notes == []
    result = generate(loaded, three)
    assert any("reference-image / text tokens" in n and "streaming" in n for n in result.notes), result.notes
    assert not loaded.residency.plan.streamed  # restored after the run


@pytest.mark.parametrize("quant", ["bf16", "int8", "nf4"])
def test_budget_loader_edits_on_the_gpu(cache, instruct_checkpoint: Path, quant: str) -> None:
    """The Budget loader (offload budget, about half the blocks streamed) runs an Instruct edit: every input of
    the vision encoder reaches its device (the official code leaves the SigLIP2 mask on the CPU,
    modeling_hunyuan_image_3.py:117-124 / :2831), and the image equals the one with every block resident."""
    req = _request("edit")
    cache.force_unload()
    resident = cache.get(cache.load(LoadSpec(str(instruct_checkpoint), quant=quant)))
    manager = resident.residency
    budget = manager.other_bytes + 2 * max(manager.block_bytes) + sum(manager.block_bytes) // 2
    cache.force_unload()
    spec = LoadSpec(str(instruct_checkpoint), quant=quant, offload="budget", vram_budget_gb=budget / GIB,
                    headroom_gb=1e-6)
    loaded = cache.get(cache.load(spec))
    manager = loaded.residency
    assert manager.plan.streamed and manager.plan.resident, manager.plan.describe()
    streamed = generate(loaded, req)
    _report(f"edit {quant} budget (streaming)", streamed)
    manager.apply(ResidencyPlan.uniform(Placement.GPU, manager.block_bytes, manager.other_bytes))
    again = generate(loaded, req)
    assert torch.equal(streamed.image, again.image), "streamed output differs from resident output"

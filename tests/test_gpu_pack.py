"""GPU tests of the whole pack (skipped without CUDA; run on an H200 by hand, see README)."""

from __future__ import annotations

import gc
import time
import weakref
from pathlib import Path

import pytest
import torch

from hunyuan_image3.hunyuan_loader.core.errors import OutOfMemoryError
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate

pytestmark = pytest.mark.gpu

REQ = dict(prompt="a lighthouse at dusk", seed=11, steps=3, resolution="1024x1024")


def _image(cache, spec: LoadSpec, **overrides) -> torch.Tensor:
    loaded = cache.get(cache.load(spec))
    return generate(loaded, GenerationRequest(**(REQ | overrides))).image


@pytest.mark.parametrize("quant", ["bf16", "int8", "nf4"])
@pytest.mark.parametrize("offload", ["disabled", "smart"])
def test_each_loader_generates_on_the_gpu(cache, base_checkpoint: Path, quant: str, offload: str) -> None:
    image = _image(cache, LoadSpec(str(base_checkpoint), quant=quant, offload=offload))
    loaded = cache.loaded
    assert loaded.device.type == "cuda" and loaded.residency is not None
    assert next(loaded.model.model.layers[0].parameters()).device.type in ("cuda", "cpu")
    assert image.shape == (1, 1024, 1024, 3) and float(image.std()) > 0.01


@pytest.mark.parametrize("quant", ["bf16", "int8", "nf4"])
def test_budget_loader_streams_and_output_is_bit_identical(cache, base_checkpoint: Path, quant: str) -> None:
    from hunyuan_image3.memory.residency import Placement, ResidencyPlan

    probe = _image(cache, LoadSpec(str(base_checkpoint), quant=quant))
    manager = cache.loaded.residency
    # a budget that holds the non-block modules, two slots and about half of the blocks
    budget_gb = (manager.other_bytes + 2 * max(manager.block_bytes) + sum(manager.block_bytes) // 2) / 1024**3
    spec = LoadSpec(str(base_checkpoint), quant=quant, offload="budget", vram_budget_gb=budget_gb, headroom_gb=1e-6)
    torch.cuda.reset_peak_memory_stats()
    streamed = _image(cache, spec)
    manager = cache.loaded.residency
    plan = manager.plan
    assert plan.streamed and plan.resident, plan.describe()
    assert plan.gpu_bytes <= budget_gb * 1024**3 + 1
    # the same weights all resident: bit-identical (same kernels, same order)
    manager.apply(ResidencyPlan.uniform(Placement.GPU, manager.block_bytes, manager.other_bytes))
    resident = generate(cache.loaded, GenerationRequest(**REQ)).image
    assert torch.equal(streamed, resident), "streamed output differs from resident output"
    if quant == "bf16":  # bf16 weights are the same whichever way they were loaded
        assert torch.equal(streamed, probe)


def test_int8_auto_switch_at_1280_streams_for_that_run_only(cache, tmp_path_factory, monkeypatch) -> None:
    # Sizes always snap to the model's buckets (~1 MP at image_base_size 1024): a 1280 base renders 1.64 MP.
    from fixtures_model import build

    big_base = build(tmp_path_factory, "base", image_base_size=1280)
    spec = LoadSpec(str(big_base), quant="int8", moe_impl="reference")
    loaded = cache.get(cache.load(spec))
    manager = loaded.residency
    # pretend the card has 20 GB: the reference estimate is 12 GB at 1 MP, 24 GB at 1.64 MP
    monkeypatch.setenv("HUNYUAN_VRAM_LIMIT_GB", str(20 + torch.cuda.memory_allocated() / 1024**3))
    states: list[str] = []
    big = generate(loaded, GenerationRequest(**(REQ | dict(resolution="custom", width=1280, height=1280))),
                   progress=lambda d, t: states.append(manager.state.value))
    assert any("INT8 at 1.64 MP (> 1.2 MP): smart offload for this run" in n for n in big.notes), big.notes
    assert set(states) == {"streaming"}
    assert manager.state.value == "resident" and not manager.plan.streamed  # restored, no reload
    assert cache.load_count == 1 or cache.loaded is loaded


def test_force_unload_returns_memory_to_baseline(cache, base_checkpoint: Path) -> None:
    cache.force_unload()
    baseline = torch.cuda.memory_allocated()
    _image(cache, LoadSpec(str(base_checkpoint), quant="int8"))
    assert torch.cuda.memory_allocated() > baseline
    cache.force_unload(nuke_orphaned_tensors=False)
    assert torch.cuda.memory_allocated() <= baseline


@pytest.mark.parametrize("quant", ["bf16", "int8", "nf4"])
def test_soft_unload_frees_the_gpu_and_reload_is_exact(cache, base_checkpoint: Path, quant: str) -> None:
    cache.force_unload()
    baseline = torch.cuda.memory_allocated()
    first = _image(cache, LoadSpec(str(base_checkpoint), quant=quant))
    cache.unload("park")
    torch.cuda.synchronize()
    assert cache.loaded.residency.state.value == "parked"
    assert torch.cuda.memory_allocated() <= baseline + 1024**2, "weights left on the GPU after soft unload"
    start = time.perf_counter()
    again = _image(cache, LoadSpec(str(base_checkpoint), quant=quant))
    assert time.perf_counter() - start < 60
    assert torch.equal(first, again)


def test_real_oom_retry_then_clear_error_then_nuke_recovers(cache, tmp_path_factory) -> None:
    # a 4096 base renders 4096x4096 (sizes snap to the buckets of image_base_size)
    from fixtures_model import build

    base_checkpoint = build(tmp_path_factory, "base", image_base_size=4096)
    cache.force_unload()
    other = torch.nn.Linear(1024, 1024, device="cuda")  # a separate model the process keeps
    x = torch.randn(8, 1024, device="cuda")
    expected = other(x).detach().clone()
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(max(0, free - (768 << 20)), dtype=torch.uint8, device="cuda")  # leave ~768 MiB
    baseline = torch.cuda.memory_allocated()
    spec = LoadSpec(str(base_checkpoint), moe_impl="reference")
    loaded = cache.get(cache.load(spec))
    held = []
    with pytest.raises(OutOfMemoryError) as info:
        generate(loaded, GenerationRequest(**(REQ | dict(resolution="custom", width=4096, height=4096, steps=1))))
    message = str(info.value)
    assert "4096x4096" in message and "GiB free" in message and "NF4" in message
    held.append(info.value)  # the traceback stays referenced, as after a real failure in ComfyUI
    # the model stays usable after the OOM
    # with the memory back (the filler gone), the same model renders the same size: nothing was left broken
    baseline -= filler.numel()
    del filler
    torch.cuda.empty_cache()
    ok = generate(loaded, GenerationRequest(**(REQ | dict(steps=1, resolution="custom", width=4096, height=4096))))
    assert ok.image.shape == (1, 4096, 4096, 3)
    from hunyuan_image3.memory.residency import weight_tensors

    weights = [weakref.ref(w.tensor) for w in weight_tensors(loaded.model) if w.tensor.is_cuda]
    assert weights
    del loaded, ok, info
    cache.loaded = None  # ComfyUI's OOM handler drops references; the held traceback does not
    gc.collect()
    report = cache.force_unload(nuke_orphaned_tensors=True)
    after = torch.cuda.memory_allocated()
    # The weights of this checkpoint are ~2 MiB, below the allocator's noise: check them one by one (a
    # weight still holding GPU memory is a leak, whatever the totals say) ...
    kept = [t for t in (r() for r in weights) if t is not None and t.is_cuda and t.untyped_storage().nbytes() > 0]
    assert not kept, f"{len(kept)} weights still on the GPU after Force Unload: {report.text()}"
    # ... and the total against the baseline within max(8 MiB, 1%), both ways: cuBLAS / cuDNN workspaces and
    # small cached tensors come and go between the two readings (seen: 0.9 MB below a 39.8 MB baseline, 2.3%),
    # while a leaked 4096x4096 run (activations, latents: hundreds of MiB) is far outside it.
    tolerance = max(8 << 20, baseline // 100)
    assert abs(after - baseline) <= tolerance, (after, baseline, report.text())
    assert torch.equal(other(x), expected)
    del held

"""The step cache (hook registry entry ``step_cache``): the official Taylor schedule, off unchanged, a
served step running no decoder layer and copying no streamed block, and the cache with the rest of the
pack (formats, split / CFG rows on logical CPU devices, soft unload, cancel, changing runs, Instruct
edit, Distil). Bit equality with the official code's own cache is checked against the official files
outside the tests (they are not part of the project)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hunyuan_image3.hunyuan_loader.core.errors import GenerationCancelled, InputError
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate
from hunyuan_image3.hunyuan_loader.hooks.registry import hook_names
from hunyuan_image3.hunyuan_loader.hooks.step_cache import (
    StepCache,
    StepCacheSettings,
    TaylorState,
    check_settings,
    split_frequencies,
)
from hunyuan_image3.hunyuan_loader.load import multi_gpu

TAYLOR = StepCacheSettings("taylor")  # the official values: interval 5, order 2, first 3 steps in full
SHORT = StepCacheSettings("taylor", interval=3, first_steps=2)  # more served steps in few steps
OFF = StepCacheSettings()


def official_full_steps(s: StepCacheSettings, steps: int) -> list[int]:
    """The steps the official rule (modeling_hunyuan_image_3.py:2218-2221) runs in full, walked as it is
    written there: a counter of served steps since the last full one."""
    full, counter = [], 0
    for i in range(steps):
        if i == 0 or counter == s.interval - 1 or i < s.first_steps or i >= steps - s.last_steps:
            full.append(i)
            counter = 0
        else:
            counter += 1
    return full


class _Decoder(nn.Module):
    """A decoder whose output depends on the step: counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.step = 0

    def forward(self, x: torch.Tensor, mode: str | None = None, first_step: bool | None = None) -> torch.Tensor:
        self.calls.append(self.step)
        return x * (1 + 0.1 * self.step) + 0.01 * self.step ** 2


def _run_decoder(settings: StepCacheSettings, steps: int, x: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    dec = _Decoder()
    hook = StepCache(dec, settings, steps)
    hook.attach()
    outs = []
    for i in range(steps):
        dec.step = i
        outs.append(dec(x, mode="gen_image", first_step=i == 0))
    assert dec(x, mode="gen_text").shape == x.shape  # the text stage is not counted nor served
    hook.detach()
    assert "forward" not in dec.__dict__
    return outs, dec.calls[:-1]


@pytest.mark.parametrize("settings,steps", [(TAYLOR, 50), (StepCacheSettings("taylor", last_steps=2), 50),
                                            (SHORT, 20), (TAYLOR, 8)])
def test_full_steps_follow_the_official_rule(settings: StepCacheSettings, steps: int) -> None:
    x = torch.randn(2, 16, 8)
    outs, calls = _run_decoder(settings, steps, x)
    assert calls == official_full_steps(settings, steps)
    assert len(outs) == steps and all(o.shape == x.shape for o in outs)
    if settings == TAYLOR and steps == 50:
        assert calls == [0, 1, 2, *range(7, 50, 5)]  # 12 of 50: the official Instruct defaults


def test_interval_one_runs_every_step_and_changes_nothing() -> None:
    x = torch.randn(2, 16, 8)
    off = [x * (1 + 0.1 * i) + 0.01 * i ** 2 for i in range(6)]
    outs, calls = _run_decoder(StepCacheSettings("taylor", interval=1), 6, x)
    assert calls == list(range(6)) and all(torch.equal(a, b) for a, b in zip(outs, off))


def test_forecast_of_a_linear_trend_is_exact_at_order_one() -> None:
    # y(step) = a + b * step: one difference per full step forecasts it exactly (float32, within rounding).
    a, b = torch.randn(1, 32, 4), torch.randn(1, 32, 4)
    state = TaylorState(order=1)
    state.update(a + 2 * b, distance=2, low_order=1, high_order=1)
    state.update(a + 7 * b, distance=5, low_order=1, high_order=1)
    for d in (1, 3):
        torch.testing.assert_close(state.forecast(d), a + (7 + d) * b, atol=1e-5, rtol=1e-5)
    order0 = TaylorState(order=0)
    order0.update(a, distance=1, low_order=0, high_order=0)
    torch.testing.assert_close(order0.forecast(4), a, atol=1e-5, rtol=1e-5)


def test_split_frequencies_adds_back_to_the_input_and_low_is_smooth() -> None:
    x = torch.randn(2, 64, 8)
    low, high = split_frequencies(x)
    assert low.dtype == high.dtype == x.dtype
    torch.testing.assert_close(low + high, x, atol=1e-5, rtol=1e-5)
    spectrum = torch.fft.fft(low, dim=1).abs()
    kept = (torch.fft.fftfreq(64).abs() <= 0.1 * 0.5)
    assert float(spectrum[:, ~kept].max()) < 1e-4 < float(spectrum[:, kept].max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_frequencies_compiled_equals_eager_on_cuda() -> None:
    """The official decomposition is torch.compile'd (cache_utils.py:100); the pack's runs eagerly. The
    same operations compiled give the same bits (inductor keeps FFTs and complex operations as aten)."""
    x = torch.randn(2, 4200, 4096, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(split_frequencies)
    for a, b in zip(compiled(x), split_frequencies(x)):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("bad,message", [
    (dict(kind="teacache"), "step_cache 'teacache' is not one of off, taylor"),
    (dict(kind="taylor", first_steps=1), "cache_first_steps must be at least 2"),
    (dict(kind="taylor", interval=0), "cache_interval must be between 1 and 50"),
    (dict(kind="taylor", high_order=5), "cache_high_order must be between 0 and 4"),
    (dict(kind="taylor", last_steps=-1), "cache_last_steps must be 0 or more"),
])
def test_bad_settings_are_refused_with_the_fix(bad: dict, message: str) -> None:
    with pytest.raises(InputError) as exc:
        check_settings(StepCacheSettings(**bad), 50)
    assert message in str(exc.value)
    with pytest.raises(InputError, match=r"cache_first_steps \(3\) is more than the steps \(2\)"):
        check_settings(TAYLOR, 2)
    check_settings(StepCacheSettings("off", first_steps=0), 1)  # knobs are not checked when off


# -- through generate, on the stand-in checkpoint ---------------------------------------------------------
def _image(loaded, settings: StepCacheSettings = OFF, **kw):
    seen: list[tuple[int, list[str]]] = []
    req = GenerationRequest(**({"prompt": "a red fox", "seed": 1, "steps": 6, "resolution": "1024x1024"} | kw),
                            step_cache=settings)
    result = generate(loaded, req, progress=lambda d, t: seen.append((d, hook_names(loaded.model))))
    return result, seen


def _layer_calls(model) -> tuple[list[int], object]:
    calls: list[int] = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_off_installs_nothing_and_taylor_every_step_is_bit_identical(cache, base_checkpoint: Path) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    default, seen = _image(loaded)  # the request's default
    assert all("step_cache" not in names for _, names in seen)
    off, _ = _image(loaded, StepCacheSettings("off"))
    every, seen = _image(loaded, StepCacheSettings("taylor", interval=1))
    assert all("step_cache" in names for _, names in seen)
    assert torch.equal(default.image, off.image) and torch.equal(off.image, every.image)
    assert every.notes == ["step cache (taylor): 6 of 6 steps ran the transformer."]
    assert "step_cache" not in hook_names(loaded.model) and "forward" not in loaded.model.model.__dict__


def test_taylor_runs_fewer_decoder_passes_reports_every_step_and_repeats(cache, base_checkpoint: Path) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    calls, handle = _layer_calls(loaded.model)
    try:
        off, _ = _image(loaded, steps=12)
        n_off = len(calls)
        calls.clear()
        cached, seen = _image(loaded, TAYLOR, steps=12)
    finally:
        handle.remove()
    full = official_full_steps(TAYLOR, 12)
    assert n_off == 12 and len(calls) == len(full) == 4
    assert [d for d, _ in seen] == list(range(1, 13))  # progress over all the steps, served or not
    assert cached.notes == ["step cache (taylor): 4 of 12 steps ran the transformer."]
    assert not torch.equal(cached.image, off.image) and torch.isfinite(cached.image).all()
    again, _ = _image(loaded, TAYLOR, steps=12)
    assert torch.equal(again.image, cached.image)


def test_a_served_step_copies_no_streamed_block(base_checkpoint: Path) -> None:
    from hunyuan_image3.hunyuan_loader.load.pipeline import load_model
    from hunyuan_image3.memory.residency import Placement, ResidencyManager, ResidencyPlan

    loaded = load_model(LoadSpec(str(base_checkpoint)))
    model = loaded.model
    mgr = ResidencyManager(model, model.model.layers, "cpu", allow_cpu_streaming=True)
    n = len(mgr.blocks)
    streamed = set(range(1, n))  # more streamed blocks than slots: each pass copies every one
    mgr.apply(ResidencyPlan(tuple(Placement.STREAM if i in streamed else Placement.GPU for i in range(n)),
                            tuple(mgr.block_bytes), mgr.other_bytes))
    calls, handle = _layer_calls(model)
    slots = len(mgr.streamer.slots)
    try:
        counts = {}
        for settings in (StepCacheSettings("off"), SHORT):
            mgr.streamer.reset()  # empty slots: a pass of k streamed blocks copies k, plus 1 prefetched
            before, calls[:] = mgr.streamer.copies, []
            result, _ = _image(loaded, settings, steps=8)
            counts[settings.kind] = (mgr.streamer.copies - before, len(calls), result.image)
    finally:
        handle.remove()
        mgr.close()
    full = len(official_full_steps(SHORT, 8))
    assert len(streamed) > slots
    assert counts["off"][:2] == (len(streamed) * 8 + 1, 8)
    assert counts["taylor"][:2] == (len(streamed) * full + 1, full) and full < 8  # served: no copy, no layer


@pytest.mark.parametrize("quant,int8_format", [("int8", "w8a16"), ("int8", "bnb"), ("nf4", "w8a16")])
def test_taylor_with_quantized_experts(cache, base_checkpoint: Path, quant: str, int8_format: str) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint), quant=quant, int8_format=int8_format)))
    assert "moe_dispatch" in hook_names(loaded.model)
    calls, handle = _layer_calls(loaded.model)
    try:
        result, _ = _image(loaded, SHORT, steps=8)
    finally:
        handle.remove()
    assert len(calls) == len(official_full_steps(SHORT, 8)) and torch.isfinite(result.image).all()


def test_cancel_within_a_run_leaves_nothing_and_changed_runs_start_clean(cache, base_checkpoint: Path) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    ref, _ = _image(loaded, SHORT, steps=8, seed=1)
    seen: list[int] = []

    def cancel() -> None:
        if len(seen) >= 4:  # after served steps: the cache holds differences
            raise GenerationCancelled("cancelled")

    req = GenerationRequest("a red fox", seed=1, steps=8, resolution="1024x1024", step_cache=SHORT)
    with pytest.raises(GenerationCancelled):
        generate(loaded, req, lambda d, t: seen.append(d), cancel)
    assert "step_cache" not in hook_names(loaded.model) and "forward" not in loaded.model.model.__dict__
    layer, passes = loaded.model.model.layers[1], [0]

    def fails_inside_a_step(_module, _args):  # an error in the middle of the 4th decoder pass
        passes[0] += 1
        if passes[0] == 4:
            raise RuntimeError("failed inside a step")

    handle = layer.register_forward_pre_hook(fails_inside_a_step)
    try:
        with pytest.raises(RuntimeError, match="inside a step"):
            _image(loaded, SHORT, steps=8, seed=1)
    finally:
        handle.remove()
    other, _ = _image(loaded, SHORT, steps=5, seed=2, resolution="1280x768")  # other steps, size, seed
    assert (other.width, other.height) == (1280, 768)
    again, _ = _image(loaded, SHORT, steps=8, seed=1)
    assert torch.equal(again.image, ref.image)


@pytest.fixture
def _logical(monkeypatch):
    monkeypatch.setenv(multi_gpu.LOGICAL_ENV, "1")


@pytest.mark.parametrize("mode", ["split", "cfg_parallel"])
def test_taylor_over_two_cpu_devices_and_after_a_soft_unload(cache, base_checkpoint: Path, _logical, mode) -> None:
    one = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    ref, _ = _image(one, SHORT, steps=8)
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint), devices="cpu,cpu", multi_gpu=mode)))
    img, seen = _image(loaded, SHORT, steps=8)
    assert all("step_cache" in names for _, names in seen)
    if mode == "cfg_parallel":
        par = loaded.residency.parallel
        assert par.parallel_calls == len(official_full_steps(SHORT, 8))  # served steps reach no replica
        assert (img.image - ref.image).abs().max() <= 2 / 255  # the replicas' rows, as without the cache
    else:
        assert torch.equal(img.image, ref.image)
    assert "Soft-unloaded" in cache.unload("park")
    back, _ = _image(cache.get(cache.load(LoadSpec(str(base_checkpoint), devices="cpu,cpu", multi_gpu=mode))),
                     SHORT, steps=8)
    assert torch.equal(back.image, img.image)


def _picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def test_instruct_edit_with_text_and_distil(cache, instruct_checkpoint: Path, distil_checkpoint: Path) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(instruct_checkpoint))))
    kw = dict(images=[_picture(320, 200, 1)], resolution="1024x1024", bot_task="think", max_new_tokens=3,
              guidance=2.0, steps=5)
    off, _ = _image(loaded, **kw)
    calls, handle = _layer_calls(loaded.model)
    try:
        cached, seen = _image(loaded, SHORT, **kw)
    finally:
        handle.remove()
    # the text stage runs in full (one decoder pass per token + the prompt), the image stage is cached
    text_passes = len(calls) - len(official_full_steps(SHORT, 5))
    assert cached.cot_text == off.cot_text and text_passes > 0 and cached.image.shape == off.image.shape
    assert [d for d, _ in seen][-5:] == list(range(1, 6))
    distil = cache.get(cache.load(LoadSpec(str(distil_checkpoint))))
    result, _ = _image(distil, TAYLOR, steps=None, guidance=None)
    assert result.steps == 8 and result.notes == ["step cache (taylor): 4 of 8 steps ran the transformer."]



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant", ["bf16", "int8", "nf4"])
def test_taylor_with_budget_streaming_on_the_gpu(cache, base_checkpoint: Path, quant: str) -> None:
    probe = cache.get(cache.load(LoadSpec(str(base_checkpoint), quant=quant)))
    manager = probe.residency  # a budget of the non-block modules, two slots and about half of the blocks
    budget_gb = (manager.other_bytes + 2 * max(manager.block_bytes) + sum(manager.block_bytes) // 2) / 1024**3
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint), quant=quant, offload="budget",
                                           vram_budget_gb=budget_gb, headroom_gb=1e-6)))
    assert loaded.residency.plan.streamed
    calls, handle = _layer_calls(loaded.model)
    try:
        off, _ = _image(loaded, steps=8)
        n_off, calls[:] = len(calls), []
        cached, seen = _image(loaded, SHORT, steps=8)
        n_cached = len(calls)
        again, _ = _image(loaded, SHORT, steps=8)
    finally:
        handle.remove()
    assert n_off == 8 and n_cached == len(official_full_steps(SHORT, 8)) and [d for d, _ in seen] == list(range(1, 9))
    assert torch.equal(again.image, cached.image) and torch.isfinite(cached.image).all()


def test_the_run_placement_plans_for_the_step_cache(cache, base_checkpoint: Path, one_thread, monkeypatch) -> None:
    """With the step cache on, the run's plan counts its memory (memory/estimator.step_cache_bytes):
    Generate hands the cache's order to the run placement; off, none."""
    from hunyuan_image3.hunyuan_loader import generation

    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    seen: list[int | None] = []
    real = generation.run_placement

    def spy(*args, **kwargs):
        seen.append(kwargs.get("step_cache_order"))
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "run_placement", spy)
    for settings in (StepCacheSettings("taylor", order=3, first_steps=2), OFF):
        generate(loaded, GenerationRequest("a fox", seed=1, steps=4, resolution="1024x1024", step_cache=settings))
    assert seen == [3, None]

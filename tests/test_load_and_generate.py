"""Loading the test checkpoint in bf16 / int8 / nf4 through transformers and generating."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hunyuan_image3.hunyuan_loader.errors import GenerationCancelled
from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate
from hunyuan_image3.hunyuan_loader.spec import LoadSpec


def _count_linear_types(model: torch.nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.modules():
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


@pytest.mark.parametrize(("quant", "quantized_class"), [("bf16", None), ("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_each_format_loads_and_generates(cache, base_checkpoint: Path, quant: str, quantized_class: str | None) -> None:
    handle = cache.load(LoadSpec(str(base_checkpoint), quant=quant))
    loaded = cache.get(handle)
    model = loaded.model
    counts = _count_linear_types(model)
    if quantized_class:
        assert counts.get(quantized_class, 0) > 0, counts
        # experts quantized, router and shared expert kept in full precision
        layer = model.model.layers[0].mlp
        assert type(layer.experts[0].gate_and_up_proj).__name__ == quantized_class
        assert type(layer.gate.wg).__name__ == "Linear" and layer.gate.wg.weight.dtype == torch.float32
        assert type(layer.shared_mlp.down_proj).__name__ == "Linear"
    steps_seen: list[tuple[int, int]] = []
    result = generate(loaded, GenerationRequest("a red fox", seed=1, steps=3, resolution="1024x1024"),
                      progress=lambda d, t: steps_seen.append((d, t)))
    assert result.image.shape == (1, 1024, 1024, 3) and result.image.dtype == torch.float32
    assert 0.0 <= float(result.image.min()) and float(result.image.max()) <= 1.0
    assert float(result.image.std()) > 0.01  # not a blank image
    assert steps_seen == [(1, 3), (2, 3), (3, 3)]


def test_seed_is_reproducible(cache, base_checkpoint: Path) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    req = dict(prompt="a lighthouse", steps=2, resolution="1024x768")
    a = generate(loaded, GenerationRequest(seed=7, **req)).image
    b = generate(loaded, GenerationRequest(seed=7, **req)).image
    c = generate(loaded, GenerationRequest(seed=8, **req)).image
    assert a.shape == (1, 768, 1024, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("variant", ["base", "instruct"])
def test_steps_and_guidance_are_honoured_on_both_variants(cache, request, variant: str) -> None:
    ckpt = request.getfixturevalue(f"{variant}_checkpoint")
    loaded = cache.get(cache.load(LoadSpec(str(ckpt))))
    seen: list[int] = []
    result = generate(loaded, GenerationRequest("a cat", steps=5, guidance=3.0, resolution="1024x1024"),
                      progress=lambda d, t: seen.append(d))
    assert seen == [1, 2, 3, 4, 5] and result.steps == 5
    assert loaded.variant.returns_tuple == (variant == "instruct")
    # generation_config is restored afterwards
    assert loaded.model.generation_config.diff_infer_steps == loaded.variant.default_steps


def test_checkpoint_defaults_come_from_generation_config(cache, distil_checkpoint: Path) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(distil_checkpoint))))
    assert loaded.variant.name == "instruct-distil"
    seen: list[int] = []
    result = generate(loaded, GenerationRequest("a cat", resolution="1024x1024"), progress=lambda d, t: seen.append(d))
    assert result.steps == 8 and len(seen) == 8


def test_custom_resolution_is_not_snapped_and_auto_picks_a_bucket(cache, base_checkpoint: Path) -> None:
    from hunyuan_image3.hunyuan_loader.resolution import resolution_buckets

    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    custom = generate(loaded, GenerationRequest("x", steps=1, resolution="custom", width=1088, height=656))
    assert (custom.width, custom.height) == (1088, 656)
    auto = generate(loaded, GenerationRequest("x", steps=1, resolution="auto"))
    assert (auto.width, auto.height) in resolution_buckets()


def test_cancel_stops_within_a_step_and_the_model_stays_usable(cache, base_checkpoint: Path) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    seen: list[int] = []

    def cancel() -> None:
        if len(seen) >= 2:
            raise GenerationCancelled("cancelled")

    with pytest.raises(GenerationCancelled):
        generate(loaded, GenerationRequest("x", steps=10, resolution="1024x1024"), lambda d, t: seen.append(d), cancel)
    assert seen == [1, 2]
    assert "step" not in loaded.model.pipeline.scheduler.__dict__  # hook removed
    again = generate(loaded, GenerationRequest("x", steps=2, resolution="1024x1024"))
    assert again.image.shape == (1, 1024, 1024, 3)


def test_int8_above_1_2_mp_switches_to_smart_for_that_run(cache, base_checkpoint: Path) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint), quant="int8")))
    big = generate(loaded, GenerationRequest("x", steps=1, resolution="custom", width=1280, height=1280))
    assert any("INT8 at 1.64 MP (> 1.2 MP): smart offload for this run" in n for n in big.notes), big.notes
    small = generate(loaded, GenerationRequest("x", steps=1, resolution="1024x1024"))
    assert small.notes == []


def test_code_without_exact_sizes_snaps_custom_and_says_so(cache, base_checkpoint: Path) -> None:
    from hunyuan_image3.hunyuan_loader.resolution import resolution_buckets

    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    loaded.model.supports_exact_image_size = False  # as the official code: no snap_resolution kwarg
    try:
        res = generate(loaded, GenerationRequest("x", steps=1, resolution="custom", width=1088, height=656))
    finally:
        del loaded.model.supports_exact_image_size
    assert (res.width, res.height) in resolution_buckets()
    assert any("snapped the custom size 1088x656" in n for n in res.notes), res.notes

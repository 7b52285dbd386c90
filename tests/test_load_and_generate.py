"""Loading the test checkpoint in bf16 / int8 / nf4 through transformers and generating."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hunyuan_image3.hunyuan_loader.cache import get_cache
from hunyuan_image3.hunyuan_loader.core.errors import GenerationCancelled, InputError
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate


def _count_linear_types(model: torch.nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.modules():
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


@pytest.mark.parametrize(
    ("quant", "int8_format", "quantized_class"),
    [("bf16", "w8a16", None), ("int8", "w8a16", "Int8WeightOnlyLinear"), ("int8", "bnb", "Linear8bitLt"),
     ("nf4", "w8a16", "Linear4bit")],
)
def test_each_format_loads_and_generates(
    cache, base_checkpoint: Path, quant: str, int8_format: str, quantized_class: str | None
) -> None:
    handle = cache.load(LoadSpec(str(base_checkpoint), quant=quant, int8_format=int8_format))
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
    req = dict(prompt="a lighthouse", steps=2, resolution="1152x896")
    a = generate(loaded, GenerationRequest(seed=7, **req)).image
    b = generate(loaded, GenerationRequest(seed=7, **req)).image
    c = generate(loaded, GenerationRequest(seed=8, **req)).image
    assert a.shape == (1, 896, 1152, 3)
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


def test_custom_size_is_snapped_by_the_model_and_said_and_auto_picks_a_bucket(cache, base_checkpoint: Path) -> None:
    # The official code has no exact sizes (image_processor.py get_target_size): the pack plans for,
    # and reports, what the model really renders.
    from hunyuan_image3.hunyuan_loader.generation import planned_size
    from hunyuan_image3.hunyuan_loader.model.resolution import resolution_buckets, snap_to_bucket

    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    buckets = resolution_buckets("base")
    req = GenerationRequest("x", steps=1, resolution="custom", width=1088, height=656)
    assert planned_size(loaded, req) == snap_to_bucket(1088, 656, buckets) == (1280, 768)
    custom = generate(loaded, req)
    assert (custom.width, custom.height) == (1280, 768)
    assert any("1088x656 is not one of this checkpoint's sizes" in n and "1280x768" in n for n in custom.notes)
    base_only = generate(loaded, GenerationRequest("x", steps=1, resolution="1280x720"))  # an Instruct bucket
    assert (base_only.width, base_only.height) == (1280, 768) and base_only.notes
    auto = generate(loaded, GenerationRequest("x", steps=1, resolution="auto"))
    assert (auto.width, auto.height) in buckets and auto.notes == []


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


def test_int8_above_1_2_mp_switches_to_smart_for_that_run(cache, tmp_path_factory) -> None:
    # Every bucket of the real (image_base_size 1024) model is ~1 MP; a 1280 base has 1.64 MP buckets.
    from fixtures_model import build

    big_base = build(tmp_path_factory, "base", image_base_size=1280)
    loaded = cache.get(cache.load(LoadSpec(str(big_base), quant="int8")))
    big = generate(loaded, GenerationRequest("x", steps=1, resolution="custom", width=1280, height=1280))
    assert any("INT8 at 1.64 MP (> 1.2 MP): smart offload for this run" in n for n in big.notes), big.notes
    assert (big.width, big.height) == (1280, 1280)


@pytest.mark.parametrize("variant", ["base", "instruct"])
def test_guidance_at_or_below_one_is_refused_on_cfg_checkpoints(cache, request, variant: str) -> None:
    # Their code always builds two CFG rows (official modeling_hunyuan_image_3.py:2732, hunyuan.py:2263).
    loaded = cache.get(cache.load(LoadSpec(str(request.getfixturevalue(f"{variant}_checkpoint")))))
    seen: list[int] = []
    with pytest.raises(InputError, match="guidance_scale 1 does not work .* above 1.0"):
        generate(loaded, GenerationRequest("x", steps=1, guidance=1.0), progress=lambda d, t: seen.append(d))
    assert seen == []  # refused before running
    assert generate(loaded, GenerationRequest("x", steps=1, guidance=1.01)).steps == 1


def test_distil_takes_any_guidance(cache, distil_checkpoint: Path) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(distil_checkpoint))))
    assert generate(loaded, GenerationRequest("x", steps=1, guidance=1.0)).steps == 1




def test_generate_node_path_is_one_call_through_the_cache(cache, base_checkpoint: Path) -> None:
    """node -> cache.generate (bring back) -> generation -> policy -> residency: the cache is crossed once."""

    handle = cache.load(LoadSpec(str(base_checkpoint)))
    asked: list[int] = []
    first = get_cache().generate(handle, GenerationRequest("x", steps=1, seed=3), make_room=asked.append)
    assert first.image.shape == (1, 1024, 1024, 3) and asked and set(asked) == {0}  # resident: nothing to bring back
    loads, before = cache.load_count, len(asked)
    cache.unload("drop")  # as ComfyUI's /free does: the handle reloads through the cache
    again = get_cache().generate(handle, GenerationRequest("x", steps=1, seed=3), make_room=asked.append)
    assert cache.load_count == loads + 1 and asked[before] > 0  # the reload's weights asked for room first
    assert torch.equal(first.image, again.image)


class _OomOnce:
    """A forward pre-hook that raises CUDA's out-of-memory error (a fault injected on the CPU) ``times`` times."""

    def __init__(self, times: int) -> None:
        self.left = times

    def __call__(self, module, args):
        if self.left > 0:
            self.left -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; injected)")


def test_an_out_of_memory_is_reported_with_cuda_text_and_the_model_stays_usable(cache, base_checkpoint: Path) -> None:
    from hunyuan_image3.hunyuan_loader.core.errors import OutOfMemoryError

    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    req = GenerationRequest("x", seed=2, steps=1, resolution="1024x1024")
    hook = loaded.model.model.layers[0].register_forward_pre_hook(_OomOnce(1))
    try:
        with pytest.raises(OutOfMemoryError, match="CUDA out of memory. Tried to allocate 2.00 GiB") as info:
            generate(loaded, req)
    finally:
        hook.remove()
    assert "1024x1024" in str(info.value) and "The model stays loaded" in str(info.value)
    assert generate(loaded, req).image.shape == (1, 1024, 1024, 3)


def test_a_retry_that_cannot_make_room_still_names_the_cuda_out_of_memory(cache, base_checkpoint: Path) -> None:
    """The retry after an OOM asks the placement for more room; when that is refused (another program
    holds the GPU), the user's error quotes CUDA's message and the refusal, not the refusal alone."""
    import contextlib

    from hunyuan_image3.hunyuan_loader.core.errors import NotEnoughVRAMError, OutOfMemoryError

    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    calls: list[bool] = []

    @contextlib.contextmanager
    def placement(size, notes, retried, tokens):
        calls.append(retried)
        if retried:
            raise NotEnoughVRAMError("the model does not fit a GPU budget of 0.03 GiB")
        yield

    saved = loaded.residency
    loaded.residency = object()  # a placed model (on the CPU there is none): the retry path runs
    hook = loaded.model.model.layers[0].register_forward_pre_hook(_OomOnce(1))
    try:
        with pytest.raises(OutOfMemoryError) as info:
            generate(loaded, GenerationRequest("x", seed=2, steps=1, resolution="1024x1024"), placement=placement)
    finally:
        hook.remove()
        loaded.residency = saved
    text = str(info.value)
    assert calls == [False, True]
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in text and "budget of 0.03 GiB" in text

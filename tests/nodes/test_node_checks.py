"""The Generate node checks its inputs before anything loads: at queue time (VALIDATE_INPUTS)
what needs no model, and at run time, before the cache (re)loads, what needs the variant."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_model import poisoned_copy

from hunyuan_image3.hunyuan_loader.cache import ModelHandle
from hunyuan_image3.hunyuan_loader.core.errors import InputError
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.nodes.generate import HunyuanImage3Generate, resolution_choices

validate = HunyuanImage3Generate.VALIDATE_INPUTS


def test_queue_time_accepts_good_and_linked_inputs() -> None:
    assert validate(prompt="a fox", resolution="1024x1024", width=100, height=9) is not True  # range still checked
    assert validate(prompt="a fox", resolution="1024x1024", width=1024, height=1024) is True
    assert validate(prompt="a fox", resolution="custom", width=1280, height=768) is True
    assert validate(prompt=None, resolution=None, width=None, height=None) is True  # all linked
    for choice in resolution_choices():
        assert validate(prompt="x", resolution=choice, width=1024, height=1024) is True


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"prompt": "  "}, "The prompt is empty"),
        ({"resolution": "999x999"}, "resolution '999x999' is not one of the node's choices"),
        ({"resolution": "custom", "width": 1000}, "width 1000 is not a multiple of 16: use 992 or 1008"),
        ({"resolution": "custom", "height": 8000}, "height 8000 is out of range"),
        ({"width": 100}, "width 100 is out of range"),
    ],
)
def test_queue_time_rejects_with_the_message(inputs: dict, message: str) -> None:
    values = {"prompt": "a fox", "resolution": "1024x1024", "width": 1024, "height": 1024} | inputs
    result = validate(**values)
    assert isinstance(result, str) and message in result


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory, base_checkpoint: Path) -> Path:
    return poisoned_copy(base_checkpoint, tmp_path_factory.mktemp("poisoned") / "HunyuanImage-3-poisoned")


def _run(path: Path, **overrides):
    inputs = dict(prompt="a fox", seed=0, steps=2, guidance_scale=5.0, resolution="1024x1024", width=1024,
                  height=1024) | overrides
    return HunyuanImage3Generate().generate(ModelHandle(LoadSpec(str(path))), **inputs)


def test_run_time_guidance_is_refused_before_the_model_loads(poisoned: Path, cache) -> None:
    loads = cache.load_count
    with pytest.raises(InputError, match="guidance_scale 1 does not work with base checkpoints"):
        _run(poisoned, guidance_scale=1.0)
    with pytest.raises(InputError, match="seed must be between"):
        _run(poisoned, seed=-5)
    assert cache.load_count == loads and cache.loaded is None
    with pytest.raises(Exception, match="POISON"):  # control: good inputs reach the model code
        _run(poisoned)


def test_step_cache_inputs_reach_the_request_and_bad_ones_fail_before_loading(poisoned: Path, cache,
                                                                               monkeypatch) -> None:
    optional = HunyuanImage3Generate.INPUT_TYPES()["optional"]
    assert optional["step_cache"][0] == ["off", "taylor"] and optional["step_cache"][1]["default"] == "off"
    assert {k: optional[k][1]["default"] for k in ("cache_interval", "cache_order", "cache_first_steps",
                                                   "cache_last_steps")} == dict(
        cache_interval=5, cache_order=2, cache_first_steps=3, cache_last_steps=0)
    loads = cache.load_count
    with pytest.raises(InputError, match="cache_first_steps must be at least 2"):
        _run(poisoned, step_cache="taylor", cache_first_steps=1)
    assert cache.load_count == loads and cache.loaded is None
    from hunyuan_image3.nodes import generate as node

    seen = []

    class _Cache:
        def generate(self, handle, request, *args, **kwargs):
            seen.append(request.step_cache)
            raise RuntimeError("stop")

    monkeypatch.setattr(node, "get_cache", lambda: _Cache())
    with pytest.raises(RuntimeError, match="stop"):
        _run(poisoned, step_cache="taylor", cache_interval=4, cache_last_steps=1, steps=10)
    with pytest.raises(RuntimeError, match="stop"):
        _run(poisoned)
    assert [(s.kind, s.interval, s.order, s.first_steps, s.last_steps) for s in seen] == [
        ("taylor", 4, 2, 3, 1), ("off", 5, 2, 3, 0)]

"""Bad Generate inputs fail with a message that names the problem and the fix."""

from __future__ import annotations

import pytest

from hunyuan_image3.hunyuan_loader.core.errors import InputError
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, target_size, validate_request


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "   \n"}, "prompt is empty"),
        ({"steps": 0}, "steps must be between 1"),
        ({"steps": -3}, "steps must be between 1"),
        ({"resolution": "custom", "width": 100}, "width 100 is out of range"),
        ({"resolution": "custom", "height": 9000}, "height 9000 is out of range"),
        ({"resolution": "custom", "width": 1000}, "width 1000 is not a multiple of 16: use 992 or 1008"),
        ({"resolution": "big"}, "resolution 'big' is not WIDTHxHEIGHT"),
        ({"guidance": -1.0}, "guidance_scale must be 0 or more"),
    ],
)
def test_bad_request(request_kwargs: dict, message: str) -> None:
    req = GenerationRequest(**({"prompt": "a cat"} | request_kwargs))
    with pytest.raises(InputError, match=message):
        validate_request(req)


def test_sizes() -> None:
    assert target_size(GenerationRequest("x", resolution="auto")) is None
    assert target_size(GenerationRequest("x", resolution="custom", width=2560, height=1440)) == (2560, 1440)
    # what was asked for; the model's image processor decides what is rendered (generation.planned_size)
    assert target_size(GenerationRequest("x", resolution="1000x1000")) == (1000, 1000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quant": "fp8"}, "quantization 'fp8'"),
        ({"offload": "sometimes"}, "offload_mode 'sometimes'"),
        ({"vram_budget_gb": 0.0}, "vram_budget_gb must be positive"),
        ({"headroom_gb": -1.0}, "inference_headroom_gb must be 0 or more"),
    ],
)
def test_bad_load_spec(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        LoadSpec("/nowhere", **kwargs)

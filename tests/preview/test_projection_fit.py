"""The preview projection: the fit recovers a linear decoder's projection exactly, through the official
VAE interface (scale / shift, time axis, encode -> posterior); it is cached on disk by the decoder's
weights; x0 from a flow step is the model's estimate of the final latents."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from linear_vae import LinearVAE, ModelWithVAE

from hunyuan_image3.hunyuan_loader.preview import vae_fit
from hunyuan_image3.hunyuan_loader.preview.projection import Projection, fit_projection, to_uint8_hwc
from hunyuan_image3.hunyuan_loader.preview.stream import PreviewStream, flow_x0


@pytest.mark.parametrize("encoder", [True, False], ids=["encoded-images", "random-latents"])
@pytest.mark.parametrize("scale,shift", [(0.56, 0.3), (None, None), (1.04, None)])
def test_the_fit_recovers_a_linear_decoders_projection(encoder: bool, scale, shift) -> None:
    vae = LinearVAE(scale=scale, shift=shift, encoder=encoder)
    projection = vae_fit.fit_from_vae(vae)
    weight, bias = vae.expected()
    assert projection.weight.shape == (3, 32) and projection.bias.shape == (3,)
    torch.testing.assert_close(projection.weight, weight, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(projection.bias, bias, atol=2e-4, rtol=1e-4)
    assert projection.r2 > 0.9999
    # and the projection reproduces the decoder on new latents (cell colours)
    z = torch.randn(2, 32, 5, 7)
    cells = torch.nn.functional.avg_pool2d(vae_fit.decode_latents(vae, z), vae.ffactor_spatial)
    torch.testing.assert_close(projection.rgb(z), cells, atol=2e-3, rtol=1e-3)
    assert vae.decodes == vae_fit.FIT_IMAGES + 1


def test_a_wrong_projection_is_not_accepted_by_the_check() -> None:
    """The check above can fail: another decoder's projection is far from this one's."""
    weight, _ = LinearVAE(seed=1).expected()
    projection = vae_fit.fit_from_vae(LinearVAE(seed=2))
    assert (projection.weight - weight).abs().max() > 1e-2


def test_fit_projection_least_squares_and_json_round_trip() -> None:
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(3, 6, 4, 5, generator=g)
    w, b = torch.randn(3, 6, generator=g), torch.randn(3, generator=g)
    rgb = torch.einsum("oc,bchw->bohw", w, latents) + b[None, :, None, None]
    p = fit_projection(latents, rgb)
    torch.testing.assert_close(p.weight, w, atol=1e-5, rtol=1e-5)
    back = Projection.from_json(p.to_json())
    assert back is not None and torch.equal(back.weight, p.weight) and torch.equal(back.bias, p.bias)
    with pytest.raises(ValueError, match="non-finite"):
        fit_projection(latents, rgb * float("nan"))
    assert Projection.from_json('{"format": -1}') is None and Projection.from_json("not json") is None
    pixels = to_uint8_hwc(torch.tensor([[[-1.0, 1.0]], [[0.0, 2.0]], [[-3.0, 0.5]]]))
    assert pixels.shape == (1, 2, 3) and pixels.dtype == torch.uint8
    assert pixels[0, 0].tolist() == [0, 128, 0] and pixels[0, 1].tolist() == [255, 255, 191]


def test_projection_is_cached_by_the_decoders_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = vae_fit.projection_for(ModelWithVAE(LinearVAE(seed=5)))
    files = list((tmp_path / "hunyuan_image3" / "previews").glob("*.json"))
    assert len(files) == 1

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted again although the cache has this VAE's projection")

    monkeypatch.setattr(vae_fit, "fit_from_vae", no_fit)
    again = vae_fit.projection_for(ModelWithVAE(LinearVAE(seed=5)))  # a new load of the same weights
    assert torch.equal(again.weight, first.weight)
    with pytest.raises(AssertionError, match="fitted again"):  # other weights: another key
        vae_fit.projection_for(ModelWithVAE(LinearVAE(seed=6)))
    changed = LinearVAE(seed=5)
    changed.config.scaling_factor = 0.7  # the same weights, another scale: another projection
    with pytest.raises(AssertionError, match="fitted again"):
        vae_fit.projection_for(ModelWithVAE(changed))


class _Scheduler:
    """The official FlowMatchDiscreteScheduler's numbers: sigmas 1 -> 0 with the SD3 shift, timesteps =
    sigmas * num_train_timesteps (hunyuan_image_3_pipeline.py:273-288)."""

    def __init__(self, steps: int, shift: float = 3.0) -> None:
        s = torch.linspace(1, 0, steps + 1)
        self.sigmas = shift * s / (1 + (shift - 1) * s)
        self.timesteps = self.sigmas[:-1] * 1000
        self.config = type("Config", (), {"num_train_timesteps": 1000})()


def test_flow_x0_is_the_final_latents_on_a_straight_flow() -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 3, 3, generator=g), torch.randn(1, 4, 3, 3, generator=g)
    sched = _Scheduler(6)
    for t, sigma in zip(sched.timesteps, sched.sigmas[:-1], strict=True):
        sample = (1 - sigma) * x0 + sigma * noise
        velocity = noise - x0  # what a perfect flow model predicts
        torch.testing.assert_close(flow_x0(sched, velocity, t, sample), x0, atol=1e-5, rtol=1e-5)


def test_stream_due_steps_and_newest_preview() -> None:
    p = Projection(torch.zeros(3, 4), torch.tensor([1.0, -1.0, 0.0]))
    stream = PreviewStream(p, every=2, total=7)
    assert [s for s in range(1, 8) if stream.due(s)] == [2, 4, 6]
    assert stream.take() is None
    stream.submit(2, torch.zeros(2, 4, 3, 5))
    stream.submit(4, torch.zeros(1, 4, 6, 10))
    image = stream.take()
    assert image.size == (10, 6) and image.getpixel((0, 0)) == (255, 0, 128)  # the newest, as RGB
    assert stream.take() is None and stream.made == 2

"""The projection for a loaded model: from the user's cache, or fitted once from the model's own VAE.

The fit drives the VAE as the official code does: ``vae.encode`` of images -> the posterior's mean,
shifted and scaled into the diffusion's latent space (modeling_hunyuan_image_3.py:2412-2431, without
its random sample), and ``vae.decode`` of latents unscaled / unshifted with a time axis added, under
CUDA float16 autocast (hunyuan_image_3_pipeline.py:880-896). A few small synthetic images (smooth
colour fields and a colour chart, made from a fixed seed) are encoded, their latents decoded, and the
decoder's output, averaged over each latent cell, is fitted by least squares. Without an encoder the
latents are drawn from a fixed seed instead. No global RNG is used: generation is not disturbed.

The result is stored as JSON in ``<cache>/hunyuan_image3/previews/<hash>.json`` keyed by a hash of the
decoder's weights and the scale / shift factors, so the next load of the same checkpoint (in any
format: the VAE is never quantized) reads it back instead of fitting again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core import settings
from .projection import FORMAT, Projection, fit_projection

log = logging.getLogger(__name__)

FIT_IMAGES = 6  # synthetic images (one encode + one decode each: about a third of one 1 MP decode in all)
FIT_LATENT = 10  # latent cells per side of each (160 px at the 16x VAE); the border ring is left out
_PROJECTIONS: weakref.WeakKeyDictionary[Any, Projection] = weakref.WeakKeyDictionary()


def vae_factors(vae: Any) -> tuple[float | None, float | None]:
    """(scaling_factor, shift_factor) of the VAE's config (either may be None, meaning not applied)."""
    config = getattr(vae, "config", None)
    return getattr(config, "scaling_factor", None) or None, getattr(config, "shift_factor", None) or None


def _device(vae: Any, fallback: torch.device) -> torch.device:
    """Where the VAE computes: its decoder's first real (not meta) parameter, else ``fallback``."""
    for p in vae.decoder.parameters():
        if p.device.type != "meta":
            return p.device
    return fallback


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # The official pipeline decodes under CUDA float16 autocast (hunyuan_image_3_pipeline.py:888); on a
    # CPU that autocast does nothing (the cpu_input_casts hook casts the inputs instead).
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion-space latents [B, C, h, w] -> RGB [B, 3, H, W] (-1..1), as the official pipeline decodes."""
    scale, shift = vae_factors(vae)
    z = latents.float()
    if scale:
        z = z / scale
    if shift:
        z = z + shift
    temporal = hasattr(vae, "ffactor_temporal")
    if temporal:
        z = z.unsqueeze(2)
    with _autocast(z.device):
        out = vae.decode(z, return_dict=False)[0]
    return (out.squeeze(2) if temporal else out).float()


def encode_images(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """RGB [B, 3, H, W] (-1..1) -> diffusion-space latents [B, C, h, w] (the posterior's mean)."""
    with _autocast(images.device):
        out = vae.encode(images, return_dict=False)[0]
    z = out if isinstance(out, torch.Tensor) else out.mode()
    z = z.float()
    if z.ndim == 5:
        z = z[:, :, -1]
    scale, shift = vae_factors(vae)
    if shift:
        z = z - shift
    if scale:
        z = z * scale
    return z


def synthetic_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` RGB images [count, 3, size, size] in -1..1: smooth colour fields (random gradients and
    blobs) and, first, a colour chart (the RGB cube's corners and greys in patches)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for i in range(count):
        if i == 0:
            levels = torch.tensor([0.0, 0.5, 1.0])
            colours = torch.cartesian_prod(levels, levels, levels)  # 27 colours
            cells = 6
            idx = (yy * cells).long().clamp(max=cells - 1) * cells + (xx * cells).long().clamp(max=cells - 1)
            img = colours[idx % len(colours)].permute(2, 0, 1)
        else:
            a, b, c = (torch.rand(3, 1, 1, generator=generator) for _ in range(3))
            img = a + (b - a) * xx + (c - a) * yy * torch.rand(1, generator=generator)
            for _ in range(4):
                cy, cx, r = torch.rand(3, generator=generator)
                blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.1 * r))
                img = img * (1 - blob) + torch.rand(3, 1, 1, generator=generator) * blob
        images.append(img.clamp(0, 1) * 2 - 1)
    return torch.stack(images)


def fit_from_vae(vae: Any, device: torch.device | None = None) -> Projection:
    """Fit the projection of ``vae`` (see the module docstring). One image at a time: little memory."""
    device = _device(vae, device or torch.device("cpu"))
    factor = int(getattr(vae, "ffactor_spatial", 16))
    generator = torch.Generator().manual_seed(0)
    size = FIT_LATENT * factor
    latents, pooled = [], []
    with torch.inference_mode():
        has_encoder = getattr(vae, "encoder", None) is not None
        images = synthetic_images(FIT_IMAGES, size, generator) if has_encoder else None
        for i in range(FIT_IMAGES):
            if images is not None:
                z = encode_images(vae, images[i : i + 1].to(device))
            else:
                channels = int(vae.decoder.conv_in.weight.shape[1])
                z = torch.randn(1, channels, FIT_LATENT, FIT_LATENT, generator=generator).to(device)
            rgb = decode_latents(vae, z)
            cell = rgb.shape[-1] // z.shape[-1]
            pooled.append(F.avg_pool2d(rgb, cell)[..., 1:-1, 1:-1].cpu())  # convs see padding at the border
            latents.append(z[..., 1:-1, 1:-1].cpu())
    return fit_projection(torch.cat(latents), torch.cat(pooled))


def vae_fingerprint(vae: Any) -> str:
    """A hash of the decoder's weights (names, shapes, dtypes, bytes) and the scale / shift factors."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"format {FORMAT}; factors {vae_factors(vae)}".encode())
    for name, tensor in sorted(list(vae.decoder.state_dict().items())):
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        if tensor.device.type != "meta":
            digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def cache_folder() -> Path:
    return settings.cache_root() / "previews"


def projection_for(model: Any) -> Projection:
    """The projection for ``model.vae``: remembered for this model object, else read from the user's
    cache, else fitted (and stored). Raises what the VAE raises when it cannot run."""
    vae = model.vae
    try:
        return _PROJECTIONS[vae]  # this model object's VAE was seen before
    except KeyError:
        pass
    t0 = time.perf_counter()
    key = vae_fingerprint(vae)
    path = cache_folder() / f"{key}.json"
    projection = Projection.from_json(path.read_text()) if path.is_file() else None
    if projection is None:
        fallback = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        projection = fit_from_vae(vae, fallback)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(projection.to_json())
            tmp.replace(path)
        except OSError as exc:  # a read-only cache still gives previews, fitted again next time
            log.warning("could not store the preview projection in %s: %s", path, exc)
        log.info("preview projection fitted from the model's VAE in %.1f s (R^2 %.3f), stored in %s",
                 time.perf_counter() - t0, projection.r2, path)
    _PROJECTIONS[vae] = projection
    return projection

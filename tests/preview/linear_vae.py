"""A VAE with the official interface whose decoder is linear: each latent cell becomes one colour
(``weight @ z + bias``) repeated over its ``factor x factor`` pixels. Its projection is known exactly."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class _Dist:
    def __init__(self, moments: torch.Tensor) -> None:
        self.mean = moments.chunk(2, dim=1)[0]

    def mode(self) -> torch.Tensor:
        return self.mean


class _Decoder(nn.Module):
    def __init__(self, channels: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.conv_in = nn.Conv3d(channels, 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        rgb = self.conv_in(z)
        return rgb.repeat_interleave(self.factor, dim=-1).repeat_interleave(self.factor, dim=-2)


class LinearVAE(nn.Module):
    def __init__(self, channels: int = 32, factor: int = 4, scale: float | None = 0.56,
                 shift: float | None = 0.3, encoder: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(scaling_factor=scale, shift_factor=shift)
        self.ffactor_spatial, self.ffactor_temporal = factor, 1
        self.decoder = _Decoder(channels, factor)
        self.encoder = nn.Conv3d(3, 2 * channels, (1, factor, factor), stride=(1, factor, factor)) if encoder else None
        self.decodes = 0

    def expected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [3, C], bias [3]) of the projection in the diffusion's latent space: the pipeline
        decodes z / scale + shift, so weight = W / scale and bias = W @ shift + b."""
        w = self.decoder.conv_in.weight.detach()[:, :, 0, 0, 0].double()
        b = self.decoder.conv_in.bias.detach().double()
        scale, shift = self.config.scaling_factor or 1.0, self.config.shift_factor or 0.0
        return (w / scale).float(), (w.sum(1) * shift + b).float()

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        self.decodes += 1
        out = self.decoder(z)
        return SimpleNamespace(sample=out) if return_dict else (out,)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        if x.ndim == 4:
            x = x[:, :, None]
        dist = _Dist(self.encoder(x))
        return SimpleNamespace(latent_dist=dist) if return_dict else (dist,)


class ModelWithVAE(nn.Module):
    """What projection_for needs of a model: ``.vae`` and parameters."""

    def __init__(self, vae: LinearVAE) -> None:
        super().__init__()
        self.vae = vae

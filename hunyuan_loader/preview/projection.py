"""A latent -> RGB linear projection (channels -> 3, plus a bias), its least-squares fit and its use.

The projection maps the diffusion's latents (the space the sampler works in, scaled and shifted as the
model's pipeline does) to RGB in -1..1 at the latent grid's resolution: one pixel per latent position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

FORMAT = 1  # bump when the fit changes: older cached projections are then fitted again


@dataclass(frozen=True)
class Projection:
    """``rgb = weight @ latent + bias`` per latent position; weight [3, C], bias [3] (float32, CPU)."""

    weight: torch.Tensor
    bias: torch.Tensor
    r2: float = float("nan")  # how much of the decoder's (pooled) output the fit explains, on its fit data

    @property
    def channels(self) -> int:
        return int(self.weight.shape[1])

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] latents -> [B, 3, h, w] RGB (-1..1, unclamped), float32 on the latents' device."""
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"latents of shape {tuple(latents.shape)}; expected [B, {self.channels}, h, w]")
        w = self.weight.to(latents.device)
        b = self.bias.to(latents.device)
        return torch.einsum("oc,bchw->bohw", w, latents.float()) + b[None, :, None, None]

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "weight": self.weight.tolist(), "bias": self.bias.tolist(),
                           "r2": self.r2})

    @classmethod
    def from_json(cls, text: str) -> Projection | None:
        """The projection in ``text``, or None when it is of another format or unreadable."""
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                return None
            weight = torch.tensor(data["weight"], dtype=torch.float32)
            bias = torch.tensor(data["bias"], dtype=torch.float32)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if weight.ndim != 2 or weight.shape[0] != 3 or bias.shape != (3,):
            return None
        return cls(weight, bias, float(data.get("r2", float("nan"))))


def fit_projection(latents: torch.Tensor, rgb: torch.Tensor) -> Projection:
    """Least squares ``rgb ~ weight @ latents + bias`` over every position of a batch.

    ``latents`` [B, C, h, w], ``rgb`` [B, 3, h, w] (the decoder's output pooled to the latent grid).
    Solved in float64 on the CPU with a minimum-norm solver, so collinear channels do not blow up."""
    if latents.ndim != 4 or rgb.ndim != 4 or latents.shape[0] != rgb.shape[0] or latents.shape[2:] != rgb.shape[2:]:
        raise ValueError(f"latents {tuple(latents.shape)} and rgb {tuple(rgb.shape)} do not pair up")
    c = latents.shape[1]
    x = latents.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).reshape(-1, c)
    y = rgb.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).reshape(-1, rgb.shape[1])
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("the VAE gave non-finite values for the fit's images: no preview projection")
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, y, driver="gelsd").solution  # [C + 1, 3]
    residual = y - design @ solution
    total = ((y - y.mean(0)) ** 2).sum()
    r2 = float(1 - (residual ** 2).sum() / total) if total > 0 else float("nan")
    return Projection(solution[:c].T.contiguous().float(), solution[c].contiguous().float(), r2)


def to_uint8_hwc(rgb: torch.Tensor) -> torch.Tensor:
    """[3, h, w] RGB in -1..1 -> [h, w, 3] uint8 (on the same device), as ComfyUI's previews scale."""
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()

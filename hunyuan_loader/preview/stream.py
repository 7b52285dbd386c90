"""Previews during sampling: the stream of preview images that the registry entry ``diffusion_preview``
(hooks/standard.py ``StepPreview``, on the scheduler's ``step``) feeds, and the x0 estimate it feeds them from.

The official pipeline calls ``scheduler.step(pred, t, latents)`` once per step
(hunyuan_image_3_pipeline.py:873) with the guided flow prediction; its Euler step is
``latents + pred * (sigma_next - sigma)`` (:394-407, :421-424), with ``t = sigma * num_train_timesteps``
(:287). The flow runs from noise at sigma 1 to the image at sigma 0, so the model's estimate of the
final latents at this step is ``x0 = latents - sigma * pred``. The entry computes that, projects it to
RGB on the latents' device and copies the small uint8 result to pinned host memory without waiting;
the progress report of this or a later step takes the newest finished one. Nothing of the model's
tensors is written and no RNG is touched, so the image is the same with previews on or off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .projection import Projection, to_uint8_hwc

PreviewFn = Callable[[int, int, Any], None]  # (step, steps, PIL image or None): progress with a preview


def flow_x0(scheduler: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> torch.Tensor:
    """The flow model's x0 estimate at ``timestep``: ``sample - sigma * model_output`` (float32)."""
    n = float(getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000)
    sigma = torch.as_tensor(timestep, device=sample.device).float().reshape(-1)[:1] / n
    return sample.float() - sigma.reshape(1, 1, 1, 1) * model_output.float()


class PreviewStream:
    """Preview images of one sampling run: ``submit`` at a step, ``take`` the newest finished one."""

    def __init__(self, projection: Projection, every: int, total: int) -> None:
        self.projection, self.every, self.total = projection, max(1, int(every)), int(total)
        self._pending: list[tuple[int, torch.Tensor, Any]] = []  # (step, host uint8, CUDA event or None)
        self.made = 0
        self.failed = False

    def due(self, step: int) -> bool:
        """Whether ``step`` (1-based) gets a preview: every ``every`` steps, never the last (the image comes)."""
        return not self.failed and step < self.total and step % self.every == 0

    def submit(self, step: int, x0: torch.Tensor) -> None:
        """Project ``x0`` [B, C, h, w] (its first image) and start the copy to the host."""
        pixels = to_uint8_hwc(self.projection.rgb(x0[:1])[0])
        if pixels.device.type == "cuda":
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = pixels.cpu(), None
        self._pending.append((step, host, event))
        self.made += 1

    def take(self) -> Any:
        """The newest finished preview as a PIL image (None when none has finished since the last take)."""
        ready = [i for i, (_, _, event) in enumerate(self._pending) if event is None or event.query()]
        if not ready:
            return None
        newest = ready[-1]
        _, host, _ = self._pending[newest]
        del self._pending[: newest + 1]
        from PIL import Image

        return Image.fromarray(host.numpy().copy(), mode="RGB")  # its own pixels: the pinned block is reused

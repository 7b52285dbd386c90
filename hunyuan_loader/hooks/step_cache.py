"""The step cache: diffusion steps served from a forecast of the decoder's output instead of a full
transformer evaluation (the hook registry's entry ``step_cache``).

``taylor`` is the official Instruct code's Taylor cache, computed the same way, for every variant
(the base code, hunyuan.py, has none):
- which steps run the decoder: official modeling_hunyuan_image_3.py:2218-2221 (the first step, every
  ``interval``-th step after the last full one, the first ``first_steps`` and the last ``last_steps``);
- after a full step the output is split into low and high sequence frequencies (cache_utils.py:100-140,
  an FFT over the token axis, cutoff 0.1) and each part's finite differences up to its order are kept
  (cache_utils.py:204-222, with the official move rule :169-177); no differences during the first
  ``first_steps - 1`` steps (modeling :2246);
- a served step is the Taylor series of each part at the distance from the last full step, the two
  parts added (cache_utils.py:186-193), in the official order of operations, so the bits match;
- the state is dropped after the last step (modeling :2262).

Why the pack's own entry and not the official switch (``generate_image(use_taylor_cache=True)``):
one path for base and Instruct; the official keeps its state on ``model.model`` (counter, last full
step, differences and a reference to the KV cache) across calls, so a cancelled run leaves
differences that the next run's first full step differences against; here the state lives in the
entry, which exists for one call. A served step calls no decoder layer, so it copies no streamed
block, and runs no CFG replica (the entry wraps the decoder outside ``cfg_rows``).

The wrapper recognises a diffusion step by the keywords the official code passes to the decoder,
``mode="gen_image"`` and ``first_step`` (modeling :2199-2211, hunyuan.py:2019-2032); the text stage
(``mode="gen_text"``) runs untouched.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..core.step_cache_settings import (  # noqa: F401 - part of this module's interface
    CHOICES,
    KNOBS,
    MAX_ORDER,
    StepCacheSettings,
    check_settings,
    settings_from,
)
from .registry import MethodWrap, registry

CUTOFF_RATIO = 0.1  # official cache_utils.py:209


def split_frequencies(x: torch.Tensor, cutoff_ratio: float = CUTOFF_RATIO) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high frequencies of ``x`` [batch, tokens, hidden] along the token axis, in ``x``'s dtype:
    the official decomposition_FFT (cache_utils.py:100-140), the same operations in the same order."""
    dtype, device = x.dtype, x.device
    spectrum = torch.fft.fft(x.to(torch.float32), dim=1)
    freqs = torch.fft.fftfreq(x.shape[1], d=1.0, device=device)
    low_mask = freqs.abs() <= cutoff_ratio * freqs.abs().max()
    high_mask = ~low_mask
    low = torch.fft.ifft(spectrum * low_mask[None, :, None], dim=1).real
    high = torch.fft.ifft(spectrum * high_mask[None, :, None], dim=1).real
    return low.to(device=device, dtype=dtype), high.to(device=device, dtype=dtype)


class TaylorState:
    """The finite differences of the low and high parts (index = order; None = not known yet)."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.low: list[torch.Tensor | None] = [None] * (order + 1)
        self.high: list[torch.Tensor | None] = [None] * (order + 1)

    def clear(self) -> None:
        self.low = [None] * (self.order + 1)
        self.high = [None] * (self.order + 1)

    def update(self, x: torch.Tensor, distance: int, low_order: int, high_order: int) -> None:
        """A full step's output ``distance`` steps after the previous full step (cache_utils.py:204-222)."""
        x_low, x_high = split_frequencies(x)
        new_low: list[torch.Tensor | None] = [x_low] + [None] * self.order
        new_high: list[torch.Tensor | None] = [x_high] + [None] * self.order
        for new, old, n in ((new_low, self.low, low_order), (new_high, self.high, high_order)):
            for i in range(min(n, self.order)):  # official: orders above max_order are computed, never kept
                if old[i] is not None:
                    new[i + 1] = (new[i] - old[i]) / distance
        for i in range(self.order + 1):  # the official move rule (cache_utils.py:169-177)
            if new_low[i] is not None:
                self.low[i] = new_low[i]
            if new_high[i] is not None:
                self.high[i] = new_high[i]
            else:
                break

    def forecast(self, distance: int) -> torch.Tensor:
        """The Taylor series of both parts at ``distance`` steps, added (cache_utils.py:186-193)."""
        parts = []
        for terms in (self.low, self.high):
            out: Any = 0
            for i in range(sum(t is not None for t in terms)):
                out += (1 / math.factorial(i)) * terms[i] * (distance ** i)
            parts.append(out)
        return parts[0] + parts[1]


def _with_hidden(last: Any, hidden: torch.Tensor) -> Any:
    """The decoder's output of the last full step with ``hidden`` as its hidden states (the official
    served step: BaseModelOutputWithPast with the last KV cache, modeling :2256-2261)."""
    if isinstance(last, torch.Tensor):
        return hidden
    if isinstance(last, tuple):
        return (hidden, *last[1:])
    return type(last)(last_hidden_state=hidden, past_key_values=getattr(last, "past_key_values", None))


class StepCache(MethodWrap):
    """The registry entry ``step_cache``: ``decoder.forward`` wrapped on the instance for one call.

    ``computed`` / ``served`` count the diffusion steps that ran the decoder / came from the cache."""

    def __init__(self, decoder: nn.Module, settings: StepCacheSettings, steps: int) -> None:
        super().__init__(decoder, "forward")
        self.decoder = decoder
        self.settings = settings
        self.steps = int(steps)
        self.computed = 0
        self.served = 0
        self._reset()

    def _reset(self) -> None:
        self.state = TaylorState(self.settings.order)
        self._step: int | None = None
        self._since_full = 0  # the official ``model.counter``
        self._last_full = 0
        self._last: Any = None

    def attach(self) -> None:
        self.detach()
        self._reset()
        super().attach()

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("mode") != "gen_image":
                return original(*args, **kwargs)
            return self._diffusion_step(original, bool(kwargs.get("first_step")), args, kwargs)

        return forward

    def detach(self) -> None:
        super().detach()
        self._reset()  # a cancelled run leaves nothing behind: no differences, no KV cache reference

    def is_full(self, step: int) -> bool:
        """Official modeling_hunyuan_image_3.py:2218-2221."""
        s = self.settings
        return (step == 0 or self._since_full == s.interval - 1 or step < s.first_steps
                or step >= self.steps - s.last_steps)

    def _diffusion_step(self, original: Callable[..., Any], first: bool, args: tuple, kwargs: dict) -> Any:
        s = self.settings
        step = 0 if first or self._step is None else self._step + 1
        self._step = step
        if self.is_full(step):
            self._since_full = 0
            out = original(*args, **kwargs)
            self.computed += 1
            if step >= s.first_steps - 1:  # official :2246-2249
                hidden = out if isinstance(out, torch.Tensor) else out[0]  # official: outputs[0]
                self.state.update(hidden, step - self._last_full, s.low_order, s.high_order)
            self._last_full = step
            self._last = out
        else:
            self._since_full += 1
            out = _with_hidden(self._last, self.state.forecast(self._since_full))
            self.served += 1
        if step == self.steps - 1:  # official :2262-2263
            self.state.clear()
            self._last = None
        return out


@contextlib.contextmanager
def step_cache(
    model: Any, settings: StepCacheSettings, steps: int, notes: list[str] | None = None
) -> Iterator[StepCache | None]:
    """The step cache on ``model.model`` for one generate call (nothing when ``settings`` is off).
    On a clean exit ``notes`` gets how many steps ran the transformer."""
    if not settings.enabled:
        yield None
        return
    hook = StepCache(model.model, settings, steps)
    with registry(model).active("step_cache", hook):
        yield hook
    if notes is not None:
        if hook.computed + hook.served:
            notes.append(f"step cache ({settings.kind}): {hook.computed} of {hook.computed + hook.served} steps "
                         "ran the transformer.")
        else:
            notes.append(f"step cache ({settings.kind}) found no diffusion step to serve: this checkpoint's code "
                         "does not call its decoder the way the official code does; every step ran in full.")

"""The step cache's settings (off | taylor and its knobs) and their checks, in a module that imports no
torch: the command line builds its flags from them before anything heavy loads (cli/args.py), the
request carries them, and hooks/step_cache.py runs them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InputError

CHOICES = ("off", "taylor")
MAX_ORDER = 4

@dataclass(frozen=True)
class StepCacheSettings:
    """``kind`` off | taylor. The defaults are the official CLI's (run_image_gen.py:85-122: interval 5,
    order 2, low/high frequency orders 2, first enhance 3 steps, tailing enhance 1 step when enabled),
    with the first enhance on: the official decoder sees the whole prompt at the first step and only the
    image tokens after it (a KV cache), so a forecast seeded from the first step has the wrong length."""

    kind: str = "off"
    interval: int = 5
    order: int = 2
    first_steps: int = 3
    last_steps: int = 0
    low_order: int = 2
    high_order: int = 2

    @property
    def enabled(self) -> bool:
        return self.kind != "off"


# The knobs: (settings field, node input / CLI flag name, minimum, maximum, help). The node shows the first four.
KNOBS: tuple[tuple[str, str, int, int, str], ...] = (
    ("interval", "cache_interval", 1, 50,
     "taylor: run the transformer every this many steps after the first ones; the steps between are forecast "
     "(official 5; 1 = every step, as with off)."),
    ("order", "cache_order", 0, MAX_ORDER,
     "taylor: how many differences of past outputs the forecast uses (official 2; 0 = repeat the last one)."),
    ("first_steps", "cache_first_steps", 2, 200,
     "taylor: the first steps that always run in full (official 3; at least 2): they set the composition."),
    ("last_steps", "cache_last_steps", 0, 200,
     "taylor: the last steps that always run in full (0 = none, the official default; 1-2 sharpen details)."),
    ("low_order", "cache_low_order", 0, MAX_ORDER,
     "taylor: the forecast's order for the low token frequencies (official 2; capped at cache_order)."),
    ("high_order", "cache_high_order", 0, MAX_ORDER,
     "taylor: the forecast's order for the high token frequencies (official 2; capped at cache_order)."),
)


def settings_from(kind: str, values: dict[str, Any]) -> StepCacheSettings:
    """Settings from the choice and the knobs given by input name (``cache_interval`` ...); a knob not
    given (or None) keeps its default."""
    given = {field: values[name] for field, name, *_ in KNOBS if values.get(name) is not None}
    return StepCacheSettings(kind=kind, **{k: int(v) for k, v in given.items()})


def check_settings(settings: StepCacheSettings, steps: int | None = None) -> None:
    """InputError naming the problem and the fix (runs before anything loads)."""
    s = settings
    if s.kind not in CHOICES:
        raise InputError(f"step_cache '{s.kind}' is not one of {', '.join(CHOICES)}.")
    if not s.enabled:
        return
    if not 1 <= s.interval <= 50:
        raise InputError(f"cache_interval must be between 1 and 50 (got {s.interval}); 5 is the official value.")
    if not 0 <= s.order <= MAX_ORDER:
        raise InputError(f"cache_order must be between 0 and {MAX_ORDER} (got {s.order}); 2 is the official value.")
    for name, value in (("cache_low_order", s.low_order), ("cache_high_order", s.high_order)):
        if not 0 <= value <= MAX_ORDER:
            raise InputError(f"{name} must be between 0 and {MAX_ORDER} (got {value}); 2 is the official value.")
    if s.first_steps < 2:
        raise InputError(
            f"cache_first_steps must be at least 2 (got {s.first_steps}): the model's first step covers the "
            "whole prompt and the later ones only the image, so the forecast starts from the second step."
        )
    if s.last_steps < 0:
        raise InputError(f"cache_last_steps must be 0 or more (got {s.last_steps}).")
    if steps is not None and s.first_steps > steps:
        raise InputError(f"cache_first_steps ({s.first_steps}) is more than the steps ({steps}): lower it.")

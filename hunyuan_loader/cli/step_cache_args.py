"""The generate command's step-cache flags: --step-cache and one --cache-* flag per knob."""

from __future__ import annotations

import argparse

from ..core.step_cache_settings import CHOICES, KNOBS, StepCacheSettings, settings_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--step-cache", choices=CHOICES, default="off",
                        help="off (default): every step runs the transformer. taylor: the official Taylor cache, "
                             "~4x fewer transformer runs at 50 steps, close to (not the same as) the full image")
    defaults = StepCacheSettings()
    for field, name, low, high, text in KNOBS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, metavar="N",
                            help=f"{text} Default {getattr(defaults, field)}; {low}..{high}.")


def settings(args: argparse.Namespace) -> StepCacheSettings:
    return settings_from(args.step_cache, vars(args))

"""The loaders' quant names a LoadSpec accepts: the built-in three and those of weight formats
registered later (formats/registry.py adds them; core imports nothing above it)."""

from __future__ import annotations

QUANTS = ("bf16", "int8", "nf4")  # the built-in loaders (the CLI's and the nodes' choices)
_registered: list[str] = []


def allow_quant(name: str) -> None:
    if name not in QUANTS and name not in _registered:
        _registered.append(name)


def forget_quant(name: str) -> None:
    if name in _registered:
        _registered.remove(name)


def known_quants() -> tuple[str, ...]:
    return QUANTS + tuple(_registered)

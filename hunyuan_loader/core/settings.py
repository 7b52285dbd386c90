"""Every environment variable the pack reads, in one table, parsed here and nowhere else.

Each ``Setting`` has a name, a type, a default and an effect (docs/settings.md is the same table for
users; a test keeps the two equal). A value is parsed on first use and cached: some are read on hot
paths (the grouped MoE reads its settings on every MoE call). ``refresh()`` forgets the cache, so the
next read sees the environment as it is now (tests that change a variable).

An unset variable, or one set to spaces only, takes the default. A bad value raises a ValueError that
names the variable and the values it accepts. Booleans accept 1/0, true/false, yes/no, on/off (any
case, spaces ignored), the same for every boolean setting.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")

# The names, for the modules that use them (their error messages and docstrings name the variable).
VERBOSE = "HUNYUAN_VERBOSE"
LOGICAL_DEVICES = "HUNYUAN_LOGICAL_DEVICES"
VRAM_LIMIT_GB = "HUNYUAN_VRAM_LIMIT_GB"
RAM_LIMIT_GB = "HUNYUAN_RAM_LIMIT_GB"
MIN_STREAMED_BLOCKS = "HUNYUAN_MIN_STREAMED_BLOCKS"
MODELS_DIR = "HUNYUAN_MODELS_DIR"
MOE_GROUPED = "HY3_MOE_GROUPED"
MOE_SCRATCH_MB = "HY3_MOE_SCRATCH_MB"
MOE_OVERLAP = "HY3_MOE_OVERLAP"
MOE_PAIR_DEQUANT = "HY3_MOE_PAIR_DEQUANT"
DEQUANT_KERNEL = "HY3_DEQUANT_KERNEL"
W8A16_KERNEL = "HY3_W8A16_KERNEL"
EXPERT_STREAMING = "HY3_EXPERT_STREAMING"
CACHE_HOME = "XDG_CACHE_HOME"
PREVIEW_EVERY = "HUNYUAN_PREVIEW_EVERY"
HUB_OFFLINE = "HF_HUB_OFFLINE"  # written (the CLI), never read: huggingface_hub reads it


class BadValue(ValueError):
    """Raised by a parser: the text says which values are allowed."""


@dataclass(frozen=True)
class Setting:
    """One environment variable: how users set it (the docs table) and how it is parsed."""

    name: str
    type: str  # as the docs show it
    default: str  # as the docs show it
    effect: str
    parse: Callable[[str], Any]  # the stripped, non-empty text -> the value; BadValue otherwise
    unset: Any  # the value when the variable is unset or blank


# -- parsers ----------------------------------------------------------------------------------------
def parse_bool(text: str) -> bool:
    """1/true/yes/on -> True, 0/false/no/off -> False (any case, spaces ignored)."""
    value = text.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise BadValue("use 1, true, yes or on to switch it on; 0, false, no or off to switch it off")


def _choice(*allowed: str, aliases: dict[str, str] | None = None, shown: str = "") -> Callable[[str], str]:
    """One of ``allowed`` (any case), or an alias of one; ``shown`` replaces the list in the error."""
    aliases = aliases or {}

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value in allowed:
            return value
        if value in aliases:
            return aliases[value]
        raise BadValue(shown or "use " + ", ".join(allowed[:-1]) + " or " + allowed[-1])

    return parse


def _positive_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise BadValue("use a positive number of GiB (e.g. 24 or 23.5), or unset it")
    return value


def _whole(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise BadValue(f"use {what}, or unset it")
        return value

    return parse


def _paths(text: str) -> list[Path]:
    return [Path(p) for p in text.split(os.pathsep) if p]


_OFF = {v: "off" for v in ("0", "false", "no", "per_expert")}  # HY3_MOE_GROUPED: every expert on its own

SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting(VERBOSE, "boolean", "off", "Show every library message, including the known harmless notes the pack "
            "hides (the CLI's --verbose does the same).", parse_bool, False),
    Setting(VRAM_LIMIT_GB, "number (GiB)", "unset: the whole GPU", "Act as if each GPU had only this much memory: "
            "share a GPU with other programs, or try a smaller card's placement on a larger one.", _positive_gib, None),
    Setting(RAM_LIMIT_GB, "number (GiB)", "unset: what the system reports available", "Act as if the machine had "
            "only this much free RAM when the loader plans where the weights go.", _positive_gib, None),
    Setting(MODELS_DIR, "folders, separated by : (; on Windows)", "unset: none",
            "Where checkpoint folders are looked for outside ComfyUI (inside ComfyUI, its models/HunyuanImage-3 "
            "folders and extra_model_paths.yaml are used).", _paths, []),
    Setting(MIN_STREAMED_BLOCKS, "whole number >= 0", "0", "Tests and benchmarks: with offload smart or budget, "
            "stream at least this many decoder blocks.", _whole(0, "a whole number >= 0"), 0),
    Setting(LOGICAL_DEVICES, "boolean", "off", "Tests and benchmarks: let a loader's devices input name cpu or "
            "the same GPU twice.", parse_bool, False),
    Setting(MOE_GROUPED, "auto, triton, dequant, linear or off", "auto", "How a layer's INT8 (W8A16) experts run: "
            "auto picks an engine; triton, dequant or linear forces one; off (also 0, false, no, per_expert) "
            "runs every expert on its own.", _choice("auto", "triton", "dequant", "linear", "off", aliases=_OFF,
                                                   shown="use auto, triton, dequant, linear or 0 (off, false, no "
                                                   "and per_expert also mean 0: every expert on its own)"), "auto"),
    Setting(MOE_SCRATCH_MB, "whole number > 0 (MiB)", "512", "Memory for the dequant and linear engines' buffers "
            "of dequantized experts; more MiB puts more experts in one chunk.", _whole(1, "a positive whole number "
            "of MiB (default 512)"), None),
    Setting(MOE_OVERLAP, "boolean", "off", "Dequantize the next experts on a side CUDA stream while the current "
            "ones compute (measured slower on an H200).", parse_bool, False),
    Setting(MOE_PAIR_DEQUANT, "boolean", "on", "Dequantize a chunk's two expert Linears in one kernel launch "
            "(off: one launch per Linear).", parse_bool, True),
    Setting(DEQUANT_KERNEL, "rows or flat", "rows", "Which kernel dequantizes INT8 experts (both give the same "
            "bits; rows is faster on an H200).", _choice("rows", "flat"), "rows"),
    Setting(W8A16_KERNEL, "auto or torch", "auto", "INT8 (W8A16) Linears: auto uses the fused Triton kernel where "
            "it runs; torch always uses the plain PyTorch path.", _choice("auto", "torch"), "auto"),
    Setting(EXPERT_STREAMING, "boolean", "on", "With streamed decoder blocks, a forward of a few tokens (the "
            "Instruct text stage) copies only the experts its tokens use (off: whole blocks).", parse_bool, True),
    Setting(CACHE_HOME, "folder", "~/.cache", "The pack's cache is <this folder>/hunyuan_image3: the CLI "
            "demo's test checkpoint and the live previews' projection fitted for each checkpoint's VAE.", Path, None),
    Setting(PREVIEW_EVERY, "whole number >= 1", "1", "Live previews while an image samples (when ComfyUI's "
            "preview method is not none, or the CLI's --preview-dir): at most one every this many steps.",
            _whole(1, "a whole number >= 1"), 1),
)}

_cache: dict[str, Any] = {}


def get(name: str) -> Any:
    """The parsed value of setting ``name`` (parsed on first use, then cached until ``refresh()``)."""
    try:
        return _cache[name]
    except KeyError:
        pass
    setting = SETTINGS[name]
    raw = os.environ.get(name, "")
    text = raw.strip()
    if not text:
        value = setting.unset
    else:
        try:
            value = setting.parse(text)
        except BadValue as exc:
            raise ValueError(f"{name}={raw!r} is not a valid value: {exc}") from None
    _cache[name] = value
    return value


def cache_root() -> Path:
    """The pack's cache folder: ``$XDG_CACHE_HOME/hunyuan_image3`` (default ``~/.cache/hunyuan_image3``)."""
    return (get(CACHE_HOME) or Path.home() / ".cache") / "hunyuan_image3"


def refresh() -> None:
    """Forget every parsed value: the next ``get`` reads the environment again."""
    _cache.clear()


def hub_offline_by_default() -> None:
    """HF_HUB_OFFLINE=1 unless the user set it: the CLI loads local folders only (no hub retries)."""
    os.environ.setdefault(HUB_OFFLINE, "1")

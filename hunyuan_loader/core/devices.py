"""The loaders' ``devices`` input: its syntax, its canonical form (part of the cache key) and the
devices it names on this machine. Below the load pipeline so that a LoadSpec can check it."""

from __future__ import annotations

import re
from typing import Any

import torch

from . import settings
from .choices import MULTI_GPU_MODES
from .errors import InputError

LOGICAL_ENV = settings.LOGICAL_DEVICES
_NAME = re.compile(r"cuda:(\d+)|cpu")
MODES = MULTI_GPU_MODES  # the loaders' multi_gpu input (memory.devices.choose_mode)


def logical_devices_allowed() -> bool:
    """HUNYUAN_LOGICAL_DEVICES (tests and benches): cpu and a repeated GPU are allowed in ``devices``."""
    return settings.get(LOGICAL_ENV)


# -- the devices input ----------------------------------------------------------------------------
def parse_devices(text: str) -> tuple[str, ...] | None:
    """The syntax of a ``devices`` input: None for auto, else the device names ("cuda:N")."""
    raw = (text or "").strip().lower()
    if raw in ("", "auto"):
        return None
    names: list[str] = []
    for token in raw.replace(" ", "").split(","):
        if token.isdigit():
            token = f"cuda:{token}"
        if not token or not _NAME.fullmatch(token):
            raise InputError(
                f"devices '{text}': '{token}' is not a GPU name. List GPUs as cuda:N separated by commas "
                "(e.g. 'cuda:0,cuda:1'), or use 'auto' for every visible GPU."
            )
        if token == "cpu" and not logical_devices_allowed():
            raise InputError(f"devices '{text}' lists 'cpu': list GPUs only (cuda:N), or use 'auto' (on a machine "
                             "without a CUDA GPU, auto runs on the CPU).")
        if token in names and not logical_devices_allowed():
            raise InputError(f"devices '{text}' names {token} twice: name each GPU once.")
        names.append(token)
    return tuple(names)


def normalise_devices(text: str) -> str:
    """The canonical form of a ``devices`` input (the cache key): 'auto' or 'cuda:0,cuda:1'."""
    names = parse_devices(text)
    return "auto" if names is None else ",".join(names)


def resolve_devices(text: str) -> list[torch.device]:
    """The devices a ``devices`` input means on this machine; InputError for one it does not have."""
    names = parse_devices(text)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if names is None:
        if count == 0:
            return [torch.device("cpu")]
        current = torch.cuda.current_device()
        return [torch.device("cuda", current)] + [torch.device("cuda", i) for i in range(count) if i != current]
    out = []
    for name in names:
        device = torch.device(name)
        if device.type == "cuda" and device.index >= count:
            have = ("no CUDA GPU is visible to this process" if count == 0
                    else f"this machine has {count} visible GPU(s): cuda:0 to cuda:{count - 1}")
            raise InputError(f"devices: {name} does not exist ({have}). Use 'auto', or GPUs from that list.")
        out.append(device)
    return out


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def primary_device(spec: Any) -> torch.device:
    """Where the model's non-block parts live: the first device of ``spec.devices``."""
    return resolve_devices(getattr(spec, "devices", "auto"))[0]


def handled_here(spec: Any) -> bool:
    """Whether the load goes through this module: several devices, or one that is not the current."""
    found = resolve_devices(getattr(spec, "devices", "auto"))
    return len(found) > 1 or found[0] != default_device()

"""The hooks every loaded model gets, in one call: the loader's MoE dispatch, the remote-code fixes
and block streaming (each a named entry of the registry, which keeps their documented order
whatever order they are installed in: docs/hooks.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .moe_dispatch import install_moe_dispatch
from .remote_code_fixes import (
    install_cache_kwarg_name,
    install_cpu_input_casts,
    install_mask_alignment,
    install_static_cache_init,
    install_vision_input_alignment,
    install_vit_return_tensors,
)
from .streaming import connect_streaming


def install_load_hooks(model: nn.Module, moe_impl: str, device: torch.device, managers: Sequence[Any]) -> None:
    """What a load installs on the model once its weights are placed; ``managers``: the residency
    managers whose streamers the registry attaches from now on."""
    install_moe_dispatch(model, moe_impl)
    install_static_cache_init(model)
    install_cache_kwarg_name(model)
    install_vit_return_tensors(model)
    install_mask_alignment(model)
    install_vision_input_alignment(model)
    if device.type == "cpu":
        install_cpu_input_casts(model)
    connect_streaming(model, managers)


def replica_hooks(moe_impl: str) -> Callable[[nn.Module], None]:
    """What a CFG-parallel decoder replica gets installed (the model's own come from install_load_hooks)."""
    return lambda decoder: install_moe_dispatch(decoder, moe_impl)

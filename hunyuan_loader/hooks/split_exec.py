"""Run a model whose decoder blocks live on several devices: activations cross at block boundaries.

Forward pre-hooks on EVERY decoder block (the model code never knows, as with accelerate's
hooks) move every tensor a block is called with (hidden states, attention mask, position ids,
the rope ``(cos, sin)`` tuple, anything nested in tuples, lists or dicts) to the block's device.
Every block, not only the first of each device's run: the decoder computes the mask and the rope
once on the first device and hands the SAME objects to each block (official
modeling_hunyuan_image_3.py:1615-1628 / hunyuan.py:1667-1681: ``decoder_layer(hidden_states,
attention_mask=, position_ids=, past_key_value=, custom_pos_emb=(cos, sin), ...)``), so only the
hidden states arrive on the block's device from the block before. A forward hook on the last
block brings its output back to the first device, where the model's non-block parts (final
norm, heads, VAE) live. A KV cache object passes
through untouched: transformers' static and dynamic cache layers allocate lazily on the device
of the keys they are first given, so each layer's cache lives with its block.

Tensors shared by every block (the mask, rope, position ids) are copied once per device per
pass over the stack, not once per block: copies are remembered from block 0's hook to the end
of the pass. The CUDA current device follows the block (code that allocates on "cuda"
inside a block gets the block's GPU) and is put back after the last block.

``SplitResidency`` is the residency of a split model: one ResidencyManager per device over its run
of blocks (``memory.residency.multi``) with this entry installed, as ``cfg_parallel.CfgParallelResidency``
is CFG-parallel's beside its entry.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...memory import devices as dv
from ...memory.residency.multi import MultiDeviceResidency
from .registry import ModuleHooks, move_to, registry

log = logging.getLogger(__name__)


class SplitExecution(ModuleHooks):
    """Hooks that run ``blocks[i]`` on ``devices[i]`` and return to ``primary`` after the last
    (the registry entry ``split_boundaries``)."""

    def __init__(self, blocks: Sequence[nn.Module], devices: Sequence[torch.device | str],
                 primary: torch.device | str, *, starts: Sequence[int] | None = None, attach: bool = True) -> None:
        """``starts``: the first block of each run (default: where the device changes); two runs on
        one device (logical parts, tests) count as a boundary there. Every block gets a pre-hook
        (the shared mask / rope reach each block from the decoder, not from the block before); on
        a block whose inputs are already on its device it moves nothing. ``attach=False``: the
        hooks go on when the registry attaches the entry."""
        super().__init__()
        if len(blocks) != len(devices):
            raise ValueError(f"{len(blocks)} blocks but {len(devices)} devices")
        self.blocks = list(blocks)
        self.devices = [torch.device(d) for d in devices]
        self.primary = torch.device(primary)
        self._memos: dict[torch.device, dict] = {}
        self.moves = 0  # block calls with a tensor moved to the block's device (tests, bench)
        self.starts = sorted({0, *(starts or [i for i in range(1, len(self.blocks))
                                             if self.devices[i] != self.devices[i - 1]])})
        self._pres = [self._make_pre(i) for i in range(len(self.blocks))]
        if attach:
            self.attach()

    def hooks(self) -> list[tuple[nn.Module, str, Any]]:
        """A keyword pre-hook on every block, an always-called hook after the last."""
        out: list[tuple[nn.Module, str, Any]] = [(b, "pre_kwargs", pre) for b, pre in zip(self.blocks, self._pres)]
        if self.blocks:
            out.append((self.blocks[-1], "post_always", self._after_last))
        return out

    @property
    def crossings(self) -> int:
        """Device changes along the stack (the first device counted from ``primary``)."""
        prev, n = self.primary, 0
        for d in self.devices:
            n += d != prev
            prev = d
        return n

    def _make_pre(self, i: int):
        device = self.devices[i]
        start = i in self.starts

        def pre(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if i == 0:
                self._memos.clear()  # a new pass over the stack
            if start and device.type == "cuda":
                torch.cuda.set_device(device)
            memo = self._memos.setdefault(device, {})
            new_args, new_kwargs = move_to(args, device, memo), move_to(kwargs, device, memo)
            if new_args is args and new_kwargs is kwargs:
                return None
            self.moves += 1
            return new_args, new_kwargs

        return pre

    def _after_last(self, _module: nn.Module, _args: tuple, output: Any) -> Any:
        self._memos.clear()
        if self.primary.type == "cuda":
            torch.cuda.set_device(self.primary)
        if self.devices[-1] == self.primary:
            return None
        self.moves += 1
        return move_to(output, self.primary)

    def detach(self) -> None:
        super().detach()
        self._memos.clear()

    def close(self) -> None:
        self.detach()


# -- residency ------------------------------------------------------------------------------------
class SplitResidency(MultiDeviceResidency):
    """MultiDeviceResidency plus the activation moves at the device boundaries."""

    def __init__(self, model: Any, blocks: Sequence[Any], split: dv.SplitPlan, **kwargs: Any) -> None:
        super().__init__(model, blocks, split, **kwargs)
        starts = [a for a, b in split.ranges if b > a]
        self.execution = (SplitExecution(blocks, split.block_devices, split.devices[0], starts=starts, attach=False)
                          if len(split.devices) > 1 else None)
        if self.execution is not None:
            registry(model).install("split_boundaries", self.execution)

    def extra_needed(self, need: int, notes: list[str] | None = None) -> tuple[int, int]:
        result = super().extra_needed(need, notes)
        if notes is not None and self.execution is not None:
            notes.append(self.split.describe() + ".")
        return result

    def close(self) -> None:
        if self.execution is not None:
            if registry(self.model).get("split_boundaries") is self.execution:
                registry(self.model).remove("split_boundaries")
            self.execution.close()
            self.execution = None
        super().close()

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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .registry import ModuleHooks

log = logging.getLogger(__name__)


def move_to(value: Any, device: torch.device, memo: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    """``value`` with every tensor in it (through tuples, lists and dicts) on ``device``; other
    objects (a KV cache, numbers, strings) as they are. ``memo`` reuses copies of the same tensor."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        if memo is not None:
            hit = memo.get(id(value))
            if hit is not None and hit[0] is value and hit[1].device == device:
                return hit[1]
        # to a GPU asynchronously (stream-ordered); to the CPU synchronously: an asynchronous
        # device-to-host copy may still be running when the CPU reads the result
        moved = value.to(device, non_blocking=device.type == "cuda")
        if memo is not None:
            memo[id(value)] = (value, moved)  # keeps the source alive, so its id is not reused
        return moved
    if isinstance(value, (tuple, list)):
        items = [move_to(v, device, memo) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value  # nothing moved: the same object
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict) and type(value) is dict:
        moved = {k: move_to(v, device, memo) for k, v in value.items()}
        return value if all(moved[k] is value[k] for k in value) else moved
    return value


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

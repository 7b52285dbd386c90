"""Memory-linear MoE dispatch for HunyuanImage-3.0 (issue 6).

The reference ("eager") MoE builds ``[tokens, experts, capacity]`` dispatch/combine
tensors; with ``moe_drop_tokens=False`` the capacity is the busiest expert's token
count, so memory grows with tokens^2. ``install_moe_dispatch(model, "gather_scatter")``
replaces each MoE block's forward (on the instance) with the same function computed
differently: the same float32 router, softmax, top-k (same ``torch.topk`` call, so the
same ties), normalisation / ``routed_scaling_factor`` and capacity/priority drop rules,
then tokens grouped by expert (stable sort), ``index_select``, each expert run once on its
tokens, and ``index_add_`` of the weighted outputs into a float32 buffer in expert order.
Memory is linear in tokens.

Not bit-exact: the reference runs each expert on a zero-padded ``[1, capacity, hidden]``
batch and sums in a bf16 einsum; here each expert sees only its tokens and the sum is
float32, so matmul shapes and summation order differ. Per layer the outputs agree within
bf16 rounding; after a few diffusion steps images differ by a few 1/255 (measured on the
official code: 1-4/255 after 2 steps). ``moe_impl="reference"`` keeps the model's own
dispatch for bit-exact work.

Each expert is called with 3-D input ``[1, tokens, hidden]``, as the reference does: the
official HunyuanMLP.forward splits with ``chunk(2, dim=2)`` (modeling_hunyuan_image_3.py:1080)
and fails on 2-D input. Works with bnb Linear8bitLt / Linear4bit experts and with hooks on
the decoder layer (the block's module calls are kept).

W8A16 experts run together in chunks when they can (``moe_grouped.py``: engines, chunking, choice).

Expert fetch, the one coupling with block streaming (per MoE block, weakly kept): each call hands
the experts that have tokens to the block's fetch callback, if one is set, once routing knows them
(after ``plan_dispatch``'s one host sync) and before any expert runs; the entry marks the blocks it
dispatches (``set_dispatched``, with the block's top-k; both in registry.py, a leaf that both entries
import). Block streaming (hooks/streaming.py) sets the
callback for a streamed block's MoE (``set_expert_fetch``: copy those experts into the block's GPU
slot) and asks ``dispatched_topk`` whether a forward will call it. Both look up at call time, so the
order in which the two registry entries are installed does not matter; at run time
``block_streaming``'s pre-hook (the block's base) runs before this forward (the experts), as
HOOK_ORDER says.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import re
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model.topology import find_moe_blocks, is_moe_block
from .moe_grouped import grouped_chunks, grouped_w8a16_reason
from .registry import expert_fetch, registry, set_dispatched

logger = logging.getLogger(__name__)

IMPLS = ("gather_scatter", "reference")
HOOK = "moe_dispatch"  # the registry entry's name
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Routing:
    """Routing rules of one MoE block (read from the model config)."""

    topk: int
    drop_tokens: bool = False
    capacity_factor: float = 1.0
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0


def _layer_value(value: Any, layer_idx: int) -> Any:
    if isinstance(value, (list, tuple)):
        return value[layer_idx] if layer_idx < len(value) else value[-1]
    return value


def routing_for(config: Any, layer_idx: int, block: nn.Module | None = None) -> Routing:
    """Routing rules for layer ``layer_idx``; ``moe_topk`` may be an int or a per-layer list."""
    gate = getattr(block, "gate", None)
    topk = getattr(config, "moe_topk", None)
    if topk is None:
        topk = getattr(gate, "moe_topk", None) or getattr(block, "moe_topk", None)
    if topk is None:
        raise ValueError("cannot find moe_topk in the config or the MoE block")

    def get(name: str, default: Any) -> Any:
        value = getattr(config, name, None)
        return default if value is None else value

    return Routing(
        topk=int(_layer_value(topk, layer_idx)),
        drop_tokens=bool(get("moe_drop_tokens", False)),
        capacity_factor=float(get("capacity_factor", 1.0)),
        norm_topk_prob=bool(get("norm_topk_prob", True)),
        routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
    )


def router_logits(gate: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float32 router logits through the gate's ``wg`` module (hooks on it still run)."""
    wdt = gate.wg.weight.dtype
    inp = x.to(wdt) if wdt.is_floating_point else x
    return gate.wg(inp).float()


def route(logits: torch.Tensor, rule: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [T, k], float32 weights [T, k]) exactly as the reference gate computes them."""
    gates = F.softmax(logits, dim=1)
    top_vals, top_idx = torch.topk(gates, rule.topk, dim=1)
    if rule.norm_topk_prob and rule.topk > 1:
        weights = top_vals / top_vals.sum(dim=1, keepdim=True)
    else:
        weights = top_vals * rule.routed_scaling_factor
    return top_idx, weights


def plan_dispatch(
    top_idx: torch.Tensor, weights: torch.Tensor, num_experts: int, rule: Routing
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Kept assignments grouped by expert: (token ids, weights, per-expert counts).

    Priority order is rank-major (every token's 1st choice, then 2nd, ...); within an
    expert the stable sort keeps that order, so with ``drop_tokens`` the first
    ``capacity`` assignments are the ones the reference keeps.
    """
    tokens, k = top_idx.shape
    flat_e = top_idx.t().reshape(-1)
    flat_tok = torch.arange(tokens, device=top_idx.device).repeat(k)
    flat_w = weights.t().reshape(-1)
    order = torch.sort(flat_e, stable=True).indices
    counts = torch.bincount(flat_e, minlength=num_experts)
    if rule.drop_tokens:
        capacity = int(max(k, k * tokens // num_experts) * rule.capacity_factor)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(order.numel(), device=order.device) - starts[flat_e[order]]
        order = order[pos < capacity]
        counts = counts.clamp(max=capacity)
    return flat_tok[order], flat_w[order], counts.tolist()


def _per_expert_chunk(n: int) -> Any:
    yield 0, n, 0, None, None


def _combine(chunks: Any, experts: Any, x: torch.Tensor, tok: torch.Tensor, w: torch.Tensor,
             counts: list[int], out: torch.Tensor) -> None:
    """Every expert's weighted output added into ``out`` (float32, one expert at a time, in expert
    order, the same on both paths); ``chunks`` as ``grouped_chunks`` yields them."""
    w = w[:, None]
    for lo, hi, start, ys, rows in chunks:
        sub = counts[lo:hi]
        end = start + sum(sub)
        # the chunk's views made in bulk (split: one call), not several view ops per expert
        idxs, ws = tok[start:end].split(sub), w[start:end].split(sub)
        yv = None
        if ys is not None:
            packed = all(r == a for r, a, n in zip(rows, itertools.accumulate(sub, initial=0), sub) if n)
            yv = ys[: end - start].split(sub) if packed else [ys[r : r + n] for r, n in zip(rows, sub)]
        for i, n in enumerate(sub):
            if n:
                if ys is not None:
                    y = yv[i]
                else:  # [1, n, hidden], as the reference feeds it
                    y = experts[lo + i](x.index_select(0, idxs[i]).unsqueeze(0))[0]
                out.index_add_(0, idxs[i], y * ws[i])  # bf16 * fp32 weights: computed in fp32
                del y
        del ys, yv


def gather_scatter_forward(self: nn.Module, hidden_states: torch.Tensor, *, rule: Routing) -> torch.Tensor:
    """MoE forward with memory linear in tokens (bound to a block, with its ``rule``, by ``install_moe_dispatch``)."""
    if hidden_states.is_cuda:
        torch.cuda.set_device(hidden_states.device)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    experts = self.experts
    # checked before routing's host sync (counts.tolist()), so it overlaps the router's GPU work
    grouped = grouped_w8a16_reason(experts, x) is None
    top_idx, weights = route(router_logits(self.gate, x), rule)
    tok, w, counts = plan_dispatch(top_idx, weights, len(experts), rule)
    fetch = expert_fetch(self)
    if fetch is not None:  # a streamed block's experts with tokens into its slot, before they run
        fetch([e for e, n in enumerate(counts) if n])
    w = w.to(hidden_states.dtype).float()  # the reference casts its combine weights to the hidden dtype
    del top_idx, weights
    out = torch.zeros(x.shape[0], shape[-1], dtype=torch.float32, device=x.device)
    if grouped:
        chunks = grouped_chunks(experts, x, tok, counts)
    else:
        chunks = _per_expert_chunk(len(counts))
    with contextlib.closing(chunks):  # an error in the loop still closes the dequant pipeline
        _combine(chunks, experts, x, tok, w, counts, out)
    result = out.to(hidden_states.dtype).reshape(shape)
    del out
    shared = self._modules.get("shared_mlp")
    if shared is not None:
        result = shared(hidden_states) + result
    return result


def _layer_index(name: str, fallback: int) -> int:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else fallback


def _forward_owner(block: nn.Module) -> tuple[object, str]:
    """Where the forward to patch lives: accelerate hooks keep the original in ``_old_forward``."""
    return (block, "_old_forward") if hasattr(block, "_old_forward") else (block, "forward")


class MoeDispatch:
    """Registry entry ``moe_dispatch``: each MoE block's forward replaced, on the instance, by
    ``gather_scatter_forward`` with the block's routing; ``detach`` puts the saved forwards back."""

    torch_hooks = False

    def __init__(self, blocks: list[tuple[nn.Module, Routing]]) -> None:
        self.blocks = blocks
        self._saved: list[tuple[object, str, Any]] = []  # (owner, attribute, what it held: None = nothing)

    @property
    def rules(self) -> list[Routing]:
        return [rule for _, rule in self.blocks]

    def attach(self) -> None:
        if self._saved:
            return
        for block, rule in self.blocks:
            owner, attr = _forward_owner(block)
            self._saved.append((owner, attr, owner.__dict__.get(attr)))
            setattr(owner, attr, types.MethodType(functools.partial(gather_scatter_forward, rule=rule), block))
            set_dispatched(block, rule.topk)  # its forward calls the block's expert fetch from now on

    def detach(self) -> None:
        for block, _ in self.blocks:
            set_dispatched(block, None)
        for owner, attr, saved in reversed(self._saved):
            if saved is None:
                owner.__dict__.pop(attr, None)
            else:
                setattr(owner, attr, saved)
        self._saved = []


def install_moe_dispatch(model: nn.Module, impl: str = "gather_scatter") -> int:
    """Switch every MoE block of ``model`` to ``impl``; returns the number of MoE blocks.

    Idempotent. ``"gather_scatter"`` installs the registry entry ``moe_dispatch``;
    ``"reference"`` removes it (the blocks' own forward again).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    config = getattr(model, "config", None)
    named = [(n, m) for n, m in model.named_modules() if is_moe_block(m)]
    reg = registry(model)
    if impl == "gather_scatter" and named and HOOK not in reg:
        blocks = [(block, routing_for(config, _layer_index(name, i), block)) for i, (name, block) in enumerate(named)]
        changed = len(blocks) if reg.install(HOOK, MoeDispatch(blocks)) else 0
    elif impl == "reference":
        changed = len(named) if reg.remove(HOOK) else 0
    else:
        changed = 0
    logger.info("MoE dispatch %s: %d blocks (%d changed)", impl, len(named), changed)
    return len(named)


def active_moe_impl(model: nn.Module) -> str:
    """``"gather_scatter"`` when every MoE block uses it, else ``"reference"`` (the conservative answer)."""
    entry = registry(model).get(HOOK)
    blocks = find_moe_blocks(model)
    if isinstance(entry, MoeDispatch) and blocks and {id(b) for b in blocks} <= {id(b) for b, _ in entry.blocks}:
        return "gather_scatter"
    return "reference"

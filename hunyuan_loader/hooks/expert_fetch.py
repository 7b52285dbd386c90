"""The one coupling between the MoE dispatch and block streaming, per MoE block (weakly kept).

``moe_dispatch`` marks the blocks whose forward is its gather_scatter (``set_dispatched``, with the
block's top-k) and, in each call, hands the experts that have tokens to the block's fetch callback
(``expert_fetch``) after routing and before any expert runs. ``streaming`` sets that callback for a
streamed block's MoE (``set_expert_fetch``: copy those experts into the block's GPU slot) and asks
``dispatched_topk`` whether a forward will call it. Both look up at call time, so the order in which
the two registry entries are installed does not matter; at run time ``block_streaming``'s pre-hook
(the base of the block) runs before ``moe_dispatch``'s forward (the experts), as HOOK_ORDER says.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from torch import nn

Fetch = Callable[[list[int]], None]

_FETCH: weakref.WeakKeyDictionary[nn.Module, Fetch] = weakref.WeakKeyDictionary()
_TOPK: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def set_expert_fetch(block: nn.Module, fetch: Fetch | None) -> None:
    """``fetch(expert ids with tokens)`` runs in each gather_scatter call of ``block`` before its experts
    do (None: no callback)."""
    if fetch is None:
        _FETCH.pop(block, None)
    else:
        _FETCH[block] = fetch


def expert_fetch(block: nn.Module) -> Fetch | None:
    return _FETCH.get(block)


def set_dispatched(block: nn.Module, topk: int | None) -> None:
    """``block``'s forward is the pack's gather_scatter with ``topk`` (None: its own forward again)."""
    if topk is None:
        _TOPK.pop(block, None)
    else:
        _TOPK[block] = topk


def dispatched_topk(block: nn.Module) -> int | None:
    """The top-k of ``block`` when its forward is gather_scatter (it calls the fetch); else None."""
    return _TOPK.get(block)

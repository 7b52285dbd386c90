"""Block streaming as the registry entry ``block_streaming``.

The work stays in ``memory.residency.streaming.BlockStreamer`` (memory/ does not import the
loader): a residency manager makes a streamer whenever a plan streams blocks (a load, a run
that needs more room, a restore after a soft unload) and closes it when the plan changes.
``connect_streaming`` asks each manager of a model to report those streamers here instead of
letting them attach themselves, so the registry attaches them in their place of the order.

Expert-granular streaming: the entry also wires each streamed MoE block to the MoE dispatch. A
forward of ``rows`` input rows with ``rows * topk < num_experts`` (the Instruct text stage: one
token per forward) can not use every expert, so it copies fewer bytes for certain when it copies
the block's base (attention, router, shared expert, norms) plus only the experts it routes to,
instead of the whole buffer: the streamer copies the base in its pre-hook (``block_streaming``
runs first), the dispatch (``moe_dispatch``, after it in HOOK_ORDER) calls the fetch with the
experts that have tokens, after routing and before any expert runs. Above that threshold the
whole block is copied, prefetched during the previous block's compute, as before: the expert
copies of a large forward could only start after routing, and most experts have tokens anyway.
Only when the block's forward is the pack's gather_scatter (``registry.dispatched_topk``) and
``HY3_EXPERT_STREAMING`` is on; a block whose experts own no weights of their own in the packed
buffer moves whole (logged once, with the reason).
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Sequence
from typing import Any

from ...memory.residency.parts import BlockParts, block_parts
from ..core import settings
from ..model.topology import find_moe_blocks
from .registry import dispatched_topk, registry, set_expert_fetch

log = logging.getLogger(__name__)

HOOK = "block_streaming"
_PARTS: weakref.WeakKeyDictionary[Any, BlockParts | None] = weakref.WeakKeyDictionary()  # per PackedBlock


def wants_experts(moe: Any, rows: int) -> bool:
    """A forward of ``rows`` rows copies only its experts: the block's forward is gather_scatter now
    and ``rows * topk < num_experts`` (fewer expert copies than a whole block, whatever the routing)."""
    if not settings.get(settings.EXPERT_STREAMING):
        return False
    topk = dispatched_topk(moe)
    return topk is not None and rows * topk < len(moe.experts)


def _parts(packed: Any, block: Any, moe: Any, idx: int) -> BlockParts | None:
    if packed in _PARTS:
        return _PARTS[packed]
    parts, why = block_parts(packed, block, list(moe.experts))
    if parts is None:
        log.info("streamed block %d moves whole in every forward: %s", idx, why)
    _PARTS[packed] = parts
    return parts


def wire_experts(streamer: Any) -> list[Any]:
    """Give ``streamer`` the expert split of each streamed MoE block and the dispatch its fetch;
    returns the MoE blocks wired (for ``unwire_experts``)."""
    wired = []
    for idx in streamer.order:
        block = streamer.blocks[idx]
        moes = find_moe_blocks(block)
        if len(moes) != 1:
            continue
        moe = moes[0]
        parts = _parts(streamer.packed[idx], block, moe, idx)
        if parts is None:
            continue
        streamer.set_parts(idx, parts, functools.partial(wants_experts, moe))
        set_expert_fetch(moe, functools.partial(streamer.fetch, idx))
        wired.append(moe)
    return wired


def unwire_experts(streamer: Any, wired: Sequence[Any]) -> None:
    streamer.clear_parts()
    for moe in wired:
        set_expert_fetch(moe, None)


class StreamingHooks:
    """Registry entry: the forward hooks of every live streamer of one model (one per device)."""

    def __init__(self, streamers: Sequence[Any]) -> None:
        self.streamers = list(streamers)
        self._wired: list[list[Any]] = []

    def attach(self) -> None:
        self.detach()
        for streamer in self.streamers:
            streamer.attach()
            self._wired.append(wire_experts(streamer))

    def detach(self) -> None:
        for streamer, wired in zip(self.streamers, self._wired):
            unwire_experts(streamer, wired)
        self._wired = []
        for streamer in self.streamers:
            streamer.detach()


def _update(model: Any, streamer: Any, started: bool) -> None:
    """The entry of ``model`` with ``streamer`` added (``started``) or taken out."""
    reg = registry(model)
    current = reg.get(HOOK)
    streamers = list(current.streamers) if isinstance(current, StreamingHooks) else []
    if started and streamer not in streamers:
        streamers.append(streamer)
    elif not started and streamer in streamers:
        streamers.remove(streamer)
    reg.remove(HOOK)
    if streamers:
        reg.install(HOOK, StreamingHooks(streamers))


def track_streamer(model: Any, streamer: Any) -> None:
    """Put one streamer made outside a manager (a CFG replica's) under ``model``'s entry."""
    streamer.detach()
    _update(model, streamer, True)


def untrack_streamer(model: Any, streamer: Any) -> None:
    _update(model, streamer, False)


def connect_streaming(model: Any, managers: Sequence[Any]) -> None:
    """From now on the streamers of ``managers`` are attached by ``model``'s registry; a streamer
    one of them already runs moves under the entry. Idempotent."""
    for manager in managers:
        manager.on_streamer = lambda streamer, started: _update(model, streamer, started)
        if manager.streamer is not None:
            track_streamer(model, manager.streamer)

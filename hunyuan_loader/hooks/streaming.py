"""Block streaming as the registry entry ``block_streaming``.

The work stays in ``memory.residency.streaming.BlockStreamer`` (memory/ does not import the
loader): a residency manager makes a streamer whenever a plan streams blocks (a load, a run
that needs more room, a restore after a soft unload) and closes it when the plan changes.
``connect_streaming`` asks each manager of a model to report those streamers here instead of
letting them attach themselves, so the registry attaches them in their place of the order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .registry import registry

HOOK = "block_streaming"


class StreamingHooks:
    """Registry entry: the forward hooks of every live streamer of one model (one per device)."""

    def __init__(self, streamers: Sequence[Any]) -> None:
        self.streamers = list(streamers)

    def attach(self) -> None:
        for streamer in self.streamers:
            streamer.attach()

    def detach(self) -> None:
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

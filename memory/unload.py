"""Force unload and the orphan hunt that recovers memory after an OOM.

After an exception (typically CUDA OOM) inside a generation, the traceback's frames keep
the model's activations and the model itself alive even when every cache has let go.
`nuke_orphans` frees exactly what belongs to HunyuanImage-3: tracebacks that ran through
our code or the model's remote code get their frames cleared, and models we loaded that
are no longer the live one get their weights replaced by empty tensors. Tensors of any
other model in the process are never touched.
"""

from __future__ import annotations

import gc
import inspect
import logging
import sys
import types
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import stats

log = logging.getLogger(__name__)

PACK_ROOT = Path(__file__).resolve().parents[1]
_tracked_models: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_code_dirs: set[str] = {str(PACK_ROOT)}


def track_model(model: torch.nn.Module) -> None:
    """Remember (weakly) a model we loaded, and where its remote code lives."""
    _tracked_models.add(model)
    try:
        _code_dirs.add(str(Path(inspect.getfile(type(model))).resolve().parent))
    except (TypeError, OSError):
        pass


def tracked_models() -> list[torch.nn.Module]:
    """Models we loaded that are still alive somewhere in the process."""
    return list(_tracked_models)


def _is_our_frame(frame: types.FrameType) -> bool:
    filename = frame.f_code.co_filename
    return any(filename.startswith(d) for d in _code_dirs)


def _traceback_chain(tb: types.TracebackType | None) -> list[types.FrameType]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def clear_our_tracebacks() -> int:
    """Clear the frames of every traceback that went through our or the model's code."""
    cleared = 0
    for name in ("last_traceback", "last_value", "last_exc", "last_type"):
        value = getattr(sys, name, None)
        tb = value if isinstance(value, types.TracebackType) else getattr(value, "__traceback__", None)
        if tb is not None and any(_is_our_frame(f) for f in _traceback_chain(tb)):
            setattr(sys, name, None)
    for obj in gc.get_objects():
        if not isinstance(obj, types.TracebackType):
            continue
        chain = _traceback_chain(obj)
        if not any(_is_our_frame(f) for f in chain):
            continue
        for frame in chain:
            try:
                frame.clear()
                cleared += 1
            except RuntimeError:  # a frame that is still running (our own caller)
                pass
    return cleared


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=t.dtype, device="cpu")


def strip_module_weights(module: torch.nn.Module) -> int:
    """Replace every parameter, buffer and bitsandbytes state tensor by an empty CPU tensor."""
    freed = 0
    for sub in module.modules():
        for param in list(sub._parameters.values()):
            if param is None or param.device.type == "meta":  # meta: no memory, and set_data refuses it
                continue
            freed += param.numel() * param.element_size()
            for attr in ("CB", "SCB"):
                if getattr(param, attr, None) is not None:
                    setattr(param, attr, None)
            if getattr(param, "quant_state", None) is not None:
                param.quant_state = None
            param.data = _empty_like(param)
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                freed += buf.numel() * buf.element_size()
                sub._buffers[name] = _empty_like(buf)
        state = getattr(sub, "state", None)
        for attr in ("CB", "SCB", "CxB"):
            if state is not None and isinstance(getattr(state, attr, None), torch.Tensor):
                setattr(state, attr, None)
    return freed


def nuke_orphans(live: Iterable[torch.nn.Module] = ()) -> tuple[int, int]:
    """Free HunyuanImage-3 memory no cache owns any more.

    Returns (frames cleared, bytes of weights stripped from orphaned models).
    Models in ``live`` (the cached one) are left alone.
    """
    keep = {id(m) for m in live}
    frames = clear_our_tracebacks()
    gc.collect()
    stripped = 0
    for model in tracked_models():
        if id(model) not in keep:
            stripped += strip_module_weights(model)
    return frames, stripped


@dataclass
class UnloadReport:
    """What a force unload did, with memory before and after."""

    before: stats.MemorySnapshot
    after: stats.MemorySnapshot
    dropped: str = "nothing cached"
    frames_cleared: int = 0
    orphan_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        gib = stats.GIB
        lines = [
            f"Force Unload: dropped {self.dropped}.",
            f"Before: {self.before.describe()}",
            f"After:  {self.after.describe()}",
            f"Freed: RAM {(self.before.rss - self.after.rss) / gib:+.2f} GiB (process), "
            f"VRAM {(self.before.cuda_allocated - self.after.cuda_allocated) / gib:+.2f} GiB allocated.",
        ]
        if self.frames_cleared or self.orphan_bytes:
            lines.append(
                f"Orphan hunt: cleared {self.frames_cleared} traceback frames, stripped "
                f"{self.orphan_bytes / gib:.2f} GiB of orphaned HunyuanImage-3 weights."
            )
        lines += self.notes
        return "\n".join(lines)


def collect_garbage(passes: int = 3) -> None:
    """Several GC passes, the CUDA caching allocator emptied, heap trimmed."""
    for _ in range(passes):
        gc.collect()
    stats.release_cached_memory()
    stats.malloc_trim()

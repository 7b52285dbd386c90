"""Memory readings: process RSS, available RAM, CUDA allocated/reserved, malloc_trim."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from ..hunyuan_loader.core import settings
from ..hunyuan_loader.core.units import GIB


@dataclass(frozen=True)
class MemorySnapshot:
    """One reading of process and GPU memory, in bytes."""

    rss: int
    ram_available: int
    cuda_allocated: int
    cuda_reserved: int
    cuda_free: int
    cuda_total: int

    def describe(self) -> str:
        text = f"RAM {self.rss / GIB:.2f} GiB (process), {self.ram_available / GIB:.1f} GiB available"
        if self.cuda_total:
            text += (
                f"; VRAM {self.cuda_allocated / GIB:.2f} GiB allocated, {self.cuda_reserved / GIB:.2f} GiB reserved, "
                f"{self.cuda_free / GIB:.1f} of {self.cuda_total / GIB:.1f} GiB free"
            )
        return text


def snapshot() -> MemorySnapshot:
    """Read memory now (CUDA figures are 0 without a GPU)."""
    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return MemorySnapshot(rss, vm.available, torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), free, total)
    return MemorySnapshot(rss, vm.available, 0, 0, 0, 0)


@functools.lru_cache(maxsize=1)
def _libc_malloc_trim() -> Any:
    """glibc's malloc_trim, or None. Looked up once: ``find_library`` runs ``ldconfig -p`` (a
    subprocess, a few ms), and a CPU load trims after every block."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def malloc_trim() -> bool:
    """Return freed heap pages to the OS (glibc only). True if it ran."""
    trim = _libc_malloc_trim()
    return bool(trim(0)) if trim is not None else False


def release_cached_memory() -> None:
    """Give the CUDA caching allocator's free blocks back and reset peak statistics."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
        torch.cuda.reset_peak_memory_stats()


def vram_limit_bytes() -> int | None:
    """HUNYUAN_VRAM_LIMIT_GB: act as if the GPU had only this much memory (sharing a GPU with
    other programs; trying a 24/48/96 GB card's placement on a larger one). None if unset."""
    limit = settings.get(settings.VRAM_LIMIT_GB)
    return int(limit * GIB) if limit is not None else None


def usable_vram(snap: MemorySnapshot | None = None) -> int:
    """Bytes new allocations can still get: free on the device plus the allocator's cached
    free blocks, capped by HUNYUAN_VRAM_LIMIT_GB."""
    snap = snap or snapshot()
    usable = snap.cuda_free + snap.cuda_reserved - snap.cuda_allocated
    limit = vram_limit_bytes()
    if limit is not None:
        usable = min(usable, limit - snap.cuda_allocated)
    return max(0, usable)

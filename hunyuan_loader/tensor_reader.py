"""Read checkpoint tensors in a given order on a background thread, a bounded window ahead.

Why by hand and not ``safe_open(...).get_tensor``: safe_open maps the file, so every page
read counts towards the process RSS until the handle closes, data arrive by page faults
into pageable memory (host->GPU copies from pageable memory run at ~1/8 of the pinned
rate) and the read cannot run ahead while the GPU quantizes. Here one thread reads each
tensor with large ``preadv`` calls (which release the GIL) straight into either

* a page-locked ring buffer (tensors that go to the GPU: the consumer copies them out and
  releases them in order, so host memory stays at the ring size), or
* a fresh tensor of its own (tensors that stay in CPU RAM: the model keeps it),

at most ``window`` bytes ahead of the consumer. Disk reading thus overlaps the copies
and the quantization of the tensors before it.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .checkpoint_layout import TensorEntry

CHUNK = 64 << 20  # bytes per preadv call
ALIGN = 256


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class ReadTensor:
    """A tensor the reader delivered; ``release()`` it once its data has been copied out."""

    entry: TensorEntry
    tensor: torch.Tensor
    _reader: TensorReader | None = None
    _region: tuple[int, int] | None = None

    def release(self) -> None:
        if self._reader is not None and self._region is not None:
            self._reader._free(self._region)
        self._region = None


class ReadCancelled(Exception):
    """The reader was closed while a consumer waited."""


class TensorReader:
    """Background reader of ``entries`` (in that order).

    ``to_ring(entry)`` says whether a tensor is transient (into the ring; the consumer
    copies it elsewhere and releases it) or kept (its own CPU tensor). ``ring_bytes`` is
    the ring size (0: no ring, every tensor gets its own storage); ``pin`` page-locks the
    ring when CUDA is available. ``window`` bounds the bytes read but not yet released.
    """

    def __init__(
        self,
        entries: Sequence[TensorEntry],
        *,
        to_ring: Callable[[TensorEntry], bool] = lambda e: False,
        ring_bytes: int = 0,
        pin: bool = True,
        window: int = 1 << 30,
    ) -> None:
        self.entries = list(entries)
        self._to_ring = to_ring
        self.window = max(int(window), 1)
        self._ring = None
        if ring_bytes > 0:
            from ..memory.residency.packed import HostBuffer

            self._ring = HostBuffer(_align(ring_bytes), pin=pin)
        self.ring_bytes = 0 if self._ring is None else self._ring.tensor.numel()
        self._cond = threading.Condition()
        self._ready: collections.deque[ReadTensor] = collections.deque()
        self._regions: collections.deque[tuple[int, int]] = collections.deque()
        self._in_flight = 0  # bytes read (or being read) and not released
        self._error: BaseException | None = None
        self._stop = False
        self._done = False
        self.bytes_read = 0
        self._files: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="hunyuan-tensor-reader", daemon=True)
        self._thread.start()

    # -- consumer side -------------------------------------------------------------------------
    def __iter__(self):
        for _ in range(len(self.entries)):
            yield self.next()

    def next(self) -> ReadTensor:
        """The next tensor in order (waits for the reader)."""
        with self._cond:
            while not self._ready:
                if self._error is not None:
                    raise self._error
                if self._stop:
                    raise ReadCancelled("the tensor reader was closed")
                self._cond.wait()
            item = self._ready.popleft()
            if item._region is None:  # a kept tensor: the consumer owns it from here
                self._in_flight -= _align(item.entry.nbytes)
                self._cond.notify_all()
            return item

    def close(self) -> None:
        """Stop reading, wait for the thread and free the ring (idempotent)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        self._ready.clear()
        self._ring = None

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- ring ----------------------------------------------------------------------------------
    def _alloc(self, n: int) -> tuple[int, int] | None:
        """A free ring region of ``n`` bytes (regions are released in order), or None if none now."""
        cap = self.ring_bytes
        if not self._regions:
            return (0, n)
        first, last = self._regions[0][0], self._regions[-1][1]
        wrapped = self._regions[-1][0] < first
        if not wrapped:
            if cap - last >= n:
                return (last, last + n)
            if first >= n:
                return (0, n)
            return None
        return (last, last + n) if first - last >= n else None

    def _free(self, region: tuple[int, int]) -> None:
        with self._cond:
            try:
                self._regions.remove(region)
            except ValueError:
                return
            self._in_flight -= region[1] - region[0]
            self._cond.notify_all()

    # -- reader thread ---------------------------------------------------------------------------
    def _fd(self, entry: TensorEntry) -> int:
        key = str(entry.file)
        fd = self._files.get(key)
        if fd is None:
            fd = self._files[key] = os.open(key, os.O_RDONLY)
        return fd

    def _run(self) -> None:
        try:
            for entry in self.entries:
                ring = self._ring is not None and self._to_ring(entry) and _align(entry.nbytes) <= self.ring_bytes
                need = _align(entry.nbytes)
                region = None
                with self._cond:
                    while not self._stop:
                        if ring:
                            region = self._alloc(need) if self._in_flight + need <= self.window or not self._regions else None
                            if region is not None:
                                self._regions.append(region)
                                break
                        elif self._in_flight + need <= self.window or self._in_flight == 0:
                            break
                        self._cond.wait()
                    if self._stop:
                        return
                    self._in_flight += need
                if ring:
                    assert region is not None and self._ring is not None
                    raw = self._ring.tensor[region[0] : region[0] + entry.nbytes]
                else:
                    raw = torch.empty(entry.nbytes, dtype=torch.uint8)
                self._read_into(entry, raw)
                tensor = raw.view(entry.dtype).view(entry.shape) if entry.nbytes else torch.empty(
                    entry.shape, dtype=entry.dtype
                )
                item = ReadTensor(entry, tensor, self if ring else None, region if ring else None)
                with self._cond:
                    self._ready.append(item)
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _read_into(self, entry: TensorEntry, raw: torch.Tensor) -> None:
        if entry.nbytes == 0:
            return
        fd = self._fd(entry)
        view = memoryview(raw.numpy())
        pos = 0
        while pos < entry.nbytes:
            if self._stop:
                raise ReadCancelled("the tensor reader was closed")
            n = os.preadv(fd, [view[pos : pos + CHUNK]], entry.start + pos)
            if n <= 0:
                raise OSError(f"{entry.file}: unexpected end of file reading {entry.name}")
            pos += n
            with self._cond:
                self.bytes_read += n

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

Tensors that lie back to back in a file are read together: one ``preadv`` scatters a run of
them (up to ``COALESCE`` bytes, ``MAX_IOV`` tensors) into their own destinations. A
pre-quantized NF4 Linear is six tensors, five of them a few bytes to a few hundred KB; read one
by one after the page cache is dropped, each would be its own small disk request.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.units import aligned
from .layout import TensorEntry

CHUNK = 64 << 20  # bytes per preadv call
COALESCE = 64 << 20  # a run of back-to-back tensors read by one preadv is at most this long ...
# The kernel is asked (posix_fadvise WILLNEED) to start reading this far past the current read, so
# the disk has requests queued while one preadv copies out: a single synchronous reader otherwise
# leaves the device idle between calls (measured on the H200 VM's disk: our reader 1.8 GB/s vs a
# plain 64 MiB sequential read 2.26 GB/s on an NF4 copy). Page cache only: it counts in no RSS.
READ_AHEAD = 256 << 20
MAX_IOV = 512  # ... and at most this many tensors (Linux allows 1024 buffers per call)


@dataclass(eq=False)
class ReadTensor:
    """A tensor the reader delivered; ``release()`` it once its data has been copied out."""

    entry: TensorEntry
    _data: torch.Tensor  # uint8: the tensor's own bytes, or the whole ring (from _offset)
    _reader: TensorReader | None = None
    _region: tuple[int, int] | None = None
    _offset: int | None = None
    _tensor: torch.Tensor | None = None

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor: a typed view of the bytes read, made on the consumer's first use (the
        reader thread only reads: what it does between two preadv calls holds the GIL while the
        disk may wait; a pre-quantized NF4 model has six tensors per Linear)."""
        t = self._tensor
        if t is None:
            e = self.entry
            raw = self._data if self._offset is None else self._data[self._offset : self._offset + e.nbytes]
            t = self._tensor = raw.view(e.dtype).view(e.shape) if e.nbytes else torch.empty(e.shape, dtype=e.dtype)
        return t

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
    ``ring`` is a ring made ahead: a ``HostBuffer``, or a ``RingAhead`` still being made, which
    the reader thread takes before its first read (the caller does not wait for the pinning).
    """

    def __init__(
        self,
        entries: Sequence[TensorEntry],
        *,
        to_ring: Callable[[TensorEntry], bool] = lambda e: False,
        ring_bytes: int = 0,
        pin: bool = True,
        window: int = 1 << 30,
        ring: Any = None,
    ) -> None:
        self.entries = list(entries)
        self._to_ring = to_ring
        self.window = max(int(window), 1)
        self.ring_ahead = ring if isinstance(ring, RingAhead) else None  # taken by the reader thread
        if self.ring_ahead is None and ring is None and ring_bytes > 0:
            from ...memory.residency.packed import HostBuffer

            ring = HostBuffer(aligned(ring_bytes), pin=pin)
        self._ring = self._ring_bytes_view = None
        self.ring_bytes = 0
        if self.ring_ahead is not None:
            self.ring_bytes = self.ring_ahead.nbytes
        else:
            self._set_ring(ring)
        self._cond = threading.Condition()
        self._ready: collections.deque[ReadTensor] = collections.deque()
        self._regions: collections.deque[tuple[int, int]] = collections.deque()
        self._in_flight = 0  # bytes read (or being read) and not released
        self._error: BaseException | None = None
        self._stop = False
        self._done = False
        self.bytes_read = 0
        self.reads = 0  # preadv calls
        self.wait_seconds = 0.0  # consumer time spent waiting in next()
        self.first_read: float | None = None  # perf_counter of the first and after the last read
        self.last_read: float | None = None
        self._files: dict[str, int] = {}
        self._advised: dict[int, tuple[int, int]] = {}  # fd -> the byte window the kernel was asked to read ahead
        self._thread = threading.Thread(target=self._run, name="hunyuan-tensor-reader", daemon=True)
        self._thread.start()

    def _set_ring(self, ring: Any) -> None:
        self._ring = ring
        self.ring_bytes = 0 if ring is None else ring.tensor.numel()
        # the ring as bytes: a destination is a slice of it (no tensor object per read on the reader thread)
        self._ring_bytes_view = None if ring is None else memoryview(ring.tensor.numpy())

    # -- consumer side -------------------------------------------------------------------------
    def __iter__(self):
        for _ in range(len(self.entries)):
            yield self.next()

    def next(self) -> ReadTensor:
        """The next tensor in order (waits for the reader)."""
        with self._cond:
            if not self._ready:
                t0 = time.perf_counter()
                while not self._ready:
                    if self._error is not None:
                        raise self._error
                    if self._stop:
                        raise ReadCancelled("the tensor reader was closed")
                    self._cond.wait()
                self.wait_seconds += time.perf_counter() - t0
            item = self._ready.popleft()
            if item._region is None:  # a kept tensor: the consumer owns it from here
                self._in_flight -= aligned(item.entry.nbytes)
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
        self._ring_bytes_view = None
        ring, self._ring = self._ring, None
        if ring is not None:
            release_later(ring)
        if self.ring_ahead is not None:  # not taken when the thread stopped first: freed here
            self.ring_ahead.close()

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

    @property
    def read_seconds(self) -> float:
        """Seconds from the reader's first byte to its last."""
        if self.first_read is None or self.last_read is None:
            return 0.0
        return self.last_read - self.first_read

    def _place(self, entry: TensorEntry, wait: bool) -> tuple[bool, tuple[int, int] | None] | None:
        """Reserve room for ``entry`` (a ring region or window bytes): (to ring, region). Waits for
        room if ``wait``, else returns None when there is none now. Called with the lock held."""
        ring = self._ring is not None and self._to_ring(entry) and aligned(entry.nbytes) <= self.ring_bytes
        need = aligned(entry.nbytes)
        while not self._stop:
            if ring:
                region = self._alloc(need) if self._in_flight + need <= self.window or not self._regions else None
                if region is not None:
                    self._regions.append(region)
                    self._in_flight += need
                    return True, region
            elif self._in_flight + need <= self.window or self._in_flight == 0:
                self._in_flight += need
                return False, None
            if not wait:
                return None
            self._cond.wait()
        return None

    def _destination(self, entry: TensorEntry, ring: bool, region: tuple[int, int] | None) -> ReadTensor:
        """The delivered item, before its bytes are read: into a ring region, or its own storage."""
        if ring:
            assert region is not None and self._ring is not None
            return ReadTensor(entry, self._ring.tensor, self, region, region[0])
        return ReadTensor(entry, torch.empty(entry.nbytes, dtype=torch.uint8))

    def _bytes_of(self, item: ReadTensor) -> memoryview:
        """Where preadv puts ``item``'s bytes."""
        if item._offset is None:
            return memoryview(item._data.numpy())
        assert self._ring_bytes_view is not None
        return self._ring_bytes_view[item._offset : item._offset + item.entry.nbytes]

    def _run(self) -> None:
        try:
            if self.ring_ahead is not None:  # made on its own thread; waited for here, not by the caller
                ring = self.ring_ahead.take()
                with self._cond:
                    self._set_ring(ring)
            i, n = 0, len(self.entries)
            while i < n:
                # a run: the next tensor (waiting for room), then the ones right after it in the same
                # file for which there is room now, up to COALESCE bytes / MAX_IOV tensors
                run: list[tuple[TensorEntry, bool, tuple[int, int] | None]] = []
                with self._cond:
                    first = self._place(self.entries[i], wait=True)
                    if first is None:
                        return
                    run.append((self.entries[i], *first))
                    size = self.entries[i].nbytes
                    while i + len(run) < n and len(run) < MAX_IOV:
                        prev, nxt = run[-1][0], self.entries[i + len(run)]
                        if (nxt.file != prev.file or nxt.start != prev.start + prev.nbytes
                                or size + nxt.nbytes > COALESCE):
                            break
                        got = self._place(nxt, wait=False)
                        if got is None:
                            break
                        run.append((nxt, *got))
                        size += nxt.nbytes
                i += len(run)
                items = [self._destination(e, ring, region) for e, ring, region in run]
                self._read_run([e for e, _, _ in run], items)
                with self._cond:
                    self._ready.extend(items)
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _advise(self, fd: int, end: int) -> None:
        """Keep the kernel reading ahead up to READ_AHEAD bytes past ``end`` (this read's end) in ``fd``;
        a jump elsewhere in the file starts a new window."""
        lo, hi = self._advised.get(fd, (0, 0))
        if lo <= end and hi >= end + READ_AHEAD // 2:
            return
        start = hi if lo <= end <= hi else end
        try:
            os.posix_fadvise(fd, start, end + READ_AHEAD - start, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):  # no fadvise here: reading works the same, only without the hint
            self._advised[fd] = (0, 1 << 62)
            return
        self._advised[fd] = (lo if lo <= end <= hi else end, end + READ_AHEAD)

    def _read_run(self, entries: list[TensorEntry], items: list[ReadTensor]) -> None:
        """Read tensors that lie back to back in one file into their destinations: one preadv
        scattering into all of them (a long single tensor: several, CHUNK bytes each)."""
        total = sum(e.nbytes for e in entries)
        if total == 0:
            return
        fd = self._fd(entries[0])
        self._advise(fd, entries[0].start + total)
        views = [self._bytes_of(item) for item, e in zip(items, entries) if e.nbytes]
        if self.first_read is None:
            self.first_read = time.perf_counter()
        pos, k, off = 0, 0, 0  # bytes done; first unfinished view and the bytes of it done
        while pos < total:
            if self._stop:
                raise ReadCancelled("the tensor reader was closed")
            bufs, room = [], CHUNK
            j, o = k, off
            while j < len(views) and room > 0:
                part = views[j][o : o + room]
                bufs.append(part)
                room -= len(part)
                j, o = j + 1, 0
            got = n = os.preadv(fd, bufs, entries[0].start + pos)
            if got <= 0:
                raise OSError(f"{entries[0].file}: unexpected end of file reading {entries[0].name}")
            pos += got
            self.reads += 1
            while got > 0:  # advance (k, off) by the bytes read
                step = min(got, len(views[k]) - off)
                got -= step
                off += step
                if off == len(views[k]):
                    k, off = k + 1, 0
            with self._cond:
                self.bytes_read += n
            self.last_read = time.perf_counter()


def release_later(buffer: Any) -> None:
    """Free a (page-locked) host buffer on a helper thread: unregistering and unmapping a 1 GiB
    ring takes a tenth of a second that the load need not wait for."""
    holder = [buffer]
    del buffer
    threading.Thread(target=holder.clear, name="hunyuan-ring-release", daemon=True).start()


class RingAhead:
    """The reader's ring allocated (page faulted and pinned) on a helper thread while the model
    skeleton is built and the plan made; ``take()`` waits for it. Nothing is read here."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.nbytes = aligned(nbytes)
        self.seconds = 0.0
        self._buffer: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._make, args=(pin,), name="hunyuan-ring-ahead", daemon=True)
        self._thread.start()

    def _make(self, pin: bool) -> None:
        from ...memory.residency.packed import HostBuffer

        t0 = time.perf_counter()
        try:
            self._buffer = HostBuffer(self.nbytes, pin=pin)
        except BaseException as exc:  # noqa: BLE001 - re-raised by take()
            self._error = exc
        self.seconds = time.perf_counter() - t0

    def wait(self) -> int:
        """Wait until the buffer is made; its bytes (0 if making it failed or it was taken)."""
        self._thread.join()
        return self.nbytes if self._buffer is not None else 0

    def take(self) -> Any:
        """The buffer (raises what allocating it raised); the caller owns it from here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        buffer, self._buffer = self._buffer, None
        return buffer

    def close(self) -> None:
        """Free the buffer if nobody took it (idempotent)."""
        self._thread.join()
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            release_later(buffer)

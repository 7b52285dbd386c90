"""Flat host buffers: one page-locked buffer per block, typed views for each tensor.

A streamed (or parked) block keeps exactly one CPU copy of its weights: a flat byte
buffer holding every tensor at a 256-byte aligned offset. The module's references
point at typed views of that buffer, so the original (GPU or mmap'd) tensors are
dropped. A block is copied to the GPU with ONE memcpy into a slot of the same layout.

Pinning: we allocate ordinary memory of the exact size and page-lock it in place with
cudaHostRegister (~17 GB/s on the H200 host) instead of ``pin_memory()`` (~1.4 GB/s
for fresh pages, and the caching host allocator rounds sizes up).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...hunyuan_loader.core.units import aligned
from .weights import WeightTensor, weight_tensors

log = logging.getLogger(__name__)


def _unregister(ptr: int, holder: list) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - interpreter shutdown, nothing to do
        pass
    holder.clear()


class HostBuffer:
    """A flat uint8 CPU buffer of exactly ``nbytes``, page-locked when CUDA is available."""

    def __init__(self, nbytes: int, *, pin: bool = True) -> None:
        self.tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        self.pinned = False
        if pin and torch.cuda.is_available():
            self.pinned = self._register()
            if not self.pinned:  # fall back to torch's pinned allocator
                self.tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
                self.pinned = True

    def unpin(self) -> None:
        """Page-unlock in place; the data stays valid as ordinary memory."""
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
        self.pinned = False

    def _register(self) -> bool:
        # Fault the fresh pages in with all cores first (fill_ is parallel); registering
        # pages that already exist is several times faster than letting the driver do it.
        self.tensor.zero_()
        ptr = self.tensor.data_ptr()
        try:
            err = torch.cuda.cudart().cudaHostRegister(ptr, self.tensor.numel(), 0)
        except Exception as exc:  # noqa: BLE001 - binding missing in this build
            log.debug("cudaHostRegister unavailable: %s", exc)
            return False
        if int(getattr(err, "value", err)) != 0:
            log.debug("cudaHostRegister failed (%s)", err)
            return False
        # Unregister when this buffer object goes; the finalizer holds the memory till then.
        self._finalizer = weakref.finalize(self, _unregister, ptr, [self.tensor])
        return True


@dataclass(frozen=True)
class Layout:
    """Byte offset of each tensor in a block's flat buffer."""

    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]
    total: int

    @classmethod
    def of(cls, tensors: Sequence[WeightTensor]) -> Layout:
        offsets, sizes, pos = [], [], 0
        for w in tensors:
            offsets.append(pos)
            sizes.append(w.nbytes)
            pos += aligned(w.nbytes)
        return cls(tuple(offsets), tuple(sizes), pos)


def typed_view(buf: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """View ``buf[offset:]`` as a tensor with ``like``'s dtype, shape and strides."""
    n = like.numel() * like.element_size()
    flat = buf[offset : offset + n]
    if like.numel() == 0:
        return torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=buf.device)
    return flat.view(like.dtype).as_strided(like.shape, like.stride())


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


class PackedBlock:
    """One block's weights packed into a single flat CPU buffer (the master copy)."""

    def __init__(self, tensors: Sequence[WeightTensor], *, pin: bool = True, host: HostBuffer | None = None) -> None:
        """``host``: a buffer allocated ahead (a loader prepares the next streamed block's while
        reading); used if it is large enough and pinned as asked, else a new one is made."""
        self.tensors = list(tensors)
        for w in self.tensors:  # views need dense strides
            if not w.tensor.is_contiguous():
                w.assign(_dense(w.tensor))
        self.layout = Layout.of(self.tensors)
        fits = host is not None and host.tensor.numel() >= self.layout.total
        if fits and host.pinned == (pin and torch.cuda.is_available()):
            self.host = host
        else:
            self.host = HostBuffer(self.layout.total, pin=pin)
        self.host_views: list[torch.Tensor] = []
        buf = self.host.tensor
        from_gpu = False
        for w, off in zip(self.tensors, self.layout.offsets):
            view = typed_view(buf, off, w.tensor)
            on_gpu = w.tensor.device.type == "cuda"
            from_gpu |= on_gpu
            view.copy_(w.tensor, non_blocking=on_gpu and self.host.pinned)  # mmap pages are read once
            self.host_views.append(view)
        if from_gpu:
            torch.cuda.synchronize()  # the copies must land before the GPU originals are dropped
        for w, view in zip(self.tensors, self.host_views):
            w.assign(view)  # drops the original (GPU / mmap) tensor

    def shared_with(self, block: torch.nn.Module) -> PackedBlock:
        """A PackedBlock for ``block``, a copy of the packed block whose tensors already point into
        this one's host buffer (a CFG-parallel replica's): the same buffer, no second copy."""
        tensors = weight_tensors(block)
        if len(tensors) != len(self.tensors) or any(
            a.tensor.data_ptr() != b.data_ptr() for a, b in zip(tensors, self.host_views)
        ):
            raise ValueError("a streamed block's replica does not match its packed layout")
        shared = PackedBlock.__new__(PackedBlock)
        shared.tensors = tensors
        shared.layout = self.layout
        shared.host = self.host
        shared.host_views = list(self.host_views)
        return shared

    @property
    def nbytes(self) -> int:
        return self.layout.total

    @property
    def pinned(self) -> bool:
        return self.host.pinned

    def views_into(self, slot: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of this block's tensors inside a device slot buffer."""
        return [typed_view(slot, off, w.tensor) for w, off in zip(self.tensors, self.layout.offsets)]

    def point_at(self, views: Sequence[torch.Tensor]) -> None:
        for w, v in zip(self.tensors, views):
            w.assign(v)

    def point_at_host(self) -> None:
        self.point_at(self.host_views)

    def unpack_to(self, device: torch.device | str, *, non_blocking: bool = False) -> HostBuffer:
        """Bring the block to ``device`` and drop the host buffer.

        On a GPU the block lands in ONE allocation with one memcpy (the tensors are typed
        views into it, same layout as a streaming slot); the allocation is freed when
        the block is packed again. On the CPU every tensor gets its own storage.
        Returns the detached host buffer: dropping it unpins and frees it.
        """
        device = torch.device(device)
        if device.type == "cpu":
            for w, view in zip(self.tensors, self.host_views):
                w.assign(view.clone())
        else:
            flat = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
            flat.copy_(self.host.tensor[: self.nbytes], non_blocking=non_blocking and self.pinned)
            self.point_at(self.views_into(flat))
            if non_blocking:
                torch.cuda.current_stream(device).synchronize()  # the copy reads the buffer we free next
        return self.release()

    def release(self) -> HostBuffer:
        """Detach the host buffer and return it (it unpins and frees when dropped)."""
        host, self.host = self.host, None  # type: ignore[assignment]
        self.host_views = []
        return host

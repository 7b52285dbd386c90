"""W8A16 experts as "dequantize, then a bf16 GEMM on the vendor kernels" (issue 14).

The fused Triton kernel (``w8a16_grouped``) converts the int8 operand in registers and
re-stages it in shared memory for wgmma, ~25-30% slower than cuBLAS on the MoE shapes. This
engine instead writes the bf16 weights of a chunk of experts into a stacked scratch
``[E_chunk, N, K]`` (one bandwidth-bound launch: 1 byte read, 2 written per weight) and runs
the GEMM on cuBLAS/CUTLASS: ``torch._grouped_mm`` (one launch per chunk) or one ``F.linear``
per expert.

Definition: the scale is folded into the dequantization, ``w = bf16(fp32(q) * fp32(s))`` per
output channel, exactly ``w8a16.dequantize_weight(q, s, bf16)``; the GEMM then computes
``x @ w.T`` with an fp32 accumulator. ``dequantize_into`` is bit-exact to that definition on
both of its paths (the Triton kernel and the torch fallback; the kernel rounds fp32 -> bf16 to
nearest-even on the bits itself, so Triton's CPU interpreter, whose bf16 cast truncates, gives
the GPU's bits too).

The experts stay separate parameters (streaming, parking, soft unload move them one by one):
the Triton kernel addresses them as ``w8a16_grouped`` does, from the lowest-addressed
weight/scale as base pointers plus a per-expert offset table in 16-byte units, rebuilt every
call.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any

import numpy as np
import torch

from . import w8a16

log = logging.getLogger(__name__)

ALIGN = w8a16.ALIGN  # bytes: weight and scale offsets are sent in these units
BLOCK = 4096  # elements per program of the dequantization kernel
ROW_ALIGN = 16  # rows per expert are padded to a multiple of this for torch._grouped_mm

_triton: Any = None  # the Triton kernel (a function), False once unavailable
_grouped_mm_ok: dict[tuple[str, int | None], bool] = {}


def _kernel() -> Any:
    global _triton
    if _triton is None:
        try:
            import triton
            import triton.language as tl

            @triton.jit
            def _dequant_kernel(w_ptr, s_ptr, out_ptr, table_ptr, n_experts, NK, K,
                                BLOCK: tl.constexpr, W_UNIT: tl.constexpr, S_UNIT: tl.constexpr,
                                BF16_BITS: tl.constexpr):
                e = tl.program_id(0)
                offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
                mask = offs < NK
                w_off = tl.load(table_ptr + e) * W_UNIT
                s_off = tl.load(table_ptr + n_experts + e) * S_UNIT
                q = tl.load(w_ptr + w_off + offs, mask=mask, other=0)
                s = tl.load(s_ptr + s_off + offs // K, mask=mask, other=0.0)
                w = q.to(tl.float32) * s.to(tl.float32)
                dst = out_ptr + e.to(tl.int64) * NK + offs
                if BF16_BITS:  # out is bf16 seen as int16: round to nearest even on the bits
                    bits = w.to(tl.uint32, bitcast=True)
                    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                    tl.store(dst, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
                else:
                    tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=mask)

            _triton = (triton, _dequant_kernel)
        except Exception as exc:  # noqa: BLE001 - no Triton: the torch fallback
            log.info("W8A16 dequantization: Triton unavailable (%s); torch fallback", exc)
            _triton = False
    return _triton


def _triton_ok(weights: list[torch.Tensor], scales: list[torch.Tensor]) -> bool:
    n, k = weights[0].shape
    return (all(w.data_ptr() % ALIGN == 0 and s.data_ptr() % ALIGN == 0 and w.is_contiguous()
                and s.is_contiguous() and s.dtype == scales[0].dtype for w, s in zip(weights, scales))
            and n * k < 2**31 - BLOCK)


def offset_table(weights: list[torch.Tensor], scales: list[torch.Tensor]) -> list[int]:
    """The Triton kernel's per-expert offsets: each weight's, then each scale's, from the lowest
    address of its kind, in ALIGN units."""
    return w8a16.offset_units(weights) + w8a16.offset_units(scales)


def use_kernel(weights: list[torch.Tensor], scales: list[torch.Tensor], out_is_cuda: bool) -> bool:
    """Whether ``dequantize_into`` takes the Triton kernel for these experts on its own choice."""
    return out_is_cuda and bool(_kernel()) and _triton_ok(weights, scales)


# Offset tables on the GPU, by what defines them (device, shapes, scale dtype, every address): the same
# experts at the same addresses (every step, every layer of a resident model, the streamed slots) reuse
# theirs instead of a pinned tensor and a copy each time; on the H200 host building them took 1.4 ms per
# MoE call, before the first kernel. The content is a function of the key, so an entry is never stale;
# entries are never freed while cached (no allocator reuse under a queued kernel). At TABLES_MAX entries
# (~0.5 KB of GPU memory each; new addresses after each reload, other expert subsets at small sizes) the
# cache is emptied after a device synchronize and fills again. ``clear_tables`` empties it (unload).
TABLES_MAX = 4096
_tables: dict[tuple, torch.Tensor | None] = {}


def kernel_table(weights: list[torch.Tensor], scales: list[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The Triton kernel's ``offset_table`` of these experts on ``device`` (cached), or None when the
    kernel does not take them (no CUDA / Triton, misaligned or non-contiguous tensors: the torch path)."""
    if device.type != "cuda":
        return None
    key = (device.index, weights[0].shape, scales[0].dtype, *(w.data_ptr() for w in weights),
           *(x.data_ptr() for x in scales))
    if key in _tables and all(w.is_contiguous() for w in weights) and all(x.is_contiguous() for x in scales):
        return _tables[key]
    table = None
    if use_kernel(weights, scales, True):
        table = torch.tensor(offset_table(weights, scales), dtype=torch.int64,
                             pin_memory=True).to(device, non_blocking=True)
    if len(_tables) >= TABLES_MAX:
        clear_tables()  # synchronizes first: no queued kernel still reads a table it frees
    _tables[key] = table
    return table


def clear_tables() -> None:
    """Forget the cached offset tables (after the GPU has finished with them)."""
    if _tables and torch.cuda.is_available():
        torch.cuda.synchronize()
    _tables.clear()


@torch.no_grad()
def dequantize_into(weights: list[torch.Tensor], scales: list[torch.Tensor], out: torch.Tensor,
                    *, use_triton: bool | None = None, table: torch.Tensor | None = None) -> torch.Tensor:
    """Write ``dequantize_weight(weights[i], scales[i], out.dtype)`` into ``out[i]`` for every
    expert (``out`` is ``[E, N, K]``, contiguous): one Triton launch for all of them (CUDA, or the
    interpreter), else one torch expression per expert. ``use_triton`` forces a path (tests);
    ``table`` is ``offset_table(weights, scales)`` already on ``out``'s device (``DequantPipeline``
    sends all its stages' tables in one copy)."""
    e = len(weights)
    if out.shape[0] < e or not out.is_contiguous():
        raise ValueError(f"scratch {tuple(out.shape)} cannot hold {e} experts (or is not contiguous)")
    if e == 0:
        return out
    n, k = weights[0].shape
    if use_triton is None:
        use_triton = use_kernel(weights, scales, out.is_cuda)
    if not use_triton:
        for i, (q, s) in enumerate(zip(weights, scales)):
            out[i].copy_(w8a16.dequantize_weight(q, s, out.dtype))
        return out
    triton, kern = _kernel()
    w_base = min(weights, key=torch.Tensor.data_ptr)
    s_base = min(scales, key=torch.Tensor.data_ptr)
    if table is None:
        table = torch.tensor(offset_table(weights, scales), dtype=torch.int64,
                             pin_memory=out.is_cuda).to(out.device, non_blocking=True)
    grid = (e, triton.cdiv(n * k, BLOCK))
    bf16 = out.dtype == torch.bfloat16
    kern[grid](w_base, s_base, out.view(torch.int16) if bf16 else out, table, e, n * k, k,
               BLOCK=BLOCK, W_UNIT=ALIGN, S_UNIT=ALIGN // s_base.element_size(), BF16_BITS=bf16, num_warps=8)
    return out


def experts_per_chunk(shapes: list[tuple[int, int]], scratch_bytes: int, itemsize: int = 2) -> int:
    """How many experts' dequantized weights fit ``scratch_bytes`` when every one of ``shapes`` (the
    Linears of an expert, run in turn) has its own buffer at once (``DequantPipeline`` holds the
    gate_up and the down buffer together, so the next one is written while the GEMMs read the
    other); at least 1."""
    per = sum(n * k for n, k in shapes) * itemsize
    return max(1, scratch_bytes // max(1, per))


def padded_rows(counts: list[int], align: int = ROW_ALIGN) -> list[int]:
    return [-(-c // align) * align for c in counts]


def gather_index(counts: list[int], align: int = ROW_ALIGN) -> tuple[torch.Tensor, list[int]]:
    """(positions into the rows grouped by expert, as an int64 CPU tensor; per-expert first output row)
    for rows padded to ``align`` per expert; a padding row repeats the expert's last row (computed,
    never read). Vectorised (numpy): a Python list of every row took ~0.5 ms per chunk of 7 experts
    at 1,056 rows each on the H200 host, enough to leave the GPU waiting."""
    c = np.asarray(counts, dtype=np.int64)
    p = np.asarray(padded_rows(counts, align), dtype=np.int64)
    out_starts = np.concatenate(([0], np.cumsum(p)[:-1]))
    src_starts = np.concatenate(([0], np.cumsum(c)[:-1]))
    j = np.arange(int(p.sum()), dtype=np.int64) - np.repeat(out_starts, p)  # row within its expert's block
    pos = np.repeat(src_starts, p) + np.minimum(j, np.repeat(c - 1, p))
    return torch.from_numpy(pos), [int(v) for v in out_starts]


def grouped_mm_available(x: torch.Tensor) -> bool:
    """``torch._grouped_mm`` exists and runs a tiny bf16 problem on this device (probed once)."""
    key = (x.device.type, x.device.index)
    if key not in _grouped_mm_ok:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                a = torch.ones(32, 32, dtype=x.dtype, device=x.device)
                b = torch.ones(2, 32, 32, dtype=x.dtype, device=x.device)
                offs = torch.tensor([16, 32], dtype=torch.int32, device=x.device)
                y = torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)
                ok = bool((y == 32).all())
            except Exception as exc:  # noqa: BLE001 - not built for this device/dtype
                log.info("torch._grouped_mm unavailable on %s (%s: %s)", x.device, type(exc).__name__, exc)
                ok = False
        _grouped_mm_ok[key] = ok
    return _grouped_mm_ok[key]


def gemm_rows(xs: torch.Tensor, w: torch.Tensor, counts: list[int], *, gemm: str,
              starts: list[int]) -> torch.Tensor:
    """``y[rows of e] = xs[rows of e] @ w[e].T`` for ``w`` ``[E, N, K]`` (dequantized weights of the
    experts with rows). ``xs`` rows: expert ``e``'s start at ``starts[e]``; for ``gemm="grouped_mm"``
    each expert's block is ``padded_rows`` long. "linear": one ``torch.mm`` per expert straight into
    its rows of one preallocated output (no per-expert allocation, copy or host sync)."""
    n = w.shape[1]
    if gemm == "grouped_mm":
        ends = [s + p for s, p in zip(starts, padded_rows(counts))]
        offs = torch.tensor(ends, dtype=torch.int32, pin_memory=xs.is_cuda).to(xs.device, non_blocking=True)
        return torch._grouped_mm(xs, w.transpose(-2, -1), offs=offs)
    if gemm != "linear":
        raise ValueError(f"gemm must be 'grouped_mm' or 'linear', got {gemm!r}")
    y = torch.empty(xs.shape[0], n, dtype=xs.dtype, device=xs.device)
    # the views made in bulk (one split / unbind call each, not four view ops per expert): at 64
    # experts the launches, not the GPU, set the pace of this loop on the H200
    if sum(counts) == xs.shape[0] and starts == list(itertools.accumulate(counts[:-1], initial=0)):
        xv, yv = xs.split(counts), y.split(counts)
    else:
        xv = [xs[s:s + c] for s, c in zip(starts, counts)]
        yv = [y[s:s + c] for s, c in zip(starts, counts)]
    for a, wt, o, c in zip(xv, w.transpose(1, 2).unbind(0), yv, counts):
        if c:
            torch.mm(a, wt, out=o)
    return y


def dequant_linear(xs: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor],
                   counts: list[int], scratch: torch.Tensor, *, gemm: str, starts: list[int]) -> torch.Tensor:
    """``dequantize_into`` a flat ``scratch`` (at least ``E * N * K`` elements of ``xs.dtype``), then
    ``gemm_rows``: one Linear of a chunk, sequentially on the current stream."""
    n, k = weights[0].shape
    e = len(weights)
    w = scratch[: e * n * k].view(e, n, k)
    dequantize_into(weights, scales, w)
    return gemm_rows(xs, w, counts, gemm=gemm, starts=starts)


# -- overlapping the dequantization with the GEMMs -----------------------------------------------
# 1: dequantize on a side CUDA stream ahead of the GEMMs | 0 (default). Off by default: on the H200 the
# dequantization running beside cuBLAS slowed it more than it hid (64 experts at 8,448 tokens: 11.5 ms
# sequential, 13.4 ms overlapped, bench/int8.py), both kernels wanting the same memory bandwidth and SMs.
OVERLAP_ENV = "HY3_MOE_OVERLAP"
_side: dict[int, Any] = {}  # one side stream per CUDA device, created once


def overlap_enabled(device: torch.device) -> bool:
    """Double-buffered dequantization on a side stream: CUDA and ``HY3_MOE_OVERLAP=1`` (off by default)."""
    flag = os.environ.get(OVERLAP_ENV, "0").strip().lower()
    return device.type == "cuda" and flag in ("1", "on", "true", "yes")


def side_stream(device: torch.device) -> Any:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _side:
        _side[idx] = torch.cuda.Stream(device=idx)
    return _side[idx]


class DequantPipeline:
    """The dequantized weights of a sequence of stages (one Linear of one chunk of experts each,
    in the order their GEMMs run: chunk 0 gate_up, chunk 0 down, chunk 1 gate_up, ...), stage
    ``j`` written into buffer ``j % 2`` (``buffer_of``). Use: ``w = acquire(j)``; the GEMMs that
    read ``w`` on the current stream; ``release(j)``; at the end ``close()``.

    With ``overlap`` (CUDA): ``acquire(j)`` also issues stage ``j + 1``'s dequantization on the
    device's side stream, into the other buffer, so it runs while stage ``j``'s GEMMs do. Events
    order it: the side stream waits, before overwriting a buffer, for the event recorded by
    ``release`` after the GEMMs that last read it (stage ``j - 1``; when that was never released,
    for everything queued on the main stream); the main stream waits for the stage's dequant event
    before reading. The buffers are owned by the pipeline for the whole call and marked with
    ``record_stream``; ``close`` makes the main stream wait for the side stream, so nothing the side
    stream reads or writes (weights, scales, buffers) can be freed and handed out under it. Same
    kernels, same inputs, same GEMMs on the same stream: bit-identical to the sequential order.
    Without ``overlap`` (CPU, ``HY3_MOE_OVERLAP=0``) each stage is dequantized in ``acquire`` on the
    current stream; ``prefetch`` keeps the overlapped issue order there too (CPU tests).

    Memory: buffer ``p`` holds the largest stage of parity ``p`` (the dispatch alternates gate_up /
    down, so one gate_up buffer and one down buffer: ``E * (6144 + 3072) * 4096 * 2`` bytes for a
    chunk of ``E`` experts on the real config, within ``moe_grouped.SCRATCH_BYTES``).
    ``trace`` records ("dequant", j, buffer) / ("gemm", j) in issue order."""

    def __init__(self, stages: list[tuple[list[torch.Tensor], list[torch.Tensor]]], dtype: torch.dtype,
                 device: torch.device, *, overlap: bool | None = None, prefetch: bool | None = None) -> None:
        self.stages = stages
        self.shapes = [(len(ws), *ws[0].shape) for ws, _ in stages]
        sizes = [0, 0]
        for j, (e, n, k) in enumerate(self.shapes):
            sizes[j % 2] = max(sizes[j % 2], e * n * k)
        self.overlap = overlap_enabled(device) if overlap is None else overlap and device.type == "cuda"
        self.prefetch = self.overlap if prefetch is None else prefetch
        self.buffers = [torch.empty(n, dtype=dtype, device=device) for n in sizes]
        self.device = device
        self.trace: list[tuple] = []
        self._issued: dict[int, Any] = {}  # j -> dequant event (None without overlap) or the exception
        self._released: dict[int, Any] = {}
        self._main = self._side = None
        if self.overlap:
            self._main = torch.cuda.current_stream(device)
            self._side = side_stream(device)
            self._side.wait_stream(self._main)  # weights just made resident on the main stream
            for b in self.buffers:
                b.record_stream(self._side)

    @staticmethod
    def buffer_of(j: int) -> int:
        return j % 2

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def _view(self, j: int) -> torch.Tensor:
        e, n, k = self.shapes[j]
        return self.buffers[self.buffer_of(j)][: e * n * k].view(e, n, k)

    def _issue(self, j: int) -> None:
        ws, ss = self.stages[j]
        self.trace.append(("dequant", j, self.buffer_of(j)))
        if not self.overlap:
            self._issued[j] = None
            table = kernel_table(ws, ss, self.device)  # per stage, not all up front: the first kernel goes early
            dequantize_into(ws, ss, self._view(j), use_triton=table is not None, table=table)
            return
        try:
            with torch.cuda.stream(self._side):
                if j >= 2:  # the last reader of this buffer: stage j - 2's GEMMs
                    done = self._released.get(j - 2)
                    if done is not None:
                        self._side.wait_event(done)
                    else:
                        self._side.wait_stream(self._main)
                table = kernel_table(ws, ss, self.device)  # a new one is copied on this stream, before its kernel
                dequantize_into(ws, ss, self._view(j), use_triton=table is not None, table=table)
                ev = torch.cuda.Event()
                ev.record(self._side)
            self._issued[j] = ev
        except Exception as exc:  # noqa: BLE001 - raised by acquire(j), for the chunk it belongs to
            self._issued[j] = exc

    def acquire(self, j: int) -> torch.Tensor:
        """Stage ``j``'s dequantized weights ``[E, N, K]``, readable on the current stream."""
        if j not in self._issued:
            self._issue(j)
        if self.prefetch and j + 1 < len(self.stages) and j + 1 not in self._issued:
            self._issue(j + 1)
        got = self._issued[j]
        if isinstance(got, Exception):
            raise got
        if got is not None:
            self._main.wait_event(got)
        self.trace.append(("gemm", j))
        return self._view(j)

    def release(self, j: int) -> None:
        """The GEMMs reading stage ``j``'s buffer are queued: it may be overwritten after them."""
        if self.overlap:
            ev = torch.cuda.Event()
            ev.record(self._main)
            self._released[j] = ev

    def close(self) -> None:
        if self.overlap:
            self._main.wait_stream(self._side)

"""W8A16 experts as "dequantize, then a bf16 GEMM on the vendor kernels" (issue 14).

The fused Triton kernel (``w8a16_grouped``) converts the int8 operand in registers and
re-stages it in shared memory for wgmma, ~25-30% slower than cuBLAS on the MoE shapes. This
engine instead writes the bf16 weights of a chunk of experts into a stacked scratch
``[E_chunk, N, K]`` (one bandwidth-bound launch: 1 byte read, 2 written per weight) and runs
the GEMM on cuBLAS/CUTLASS: ``torch._grouped_mm`` (one launch per chunk) or one ``F.linear``
per expert.

Definition: the scale is folded into the dequantization, ``w = bf16(fp32(q) * fp32(s))`` per
output channel, exactly ``w8a16.dequantize_weight(q, s, bf16)``; the GEMM then computes
``x @ w.T`` with an fp32 accumulator. ``dequantize_groups`` / ``dequantize_into`` are bit-exact
to that definition on both of their paths (the Triton kernel and the torch fallback; the kernel
rounds fp32 -> bf16 to nearest-even on the bits itself, so Triton's CPU interpreter, whose bf16
cast truncates, gives the GPU's bits too).

The experts stay separate parameters (streaming, parking, soft unload move them one by one):
the Triton kernel reaches them as ``w8a16_grouped`` does, from the lowest-addressed weight /
scale as base pointers, through a table with one row per expert (``entry_table``: weight and
scale offsets in 16-byte units, N*K, K, and where its output starts), so one launch can fill
several Linears' buffers (a chunk's gate_up and down: ``DequantPipeline``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..core import settings
from . import w8a16_common as w8a16

log = logging.getLogger(__name__)

ALIGN = w8a16.ALIGN  # bytes: weight and scale offsets are sent in these units
BLOCK = 4096  # elements per program of the dequantization kernel
ROW_ALIGN = 16  # rows per expert are padded to a multiple of this for torch._grouped_mm
ENTRY_COLS = 5  # a kernel table row: weight offset, scale offset (ALIGN units), N*K, K, output offset (E_UNIT units)
# N*K, K and the output offset are sent in units of E_UNIT_MAX elements when every entry allows it (real shapes do),
# else of 1: the kernel multiplies them by its constexpr E_UNIT, so Triton knows the mask and the stores are
# E_UNIT-aligned and vectorises them. Loaded from the table as plain numbers, they are of unknown alignment,
# and the stores went element by element (H200: the layer's 64 experts at 8,448 tokens 9.7 -> 11.4 ms on the GPU).
E_UNIT_MAX = 16
OUT_ALIGN = 256  # elements: the pipeline's second buffer starts at a multiple of this (512 B in bf16)

# One Linear's experts for ``dequantize_groups``: weights, scales, and the output offset (elements) from
# which their dequantized weights are written one after another, N*K elements each.
Group = tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], int]

_triton: Any = None  # the Triton kernel (a function), False once unavailable
_grouped_mm_ok: dict[tuple[str, int | None], bool] = {}


def _kernel() -> Any:
    global _triton
    if _triton is None:
        try:
            import triton
            import triton.language as tl

            @triton.jit
            def _dequant_kernel(w_ptr, s_ptr, out_ptr, table_ptr, BLOCK: tl.constexpr, W_UNIT: tl.constexpr,
                                S_UNIT: tl.constexpr, E_UNIT: tl.constexpr, BF16_BITS: tl.constexpr):
                row = table_ptr + tl.program_id(0) * 5  # this program's expert (ENTRY_COLS)
                nk = tl.load(row + 2).to(tl.int32) * E_UNIT
                start = tl.program_id(1) * BLOCK
                if start < nk:  # the grid covers the largest N*K: the other entries' extra programs do nothing
                    k = tl.load(row + 3).to(tl.int32) * E_UNIT
                    offs = start + tl.arange(0, BLOCK)
                    mask = offs < nk
                    q = tl.load(w_ptr + tl.load(row) * W_UNIT + offs, mask=mask, other=0)
                    s = tl.load(s_ptr + tl.load(row + 1) * S_UNIT + offs // k, mask=mask, other=0.0)
                    w = q.to(tl.float32) * s.to(tl.float32)
                    dst = out_ptr + tl.load(row + 4) * E_UNIT + offs
                    if BF16_BITS:  # out is bf16 seen as int16: round to nearest even on the bits
                        bits = w.to(tl.uint32, bitcast=True)
                        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                        tl.store(dst, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
                    else:
                        tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=mask)

            @triton.jit
            def _dequant_rows_kernel(w_ptr, s_ptr, out_ptr, table_ptr, ROWS: tl.constexpr, KBLOCK: tl.constexpr,
                                     W_UNIT: tl.constexpr, S_UNIT: tl.constexpr, E_UNIT: tl.constexpr,
                                     BF16_BITS: tl.constexpr):
                # ROWS output rows of one expert per program, KBLOCK columns at a time: the row and its
                # scale come from the program and the tile, not from a division per element (``offs // k``
                # of the flat kernel) and a scale load per element
                row = table_ptr + tl.program_id(0) * 5
                k = tl.load(row + 3).to(tl.int32) * E_UNIT
                n = tl.load(row + 2).to(tl.int32) * E_UNIT // k
                r0 = tl.program_id(1) * ROWS
                if r0 < n:  # the grid covers the largest N: the other entries' extra programs do nothing
                    rows = r0 + tl.arange(0, ROWS)
                    rmask = rows < n
                    s = tl.load(s_ptr + tl.load(row + 1) * S_UNIT + rows, mask=rmask, other=0.0).to(tl.float32)
                    src = w_ptr + tl.load(row) * W_UNIT + rows[:, None] * k
                    dst = out_ptr + tl.load(row + 4) * E_UNIT + rows[:, None] * k
                    for c0 in range(0, k, KBLOCK):
                        cols = c0 + tl.arange(0, KBLOCK)
                        mask = rmask[:, None] & (cols < k)[None, :]
                        q = tl.load(src + cols[None, :], mask=mask, other=0)
                        w = q.to(tl.float32) * s[:, None]
                        if BF16_BITS:
                            bits = w.to(tl.uint32, bitcast=True)
                            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                            tl.store(dst + cols[None, :], bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
                        else:
                            tl.store(dst + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)

            _triton = (triton, _dequant_kernel, _dequant_rows_kernel)
        except Exception as exc:  # noqa: BLE001 - no Triton: the torch fallback
            log.info("W8A16 dequantization: Triton unavailable (%s); torch fallback", exc)
            _triton = False
    return _triton


def _triton_ok(groups: Sequence[Group]) -> bool:
    """Every weight and scale 16-byte aligned and contiguous, one scale dtype, one weight shape per
    group with N*K within int32."""
    sdt = next((ss[0].dtype for _, ss, _ in groups if len(ss)), None)
    for ws, ss, _ in groups:
        if not len(ws):
            continue
        shape = ws[0].shape
        n, k = shape
        if n * k >= 2**31 - BLOCK:
            return False
        for w, s in zip(ws, ss):
            if (w.data_ptr() % ALIGN or s.data_ptr() % ALIGN or not w.is_contiguous() or not s.is_contiguous()
                    or s.dtype != sdt or w.shape != shape):
                return False
    return True


def entry_unit(groups: Sequence[Group]) -> int:
    """The unit (elements) of N*K, K and the output offsets in ``entry_table``: ``E_UNIT_MAX`` when every
    group's K and offset are multiples of it, else 1."""
    for ws, _, off in groups:
        if len(ws):
            n, k = ws[0].shape
            if k % E_UNIT_MAX or off % E_UNIT_MAX:
                return 1
    return E_UNIT_MAX


def entry_table(groups: Sequence[Group]) -> list[int]:
    """The Triton kernel's table, ``ENTRY_COLS`` numbers per expert of every group in order: its
    weight's and its scale's offset from the lowest address of their kind over all groups, in ALIGN
    units, N*K, K, and the output offset (the group's offset + i * N*K for its i-th); N*K and the
    output offset in units of ``entry_unit(groups)`` elements."""
    unit = entry_unit(groups)
    wo = w8a16.offset_units([w for ws, _, _ in groups for w in ws])
    so = w8a16.offset_units([s for _, ss, _ in groups for s in ss])
    rows, i = [], 0
    for ws, _, off in groups:
        if not len(ws):
            continue
        n, k = ws[0].shape
        for e in range(len(ws)):
            rows += (wo[i], so[i], n * k // unit, k // unit, (off + e * n * k) // unit)
            i += 1
    return rows


def offset_table(weights: list[torch.Tensor], scales: list[torch.Tensor]) -> list[int]:
    """``entry_table`` of one Linear's experts written from offset 0."""
    return entry_table([(weights, scales, 0)])


def use_kernel(weights: list[torch.Tensor], scales: list[torch.Tensor], out_is_cuda: bool) -> bool:
    """Whether ``dequantize_into`` takes the Triton kernel for these experts on its own choice."""
    return out_is_cuda and bool(_kernel()) and _triton_ok([(weights, scales, 0)])


# Kernel tables on the GPU, by what defines them (device, per group: shape, dtypes, output offset, every
# address): the same experts at the same addresses (every step, every layer of a resident model, the
# streamed slots) reuse theirs instead of a pinned tensor and a copy each time; on the H200 host building
# them took 1.4 ms per MoE call, before the first kernel. The content is a function of the key, so an entry
# is never stale; entries are never freed while cached (no allocator reuse under a queued kernel). At
# TABLES_MAX entries (~1 KB of GPU memory each; new addresses after each reload, other expert subsets at
# small sizes) the cache is emptied after a device synchronize and fills again. ``clear_tables`` empties it
# (unload). A hit checks contiguity with one C-level map per list (a non-contiguous view at a cached
# address, e.g. a square weight transposed, is not given the kernel) but builds no generator.
TABLES_MAX = 4096
_tables: dict[tuple, torch.Tensor | None] = {}
_ptr = torch.Tensor.data_ptr
_contiguous = torch.Tensor.is_contiguous


def _table_key(groups: Sequence[Group], device: torch.device) -> tuple:
    key: list = [device.type, device.index]
    for ws, ss, off in groups:
        if len(ws):
            key += (ws[0].shape, ws[0].dtype, ss[0].dtype, off, len(ws))
            key += map(_ptr, ws)
            key += map(_ptr, ss)
    return tuple(key)


def kernel_table(groups: Sequence[Group], device: torch.device) -> torch.Tensor | None:
    """The Triton kernel's ``entry_table`` of ``groups`` on ``device`` (cached), or None when the
    kernel does not take them (no CUDA / Triton, misaligned or non-contiguous tensors: the torch path)."""
    if device.type != "cuda":
        return None
    return cached_table(groups, device)


def cached_table(groups: Sequence[Group], device: torch.device) -> torch.Tensor | None:
    """``kernel_table`` without the CUDA check (the cache's logic runs on the CPU in tests)."""
    key = _table_key(groups, device)
    if key in _tables:
        if all(all(map(_contiguous, ws)) and all(map(_contiguous, ss)) for ws, ss, _ in groups):
            return _tables[key]
        return None  # a non-contiguous view at cached addresses: not cached, the torch path
    table = None
    if _kernel() and _triton_ok(groups):
        cuda = device.type == "cuda"
        table = torch.tensor(entry_table(groups), dtype=torch.int64, pin_memory=cuda).to(device, non_blocking=cuda)
    if len(_tables) >= TABLES_MAX:
        clear_tables()  # synchronizes first: no queued kernel still reads a table it frees
    _tables[key] = table
    return table


def clear_tables() -> None:
    """Forget the cached kernel tables (after the GPU has finished with them)."""
    if _tables and torch.cuda.is_available():
        torch.cuda.synchronize()
    _tables.clear()


@torch.no_grad()
def dequantize_groups(groups: Sequence[Group], out: torch.Tensor, *, use_triton: bool | None = None,
                      table: torch.Tensor | None = None) -> torch.Tensor:
    """For each group ``(weights, scales, offset)``, write ``dequantize_weight(weights[i], scales[i],
    out.dtype)`` into the contiguous ``out`` seen flat, from element ``offset + i * N * K`` on: one
    Triton launch for every expert of every group (CUDA, or the interpreter; the kernel
    ``dequant_kernel_variant`` names: grid experts x the largest N in ROWS, or x the largest N*K in
    BLOCKs), else one torch expression per expert. ``use_triton`` forces a path;
    ``table`` is ``entry_table(groups)`` already on ``out``'s device (``kernel_table``)."""
    if not out.is_contiguous():
        raise ValueError(f"scratch {tuple(out.shape)} is not contiguous")
    need = entries = max_nk = 0
    for ws, _, off in groups:
        if len(ws):
            n, k = ws[0].shape
            need = max(need, off + len(ws) * n * k)
            entries += len(ws)
            max_nk = max(max_nk, n * k)
    if out.numel() < need:
        raise ValueError(f"scratch {tuple(out.shape)} cannot hold the dequantized experts ({need} elements)")
    if not entries:
        return out
    if use_triton is None:
        use_triton = out.is_cuda and bool(_kernel()) and _triton_ok(groups)
    flat = out.view(-1)
    if not use_triton:
        for ws, ss, off in groups:
            for i, (q, s) in enumerate(zip(ws, ss)):
                n, k = q.shape
                flat[off + i * n * k: off + (i + 1) * n * k].view(n, k).copy_(w8a16.dequantize_weight(q, s, out.dtype))
        return out
    triton, flat_kernel, rows_kernel = _kernel()
    w_base = min((w for ws, _, _ in groups for w in ws), key=_ptr)
    s_base = min((s for _, ss, _ in groups for s in ss), key=_ptr)
    if table is None:
        table = torch.tensor(entry_table(groups), dtype=torch.int64,
                             pin_memory=out.is_cuda).to(out.device, non_blocking=True)
    bf16 = out.dtype == torch.bfloat16
    args = (w_base, s_base, flat.view(torch.int16) if bf16 else flat, table)
    units = dict(W_UNIT=ALIGN, S_UNIT=ALIGN // s_base.element_size(), E_UNIT=entry_unit(groups), BF16_BITS=bf16)
    if dequant_kernel_variant() == "rows":
        max_n = max(ws[0].shape[0] for ws, _, _ in groups if len(ws))
        rows_kernel[(entries, triton.cdiv(max_n, ROWS))](*args, ROWS=ROWS, KBLOCK=KBLOCK, **units, num_warps=8)
    else:
        flat_kernel[(entries, triton.cdiv(max_nk, BLOCK))](*args, BLOCK=BLOCK, **units, num_warps=8)
    return out


KERNEL_ENV = settings.DEQUANT_KERNEL  # rows (default) | flat: which dequantization kernel (same bits, see above)
ROWS = 4  # output rows per program of the row-tiled kernel ...
KBLOCK = 1024  # ... and columns per step


def dequant_kernel_variant() -> str:
    """``HY3_DEQUANT_KERNEL``: "rows" (the default: ROWS rows per program, KBLOCK columns per step, no
    division, one scale load per row) or "flat" (one BLOCK of N*K per program; the row of each element
    found by a division). Both write the same bits (tests). H200, a real layer's 64 experts' gate_up +
    down in one launch (bench/moe_host.py): rows 1.99 ms (3.65 TB/s), flat 2.21 ms (3.28 TB/s)."""
    return settings.get(KERNEL_ENV)


def dequantize_into(weights: list[torch.Tensor], scales: list[torch.Tensor], out: torch.Tensor,
                    *, use_triton: bool | None = None, table: torch.Tensor | None = None) -> torch.Tensor:
    """Write ``dequantize_weight(weights[i], scales[i], out.dtype)`` into ``out[i]`` for every
    expert (``out`` is ``[E, N, K]``, contiguous): ``dequantize_groups`` of one group at offset 0.
    ``table`` is ``offset_table(weights, scales)`` on ``out``'s device."""
    e = len(weights)
    if out.shape[0] < e or not out.is_contiguous() or (e and tuple(out.shape[1:]) != tuple(weights[0].shape)):
        raise ValueError(f"scratch {tuple(out.shape)} cannot hold {e} experts (or is not contiguous)")
    return dequantize_groups([(weights, scales, 0)], out, use_triton=use_triton, table=table)


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
              starts: list[int], wt: Sequence[torch.Tensor] | None = None,
              packed: bool | None = None) -> torch.Tensor:
    """``y[rows of e] = xs[rows of e] @ w[e].T`` for ``w`` ``[E, N, K]`` (dequantized weights of the
    experts with rows). ``xs`` rows: expert ``e``'s start at ``starts[e]``; for ``gemm="grouped_mm"``
    each expert's block is ``padded_rows`` long. "linear": one ``torch.mm`` per expert straight into
    its rows of one preallocated output (no per-expert allocation, copy or host sync); ``wt`` are
    the ``w[e].T`` views already made (``DequantPipeline.transposed``), ``packed`` says the rows lie
    back to back from 0 (None: checked)."""
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
    if packed is None:
        packed = sum(counts) == xs.shape[0] and starts == list(itertools.accumulate(counts[:-1], initial=0))
    if packed:
        xv, yv = xs.split_with_sizes(counts), y.split_with_sizes(counts)  # (Tensor.split: a Python wrapper)
    else:
        xv = [xs[s:s + c] for s, c in zip(starts, counts)]
        yv = [y[s:s + c] for s, c in zip(starts, counts)]
    mm = torch.mm
    for a, b, o, c in zip(xv, w.transpose(1, 2).unbind(0) if wt is None else wt, yv, counts):
        if c:
            mm(a, b, out=o)
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
OVERLAP_ENV = settings.MOE_OVERLAP
# 1 (default): without the overlap, one dequantization launch per chunk for its gate_up AND down buffers
# (half the Triton launches, ~30 us of host time each on the H200's host) | 0: one launch per Linear.
PAIR_ENV = settings.MOE_PAIR_DEQUANT
_side: dict[int, Any] = {}  # one side stream per CUDA device, created once


def overlap_enabled(device: torch.device) -> bool:
    """Double-buffered dequantization on a side stream: CUDA and ``HY3_MOE_OVERLAP=1`` (off by default)."""
    return device.type == "cuda" and settings.get(OVERLAP_ENV)


def pair_enabled() -> bool:
    """``HY3_MOE_PAIR_DEQUANT`` (on by default): a chunk's two Linears dequantized in one launch."""
    return settings.get(PAIR_ENV)


def side_stream(device: torch.device) -> Any:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _side:
        _side[idx] = torch.cuda.Stream(device=idx)
    return _side[idx]


class DequantPipeline:
    """The dequantized weights of a sequence of stages (one Linear of one chunk of experts each,
    in the order their GEMMs run: chunk 0 gate_up, chunk 0 down, chunk 1 gate_up, ...: stages
    ``2c`` and ``2c + 1`` are chunk ``c``'s), stage ``j`` written into buffer ``j % 2``
    (``buffer_of``). Use: ``w = acquire(j)``; the GEMMs that read ``w`` on the current stream;
    ``release(j)``; at the end ``close()``.

    Without ``overlap`` (the default; CPU, ``HY3_MOE_OVERLAP=0``) stages are dequantized in
    ``acquire`` on the current stream; with ``pair`` (default: ``HY3_MOE_PAIR_DEQUANT``, on, and
    not ``prefetch``) ``acquire(2c)`` dequantizes stage ``2c + 1`` in the same launch
    (``dequantize_groups``: both buffers are parts of one allocation), so a chunk costs one
    dequantization launch; ``prefetch`` keeps the overlapped issue order (CPU tests).

    With ``overlap`` (CUDA): ``acquire(j)`` also issues stage ``j + 1``'s dequantization on the
    device's side stream, into the other buffer, so it runs while stage ``j``'s GEMMs do (one
    launch per stage). Events order it: the side stream waits, before overwriting a buffer, for
    the event recorded by ``release`` after the GEMMs that last read it (stage ``j - 1``; when that
    was never released, for everything queued on the main stream); the main stream waits for the
    stage's dequant event before reading. The scratch is owned by the pipeline for the whole call
    and marked with ``record_stream``; ``close`` makes the main stream wait for the side stream, so
    nothing the side stream reads or writes (weights, scales, buffers) can be freed and handed out
    under it. Same kernels, same inputs, same GEMMs on the same stream: bit-identical to the
    sequential order.

    Memory: buffer ``p`` holds the largest stage of parity ``p`` (the dispatch alternates gate_up /
    down, so one gate_up buffer and one down buffer: ``E * (6144 + 3072) * 4096 * 2`` bytes for a
    chunk of ``E`` experts on the real config, within ``moe_grouped.scratch_bytes()``), both in one
    allocation (``scratch``; the second from an ``OUT_ALIGN`` multiple). The ``[E, N, K]`` views and
    their per-expert transposes are made once per shape and buffer. ``trace`` records ("launch",
    stages), ("dequant", j, buffer) and ("gemm", j) in issue order."""

    def __init__(self, stages: list[tuple[list[torch.Tensor], list[torch.Tensor]]], dtype: torch.dtype,
                 device: torch.device, *, overlap: bool | None = None, prefetch: bool | None = None,
                 pair: bool | None = None) -> None:
        self.stages = stages
        self.shapes = [(len(ws), *ws[0].shape) for ws, _ in stages]
        sizes = [0, 0]
        for j, (e, n, k) in enumerate(self.shapes):
            sizes[j % 2] = max(sizes[j % 2], e * n * k)
        self.overlap = overlap_enabled(device) if overlap is None else overlap and device.type == "cuda"
        self.prefetch = self.overlap if prefetch is None else prefetch
        self.pair = (pair_enabled() if pair is None else pair) and not self.prefetch
        second = -(-sizes[0] // OUT_ALIGN) * OUT_ALIGN if sizes[1] else sizes[0]
        self.offsets = (0, second)  # of each buffer in ``scratch``, in elements
        self.scratch = torch.empty(second + sizes[1], dtype=dtype, device=device)
        self.buffers = [self.scratch[:sizes[0]], self.scratch[second:second + sizes[1]]]
        self.device = device
        self.trace: list[tuple] = []
        self._issued: dict[int, Any] = {}  # j -> dequant event (None without overlap) or the exception
        self._released: dict[int, Any] = {}
        self._views: dict[tuple, torch.Tensor] = {}
        self._transposed: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._main = self._side = None
        if self.overlap:
            self._main = torch.cuda.current_stream(device)
            self._side = side_stream(device)
            self._side.wait_stream(self._main)  # weights just made resident on the main stream
            self.scratch.record_stream(self._side)

    @staticmethod
    def buffer_of(j: int) -> int:
        return j % 2

    def nbytes(self) -> int:
        return self.scratch.numel() * self.scratch.element_size()

    def _view(self, j: int) -> torch.Tensor:
        key = (j % 2, self.shapes[j])
        v = self._views.get(key)
        if v is None:
            e, n, k = self.shapes[j]
            v = self._views[key] = self.buffers[j % 2][: e * n * k].view(e, n, k)
        return v

    def transposed(self, j: int) -> tuple[torch.Tensor, ...]:
        """``w[e].T`` for each expert of stage ``j``'s view ``w`` (for ``gemm_rows``'s ``wt``), made
        once per shape and buffer."""
        key = (j % 2, self.shapes[j])
        t = self._transposed.get(key)
        if t is None:
            t = self._transposed[key] = self._view(j).transpose(1, 2).unbind(0)
        return t

    def _groups(self, js: tuple[int, ...]) -> list[Group]:
        return [(self.stages[j][0], self.stages[j][1], self.offsets[j % 2]) for j in js]

    def _issue(self, j: int) -> None:
        js = (j, j + 1) if self.pair and j % 2 == 0 and j + 1 < len(self.stages) else (j,)
        self.trace.append(("launch", js))
        self.trace.extend(("dequant", i, self.buffer_of(i)) for i in js)
        groups = self._groups(js)
        if not self.overlap:
            for i in js:
                self._issued[i] = None
            table = kernel_table(groups, self.device)  # per launch, not all up front: the first kernel goes early
            dequantize_groups(groups, self.scratch, use_triton=table is not None, table=table)
            return
        try:
            with torch.cuda.stream(self._side):
                if j >= 2:  # the last reader of this buffer: stage j - 2's GEMMs
                    done = self._released.get(j - 2)
                    if done is not None:
                        self._side.wait_event(done)
                    else:
                        self._side.wait_stream(self._main)
                table = kernel_table(groups, self.device)  # a new one is copied on this stream, before its kernel
                dequantize_groups(groups, self.scratch, use_triton=table is not None, table=table)
                ev = torch.cuda.Event()
                ev.record(self._side)
            for i in js:
                self._issued[i] = ev
        except Exception as exc:  # noqa: BLE001 - raised by acquire(j), for the chunk it belongs to
            for i in js:
                self._issued[i] = exc

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

"""Grouped W8A16 MoE kernel: ONE Triton launch runs a Linear of every routed expert of a layer
(issue 14), instead of one launch per expert.

The tokens are already grouped by expert (``moe_dispatch.plan_dispatch``): rows
``[start_e, start_e + count_e)`` of ``x`` belong to expert ``e``. The host cuts each expert's
rows into BLOCK_M tiles (``tile_schedule``) and sends one small int64 table per call: per tile,
the expert's weight and scale offsets from a base pointer, the first row and the end row.
Each program computes one (tile, BLOCK_N channels) block of ``y = (x @ q_e.T) * scale_e`` with
the same fused int8 -> bf16 cast as ``w8a16_kernel`` (fp32 accumulator, scale in the
epilogue, one rounding).

The expert weights stay separate parameters (the residency engine streams, parks and soft
unloads them per module): the kernel gets the lowest-addressed expert's weight as base
pointer and, per tile, ``(data_ptr_e - data_ptr_base)`` in units of 16 bytes, rebuilt every
call (streaming moves them). Offsets in 16-byte units tell the compiler the addresses stay
16-byte aligned (vector loads); weights not 16-byte aligned are ``Unsupported``.

Only the non-SWAP configs of ``w8a16_kernel`` (SWAP is miscompiled on Hopper by Triton 3.6,
see that module's docstring). ``tune`` does what ``w8a16_kernel.tune`` does for one Linear: the
first call per key runs every candidate on a thrown-away input of the call's shape
(``tuning_input``) and keeps the fastest one that has no compiled-code hazard, matches an fp32
reference (on a few experts), is bit-identical over two runs and bit-identical to the reference
config (the first candidate that passes the other checks), so the timing never changes a bit
(issue 21).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from . import w8a16_common as w8a16
from .cuda_timing import time_ms
from .w8a16_common import Unsupported, m_bucket, tuning_input
from .w8a16_kernel import CONFIGS, INT32_LIMIT, Config, check_output, compiled_hazard, reference_error

log = logging.getLogger(__name__)

GROUPED_CONFIGS = [c for c in CONFIGS if not c.SWAP]
ALIGN = w8a16.ALIGN  # bytes: weight and scale offsets are sent in these units


def configs() -> list[Config]:
    return list(GROUPED_CONFIGS)


def candidates(rows_per_expert: int) -> list[Config]:
    """Configs tried for a mean of ``rows_per_expert`` rows: tiles far taller only compute padding."""
    bucket = m_bucket(rows_per_expert)
    return [c for c in GROUPED_CONFIGS if c.BLOCK_M <= max(32, bucket)] or list(GROUPED_CONFIGS)


def tile_schedule(counts: list[int], block_m: int) -> tuple[list[int], list[int], list[int]]:
    """(expert, first row, end row) of every BLOCK_M tile, in expert order; an expert with no
    rows has no tile, the last tile of an expert may be short."""
    experts, r0, r1 = [], [], []
    start = 0
    for e, n in enumerate(counts):
        for r in range(start, start + n, block_m):
            experts.append(e)
            r0.append(r)
            r1.append(min(r + block_m, start + n))
        start += n
    return experts, r0, r1


@triton.jit(do_not_specialize=["n_tiles"])
def _grouped_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, sched_ptr,
    n_tiles, N, K,
    stride_xm, stride_wn, stride_ym,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, W_UNIT: tl.constexpr, S_UNIT: tl.constexpr,
):
    # Grouped order: GROUP_M row tiles (mostly of one expert) share each weight tile in L2.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first = group_id * GROUP_M
    group_size = tl.minimum(n_tiles - first, GROUP_M)
    tile = first + ((pid % num_pid_in_group) % group_size)
    pid_n = (pid % num_pid_in_group) // group_size

    w_off = tl.load(sched_ptr + tile) * W_UNIT  # elements; a multiple of 16 bytes by construction
    s_off = tl.load(sched_ptr + n_tiles + tile) * S_UNIT
    r0 = tl.load(sched_ptr + 2 * n_tiles + tile)
    r1 = tl.load(sched_ptr + 3 * n_tiles + tile)

    offs_m = r0 + tl.arange(0, BLOCK_M)  # int64: row offsets of all experts' tokens
    row_ok = offs_m < r1
    rm = tl.where(row_ok, offs_m, r0)  # rows past the tile's end re-read its first row, never stored
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    rk = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    cdtype = x_ptr.dtype.element_ty

    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + w_off + rn[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            xa = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            xa = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0)
        acc = tl.dot(xa, w.to(cdtype), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    scale = tl.load(s_ptr + s_off + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & mask_n[None, :])


class Operands(NamedTuple):
    """The per-expert tensors of one grouped Linear, as the kernel addresses them."""

    weights: list[torch.Tensor]  # int8 [N, K] per expert
    scales: list[torch.Tensor]  # [N] per expert
    w_base: torch.Tensor  # the lowest-addressed weight
    s_base: torch.Tensor
    w_units: list[int]  # per expert: (data_ptr - base) / ALIGN
    s_units: list[int]


def operands(weights: list[torch.Tensor], scales: list[torch.Tensor]) -> Operands:
    """Base pointers and per-expert offsets (raises ``Unsupported`` where the kernel cannot
    address them: other shapes, non-contiguous, not 16-byte aligned, other devices)."""
    if not weights or len(weights) != len(scales):
        raise Unsupported("grouped W8A16: no experts, or weights and scales differ in number")
    n, k = weights[0].shape
    dev, sdt = weights[0].device, scales[0].dtype
    for w, s in zip(weights, scales):
        if (w.dtype != torch.int8 or w.shape != (n, k) or w.stride() != (k, 1) or s.shape != (n,)
                or s.stride() != (1,) or s.dtype != sdt or w.device != dev or s.device != dev):
            raise Unsupported("grouped W8A16: expert weights differ in shape, dtype, layout or device")
        if w.data_ptr() % ALIGN or s.data_ptr() % ALIGN:
            raise Unsupported("grouped W8A16: an expert weight or scale is not 16-byte aligned")
    if n * k > INT32_LIMIT:
        raise Unsupported(f"grouped W8A16: a weight of {n * k} elements needs 64-bit offsets inside it")
    w_base = min(weights, key=torch.Tensor.data_ptr)
    s_base = min(scales, key=torch.Tensor.data_ptr)
    return Operands(weights, scales, w_base, s_base, w8a16.offset_units(weights), w8a16.offset_units(scales))


def _schedule_tensor(ops: Operands, counts: list[int], block_m: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """int64 [4, tiles] (weight offset units, scale offset units, first row, end row): one H2D copy."""
    experts, r0, r1 = tile_schedule(counts, block_m)
    table = torch.tensor([[ops.w_units[e] for e in experts], [ops.s_units[e] for e in experts], r0, r1],
                         dtype=torch.int64, pin_memory=device.type == "cuda")
    return table.to(device, non_blocking=True), len(experts)


def _run(cfg: Config, x2: torch.Tensor, ops: Operands, counts: list[int], y: torch.Tensor) -> Any:
    """One launch of ``cfg`` writing ``y [rows, N]``; returns Triton's compiled kernel (None
    under the interpreter)."""
    n, k = ops.w_base.shape
    sched, n_tiles = _schedule_tensor(ops, counts, cfg.BLOCK_M, x2.device)
    if n_tiles == 0:
        return None
    grid = (n_tiles * triton.cdiv(n, cfg.BLOCK_N),)
    return _grouped_kernel[grid](
        x2, ops.w_base, ops.s_base, y, sched,
        n_tiles, n, k,
        x2.stride(0), k, y.stride(0),
        EVEN_K=k % cfg.BLOCK_K == 0, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        GROUP_M=cfg.GROUP_M, W_UNIT=ALIGN, S_UNIT=ALIGN // ops.s_base.element_size(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


@torch.no_grad()
def grouped_error(y: torch.Tensor, x2: torch.Tensor, ops: Operands, counts: list[int], sample: int = 4) -> float:
    """Worst ``reference_error`` (fp32 reference, of the output's max) over ``sample`` experts with
    rows spread over the layer (first, last, between): a wrong config is wrong on every tile."""
    starts, s = [], 0
    for c in counts:
        starts.append(s)
        s += c
    busy = [e for e, c in enumerate(counts) if c]
    picks = sorted({busy[round(i * (len(busy) - 1) / max(1, sample - 1))] for i in range(sample)}) if busy else []
    err = 0.0
    for e in picks:
        r0, r1 = starts[e], starts[e] + counts[e]
        err = max(err, reference_error(y[r0:r1], x2[r0:r1], ops.weights[e], ops.scales[e], None))
    return err


class Tuning(NamedTuple):
    config: Config | None  # None: no config passed, the key runs the per-expert path
    timings: dict[Config, float]
    rejected: dict[Config, str]
    seconds: float
    reference: Config | None = None  # whose bits every timed config reproduces (the first that passed)


_lock = threading.Lock()
_tuned: dict[tuple, Tuning] = {}


def tuning_key(x2: torch.Tensor, ops: Operands, counts: list[int]) -> tuple:
    busy = sum(1 for c in counts if c) or 1
    n, k = ops.w_base.shape
    return (m_bucket(x2.shape[0] // busy), n, k, x2.dtype, x2.device.index)


def tunings() -> dict[tuple, Tuning]:
    return dict(_tuned)


@torch.no_grad()
def tune(x2: torch.Tensor, ops: Operands, counts: list[int], y: torch.Tensor) -> Tuning:
    """Check and time every candidate on ``x2`` (``grouped_linear`` passes ``tuning_input``; ``y`` is
    scratch); keep the fastest that passes and is bit-identical to the reference (the first that passes)."""
    key = tuning_key(x2, ops, counts)
    t0 = time.perf_counter()
    timings: dict[Config, float] = {}
    rejected: dict[Config, str] = {}
    ref: tuple[Config, torch.Tensor] | None = None
    for cfg in candidates(key[0]):
        try:
            why = compiled_hazard(_run(cfg, x2, ops, counts, y))
            if why:
                rejected[cfg] = why
                continue
            first = y.clone()
            _run(cfg, x2, ops, counts, y)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - out of shared memory, a compile error: not a candidate
            rejected[cfg] = f"{type(exc).__name__}: {str(exc)[:160]}"
            continue
        err = grouped_error(y, x2, ops, counts)
        why = check_output(cfg, first, y, err, ref)
        del first
        if why:
            rejected[cfg] = why
            continue
        if ref is None:
            ref = (cfg, y.clone())
        timings[cfg] = time_ms(lambda c=cfg: _run(c, x2, ops, counts, y), x2.device)
    for cfg, why in rejected.items():
        log.debug("grouped W8A16: config %s left out for %s: %s", cfg, key[:3], why)
    if not timings:
        log.warning("grouped W8A16: no config passed for rows/expert bucket %d, N %d, K %d: per-expert path there",
                    *key[:3])
        return Tuning(None, timings, rejected, time.perf_counter() - t0)
    best = min(timings, key=timings.__getitem__)
    log.info("grouped W8A16: rows/expert bucket %d, N %d, K %d -> %s (%.3f ms; tuned in %.1f s)",
             key[0], key[1], key[2], best, timings[best], time.perf_counter() - t0)
    return Tuning(best, timings, rejected, time.perf_counter() - t0, ref[0] if ref else None)


def grouped_linear(
    x2: torch.Tensor,
    weights: list[torch.Tensor],
    scales: list[torch.Tensor],
    counts: list[int],
    *,
    config: Config | dict[str, Any] | None = None,
) -> torch.Tensor:
    """``y[rows of e] = (x2[rows of e] @ weights[e].T) * scales[e]`` for every expert ``e`` in one
    launch; ``x2`` is ``[sum(counts), K]``, rows grouped by expert in order. ``config`` forces a
    config (tests); otherwise the tuned one for this input's key (tuned on a thrown-away input of
    this shape the first time, never on this one)."""
    ops = operands(weights, scales)
    n, k = ops.w_base.shape
    if x2.dim() != 2 or x2.shape[1] != k or x2.shape[0] != sum(counts):
        raise ValueError(f"grouped W8A16: x {tuple(x2.shape)} does not match K {k} and {sum(counts)} rows")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], n, dtype=x2.dtype, device=x2.device)
    if x2.shape[0] == 0:
        return y
    if config is None:
        key = tuning_key(x2, ops, counts)
        tuned = _tuned.get(key)
        if tuned is None:
            with _lock:
                tuned = _tuned.get(key)
                if tuned is None:  # not on the call's input: it may be non-finite, and the call's
                    # output must be the chosen config's run, not a tuning run's
                    xt = tuning_input(x2.shape[0], k, x2.dtype, x2.device)
                    tuned = _tuned[key] = tune(xt, ops, counts, y)
                    del xt
        if tuned.config is None:
            raise Unsupported(f"no grouped W8A16 config passed its check for {key[:3]}")
        cfg = tuned.config
    elif isinstance(config, Config):
        cfg = config
    else:
        cfg = Config(**{"GROUP_M": 8, "SWAP": False, "num_warps": 4, "num_stages": 3, **config})
    if cfg.SWAP:
        raise ValueError("the grouped kernel has no SWAP variant")
    _run(cfg, x2, ops, counts, y)
    return y

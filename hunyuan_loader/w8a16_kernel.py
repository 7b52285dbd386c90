"""Triton kernel for W8A16: ``y = (x @ q.T) * scale (+ bias)`` with the int8 -> bf16 cast fused
into the matmul (no dequantized weight is ever written to memory).

``x`` is bf16/fp16 ``[M, K]``, ``q`` int8 ``[N, K]``, ``scale`` ``[N]``. Each weight tile is
loaded as int8 (half the bytes of bf16), cast to the activation dtype in registers (exact:
|q| <= 127 fits the 8-bit significand of bf16) and fed to the tensor cores; the fp32
accumulator is multiplied by the per-channel scale once, in the epilogue, and rounded to the
output dtype once. ``SWAP`` computes the transposed tile ``q_tile @ x_tile.T`` so that the
converted weight is the MMA's first operand (on Hopper it can stay in registers) and the
token dimension, small for a single expert, is the MMA's N.

Imported only where Triton exists (``hunyuan_loader.w8a16`` checks); config choice is autotuned
per (token-count bucket, N, K). The raw kernel is testable on the CPU with ``TRITON_INTERPRET=1``
through ``launch`` with an explicit config.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import triton
import triton.language as tl

# (BLOCK_M tokens, BLOCK_N channels, BLOCK_K, GROUP_M, SWAP, num_warps, num_stages)
_CONFIGS = [
    (128, 256, 64, 8, False, 8, 3),
    (128, 128, 64, 8, False, 4, 4),
    (128, 128, 128, 8, False, 8, 3),
    (64, 128, 64, 8, False, 4, 4),
    (128, 128, 64, 8, True, 4, 4),
    (256, 128, 64, 8, True, 8, 3),
    (64, 128, 128, 8, True, 4, 4),
    (32, 128, 128, 8, True, 4, 4),
]
MAX_BUCKET = 4096


def configs() -> list[triton.Config]:
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, SWAP=swap), num_warps=w, num_stages=s)
        for bm, bn, bk, g, swap, w, s in _CONFIGS
    ]


def m_bucket(m: int) -> int:
    """Autotune key for the token count: the next power of two, 16..MAX_BUCKET."""
    return min(MAX_BUCKET, max(16, 1 << max(0, m - 1).bit_length()))


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Drop token tiles far larger than the token count (they only compute padding)."""
    bucket = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, bucket)]
    return kept or configs


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    M_BUCKET,  # autotune key only
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP: tl.constexpr,
):
    # Grouped tile order: GROUP_M token tiles share each weight tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past the end read row (r % M): always in bounds, never stored.
    rm = offs_m % M
    rn = offs_n % N
    rk = tl.arange(0, BLOCK_K)
    cdtype = x_ptr.dtype.element_ty
    mask_n = offs_n < N

    if SWAP:
        # acc[n, m] = sum_k q[n, k] * x[m, k]
        w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk
        x_ptrs = x_ptr + rm[None, :] * stride_xm + rk[:, None] * stride_xk
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                w = tl.load(w_ptrs)
                xt = tl.load(x_ptrs)
            else:
                k_left = K - k * BLOCK_K
                w = tl.load(w_ptrs, mask=rk[None, :] < k_left, other=0)
                xt = tl.load(x_ptrs, mask=rk[:, None] < k_left, other=0.0)
            acc = tl.dot(w.to(cdtype), xt, acc)
            w_ptrs += BLOCK_K * stride_wk
            x_ptrs += BLOCK_K * stride_xk
        scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * scale[:, None]
        if HAS_BIAS:
            acc = acc + bias[:, None]
        y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn
        mask = (offs_m[None, :] < M) & mask_n[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # acc[m, n] = sum_k x[m, k] * q[n, k]
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk
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
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * scale[None, :]
        if HAS_BIAS:
            acc = acc + bias[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        mask = (offs_m[:, None] < M) & mask_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
_autotune_kwargs: dict[str, Any] = {}
if "cache_results" in inspect.signature(triton.autotune).parameters:
    _autotune_kwargs["cache_results"] = True  # keep timings on disk: no re-tuning in the next process
_tuned = triton.autotune(
    configs=configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune},
    **_autotune_kwargs,
)(_even_k(_w8a16_kernel))
_fixed = _even_k(_w8a16_kernel)


def _args(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
          y: torch.Tensor) -> tuple:
    m, k = x2.shape
    n = weight.shape[0]
    return (
        x2, weight, scale, bias if bias is not None else scale, y,
        m, n, k,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        m_bucket(m),
    )


def _grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``(x @ weight.T) * scale (+ bias)`` in ``x.dtype``; ``x`` is ``[..., K]``.

    ``config`` (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SWAP, optional num_warps/num_stages)
    bypasses the autotuner: the CPU interpreter tests use it.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = weight.shape[0]
    y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0 or n == 0:
        return y.reshape(*lead, n)
    if k == 0:
        y.copy_(bias.expand_as(y) if bias is not None else torch.zeros_like(y))
        return y.reshape(*lead, n)
    args = _args(x2, weight, scale, bias, y)
    grid = _grid(x2.shape[0], n)
    if config is None:
        _tuned[grid](*args, HAS_BIAS=bias is not None)
    else:
        meta = dict(config)
        extra = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
        _fixed[grid](*args, HAS_BIAS=bias is not None, **meta, **extra)
    return y.reshape(*lead, n)

"""FP8 candidate for bench/int8.py (CUDA, FP8 tensor cores): e4m3 weights with a per-output-
channel scale, activations quantized per token to e4m3 by one fused Triton kernel (row absmax,
scale, cast, in one pass), matmul by ``torch._scaled_mm`` with row-wise scales, bf16 out.
Bench-only: it becomes a loader format only if it beats W8A16 at an error no worse than
bitsandbytes LLM.int8's (bench/int8.py prints that verdict)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
    tl.store(q_ptr + row * stride_q + offs, (x / scale).to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + row, scale)


def act_quant(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of a 2-D bf16 tensor: (fp8 [M, K], fp32 scales [M, 1])."""
    m, k = x2.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x2.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x2.device)
    if m:
        _act_quant_kernel[(m,)](x2, q, s, k, x2.stride(0), q.stride(0), BLOCK=triton.next_power_of_2(k),
                                num_warps=8)
    return q, s


class Fp8Linear:
    """A bias-free Linear as e4m3 weights + fp32 per-channel scales (callable like a module)."""

    def __init__(self, lin: torch.nn.Linear) -> None:
        w = lin.weight.detach().float()
        self.scale = (w.abs().amax(dim=1) / E4M3_MAX).clamp_min(1e-12)
        self.weight = (w / self.scale[:, None]).to(torch.float8_e4m3fn)
        self.scale_b = self.scale[None, :].contiguous()
        del w

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        xq, sx = act_quant(x2)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.scale_b, out_dtype=torch.bfloat16)
        return y.reshape(*lead, -1)

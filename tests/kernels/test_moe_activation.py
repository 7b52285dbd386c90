"""The grouped MoE engines' one-pass activation (hunyuan_loader/kernels/moe_activation.py): the official
``x1 * silu(x2)`` of the gate_up halves (hunyuan_image_3/hunyuan.py:1014-1019), bit for bit on CUDA;
the eager expression elsewhere; checked on its first call and dropped if it ever differs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hunyuan_image3.hunyuan_loader.kernels import moe_activation as A

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from triton_interpreter import PRELUDE, interpret, needs_triton  # noqa: E402

CUDA = torch.cuda.is_available()


def _official(h: torch.Tensor) -> torch.Tensor:
    x1, x2 = h.chunk(2, dim=2)  # the official expert's split of its [1, n, 2I] gate_up output
    return x1 * F.silu(x2)


def test_cpu_takes_the_official_expression() -> None:
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        h = torch.randn(1, 33, 2 * 40, dtype=dtype) * 4
        assert torch.equal(A.silu_mul(h[0]), _official(h)[0])
        assert torch.equal(A.silu_mul_eager(h), _official(h))  # any rank: the last dimension is split


_INTERPRETED = PRELUDE + r"""
from hunyuan_image3.hunyuan_loader.kernels import moe_activation as A
torch.manual_seed(0)
A.BLOCK = 64
for dtype, ulp in ((torch.float16, 2.0 ** -10), (torch.bfloat16, 2.0 ** -7)):
    h = (torch.randn(7, 2 * 150) * 4).to(dtype)  # 150 columns: a partial last program
    got, ref = A.silu_mul_fused(h), A.silu_mul_eager(h)
    assert got.shape == ref.shape == (7, 150) and got.dtype == dtype
    # the interpreter's exp is numpy's and its bf16 cast truncates: within one unit in the last place
    err = ((got.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-2)).max().item()
    assert err <= 2 * ulp, (dtype, err)
    assert A.silu_mul_fused(h[:0]).shape == (0, 150)
print("KERNEL OK")
"""


@needs_triton
def test_fused_pass_in_the_triton_interpreter() -> None:
    interpret(_INTERPRETED)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_fused_pass_is_the_official_expression_bit_for_bit() -> None:
    torch.manual_seed(0)
    for rows, inter in ((1, 3072), (4097, 3072), (513, 1000), (3, 8), (16384, 3072)):
        h = (torch.randn(rows, 2 * inter, device="cuda") * 4).to(torch.bfloat16)
        h[0, :4] = torch.tensor([0.0, -0.0, 30.0, -30.0])  # zeros and saturated silu
        got = A.silu_mul_fused(h)
        assert torch.equal(got, _official(h.unsqueeze(0))[0]), (rows, inter, int((got != _official(h[None])[0]).sum()))
        assert torch.equal(A.silu_mul(h), got)
    assert A._checked[(0, torch.bfloat16)] is True
    h16 = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    assert torch.equal(A.silu_mul(h16), _official(h16.unsqueeze(0))[0])  # fp16: the eager expression


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_a_differing_kernel_is_dropped_after_its_first_call(monkeypatch) -> None:
    monkeypatch.setattr(A, "_checked", {})
    real = A.silu_mul_fused
    monkeypatch.setattr(A, "silu_mul_fused", lambda h: real(h) + 1)
    h = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(A.silu_mul(h), A.silu_mul_eager(h))  # the first call already answers eager
    assert A._checked[(0, torch.bfloat16)] is False
    assert torch.equal(A.silu_mul(h), A.silu_mul_eager(h))

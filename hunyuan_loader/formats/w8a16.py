"""W8A16: 8-bit weights, bf16 activations, for the INT8 loader (issue 14).

Format (per Linear): ``weight`` int8 ``[out, in]`` and ``weight_scale`` bf16 ``[out]``, one
scale per output channel; the layer computes ``x @ (weight * weight_scale[:, None]).T``
(+ bias). Quantization is symmetric round-to-nearest-even on the bf16 scale:
``scale = bf16(absmax(row) / 127)``, ``q = clamp(round(w / scale), -127, 127)``, every step in
fp32 with IEEE rounding, so the CPU and the GPU give the same bits. The scale is bf16 (not
fp32) so that transformers' dtype casting on load leaves it untouched and a pre-quantized
copy loads bit-identically to a fresh quantization.

Forward: on CUDA a Triton kernel with the int8 -> bf16 cast fused into the matmul
(``w8a16_kernel.py``); elsewhere (CPU, no Triton, other dtypes) plain torch: the int8 matrix
cast to the activation dtype (exact), one matmul, the scale on its output.
``HY3_W8A16_KERNEL=torch`` forces the plain path.

Every path computes the one definition ``x @ (q * s).T`` (``q * s`` exact, per output channel);
they differ only in rounding: the fused kernels scale the fp32 accumulator (one rounding), the
plain path rounds ``x @ q.T`` then the scaled output (two), the dequant MoE engine
(``w8a16_dequant``) rounds the weight ``bf16(q * s)`` (= ``dequantize_weight(q, s, bf16)``) and
then the GEMM output; on K 3072 / 4096 its L2 error vs that definition is that of the plain
path (~0.23%, CPU check) with a smaller max. The routed experts of a MoE block run through the
engines of ``moe_dispatch`` (``HY3_MOE_GROUPED``).

Memory per Linear is the same as bitsandbytes int8 (1 byte per weight plus a small per-row
scale), and both tensors are ordinary parameters, so streaming, soft unload, force unload
and byte accounting (memory/residency/weights.py) see them without special cases.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import settings
from ..kernels.w8a16_common import ALIGN, MAX_BUCKET, Unsupported, dequantize_weight, m_bucket, offset_units  # noqa: F401 - part of this module's interface

log = logging.getLogger(__name__)

FORMAT = "w8a16"
QUANT_METHOD = "hy3_w8a16"  # quantization_config.quant_method in a pre-quantized config.json
SCALE_DTYPE = torch.bfloat16
QMAX = 127
KERNEL_ENV = settings.W8A16_KERNEL  # auto (default) | torch

EXPERT_RE = re.compile(r"(?:^|\.)mlp\.experts\.\d+\.(?:gate_and_up_proj|down_proj)$")
ATTENTION_RE = re.compile(r"(?:^|\.)self_attn\.(?:qkv_proj|o_proj)$")


# -- the format ------------------------------------------------------------------------------
@torch.no_grad()
def quantize_weight(weight: torch.Tensor, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 ``[out, in]``, bf16 scale ``[out]``) of a float weight, computed on ``device``."""
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"expected a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
    w = weight.to(device) if device is not None else weight
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / QMAX).to(SCALE_DTYPE)
    div = scale.float().clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero row gives q = 0
    q = torch.round(wf / div[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


# -- the forward -----------------------------------------------------------------------------
_kernel: Any = None  # the w8a16_kernel module, False once unavailable, None before the first try
_capable: dict[int, bool] = {}  # CUDA device index -> compute capability >= 8.0 (bf16 tensor cores)


def _load_kernel() -> Any:
    global _kernel
    if _kernel is None:
        try:
            from ..kernels import w8a16_kernel

            _kernel = w8a16_kernel
        except Exception as exc:  # noqa: BLE001 - no Triton, or a Triton that does not import
            log.info("W8A16: Triton kernel unavailable (%s); using the plain torch path", exc)
            _kernel = False
    return _kernel


def fused_available(x: torch.Tensor) -> bool:
    """True where the fused Triton kernel runs ``x``: CUDA, bf16/fp16, compute capability >= 8.0."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if settings.get(KERNEL_ENV) == "torch":
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _capable:
        _capable[index] = torch.cuda.get_device_capability(index) >= (8, 0)
    return _capable[index] and bool(_load_kernel())


def torch_w8a16(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain-torch path: int8 cast to ``x.dtype`` (exact), matmul, per-channel scale."""
    y = F.linear(x, weight.to(x.dtype))
    y = y * scale.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def w8a16_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T (+ bias)`` in ``x.dtype``: fused kernel where available."""
    global _kernel
    if fused_available(x):
        try:
            with torch.cuda.device(x.device):
                return _kernel.launch(x, weight, scale, bias)
        except torch.OutOfMemoryError:
            raise
        except Unsupported as exc:  # this shape/key only: the kernel stays on for the others
            log.debug("W8A16: %s; plain torch path for this call", exc)
        except Exception as exc:  # noqa: BLE001 - a Triton compile/launch failure: keep working, say so once
            log.warning("W8A16: Triton kernel failed (%s: %s); using the plain torch path from now on",
                        type(exc).__name__, exc)
            _kernel = False
    return torch_w8a16(x, weight, scale, bias)


class Int8WeightOnlyLinear(nn.Module):
    """A Linear with int8 weights and per-output-channel bf16 scales (W8A16).

    ``weight`` (int8) and ``weight_scale`` (bf16) are parameters without grad, so
    ``state_dict`` holds ``<name>.weight`` / ``<name>.weight_scale`` and every tensor walk in
    the pack (residency, unload) treats them like any other weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=SCALE_DTYPE, device=device),
                                         requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> Int8WeightOnlyLinear:
        """Quantize ``linear`` on ``device`` (default: where its weight is); the result lives there."""
        if linear.weight.device.type == "meta":
            raise ValueError("cannot quantize a Linear whose weight is on the meta device")
        q, scale = quantize_weight(linear.weight, device)
        bias = linear.bias
        module = cls(linear.in_features, linear.out_features, bias is not None, device="meta",
                     dtype=bias.dtype if bias is not None else torch.bfloat16)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.weight_scale = nn.Parameter(scale, requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().to(q.device), requires_grad=False)
        return module

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a16_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# -- converting models -----------------------------------------------------------------------
def is_expert_linear(name: str) -> bool:
    """``...mlp.experts.N.gate_and_up_proj`` / ``...down_proj`` (a routed expert's Linear)."""
    return bool(EXPERT_RE.search(name))


def is_block_quantizable(name: str) -> bool:
    """Routed experts and the attention projections: what the INT8 loader quantizes in a block."""
    return bool(EXPERT_RE.search(name) or ATTENTION_RE.search(name))


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _linears(root: nn.Module, include: Callable[[str], bool], prefix: str) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in root.named_modules()
            if type(m) is nn.Linear and include(f"{prefix}.{n}" if prefix else n)]


@torch.no_grad()
def quantize_w8a16(
    root: nn.Module,
    device: torch.device | str | None = None,
    *,
    include: Callable[[str], bool] = is_block_quantizable,
    prefix: str = "",
    out_device: torch.device | str | None = None,
) -> int:
    """Replace, in place, every ``nn.Linear`` of ``root`` whose name passes ``include`` by an
    ``Int8WeightOnlyLinear``; returns how many.

    One Linear at a time: its weight is copied to ``device`` (default: where it is),
    quantized there, and the int8 result moved to ``out_device`` (default: ``device``), so
    the peak is one bf16 weight on top of what is already there. ``prefix`` is prepended to
    the names given to ``include`` (e.g. ``"model.layers.3"`` for one block).
    """
    n = 0
    for name, linear in _linears(root, include, prefix):
        q = Int8WeightOnlyLinear.from_linear(linear, device)
        if out_device is not None:
            for p in q.parameters():
                p.data = p.data.to(out_device)
        _set_child(root, name, q)
        del linear
        n += 1
    return n


def quantize_experts_w8a16(block_or_model: nn.Module, device: torch.device | str | None = None) -> int:
    """Convert every routed expert Linear (``*.mlp.experts.N.{gate_and_up_proj,down_proj}``) in place."""
    return quantize_w8a16(block_or_model, device, include=is_expert_linear)


def quantize_block_w8a16(block: nn.Module, device: torch.device | str | None = None) -> int:
    """Convert a decoder block as the INT8 (w8a16) loader does: routed experts and attention projections."""
    return quantize_w8a16(block, device, include=is_block_quantizable)


def replace_with_w8a16(
    root: nn.Module,
    convert: Callable[[str], bool],
    *,
    device: torch.device | str = "meta",
) -> list[str]:
    """Swap the selected ``nn.Linear`` modules for empty ``Int8WeightOnlyLinear`` (a skeleton to
    load pre-quantized tensors into by name); returns the names swapped."""
    done = []
    for name, linear in _linears(root, convert, ""):
        bias = linear.bias
        _set_child(root, name, Int8WeightOnlyLinear(
            linear.in_features, linear.out_features, bias is not None, device=device,
            dtype=bias.dtype if bias is not None else torch.bfloat16,
        ))
        done.append(name)
    return done


def w8a16_module_names(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, Int8WeightOnlyLinear))


# -- checkpoints -----------------------------------------------------------------------------
def checkpoint_int8_format(config: dict) -> str | None:
    """The int8 format a checkpoint's config.json says its weights are in: ``"w8a16"``,
    ``"bnb"`` (bitsandbytes int8), or None (not pre-quantized to int8)."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == QUANT_METHOD:
        return FORMAT
    if qc.get("load_in_8bit"):
        return "bnb"
    return None


def resolve_int8_format(quant: str, int8_format: str, config: dict) -> str | None:
    """The int8 format a load uses: a pre-quantized checkpoint's own format, else the requested
    one for ``quant == "int8"``; None when nothing is int8."""
    found = checkpoint_int8_format(config)
    if found is not None:
        return found
    return int8_format if quant == "int8" else None


def config_entry(modules_to_not_convert: Iterable[str]) -> dict:
    """The ``quantization_config`` a pre-quantized W8A16 folder carries in config.json."""
    return {"quant_method": QUANT_METHOD, "modules_to_not_convert": sorted(modules_to_not_convert),
            "scale_dtype": "bfloat16", "format_version": 1}

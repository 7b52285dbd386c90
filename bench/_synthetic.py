"""Real-size synthetic HunyuanImage-3 decoder layers for the benchmarks (CUDA).

hidden 4096, GQA 32/8 heads of dim 128 (fused qkv_proj), 64 experts of width 3072 +
1 shared expert (SwiGLU), float32 router, top-8, gather/scatter MoE forward so that
activations stay small: ~4.99 GB per layer in bf16.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

H, HEADS, KV, HD, E, W, TOPK = 4096, 32, 8, 128, 64, 3072, 8
GB = 1e9


def load_pack():
    from hunyuan_loader.standalone import load_pack as _load

    return _load()


def start_bench(name: str) -> bool:
    """Common start of a CUDA benchmark: False (after saying so) without a GPU; else quiet
    the per-call bitsandbytes notices and import the pack."""
    import logging
    import warnings

    if not torch.cuda.is_available():
        print(f"{name} needs a CUDA GPU; nothing to measure here.")
        return False
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # the per-call int8 cast notice
    load_pack()
    return True


class RMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(H))

    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(v + 1e-6)).to(x.dtype) * self.weight


class MLP(nn.Module):
    """The official HunyuanMLP for hidden_act "silu" (hunyuan_image_3/hunyuan.py:1014-1019)."""

    hidden_act = "silu"

    def __init__(self) -> None:
        super().__init__()
        self.gate_and_up_proj = nn.Linear(H, 2 * W, bias=False)
        self.down_proj = nn.Linear(W, H, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        a, b = self.gate_and_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(a * self.act_fn(b))


class Gate(nn.Module):
    moe_topk = TOPK  # what moe_dispatch.routing_for reads when the model has no config

    def __init__(self) -> None:
        super().__init__()
        self.wg = nn.Linear(H, E, bias=False)


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.experts = nn.ModuleList(MLP() for _ in range(E))
        self.shared_mlp = MLP()

    def forward(self, x):
        flat = x.reshape(-1, H)
        gates = self.gate.wg(flat.float()).softmax(-1)
        w, idx = gates.topk(TOPK, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype).flatten()
        order = idx.flatten().argsort(stable=True)
        counts = torch.bincount(idx.flatten(), minlength=E).tolist()
        tok = order // TOPK
        xs = flat.index_select(0, tok)
        ys = torch.cat([self.experts[e](c) for e, c in enumerate(xs.split(counts)) if counts[e]])
        # scatter back by position (unique indices, deterministic; index_add_ uses atomics)
        routed = torch.empty_like(ys)
        routed[order] = ys * w[order, None]
        out = self.shared_mlp(flat) + routed.view(-1, TOPK, H).sum(1)
        return out.reshape(x.shape)


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(H, (HEADS + 2 * KV) * HD, bias=False)
        self.o_proj = nn.Linear(HEADS * HD, H, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split([HEADS * HD, KV * HD, KV * HD], dim=-1)
        q = q.view(b, t, HEADS, HD).transpose(1, 2)
        k = k.view(b, t, KV, HD).transpose(1, 2).repeat_interleave(HEADS // KV, dim=1)
        v = v.view(b, t, KV, HD).transpose(1, 2).repeat_interleave(HEADS // KV, dim=1)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, HEADS * HD))


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm()
        self.self_attn = Attn()
        self.post_attention_layernorm = RMSNorm()
        self.mlp = MoE()

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Stack(nn.Module):
    """model.layers + a small non-block part, like model.model of the real checkpoint."""

    def __init__(self, layers: list[nn.Module], device) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.ln_f = RMSNorm().to(device=device, dtype=torch.bfloat16)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.ln_f(x)


def make_layer(device, seed: int) -> Layer:
    """A bf16 layer with random weights made on ``device`` (router float32)."""
    with torch.device("meta"):
        layer = Layer().to(torch.bfloat16)
        layer.mlp.gate.wg.float()
    layer = layer.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return layer


def bnb_linear(lin: nn.Linear, mode: str) -> nn.Module:
    """A bnb Linear8bitLt ("int8", LLM.int8 threshold 6.0) or Linear4bit ("nf4") of ``lin``,
    quantized where its weight is (what a bnb load does on the GPU)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    w = lin.weight.data
    if mode == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False,
                                has_fp16_weights=False, threshold=6.0, device="meta")
        cb, scb, _ = BF.int8_vectorwise_quant(w.half())
        q.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        return q
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                          quant_type="nf4", compress_statistics=True, device="meta")
    w4, qs = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                              quant_storage=torch.uint8)
    q.weight = bnb.nn.Params4bit(w4, requires_grad=False, quant_state=qs, blocksize=64,
                                 compress_statistics=True, quant_type="nf4", bnb_quantized=True, module=q)
    q.quant_state = qs
    return q


def quantize_layer(layer: Layer, mode: str) -> Layer:
    """Replace expert + attention Linears by quantized ones, quantizing on the GPU (what a
    load does); the router and the shared expert stay fp32/bf16.

    ``int8`` / ``nf4``: bitsandbytes. ``w8a16``: the pack's INT8 format (int8 weights x bf16
    activations, hunyuan_loader/formats/w8a16.py). ``w8a16-experts``: W8A16 routed experts, bnb int8
    attention projections."""
    experts_mode = "w8a16" if mode.startswith("w8a16") else mode
    attn_mode = "int8" if mode == "w8a16-experts" else experts_mode

    def convert(lin: nn.Linear, how: str) -> nn.Module:
        if how == "w8a16":
            from hunyuan_image3.hunyuan_loader.formats.w8a16 import Int8WeightOnlyLinear

            return Int8WeightOnlyLinear.from_linear(lin)
        return bnb_linear(lin, how)

    for e in layer.mlp.experts:
        e.gate_and_up_proj = convert(e.gate_and_up_proj, experts_mode)
        e.down_proj = convert(e.down_proj, experts_mode)
    layer.self_attn.qkv_proj = convert(layer.self_attn.qkv_proj, attn_mode)
    layer.self_attn.o_proj = convert(layer.self_attn.o_proj, attn_mode)
    return layer.eval()


def step_input(device, tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(2, tokens // 2, H, device=device, dtype=torch.bfloat16, generator=g)


def time_steps(model: nn.Module, x: torch.Tensor, steps: int, warmup: int = 1):
    """Seconds per step (one pass over all layers), the last output, the peak VRAM in bytes."""
    dev = x.device
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(x)
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - t0) / steps, out, torch.cuda.max_memory_allocated(dev)


def copy_rates(device, nbytes: int = 2 << 30, reps: int = 3) -> tuple[float, float]:
    """Host->GPU bytes/s from pinned (cudaHostRegister'ed) and from pageable memory."""
    load_pack()
    from hunyuan_image3.memory.residency import HostBuffer

    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for pinned in (True, False):
        host = HostBuffer(nbytes, pin=pinned)  # keep it referenced: it unpins when collected
        src = host.tensor
        src.fill_(1)
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize(device)
        rates.append(nbytes * reps / (time.perf_counter() - t0))
        del src, host
    return rates[0], rates[1]


def settings_refresh() -> None:
    """The pack parses its environment variables once (core/settings.py): re-read them after this bench
    changes one."""
    from hunyuan_image3.hunyuan_loader.core import settings

    settings.refresh()

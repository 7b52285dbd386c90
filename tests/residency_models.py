"""Tiny HunyuanImage-3-shaped models for the residency tests (model.model.layers of MoE blocks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(v + 1e-6)).to(x.dtype) * self.weight.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, h: int, w: int) -> None:
        super().__init__()
        self.gate_and_up_proj = nn.Linear(h, 2 * w, bias=False)
        self.down_proj = nn.Linear(w, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.gate_and_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(a * F.silu(b))


class Gate(nn.Module):
    def __init__(self, h: int, e: int) -> None:
        super().__init__()
        self.wg = nn.Linear(h, e, bias=False, dtype=torch.float32)


class MoE(nn.Module):
    def __init__(self, h: int, w: int, e: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.gate = Gate(h, e)
        self.experts = nn.ModuleList(MLP(h, w) for _ in range(e))
        self.shared_mlp = MLP(h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gates = self.gate.wg(flat.float()).softmax(-1)
        weights, idx = gates.topk(self.k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        routed = flat.new_zeros(flat.shape[0], self.k, flat.shape[1])
        for e, expert in enumerate(self.experts):  # gather / scatter (unique positions: deterministic)
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                y = expert(flat.index_select(0, tok)) * weights[tok, slot, None]
                routed[tok, slot] = y.to(routed.dtype)
        return (self.shared_mlp(flat) + routed.sum(1)).reshape(x.shape)


class Attn(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(h, 3 * h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        return self.o_proj(F.scaled_dot_product_attention(q, k, v))


class Block(nn.Module):
    def __init__(self, h: int, w: int, e: int, k: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(h)
        self.self_attn = Attn(h)
        self.post_attention_layernorm = RMSNorm(h)
        self.mlp = MoE(h, w, e, k)
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x)) * self.scale.to(x.dtype)


class Inner(nn.Module):
    def __init__(self, n: int, h: int, w: int, e: int, k: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(97, h)
        self.layers = nn.ModuleList(Block(h, w, e, k) for _ in range(n))
        self.ln_f = RMSNorm(h)


class TinyHunyuan(nn.Module):
    def __init__(self, n: int = 4, h: int = 64, w: int = 64, e: int = 4, k: int = 2) -> None:
        super().__init__()
        self.model = Inner(n, h, w, e, k)
        self.final_layer = nn.Linear(h, h)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.wte(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.final_layer(self.model.ln_f(x).to(self.final_layer.weight.dtype))


def quantize_experts(model: nn.Module, mode: str) -> nn.Module:
    """Replace expert and attention Linears by bnb Linear8bitLt ("int8") or Linear4bit ("nf4") on CPU."""
    import bitsandbytes as bnb

    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if not isinstance(child, nn.Linear) or child_name == "wg" or "final_layer" in f"{name}.{child_name}":
                continue
            if mode == "int8":
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
            else:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
            q.load_state_dict(child.state_dict())
            q = q.to("cpu")  # quantizes
            setattr(mod, child_name, q)
    from fixtures_model import portable_nf4_on_cpu

    return portable_nf4_on_cpu(model.eval())


def make_model(mode: str = "bf16", n: int = 4, seed: int = 0, h: int = 64, w: int = 64, e: int = 4) -> TinyHunyuan:
    torch.manual_seed(seed)
    model = TinyHunyuan(n=n, h=h, w=w, e=e).eval()
    if mode == "bf16":
        model.to(torch.bfloat16)
        for layer in model.model.layers:
            layer.mlp.gate.wg.float()  # the router stays float32, as in the real model
        return model
    return quantize_experts(model, mode)


def inputs(seed: int = 1, batch: int = 2, seq: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (batch, seq), generator=g)

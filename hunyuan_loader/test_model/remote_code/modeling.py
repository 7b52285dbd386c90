"""HunyuanImage-3.0 test model: a tiny stand-in with the real model's interface.

Written for the ComfyUI-HunyuanImage3 test suite; not derived from the official code.
It mirrors the parameter names, the float32 router, the GShard-style eager MoE with
``[tokens, experts, capacity]`` dispatch, lazy pipeline/scheduler construction,
resolution-group snapping and both ``generate_image`` return conventions (base: one
PIL image; Instruct/Distil: ``(cot_text_list or None, [PIL images])``).

Where the pack touches the model, this code behaves like the official one (each behaviour
pinned by a test in tests/model/test_model_interface.py that cites the official file:line):
3-D expert input (``chunk(2, dim=2)``), the reference MoE feeding each expert
``[1, capacity, hidden]``, timestep embedders casting their input to ``mlp[0].weight.dtype``,
Distil's ``guidance_emb`` / ``timestep_r_emb``, two CFG rows always built for base/Instruct
while the pipeline batches ``1 + (guidance > 1)`` latents, sizes snapped by the model's own
image processor (no exact sizes), the base text-stage attention mask built on the CPU, the
CoT/recaption text sampled on the global torch RNG, a float32 router with no
``_keep_in_fp32_modules`` (so bitsandbytes loads cast it to bf16), a diffusers import, and the
Instruct/Distil text stage decoding with the official KV cache (``HunyuanStaticCache``, dynamic,
its layers initialised with the one-argument ``lazy_initialization``) and ``model.cached_rope``
(a ``CachedRoPE`` that never stores its key): the prompt's forward, then one token per forward.

Like the real Instruct code, the Instruct/Distil ``generate_image`` ignores the
``diff_infer_steps`` / ``diff_guidance_scale`` kwargs and reads
``generation_config``; ``flow_shift`` is read once when ``pipeline`` is first built.
"""

from __future__ import annotations

import logging
import math
import random
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor  # every official code file imports diffusers
from PIL import Image
from torch import nn
from transformers import GenerationMixin, LogitsProcessor, PreTrainedModel
from transformers.cache_utils import StaticCache
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from .configuration import HunyuanImage3Config
from .image_processor import HunyuanImage3ImageProcessor
from .tokenization import HunyuanImage3Tokenizer

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers
def _nvtx(name: str):
    """CUDA profiler range when CUDA exists (the real code calls nvtx unconditionally)."""
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return nullcontext()


def _to_device(data, device):
    """The official helper's behaviour (modeling_hunyuan_image_3.py:117-124): tensors and lists move, anything
    else (a dict of vision kwargs) is returned as it is."""
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, list):
        return [_to_device(x, device) for x in data]
    return data


def _conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a conv; on CPU in float32 (CPU bf16 convs are very slow), result in x's dtype."""
    if x.device.type != "cpu" or x.dtype == torch.float32:
        return conv(x.to(conv.weight.dtype))
    bias = conv.bias.float() if conv.bias is not None else None
    fn = F.conv3d if isinstance(conv, nn.Conv3d) else F.conv2d
    out = fn(x.float(), conv.weight.float(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.to(x.dtype)


def _timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class HunyuanRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(dtype)


def _rope(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    freqs = positions.float()[..., None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-b, a], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class CachedRoPE:
    """The Instruct text stage's RoPE table, with the official object's interface and miss test
    (modeling_hunyuan_image_3.py:973-1022): ``__call__(seq_len, device, rope_image_info, position_ids)``
    rebuilds ``cos_cache`` / ``sin_cache`` unless ``seq_len`` and ``rope_image_info`` equal the ones it
    holds, and, like the official one, never stores them (they stay ``None``), so every call rebuilds.
    The table is this model's 1-D RoPE (``_rope``) over ``seq_len`` positions, gathered by
    ``position_ids`` [rows, tokens]: the same values ``_rope`` gives those positions directly."""

    def __init__(self, config) -> None:
        self.config = config
        self.cos_cache = None
        self.sin_cache = None
        self.seq_len = None  # compared, never assigned (the official M:980-981, 997)
        self.rope_image_info = None

    def __call__(self, seq_len, device, rope_image_info=None, position_ids=None):
        changed = self.seq_len != seq_len
        if rope_image_info is not None and self.rope_image_info != rope_image_info:
            changed = True
        if changed:  # always, as shipped: nothing above was ever stored
            rows = 1 if rope_image_info is None else len(rope_image_info)
            table = torch.arange(seq_len, device=device)[None]
            cos, sin = _rope(table, self.config.attention_head_dim, self.config.rope_theta)
            self.cos_cache, self.sin_cache = cos.expand(rows, -1, -1), sin.expand(rows, -1, -1)
        if position_ids is None:
            return self.cos_cache, self.sin_cache
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [rows, tokens], got shape {tuple(position_ids.shape)}")
        width = self.cos_cache.shape[-1]
        index = position_ids[..., None].expand(-1, -1, width)
        cos = self.cos_cache.expand(position_ids.shape[0], -1, -1) if self.cos_cache.shape[0] == 1 else self.cos_cache
        sin = self.sin_cache.expand(position_ids.shape[0], -1, -1) if self.sin_cache.shape[0] == 1 else self.sin_cache
        return torch.gather(cos, 1, index), torch.gather(sin, 1, index)


class HunyuanStaticCache(StaticCache):
    """The text stage's KV cache, with the official class's interface (modeling_hunyuan_image_3.py:895-970):
    a ``StaticCache`` whose ``update`` writes the new keys / values at ``cache_position`` (one index per
    row position, 1-D, or [rows, tokens]) and, in ``dynamic`` mode (the text stage), hands attention the
    cache up to the last written position only (its end read from the device, ``.item()``, in every
    layer). Its layers are initialised on first use with ``lazy_initialization(key_states)``, the one
    argument the official code passes: transformers 5.x asks for two, and the pack's load-time fix
    (static_cache_init) is what makes this run there, as on the official code."""

    def __init__(self, *args, **kwargs) -> None:
        self.dynamic = kwargs.pop("dynamic", False)
        super().__init__(*args, **kwargs)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        position = (cache_kwargs or {}).get("cache_position")
        layer = self.layers[layer_idx]
        if layer.keys is None:
            layer.lazy_initialization(key_states)  # as the official M:933 (one argument)
        keys, values = layer.keys, layer.values
        if position is None:  # the whole cache at once
            keys.copy_(key_states)
            values.copy_(value_states)
            return keys, values
        if position.dim() == 1:  # the same positions for every row
            keys.index_copy_(2, position, key_states)
            values.index_copy_(2, position, value_states)
            last = position[-1]
        else:  # [rows, tokens]: each row at its own positions
            if position.dim() != 2 or not (len(position) == len(keys) == len(key_states)):
                raise ValueError(f"cache_position {tuple(position.shape)} does not match the cache's rows")
            for row in range(len(position)):
                keys[row].index_copy_(1, position[row], key_states[row])
                values[row].index_copy_(1, position[row], value_states[row])
            if self.dynamic and len(position) != 1:
                raise ValueError("a dynamic cache holds one row")
            last = position[0, -1]
        if self.dynamic:  # up to the last written position (the official M:947-951, 964-968)
            end = last.item() + 1
            keys, values = keys[:, :, :end], values[:, :, :end]
        return keys, values


# --------------------------------------------------------------------------- transformer
class HunyuanImage3Attention(nn.Module):
    def __init__(self, config: HunyuanImage3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        self.rope_theta = config.rope_theta
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_out, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            self.query_layernorm = HunyuanRMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = HunyuanRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, position_ids=None,
                past_key_value=None):
        bsz, seq, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
            dim=-1,
        )
        q = q.view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        causal = attention_mask is None
        if past_key_value is not None:  # the text stage: new keys into the cache, attend over what it holds
            # (official M:1332-1335: the position ids are the cache positions); no mask = every cached key
            k, v = past_key_value.update(k, v, self.layer_idx, {"cache_position": position_ids})
            causal = False
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=attention_mask, is_causal=causal
        )
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)


class HunyuanMLP(nn.Module):
    """SwiGLU: down_proj(a * act_fn(b)) with (a, b) = gate_and_up_proj(x).chunk(2, dim=2): the SECOND half
    is activated. Input must be 3-D [batch, tokens, hidden] (official modeling_hunyuan_image_3.py:1080).
    ``hidden_act`` and ``act_fn = ACT2FN[hidden_act]`` are attributes, as the official ones set them
    (hunyuan.py:989 and :1003; modeling_hunyuan_image_3.py:1052 and :1066): the MoE dispatch reads them."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu") -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        if hidden_act != "silu":
            raise ValueError(f"the test model's MLP is the official silu branch only, got {hidden_act!r}")
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        self.gate_and_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.gate_and_up_proj(x).chunk(2, dim=2)
        return self.down_proj(a * self.act_fn(b))


class HunyuanTopKGate(nn.Module):
    """GShard-style top-k gate with a float32 router ``wg``."""

    def __init__(self, config: HunyuanImage3Config, layer_idx: int) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.moe_topk = int(config.layer_value("moe_topk", layer_idx))
        self.drop_tokens = bool(config.moe_drop_tokens)
        self.capacity_factor = float(config.capacity_factor)
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.routed_scaling_factor = float(config.routed_scaling_factor)
        self.wg = nn.Linear(config.hidden_size, config.num_experts, bias=False, dtype=torch.float32)

    def router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        wdt = self.wg.weight.dtype
        x = hidden_states.to(wdt) if wdt.is_floating_point else hidden_states
        return self.wg(x).float()

    def forward(self, hidden_states: torch.Tensor):
        """hidden_states [B, S, H] -> (l_aux, combine_weights [T,E,C], dispatch_mask [T,E,C], exp_counts [E])."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        k, num_e = self.moe_topk, self.num_experts
        tokens = hidden_states.shape[0]
        gates = F.softmax(self.router_logits(hidden_states), dim=1)
        top_vals, top_idx = torch.topk(gates, k, dim=1)
        if self.norm_topk_prob and k > 1:
            weights = top_vals / top_vals.sum(dim=1, keepdim=True)
        else:
            weights = top_vals * self.routed_scaling_factor
        masks = F.one_hot(top_idx, num_e).transpose(0, 1)  # [k, T, E], rank-major priority
        exp_counts = masks.sum(dim=(0, 1))
        if self.drop_tokens:
            capacity = int(max(k, k * tokens // num_e) * self.capacity_factor)
        else:
            capacity = int(exp_counts.max())
        locations = torch.cumsum(masks.reshape(k * tokens, num_e), dim=0).reshape(k, tokens, num_e) - 1
        masks = masks * (locations < capacity)
        loc_s = (locations * masks).sum(dim=-1)  # [k, T]
        kept_w = weights.transpose(0, 1) * masks.sum(dim=-1)  # [k, T]
        loc_onehot = F.one_hot(loc_s, capacity).float()  # [k, T, C]
        combine_weights = torch.einsum("kt,kte,ktc->tec", kept_w, masks.float(), loc_onehot)
        dispatch_mask = combine_weights.bool()
        me = gates.mean(dim=0)
        ce = masks[0].float().mean(dim=0)
        l_aux = (me * ce).sum() * num_e
        return l_aux, combine_weights, dispatch_mask, exp_counts


class HunyuanMoE(nn.Module):
    """Routed experts + shared expert, eager GShard dispatch (memory grows with tokens^2 when nothing drops)."""

    def __init__(self, config: HunyuanImage3Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.moe_topk = int(config.layer_value("moe_topk", layer_idx))
        width = int(config.layer_value("moe_intermediate_size", layer_idx))
        self.gate = HunyuanTopKGate(config, layer_idx)
        self.experts = nn.ModuleList([HunyuanMLP(config.hidden_size, width, config.hidden_act)
                                      for _ in range(config.num_experts)])
        n_shared = int(config.layer_value("num_shared_expert", layer_idx))
        # Shared expert width: moe_intermediate_size x num_shared_expert (official modeling_hunyuan_image_3.py:1054-1063).
        self.shared_mlp = HunyuanMLP(config.hidden_size, width * n_shared, config.hidden_act) if n_shared > 0 else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.is_cuda:
            torch.cuda.set_device(hidden_states.device)
        with _nvtx("moe"):
            shape = hidden_states.shape
            x = hidden_states.reshape(-1, shape[-1])
            _, combine_weights, dispatch_mask, _ = self.gate(hidden_states)
            # CPU bf16 matmul is slow; the one-hot dispatch/combine values are identical in float32.
            ein_dtype = torch.float32 if x.device.type == "cpu" else x.dtype
            dispatched = torch.einsum("sec,sm->ecm", dispatch_mask.to(ein_dtype), x.to(ein_dtype)).to(x.dtype)
            # Each expert gets [1, capacity, hidden] (official modeling_hunyuan_image_3.py:1203).
            chunks = dispatched.chunk(self.num_experts, dim=0)
            expert_output = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)], dim=0)
            weights = combine_weights.type_as(x).to(ein_dtype)  # rounded to the hidden dtype, as on CUDA
            combined = torch.einsum("sec,ecm->sm", weights, expert_output.to(ein_dtype))
            out = combined.to(hidden_states.dtype).reshape(shape)
            if self.shared_mlp is not None:
                out = self.shared_mlp(hidden_states) + out
            return out


class HunyuanImage3DecoderLayer(nn.Module):
    def __init__(self, config: HunyuanImage3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = HunyuanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = HunyuanImage3Attention(config, layer_idx)
        self.post_attention_layernorm = HunyuanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = HunyuanMoE(config, layer_idx)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, position_ids=None,
                past_key_value=None, **kwargs):
        residual = hidden_states
        h = self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_embeddings,
                           position_ids=position_ids, past_key_value=past_key_value)
        hidden_states = residual + h
        residual = hidden_states
        hidden_states = residual + self.mlp(self.post_attention_layernorm(hidden_states))
        return (hidden_states,)


class HunyuanImage3PreTrainedModel(PreTrainedModel):
    config_class = HunyuanImage3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["HunyuanImage3DecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, HunyuanTopKGate):
            nn.init.normal_(module.wg.weight, std=self.config.router_init_std)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, HunyuanRMSNorm):
            nn.init.ones_(module.weight)


class HunyuanImage3Model(HunyuanImage3PreTrainedModel):
    """Token embedding ``wte``, decoder ``layers`` (nn.ModuleList), final norm ``ln_f``."""

    def __init__(self, config: HunyuanImage3Config) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [HunyuanImage3DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.ln_f = HunyuanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, custom_pos_emb=None, **kwargs):
        """``custom_pos_emb``: the (cos, sin) of the text stage's CachedRoPE, [rows, tokens, head_dim]
        (official M:2151-2153, 2207); without it the positions' RoPE is computed here (the image stage).
        ``past_key_values``: the text stage's KV cache, written at ``position_ids`` by every layer."""
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        hidden = inputs_embeds
        if custom_pos_emb is not None:
            cos, sin = custom_pos_emb
        else:
            positions = position_ids
            if positions is None:
                positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
            cos, sin = _rope(positions, self.config.attention_head_dim, self.config.rope_theta)
        cos, sin = cos[:, None], sin[:, None]
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=attention_mask, position_embeddings=(cos, sin),
                           position_ids=position_ids, past_key_value=past_key_values)[0]
        return self.ln_f(hidden)


# --------------------------------------------------------------------------- image modules
class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> Linear, GELU, Linear. forward(t) casts the features to
    ``mlp[0].weight.dtype`` (official modeling_hunyuan_image_3.py:591): quantize it and GELU
    runs on int8 / uint8."""

    def __init__(self, hidden_size: int, act_layer=nn.GELU, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), act_layer(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = _timestep_embedding(t, self.frequency_embedding_size).type(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)


class UNetPatchEmbed(nn.Module):
    """Small conv block + timestep conditioning + patchify to transformer tokens."""

    def __init__(self, config: HunyuanImage3Config) -> None:
        super().__init__()
        c, mid, p = config.vae_latent_channels, config.patch_embed_hidden_dim, config.patch_size
        self.patch_size = p
        self.conv_in = nn.Conv2d(c, mid, 3, padding=1)
        self.emb_proj = nn.Linear(config.hidden_size, mid)
        self.norm = nn.GroupNorm(8, mid)
        self.conv_mid = nn.Conv2d(mid, mid, 3, padding=1)
        self.proj = nn.Conv2d(mid, config.hidden_size, p, stride=p)

    def forward(self, latents: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = _conv(self.conv_in, latents)
        h = h + self.emb_proj(temb)[:, :, None, None]
        h = h + _conv(self.conv_mid, F.silu(self.norm(h)))
        return _conv(self.proj, h).flatten(2).transpose(1, 2)


class FinalLayer(nn.Module):
    """adaLN-modulated projection back to latent patches, then a conv."""

    def __init__(self, config: HunyuanImage3Config) -> None:
        super().__init__()
        c, p, hid = config.vae_latent_channels, config.patch_size, config.hidden_size
        self.patch_size, self.channels = p, c
        self.norm_final = nn.LayerNorm(hid, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hid, 2 * hid))
        self.linear = nn.Linear(hid, p * p * c)
        self.conv_out = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(temb).chunk(2, dim=-1)
        x = self.norm_final(x) * (1 + scale[:, None]) + shift[:, None]
        x = self.linear(x)
        b, (gh, gw), p, c = x.shape[0], grid, self.patch_size, self.channels
        x = x.view(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, gh * p, gw * p)
        return _conv(self.conv_out, x)


class VAEDecoder(nn.Module):
    def __init__(self, latent: int, factor: int, mid: int = 64) -> None:
        super().__init__()
        self.factor = factor
        self.conv_in = nn.Conv3d(latent, mid, (1, 3, 3), padding=(0, 1, 1))
        self.norm = nn.GroupNorm(8, mid)
        self.conv_mid = nn.Conv3d(mid, mid, (1, 3, 3), padding=(0, 1, 1))
        self.conv_out = nn.Conv3d(mid, 3 * factor * factor, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _conv(self.conv_in, z)
        h = h + _conv(self.conv_mid, F.silu(self.norm(h.to(self.norm.weight.dtype))))
        h = _conv(self.conv_out, F.silu(h))
        return F.pixel_shuffle(h.squeeze(2), self.factor).unsqueeze(2)


class VAEEncoder(nn.Module):
    def __init__(self, latent: int, factor: int, mid: int = 64) -> None:
        super().__init__()
        self.factor = factor
        self.conv_in = nn.Conv3d(3 * factor * factor, mid, 1)
        self.norm = nn.GroupNorm(8, mid)
        self.conv_out = nn.Conv3d(mid, 2 * latent, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pixel_unshuffle(x.squeeze(2), self.factor).unsqueeze(2)
        return self.conv_out(F.silu(self.norm(self.conv_in(h))))


class _VAEConfig:
    """The fields of the official VAE's diffusers config that the model and its pipeline read
    (``vae.config.scaling_factor`` / ``shift_factor``: hunyuan_image_3_pipeline.py:880-883)."""

    def __init__(self, scaling_factor: float | None, shift_factor: float | None) -> None:
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor


class _LatentDist:
    """The part of the official DiagonalGaussianDistribution the model uses (mean and log-variance)."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, self.logvar = moments.chunk(2, dim=1)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar.clamp(-30, 20)) * noise


class _VAEOutput:
    """``latent_dist`` (encode) or ``sample`` (decode), like diffusers' output classes."""

    def __init__(self, latent_dist: _LatentDist | None = None, sample: torch.Tensor | None = None) -> None:
        self.latent_dist, self.sample = latent_dist, sample


class HunyuanVAE(nn.Module):
    """3D-conv VAE (time dim 1), runs in float32, with the official AutoencoderKLConv3D's interface
    (autoencoder_kl_3d.py:438-464, :770-834): ``config.scaling_factor`` / ``shift_factor``,
    ``ffactor_spatial`` / ``ffactor_temporal``, ``encode(x)`` of [B, 3, H, W] or [B, 3, T, H, W] images
    -> ``latent_dist`` of raw VAE latents [B, C, 1, h, w], ``decode(z)`` of raw latents [B, C, 1, h, w]
    -> ``sample`` [B, 3, 1, H, W] (the last frame; :830). Scaling and shifting are the model's and the
    pipeline's job, as in the official code."""

    def __init__(self, config: HunyuanImage3Config) -> None:
        super().__init__()
        factor = int(config.vae_downsample_factor[0])
        self.config = _VAEConfig(config.vae_scaling_factor, getattr(config, "vae_shift_factor", None))
        self.ffactor_spatial, self.ffactor_temporal = factor, 1
        self.encoder = VAEEncoder(config.vae_latent_channels, factor)
        self.decoder = VAEDecoder(config.vae_latent_channels, factor)
        if torch.cuda.is_available():  # the real constructor allocates on CUDA unconditionally
            self._cuda_probe = torch.empty(0, device="cuda")

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        decoded = self.decoder(z.to(self.decoder.conv_in.weight.dtype)).float()
        if z.shape[-3] == 1:
            decoded = decoded[:, :, -1:]
        return _VAEOutput(sample=decoded) if return_dict else (decoded,)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        if x.ndim != 5:
            x = x[:, :, None]
        posterior = _LatentDist(self.encoder(x.to(self.encoder.conv_in.weight.dtype)))
        return _VAEOutput(latent_dist=posterior) if return_dict else (posterior,)


class VisionEmbeddings(nn.Module):
    """Siglip2-naflex-shaped: a Linear over flattened patches, a learned position grid resized to each
    image's patch grid (``spatial_shapes``)."""

    def __init__(self, dim: int, patch: int, num_pos: int) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(3 * patch * patch, dim)
        self.position_embedding = nn.Embedding(num_pos, dim)
        self.grid = int(math.isqrt(num_pos))

    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        dim = x.shape[-1]
        grid = self.position_embedding.weight.float().reshape(self.grid, self.grid, dim).permute(2, 0, 1)[None]
        pos = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for i, (h, w) in enumerate(spatial_shapes.tolist()):
            resized = F.interpolate(grid, size=(int(h), int(w)), mode="bilinear", align_corners=False)
            pos[i, : h * w] = resized[0].reshape(dim, h * w).t()
        return x + pos.to(x.dtype)


class VisionLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.ModuleDict({n: nn.Linear(dim, dim) for n in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.layer_norm2 = nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, 2 * dim), "fc2": nn.Linear(2 * dim, dim)})

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None = None) -> torch.Tensor:
        h = self.layer_norm1(x)
        a = self.self_attn
        q, k, v = a["q_proj"](h), a["k_proj"](h), a["v_proj"](h)
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if mask_bias is not None:
            # the official eager attention adds the 4-D mask to the scores where it lies (siglip2.py:210):
            # a mask left on the CPU fails here on a GPU ("Expected all tensors to be on the same device")
            scores = scores + mask_bias[:, 0]
        attn = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        x = x + a["out_proj"](attn @ v)
        h = self.layer_norm2(x)
        return x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](h)))


class VisionModel(nn.Module):
    """SigLIP2-naflex-shaped encoder (Instruct reference images): forward(pixel_values, attention_mask,
    spatial_shapes) -> an output with ``last_hidden_state`` [images, max_num_patches, vit_hidden]."""

    def __init__(self, config: HunyuanImage3Config) -> None:
        super().__init__()
        dim, patch, size = config.vit_hidden_size, config.vit_patch_size, config.vit_image_size
        self.embeddings = VisionEmbeddings(dim, patch, (size // patch) ** 2)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList([VisionLayer(dim)])})
        self.post_layernorm = nn.LayerNorm(dim)

    def forward(self, pixel_values: torch.Tensor, attention_mask=None, spatial_shapes=None, **kwargs):
        if spatial_shapes is None:  # a square grid of all patches
            side = int(math.isqrt(pixel_values.shape[1]))
            spatial_shapes = torch.tensor([[side, side]] * pixel_values.shape[0])
        x = self.embeddings(pixel_values, spatial_shapes)
        # [images, patches] -> an additive [images, 1, patches, patches] bias in x's dtype, made on the mask's
        # device, as the official forward does with _prepare_4d_attention_mask (siglip2.py:514-516)
        bias = None
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool)[:, None, None, :].expand(-1, 1, x.shape[1], -1)
            bias = torch.zeros(keep.shape, dtype=x.dtype, device=attention_mask.device)
            bias = bias.masked_fill(~keep, torch.finfo(x.dtype).min)
        for layer in self.encoder["layers"]:
            x = layer(x, bias)
        return BaseModelOutput(last_hidden_state=self.post_layernorm(x))


class VisionAligner(nn.Module):
    def __init__(self, config: HunyuanImage3Config) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(config.vit_hidden_size, config.hidden_size)
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


# --------------------------------------------------------------------------- scheduler + pipeline
class FlowMatchEulerScheduler:
    """Flow-matching Euler scheduler: sigma 1 -> 0, shifted by ``shift``."""

    def __init__(self, shift: float = 3.0, num_train_timesteps: int = 1000) -> None:
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps
        self.sigmas = torch.ones(1)
        self.timesteps = torch.zeros(0)
        self._step_index = 0

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        s = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float32)
        s = self.shift * s / (1 + (self.shift - 1) * s)
        self.sigmas = s.to(device) if device is not None else s
        self.timesteps = self.sigmas[:-1] * self.num_train_timesteps
        self._step_index = 0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = False):
        i = self._step_index
        prev = sample.float() + (self.sigmas[i + 1] - self.sigmas[i]) * model_output.float()
        self._step_index = i + 1
        return (prev,) if not return_dict else {"prev_sample": prev}


class HunyuanImage3Text2ImagePipeline:
    """Diffusion loop. Like the official pipeline (hunyuan_image_3_pipeline.py:776, :833) it
    batches ``1 + (guidance_scale > 1)`` copies of the latents (1 for cfg-distilled
    checkpoints) against the token rows the model prepared: base / Instruct always prepare two
    CFG rows, so guidance_scale <= 1 fails there with a batch-size mismatch."""

    def __init__(self, model: HunyuanImage3ForCausalMM, scheduler: FlowMatchEulerScheduler) -> None:
        self.model = model
        self.scheduler = scheduler

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int,
        image_size: tuple[int, int],
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator,
        model_kwargs: dict,
        cfg_distilled: bool = False,
        callback_on_step_end=None,
    ) -> torch.Tensor:
        model = self.model
        device = model.model.wte.weight.device
        height, width = image_size
        factor = int(model.config.vae_downsample_factor[0])
        shape = (batch_size, model.config.vae_latent_channels, height // factor, width // factor)
        latents = randn_tensor(shape, generator=generator, dtype=torch.float32).to(device)
        cfg_factor = 1 if cfg_distilled else 1 + (guidance_scale > 1.0)
        ids = model_kwargs["input_ids"].to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for i, t in enumerate(self.scheduler.timesteps):
            inp = torch.cat([latents] * cfg_factor)
            v = model._denoise(inp, t.reshape(1).expand(inp.shape[0]), ids, guidance_scale,
                               model_kwargs.get("inputs_embeds"), model_kwargs.get("full_attn_slices"),
                               first_step=(i == 0))
            if cfg_factor == 2:
                v_cond, v_uncond = v.chunk(2, dim=0)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": latents})
        # As the official pipeline (hunyuan_image_3_pipeline.py:880-892): unscale, unshift, add the time axis.
        vae = model.vae
        latents = latents.float()
        if getattr(vae.config, "scaling_factor", None):
            latents = latents / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            latents = latents + vae.config.shift_factor
        if hasattr(vae, "ffactor_temporal"):
            latents = latents.unsqueeze(2)
        image = vae.decode(latents, return_dict=False, generator=generator)[0]
        return image.squeeze(2) if hasattr(vae, "ffactor_temporal") else image


# --------------------------------------------------------------------------- the model
class HunyuanImage3ForCausalMM(HunyuanImage3PreTrainedModel, GenerationMixin):
    """Text + image model; ``generate_image`` signature and return type follow the variant."""

    def __init__(self, config: HunyuanImage3Config) -> None:
        super().__init__(config)
        self.image_processor = HunyuanImage3ImageProcessor(config)
        self.model = HunyuanImage3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vae = HunyuanVAE(config)
        self.vision_model = VisionModel(config)
        self.vision_aligner = VisionAligner(config)
        self.timestep_emb = TimestepEmbedder(config.hidden_size)
        if config.cfg_distilled:  # official modeling_hunyuan_image_3.py:1717-1720
            self.guidance_emb = TimestepEmbedder(config.hidden_size)
        if config.use_meanflow:
            self.timestep_r_emb = TimestepEmbedder(config.hidden_size)
        self.patch_embed = UNetPatchEmbed(config)
        self.time_embed = TimestepEmbedder(config.hidden_size)
        self.final_layer = FinalLayer(config)
        self.time_embed_2 = TimestepEmbedder(config.hidden_size)
        if self.is_instruct:  # the Instruct code's RoPE object (official M:1736); the base code has none
            self.cached_rope = CachedRoPE(config)
        self._pipeline = None
        self.scheduler = None
        self._tokenizer = None
        self._generate_image_override = None
        if config.moe_impl != "eager":
            logger.warning("moe_impl=%r is not available in the test model; using eager", config.moe_impl)
        self.post_init()

    # ---- transformers plumbing
    def get_input_embeddings(self):
        return self.model.wte

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, prefix_embeds=None, full_attn_slices=None, rope_image_info=None, mode=None,
                first_step=None, use_cache=None, **kwargs):
        """The text stage's forward. The prompt's forward gets ``prefix_embeds`` (its rows' embeddings, with
        the reference images) and builds its mask; a decode step gets the new token's ids at
        ``position_ids`` and no mask (official M:2872-2990). On the Instruct model the RoPE comes from
        ``cached_rope`` over ``max_position_embeddings`` positions, gathered by ``position_ids`` (official
        M:2143-2153). ``lm_head`` runs over every position of the forward, logits upcast (M:2276-2285)."""
        if prefix_embeds is not None:  # the prompt's forward: its rows carry the reference images
            embeds = self.model.wte(input_ids)
            n = prefix_embeds.shape[1]
            inputs_embeds = torch.cat([prefix_embeds.to(embeds.dtype), embeds[:, n:]], dim=1)
            attention_mask = self._instruct_mask(inputs_embeds.shape[1], full_attn_slices, embeds.device)
            input_ids = None
        pos_emb = None
        rope = getattr(self, "cached_rope", None)
        if rope is not None:
            ref = input_ids if input_ids is not None else inputs_embeds
            if position_ids is None:
                position_ids = torch.arange(ref.shape[1], device=ref.device)[None].expand(ref.shape[0], -1)
            pos_emb = rope(self.config.max_position_embeddings, ref.device, rope_image_info=rope_image_info,
                           position_ids=position_ids)
        hidden = self.model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, custom_pos_emb=pos_emb, mode="gen_text",
        )
        return CausalLMOutputWithPast(logits=self.lm_head(hidden).float(), past_key_values=past_key_values)

    @property
    def is_instruct(self) -> bool:
        return "instruct" in str(self.config.model_version).lower()

    # ---- tokenizer
    def load_tokenizer(self, path) -> HunyuanImage3Tokenizer:
        self._tokenizer = HunyuanImage3Tokenizer.from_pretrained(path)
        return self._tokenizer

    @property
    def tokenizer(self) -> HunyuanImage3Tokenizer:
        if self._tokenizer is None:
            raise RuntimeError("call model.load_tokenizer(path) before generate_image")
        return self._tokenizer

    # ---- pipeline
    @property
    def pipeline(self) -> HunyuanImage3Text2ImagePipeline:
        if self._pipeline is None:
            shift = float(getattr(self.generation_config, "flow_shift", 3.0))
            self.scheduler = FlowMatchEulerScheduler(shift=shift)
            self._pipeline = HunyuanImage3Text2ImagePipeline(self, self.scheduler)
        return self._pipeline

    def _compute_dtype(self) -> torch.dtype:
        return self.model.wte.weight.dtype

    def _denoise(self, latents: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, guidance: float,
                 prefix_embeds: torch.Tensor | None = None, full_attn_slices=None, first_step=None) -> torch.Tensor:
        dtype = self._compute_dtype()
        p = self.config.patch_size
        lh, lw = latents.shape[-2:]
        ph, pw = (-lh) % p, (-lw) % p
        x = F.pad(latents, (0, pw, 0, ph)) if (ph or pw) else latents
        grid = ((lh + ph) // p, (lw + pw) // p)
        temb = self.time_embed(t)
        if self.config.cfg_distilled:
            temb = temb + self.guidance_emb(torch.full_like(t, float(guidance) * 1000.0))
        if self.config.use_meanflow:
            temb = temb + self.timestep_r_emb(torch.zeros_like(t))
        img = self.patch_embed(x.to(dtype), self.timestep_emb(t).to(dtype))
        text = self.model.wte(ids) if prefix_embeds is None else prefix_embeds.to(self.model.wte.weight.dtype)
        # Text rows and latent rows are concatenated: a batch mismatch (two CFG rows, one latent) fails here.
        seq = torch.cat([text, temb[:, None].to(text.dtype), img.to(text.dtype)], dim=1)
        n_text, total = text.shape[1], seq.shape[1]
        pos = torch.arange(total, device=seq.device)
        allowed = (pos[None, :] <= pos[:, None]) | ((pos[:, None] >= n_text) & (pos[None, :] >= n_text))
        key_ok = torch.cat(
            [ids != self.config.pad_token_id, torch.ones(ids.shape[0], total - n_text, dtype=torch.bool, device=ids.device)],
            dim=1,
        )
        mask = allowed[None, None] & key_ok[:, None, None, :]
        for start, stop in full_attn_slices or ():  # reference images attend to themselves fully
            mask[:, :, start:stop, start:stop] = True
        mask = mask | torch.eye(total, dtype=torch.bool, device=seq.device)[None, None]
        # The decoder is called once per step with mode / first_step, as the official code does
        # (modeling_hunyuan_image_3.py:2199-2211, hunyuan.py:2019-2032; pipeline first_step=(i == 0)).
        hidden = self.model(inputs_embeds=seq, attention_mask=mask, mode="gen_image", first_step=first_step)
        out = self.final_layer(hidden[:, n_text + 1 :], self.time_embed_2(t).to(dtype), grid)
        return out[..., :lh, :lw].float()

    # ---- text side
    def _prefix_ids(self, prompt: str, use_system_prompt, system_prompt, extra: list[int] | None = None) -> list[int]:
        tok = self.tokenizer
        ids = [tok.bos_token_id]
        if use_system_prompt not in (None, False, "None", "none"):
            ids += tok.encode(system_prompt or "You are a helpful image generator.")
        ids += tok.encode(prompt or "")
        return ids + (extra or [])

    def _text_attention_mask(self, length: int) -> torch.Tensor:
        """Causal mask of the text stage. The base code builds it on the CPU (official hunyuan.py:2396)
        and relies on accelerate's device-alignment hooks to move it; Instruct builds it on the
        model's device."""
        device = None if not self.is_instruct else self.model.wte.weight.device
        return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]

    @torch.no_grad()
    def _next_token_logits(self, ids: list[int]) -> torch.Tensor:
        device = self.model.wte.weight.device
        mask = self._text_attention_mask(len(ids))
        return self(input_ids=torch.tensor([ids], device=device), attention_mask=mask).logits[0, -1]

    @torch.no_grad()
    def _sample_text(self, ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        """CoT / recaption text: sampled on the GLOBAL torch RNG (official modeling_hunyuan_image_3.py:2762
        seeds only the diffusion generator), so the same seed gives different text unless the caller
        seeds torch itself."""
        out: list[int] = []
        for _ in range(max_new_tokens):
            probs = torch.softmax(self._next_token_logits(ids + out), dim=-1)
            token = int(torch.multinomial(probs, 1))
            out.append(token)
            if token in stop_ids:
                break
        return out

    def _predict_ratio(self, prefix: list[int]) -> int:
        """'auto' size: the ratio token with the highest logit after <boi>."""
        group = self.image_processor.vae_reso_group if self.is_instruct else self.image_processor.reso_group
        ratio_ids = self.tokenizer.ratio_token_ids[: len(group)]
        logits = self._next_token_logits(prefix + [self.tokenizer.convert_tokens_to_ids("<boi>")])
        return int(torch.argmax(logits[torch.tensor(ratio_ids, device=logits.device)]))

    def _image_info(self, image_size):
        proc = self.image_processor
        build = proc.build_gen_image_info if self.is_instruct else proc.build_image_info
        return build(image_size)

    def _run_diffusion(self, prefix: list[int], image_size, seed, steps: int, guidance: float):
        tok = self.tokenizer
        info = self._image_info(image_size)
        cond = prefix + [tok.convert_tokens_to_ids("<boi>")]
        rows = [cond]
        if not self.config.cfg_distilled:  # two CFG rows, whatever the guidance (official :2732)
            rows.append([tok.bos_token_id] + [tok.pad_token_id] * (len(cond) - 2) + [cond[-1]])
        if seed is None:
            seed = random.randint(0, 2**31 - 1)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        pixels = self.pipeline(
            batch_size=1,
            image_size=(info.image_height, info.image_width),
            num_inference_steps=int(steps),
            guidance_scale=float(guidance),
            generator=generator,
            model_kwargs={"input_ids": torch.tensor(rows)},
            cfg_distilled=bool(self.config.cfg_distilled),
        )
        arr = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return Image.fromarray(np.ascontiguousarray(arr.permute(1, 2, 0).cpu().numpy()), mode="RGB")

    def _cot(self, prefix: list[int], bot_task, max_new_tokens: int) -> tuple[list[int], str | None]:
        tok = self.tokenizer
        if bot_task not in ("think", "recaption", "think_recaption"):
            return prefix, None
        start = tok.convert_tokens_to_ids("<recaption>" if bot_task == "recaption" else "<think>")
        stops = [tok.convert_tokens_to_ids("</recaption>"), tok.convert_tokens_to_ids("</think>")]
        new = self._sample_text(prefix + [start], max_new_tokens, stops)
        return prefix + [start] + new, tok.decode(new)

    def _resolve_image_size(self, image_size, prefix: list[int]):
        if image_size == "auto":
            return f"<img_ratio_{self._predict_ratio(prefix)}>"
        return image_size

    # ---- generate_image (signature depends on the variant)
    @property
    def generate_image(self):
        if self._generate_image_override is not None:
            return self._generate_image_override
        return self._generate_image_instruct if self.is_instruct else self._generate_image_base

    @generate_image.setter
    def generate_image(self, fn) -> None:
        self._generate_image_override = fn

    @generate_image.deleter
    def generate_image(self) -> None:
        self._generate_image_override = None

    @torch.no_grad()
    def _generate_image_base(
        self,
        prompt,
        seed=None,
        image_size="auto",
        use_system_prompt=None,
        system_prompt=None,
        bot_task=None,
        stream=False,
        **kwargs,
    ):
        """Base: honours diff_infer_steps / diff_guidance_scale kwargs; returns one PIL image
        (a think / recaption text is generated but not returned, as in the official code)."""
        gen = self.generation_config
        steps = kwargs.get("diff_infer_steps") or gen.diff_infer_steps
        guidance = kwargs.get("diff_guidance_scale")
        guidance = gen.diff_guidance_scale if guidance is None else guidance
        prefix = self._prefix_ids(prompt, use_system_prompt, system_prompt)
        if bot_task in ("think", "recaption"):
            prefix, _ = self._cot(prefix, bot_task, int(kwargs.get("max_new_tokens", 8)))
        size = self._resolve_image_size(image_size, prefix)
        return self._run_diffusion(prefix, size, seed, steps, guidance)

    # ---- Instruct: reference images, the text stage through transformers' generate, the image stage
    def _instruct_mask(self, length: int, full_attn_slices, device) -> torch.Tensor:
        """Causal, with full attention inside each reference image (official cond_token_attn_type "full")."""
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        for start, stop in full_attn_slices or ():
            mask[start:stop, start:stop] = True
        return mask[None, None]

    def _system_prompt_text(self, use_system_prompt, system_prompt) -> str:
        if use_system_prompt in (None, False, "None", "none"):
            return ""
        if use_system_prompt == "custom":
            return system_prompt or ""
        return "You are a helpful image generator."  # stands in for the official en_* prompts

    def _instruct_row(self, prompt: str, system_prompt: str, conds: list, cot_text, tail: list[int], uncond: bool):
        """Token ids of one row: bos, system text, per reference image <boi><img_size><img_ratio><timestep>
        <img>*vae <joint_img_sep> <img>*vit <eoi>, the prompt, the think/recaption text, ``tail``. The
        unconditional CFG row has every text token replaced by <cfg> (same layout)."""
        tok = self.tokenizer
        ids: list[int] = [tok.bos_token_id]
        blocks: list[tuple[int, int, int, int]] = []  # (timestep pos, vae start, vae tokens, vit tokens)

        def text(value: str) -> None:
            enc = tok.encode(value)
            ids.extend([tok.cfg_token_id] * len(enc) if uncond else enc)

        if system_prompt:
            text(system_prompt)
        for cond in conds:
            vae, vit = cond.vae_image.i, cond.vit_image.i
            ids.extend([tok.boi_token_id, tok.size_token_id(vae.base_size), tok.ratio_token_id(vae.ratio_index),
                        tok.timestep_token_id])
            blocks.append((len(ids) - 1, len(ids), vae.image_token_length, vit.image_token_length))
            ids.extend([tok.img_token_id] * vae.image_token_length + [tok.joint_img_sep_token_id]
                       + [tok.img_token_id] * vit.image_token_length + [tok.eoi_token_id])
        text(prompt or "")
        if cot_text:
            text(cot_text[0] if isinstance(cot_text, (list, tuple)) else cot_text)
        return ids + list(tail), blocks

    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in -1..1 -> latents [B, C, H/16, W/16] (the mean; the official samples with the seed),
        shifted and scaled as the official vae_encode does (modeling_hunyuan_image_3.py:2412-2431)."""
        latents = self.vae.encode(image).latent_dist.mode()
        config = self.vae.config
        if getattr(config, "shift_factor", None):
            latents = latents - config.shift_factor
        if getattr(config, "scaling_factor", None):
            latents = latents * config.scaling_factor
        return latents.squeeze(2) if hasattr(self.vae, "ffactor_temporal") else latents

    def _forward_vision_encoder(self, images: torch.Tensor, **image_kwargs) -> torch.Tensor:
        return self.vision_aligner(self.vision_model(images, **image_kwargs).last_hidden_state)

    def _encode_cond_images(self, conds: list) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per reference image: VAE tokens (patch_embed of its latents at t=0), ViT tokens (vision_model +
        vision_aligner) and the embedding of its <timestep> token."""
        device, dtype = self.model.wte.weight.device, self._compute_dtype()
        p = int(self.config.patch_size)
        out = []
        for cond in conds:
            vae_image, vit_image = cond.vae_image, cond.vit_image
            th, tw = vae_image.i.token_height, vae_image.i.token_width
            latents = self.vae_encode(vae_image[None].to(device))[..., : th * p, : tw * p]
            t = torch.zeros(1, device=device)
            vae_tokens = self.patch_embed(latents.to(dtype), self.time_embed(t).to(dtype))[0]
            # The official code packs the SigLIP2 kwargs into a dict (modeling_hunyuan_image_3.py:2538-2553) and
            # passes it through to_device (:2831), which moves tensors and lists but returns a dict as it is
            # (:117-124): the pixel values reach the device, the attention mask stays on the CPU.
            kwargs = vit_image.vision_encoder_kwargs
            vit_kwargs = _to_device({"spatial_shapes": kwargs["spatial_shapes"][None],
                                     "attention_mask": kwargs["pixel_attention_mask"][None]}, device)
            vit_tokens = self._forward_vision_encoder(_to_device(vit_image[None], device), **vit_kwargs)[0]
            out.append((vae_tokens, vit_tokens, self.timestep_emb(t)[0]))
        return out

    def _embed_rows(self, rows: torch.Tensor, conds: list, blocks: list) -> torch.Tensor:
        embeds = self.model.wte(rows).clone()
        for (vae_tokens, vit_tokens, t_emb), (t_pos, start, n_vae, n_vit) in zip(self._encode_cond_images(conds), blocks):
            embeds[:, t_pos] = t_emb.to(embeds.dtype)
            embeds[:, start : start + n_vae] = vae_tokens.to(embeds.dtype)
            embeds[:, start + n_vae + 1 : start + n_vae + 1 + n_vit] = vit_tokens.to(embeds.dtype)
        return embeds

    def _stop_token_ids(self, bot_task: str, image_size) -> list[int]:
        """eos per text task, as the official prepare_model_inputs defines them."""
        tok = self.tokenizer
        auto_stops = tok.get_all_ratio_token_ids() if image_size == "auto" else [tok.boi_token_id]
        return {
            "think": [tok.end_of_think_token_id, tok.end_of_recaption_token_id],
            "recaption": [tok.end_of_recaption_token_id],
            "img_ratio": auto_stops,
        }.get(bot_task, [tok.eos_token_id] + auto_stops)

    @staticmethod
    def _check_images(image) -> list:
        images = [] if image is None else (list(image) if isinstance(image, (list, tuple)) else [image])
        for im in images:
            if not isinstance(im, (Image.Image, str, bytes)):
                raise AssertionError(
                    f"`image` should be a PIL Image, a string path, a base64 string, bytes, or a list of them, "
                    f"but got {type(im)}."
                )
        return images

    def prepare_model_inputs(self, prompt=None, image=None, mode="gen_text", system_prompt=None, cot_text=None,
                             image_size="auto", message_list=None, device=None, max_new_tokens=None, **kwargs):
        """Rows, their embeddings (reference images encoded here, once) and the stop tokens for one stage.
        gen_text: one row; gen_image: two CFG rows (one for cfg-distilled checkpoints)."""
        tok = self.tokenizer
        bot_task = kwargs.pop("bot_task", "auto")
        if prompt is None and message_list:
            prompt = str(message_list[-1].get("content", ""))
        conds = kwargs.get("batch_cond_images")
        if conds is None:
            images = self._check_images(image)
            conds = [self.image_processor.build_cond_images(
                image_list=images, infer_align_image_size=kwargs.get("infer_align_image_size", False))]
        gen_info = None
        if mode == "gen_image":
            gen_info = self.image_processor.build_gen_image_info(
                image_size, add_guidance_token=self.config.cfg_distilled, add_timestep_r_token=self.config.use_meanflow)
            tail = [tok.boi_token_id]
        else:
            base = self.image_processor.vae_reso_group.base_size
            tail = {"think": [tok.think_token_id], "recaption": [tok.recaption_token_id],
                    "img_ratio": [tok.boi_token_id, tok.size_token_id(base)]}.get(bot_task, [])
        ids, blocks = self._instruct_row(prompt, system_prompt, conds[0], cot_text, tail, uncond=False)
        # The whole sequence (with the generated image's tokens) must fit generation_config.max_length
        # (official tokenization_hunyuan_image_3.py:1448-1452).
        length = len(ids)
        if gen_info is not None:
            length += gen_info.token_height * gen_info.token_width + 4 + int(self.config.cfg_distilled) + int(
                self.config.use_meanflow)
        max_length = kwargs.get("max_length", getattr(self.generation_config, "max_length", None))
        if max_length is not None and length > max_length:
            raise ValueError(
                f"Encoded token length {length} exceeds max_length {max_length}.\n"
                "Please set a larger max_length or check the input messages."
            )
        rows = [ids]
        if mode == "gen_image" and not self.config.cfg_distilled:  # two CFG rows (official :2732)
            rows.append(self._instruct_row(prompt, system_prompt, conds[0], cot_text, tail, uncond=True)[0])
        dev = self.model.wte.weight.device
        input_ids = torch.tensor(rows, device=dev)
        seed = kwargs.get("seed")
        seed = random.randint(0, 10_000_000) if seed is None else int(seed)
        slices = [(start - 1, start + n_vae + 1 + n_vit) for _, start, n_vae, n_vit in blocks]
        text = {}
        if mode == "gen_text":
            # the KV cache of the text stage: prompt + max_new_tokens positions, dynamic (official M:2775-2786);
            # the prompt's positions, one row each (M:2788-2790); the per-row image layout the RoPE is keyed by
            # (the stand-in's RoPE is 1-D: the layout names the reference images' positions, not a 2-D grid)
            extra = max_new_tokens if max_new_tokens is not None else getattr(self.generation_config, "max_length", 0)
            text = dict(
                past_key_values=HunyuanStaticCache(config=self.config, max_batch_size=len(rows),
                                                   max_cache_len=len(ids) + int(extra), dtype=self.dtype,
                                                   dynamic=True),
                position_ids=torch.arange(len(ids), dtype=torch.long, device=dev)[None].expand(len(rows), -1),
                rope_image_info=[[slice(a, b) for a, b in slices] for _ in rows],
            )
        return dict(
            input_ids=input_ids,
            prefix_embeds=self._embed_rows(input_ids, conds[0], blocks),
            full_attn_slices=slices,
            **text,
            mode=mode,
            eos_token_id=None if mode == "gen_image" else self._stop_token_ids(bot_task, image_size),
            max_new_tokens=max_new_tokens,
            batch_cond_images=conds,
            batch_gen_image_info=[gen_info],
            generator=[torch.Generator("cpu").manual_seed(seed)],
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      prefix_embeds=None, full_attn_slices=None, **kwargs):
        """The official split (M:2872-2910): the prompt's forward takes the whole prompt; a decode step takes
        the ids at ``position_ids`` only (the token just sampled), with the cache and no mask."""
        position_ids = kwargs.get("position_ids")
        inputs = {"input_ids": input_ids, "prefix_embeds": prefix_embeds, "full_attn_slices": full_attn_slices}
        if past_key_values is not None:
            if position_ids is None:
                raise ValueError("position_ids must be given with past_key_values")
            if input_ids.shape[1] != position_ids.shape[1]:  # a decode step
                inputs["input_ids"] = torch.gather(input_ids, 1, position_ids)
        inputs.update(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                      rope_image_info=kwargs.get("rope_image_info"), mode=kwargs.get("mode", "gen_text"))
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        """After each forward, as the official one (M:2912-2990, gen_text): the cache under the first name
        transformers gives the outputs' cache; after the prompt's forward the next position (the official
        ``real_pos``: no padding here, so the prompt's length), after a decode step ``position_ids + 1``; no
        mask, no prompt embeddings. Only these keys go on to the next forward."""
        from transformers.generation.utils import ALL_CACHE_NAMES

        updated = {"mode": model_kwargs.get("mode", "gen_text"), "rope_image_info": model_kwargs.get("rope_image_info")}
        for name in ALL_CACHE_NAMES:
            if name in outputs:
                updated["past_key_values" if name in ("past_buckets_states", "mems") else name] = outputs[name]
                break
        position_ids = model_kwargs["position_ids"]
        if "prefix_embeds" in model_kwargs:  # after the prompt's forward
            updated["position_ids"] = position_ids[:, -1:] + 1
        else:
            updated["position_ids"] = position_ids + 1
        return updated

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
                 stage_transitions=None, final_stop_tokens=None, decode_text=False, **kwargs):
        """gen_text: transformers' generate (sampling on the global RNG; the prompt's forward, then one forward
        per new token with the KV cache that prepare_model_inputs built), with
        the caller's ``logits_processor`` / ``stopping_criteria`` and the stage transitions; gen_image: the
        diffusion pipeline (logits processors and stopping criteria do not apply)."""
        from transformers import LogitsProcessorList

        mode = kwargs.pop("mode", "gen_text")
        if mode == "gen_image":
            return self._generate_images(**kwargs)
        for key in ("batch_cond_images", "batch_gen_image_info", "generator", "seed"):
            kwargs.pop(key, None)
        processors = LogitsProcessorList(logits_processor or [])
        if stage_transitions is not None:
            if final_stop_tokens is None:
                raise ValueError("`final_stop_tokens` must be provided when `stage_transitions` is set.")
            processors.append(_StageTransitions(stage_transitions, kwargs["input_ids"].shape[0]))
            kwargs["eos_token_id"] = final_stop_tokens
        out = super().generate(inputs=inputs, generation_config=generation_config or self.generation_config,
                               logits_processor=processors, stopping_criteria=stopping_criteria, **kwargs)
        if decode_text:
            return [self.tokenizer.decode(row[kwargs["input_ids"].shape[1]:]) for row in out]
        return out

    def _generate_images(self, input_ids, prefix_embeds, full_attn_slices, batch_gen_image_info, generator, **_):
        info = batch_gen_image_info[0]
        gen = self.generation_config
        pixels = self.pipeline(
            batch_size=1,
            image_size=(info.image_height, info.image_width),
            num_inference_steps=int(gen.diff_infer_steps),
            guidance_scale=float(gen.diff_guidance_scale),
            generator=generator[0],
            model_kwargs={"input_ids": input_ids, "inputs_embeds": prefix_embeds, "full_attn_slices": full_attn_slices},
            cfg_distilled=bool(self.config.cfg_distilled),
        )
        arr = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(np.ascontiguousarray(arr.permute(1, 2, 0).cpu().numpy()), mode="RGB")]

    def _ratio_index(self, token_id: int) -> int:
        ids = self.tokenizer.get_all_ratio_token_ids()
        if token_id not in ids:
            raise ValueError(f"Unknown ratio token id {token_id}")
        return ids.index(token_id)

    @torch.no_grad()
    def _generate_image_instruct(
        self,
        prompt=None,
        image=None,
        message_list=None,
        seed=None,
        image_size="auto",
        use_system_prompt=None,
        system_prompt=None,
        bot_task=None,
        infer_align_image_size=False,
        use_taylor_cache=False,
        taylor_cache_interval=None,
        taylor_cache_order=None,
        taylor_cache_enable_first_enhance=None,
        taylor_cache_first_enhance_steps=None,
        taylor_cache_enable_tailing_enhance=None,
        taylor_cache_tailing_enhance_steps=None,
        taylor_cache_low_freqs_order=None,
        taylor_cache_high_freqs_order=None,
        **kwargs,
    ):
        """Instruct/Distil: returns (cot_text list or None, [PIL images]), with the official control flow
        (modeling_hunyuan_image_3.py generate_image): ``image`` is a PIL image, a path or a list of them
        (1 = edit, 2+ = fusion); ``bot_task`` image | auto | think | recaption | think_recaption (default:
        generation_config.bot_task); ``max_new_tokens`` (default 2048) bounds the text stage; every other
        kwarg (e.g. ``stopping_criteria``) goes to ``self.generate``. Steps / guidance come from
        generation_config only (the real code's behaviour). The official Taylor cache switch and its
        settings (modeling_hunyuan_image_3.py:3234-3242, off by default) are accepted; the stand-in has no
        cache of its own (the pack's step_cache entry is the cache), so turning it on is an error here."""
        if use_taylor_cache:
            raise NotImplementedError("the test checkpoint has no built-in Taylor cache: use the step_cache option")
        max_new_tokens = kwargs.pop("max_new_tokens", 2048)
        cot_text = kwargs.pop("cot_text", None)
        gen = self.generation_config
        bot_task = bot_task if bot_task is not None else getattr(gen, "bot_task", "image")
        use_system_prompt = use_system_prompt if use_system_prompt is not None else getattr(gen, "use_system_prompt", None)
        system_prompt = self._system_prompt_text(use_system_prompt, system_prompt)
        tok = self.tokenizer
        common = dict(prompt=prompt, image=image, message_list=message_list, system_prompt=system_prompt,
                      infer_align_image_size=infer_align_image_size)
        conds = None
        need_ratio = image_size == "auto"
        if bot_task in ("think", "recaption", "think_recaption"):
            first = bot_task.split("_")[0]
            transitions = []
            if first == "think" and "recaption" in bot_task:
                transitions.append((tok.end_of_think_token_id, [tok.recaption_token_id]))
            processors = None
            if need_ratio:
                base = self.image_processor.vae_reso_group.base_size
                answer = [tok.answer_token_id] if getattr(gen, "sequence_template", "pretrain") == "instruct" else []
                trigger = tok.end_of_recaption_token_id if "recaption" in bot_task else tok.end_of_think_token_id
                transitions.append((trigger, answer + [tok.boi_token_id, tok.size_token_id(base)]))
                final_stops = tok.get_all_ratio_token_ids()
                processors = [_RatioAfterSizeToken([tok.size_token_id(base)], tok.get_all_ratio_token_ids())]
            else:
                final_stops = ([tok.end_of_recaption_token_id] if "recaption" in bot_task
                               else [tok.end_of_think_token_id, tok.end_of_recaption_token_id])
            inputs = self.prepare_model_inputs(mode="gen_text", bot_task=first, max_new_tokens=max_new_tokens,
                                               **common)
            conds = inputs["batch_cond_images"]
            n_in = inputs["input_ids"].shape[1]
            if transitions:
                outputs = self.generate(**inputs, stage_transitions=transitions, final_stop_tokens=final_stops,
                                        logits_processor=processors, **kwargs)
            else:
                outputs = self.generate(**inputs, logits_processor=processors, **kwargs)
            new = outputs[0, n_in:].tolist()
            end_id = tok.end_of_recaption_token_id if "recaption" in bot_task else tok.end_of_think_token_id
            new = new[: new.index(end_id) + 1] if end_id in new else new
            cot_text = [(tok.think_token if first == "think" else tok.recaption_token) + tok.decode(new)]
            if getattr(gen, "drop_think", False) and tok.recaption_token in cot_text[0]:
                kept = cot_text[0].split(tok.recaption_token, 1)[1].split(tok.end_of_recaption_token)[0]
                cot_text = [tok.recaption_token + kept + tok.end_of_recaption_token]
            if need_ratio:
                res = self.image_processor.vae_reso_group[self._ratio_index(int(outputs[0, -1]))]
                image_size = (res.height, res.width)
        elif need_ratio:
            inputs = self.prepare_model_inputs(mode="gen_text", bot_task="img_ratio", cot_text=cot_text,
                                               max_new_tokens=1, seed=seed, **common)
            conds = inputs["batch_cond_images"]
            ratios = tok.get_all_ratio_token_ids()
            outputs = self.generate(**inputs, do_sample=False, logits_processor=[_OnlyTokens(ratios)], **kwargs)
            res = self.image_processor.vae_reso_group[self._ratio_index(int(outputs[0, -1]))]
            image_size = (res.height, res.width)
        inputs = self.prepare_model_inputs(mode="gen_image", cot_text=cot_text, seed=seed, image_size=image_size,
                                           batch_cond_images=conds, **common)
        images = self.generate(**inputs, **kwargs)
        self.image_processor.postprocess_outputs(images, batch_cond_images=inputs["batch_cond_images"],
                                                 infer_align_image_size=infer_align_image_size)
        return cot_text, images


# --------------------------------------------------------------------------- text-stage logits processors
class _StageTransitions(LogitsProcessor):
    """After a trigger token, force its listed tokens one by one (each trigger fires once per row):
    the official _StageTransitionLogitsProcessor's behaviour (</think> -> <recaption>, ...)."""

    def __init__(self, transitions, batch_size: int) -> None:
        self.transitions = {int(k): [int(t) for t in v] for k, v in transitions}
        self.pending: list[list[int]] = [[] for _ in range(batch_size)]
        self.fired: list[set[int]] = [set() for _ in range(batch_size)]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        low = torch.finfo(scores.dtype).min
        for row in range(input_ids.shape[0]):
            last, queue = int(input_ids[row, -1]), self.pending[row]
            if queue and last == queue[0]:
                queue.pop(0)
            if not queue and last in self.transitions and last not in self.fired[row]:
                self.fired[row].add(last)
                queue.extend(self.transitions[last])
            if queue:
                scores[row].fill_(low)
                scores[row, queue[0]] = 0
        return scores


class _RatioAfterSizeToken(LogitsProcessor):
    """After <img_size_*>, only the ratio tokens, greedily (the official conditional slice processor)."""

    def __init__(self, trigger_ids: list[int], allowed: list[int]) -> None:
        self.trigger_ids, self.allowed = set(trigger_ids), torch.tensor(allowed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        allowed = self.allowed.to(scores.device)
        for row in range(input_ids.shape[0]):
            if int(input_ids[row, -1]) in self.trigger_ids:
                best = allowed[int(torch.argmax(scores[row, allowed]))]
                scores[row].fill_(torch.finfo(scores.dtype).min)
                scores[row, best] = 0
        return scores


class _OnlyTokens(LogitsProcessor):
    """Only ``allowed`` tokens can come next (the ratio prediction of image_size="auto")."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = torch.tensor(allowed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        keep = torch.full_like(scores, torch.finfo(scores.dtype).min)
        idx = self.allowed.to(scores.device)
        keep[:, idx] = scores[:, idx]
        return keep

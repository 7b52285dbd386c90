"""Inference VRAM estimate (activations, not weights) for one image.

``reference``: the field formula 12 x MP^1.4 GB, which reflects the reference GShard MoE
dispatch whose ``[tokens, experts, capacity]`` tensors grow with tokens^2.

``gather_scatter``: derived from the model config. Peak of one decoder layer
(attention with its 4D mask, or the MoE expert loop, whichever is larger) plus the
residual stream, or the VAE decode if larger, times ``CALIBRATION`` plus ``OVERHEAD_GB``.
Calibration (``bench/moe.py`` on an H200, one real-size MoE layer incl. the shared
expert, bf16, float32 router): gather/scatter peak 0.27 / 0.54 / 0.99 GiB at 8,448 /
16,640 / 30,496 tokens with a near-uniform router (~33.5 KiB per token) and 0.45 GiB
at 8,448 tokens with a router that sends every token to one expert (56.1 KiB per token,
the worst case). This model's MoE term is ~51.7 KB per token for the real config
(``SKEW_ALLOWANCE`` 2), x ``CALIBRATION`` 1.3 = ~67 KB, which covers the worst
measured case; the residual stream (~24 KB per token) comes on top. ``OVERHEAD_GB``
is the CUDA context and cuBLAS workspace.

Beside the transient peak, what lives through the whole generation, exactly as the official code
allocates it (no calibration): the KV cache (``kv_cache_bytes``: keys and values of every token of
every CFG row in every layer, 128 KiB per token for the real model: ~1 GiB at 1 MP; it is still held
while the VAE decodes) and the 2D RoPE tables (``rope_bytes``: cos and sin over every position, per row).
With the step cache on (``step_cache_order``), its differences are held through the steps and its
frequency split after a full step briefly needs several float32 / complex copies of the decoder's
output (``step_cache_bytes``).

Reference images (Instruct edit / fusion) and the think / recaption text lengthen every
sequence: ``extra_tokens`` per CFG half (``reference_image_tokens`` counts the images: VAE
tokens at the size the model snaps each image to, its ViT tokens, 6 special tokens) enter the
token count, and both CFG halves carry them (official modeling_hunyuan_image_3.py
_encode_cond_image repeats the condition images cfg_factor times). The reference formula scales
its megapixels by the same token ratio.
"""

from __future__ import annotations

import math
from typing import Any

from ..hunyuan_loader.core.units import GIB

TEXT_TOKENS_PER_HALF = 128  # prompt + special tokens per CFG half (8,448 tokens at 1 MP)
CALIBRATION = 1.3
OVERHEAD_GB = 0.5  # CUDA context, cuBLAS workspace
VAE_BYTES_PER_PIXEL = 1536  # ~128 float32 channels x 3 live tensors at full resolution
SKEW_ALLOWANCE = 2.0  # busiest expert gets this many times the uniform share
# Per reference image: <boi> <img_size> <img_ratio> <timestep> ... <joint_img_sep> ... <eoi>
# (official tokenization_hunyuan_image_3.py encode_sequence, cond_joint_image).
SPECIAL_TOKENS_PER_REFERENCE_IMAGE = 6

REAL_DEFAULTS: dict[str, Any] = {
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "attention_head_dim": 128,
    "num_experts": 64,
    "moe_topk": 8,
    "moe_intermediate_size": 3072,
    "intermediate_size": 3072,
    "vae_downsample_factor": [16, 16],
    "patch_size": 1,
    "num_hidden_layers": 32,
    "max_position_embeddings": 22800,
}


def _get(config: Any, name: str) -> Any:
    if config is None:
        value = None
    elif isinstance(config, dict):
        value = config.get(name)
    else:
        value = getattr(config, name, None)
    if value is None:
        value = REAL_DEFAULTS[name]
    if isinstance(value, (list, tuple)) and name != "vae_downsample_factor":
        value = max(value)
    return value


def config_value(config: Any, name: str) -> Any:
    """A model config field (dict, config object or None), the released model's value where absent."""
    return _get(config, name)


def megapixels(width: int, height: int) -> float:
    return width * height / 1e6


def reference_inference_gb(megapixels: float) -> float:
    """Field formula for the reference eager MoE: 12 x MP^1.4 GB."""
    return 12.0 * max(megapixels, 0.0) ** 1.4


def tokens_for_image(config: Any, width: int, height: int, cfg: bool = True, extra_tokens: int = 0) -> int:
    """Tokens in one transformer forward: image patches + text + ``extra_tokens`` (reference images,
    think / recaption text), both CFG halves if ``cfg``."""
    factor = _get(config, "vae_downsample_factor")
    fh, fw = (factor[0], factor[-1]) if isinstance(factor, (list, tuple)) else (factor, factor)
    p = int(_get(config, "patch_size"))
    patches = math.ceil(height / fh / p) * math.ceil(width / fw / p)
    return (patches + TEXT_TOKENS_PER_HALF + int(extra_tokens)) * (2 if cfg else 1)


def reference_image_tokens(
    sizes: list[tuple[int, int]], *, vae_factors: tuple[int, int], vit_tokens: int
) -> int:
    """Tokens the reference images add to one sequence (one CFG half): per image, VAE tokens at its
    snapped (width, height) (size // the VAE factor x patch size, ``vae_factors`` = (h, w)), the ViT's
    ``vit_tokens`` (its processor's max_num_patches: every image is padded to it) and the special tokens."""
    fh, fw = vae_factors
    return sum((h // fh) * (w // fw) + int(vit_tokens) + SPECIAL_TOKENS_PER_REFERENCE_IMAGE for w, h in sizes)


def kv_cache_bytes(config: Any, tokens: int) -> float:
    """The official KV cache for ``tokens`` (all rows): ``HunyuanStaticCache`` holds keys and values of
    every token in every layer, in the model's dtype (bf16), for the whole generation. Image stage:
    max_cache_len = the sequence, max_batch_size = batch x cfg_factor (Instruct
    modeling_hunyuan_image_3.py:2773-2785; base hunyuan.py:2318-2331). The text stage's cache (one row,
    the prompt + max_new_tokens, M:2778) is shorter than the image stage's, which carries that text too."""
    layers = int(_get(config, "num_hidden_layers"))
    kv, d = int(_get(config, "num_key_value_heads")), int(_get(config, "attention_head_dim"))
    return layers * 2 * kv * d * tokens * 2


def rope_bytes(config: Any, rows: int) -> float:
    """The 2D RoPE tables: cos and sin (float32) over every position, per row. Instruct builds them over
    ``max_position_embeddings`` and keeps them (M:2146-2150, CachedRoPE M:973); base over the sequence
    (hunyuan.py:2306-2316): the Instruct size bounds both."""
    return rows * int(_get(config, "max_position_embeddings")) * int(_get(config, "attention_head_dim")) * 4 * 2


FFT_BYTES_PER_ELEMENT = 40  # step cache's split: float32 input, complex spectrum, two masked inverse FFTs, outputs


def step_cache_bytes(config: Any, tokens: int, order: int) -> tuple[float, float]:
    """(held, during the update) for the step cache of ``order`` over ``tokens`` decoder outputs (all rows):
    held: the low and high parts' differences up to ``order`` and the last full step's output, in bf16
    (hooks/step_cache.py TaylorState, after the official cache_utils.py:204-222); during the update after a
    full step, beside the held ones, first the frequency split's temporaries (split_frequencies, official
    cache_utils.py:100-140), then the new differences (freed only as the old are replaced)."""
    h = int(_get(config, "hidden_size"))
    held = (2 * (order + 1) + 1) * tokens * h * 2
    return held, held + max(FFT_BYTES_PER_ELEMENT * tokens * h, held)


def _layer_peak_bytes(config: Any, tokens: int, batch: int) -> float:
    h = int(_get(config, "hidden_size"))
    heads, kv, d = (int(_get(config, n)) for n in ("num_attention_heads", "num_key_value_heads", "attention_head_dim"))
    experts, k = int(_get(config, "num_experts")), int(_get(config, "moe_topk"))
    width = int(_get(config, "moe_intermediate_size"))
    shared = int(_get(config, "intermediate_size"))
    residual = 3 * tokens * h * 2  # hidden, residual, normed (bf16)
    seq = tokens / batch
    attention = tokens * (heads + 2 * kv) * d * 2 + 2 * tokens * heads * d * 2 + batch * seq * seq * 2
    share = min(1.0, SKEW_ALLOWANCE * k / experts)
    moe = (
        tokens * h * (4 + 2)  # float32 accumulator + bf16 output
        + tokens * experts * 4 * 2  # router logits + softmax (float32)
        + tokens * k * 16  # top-k ids, weights, sort order
        + share * tokens * (2 * h + 3 * width) * 2  # busiest expert: input, gate_up, act, out
        + tokens * 3 * shared * 2  # shared expert
    )
    return residual + max(attention, moe)


def estimate_inference_gb(
    width: int,
    height: int,
    *,
    config: Any = None,
    moe_impl: str = "reference",
    cfg: bool = True,
    extra_tokens: int = 0,
    step_cache_order: int | None = None,
) -> float:
    """Inference VRAM (GB, activations) for a width x height image, with ``extra_tokens`` more per
    CFG half (reference images, think / recaption text) and, with ``step_cache_order``, the step cache."""
    if moe_impl == "reference":
        scale = 1.0
        if extra_tokens:
            scale = tokens_for_image(config, width, height, cfg, extra_tokens) / tokens_for_image(
                config, width, height, cfg
            )
        return reference_inference_gb(megapixels(width, height) * scale)
    if moe_impl != "gather_scatter":
        raise ValueError(f"moe_impl must be 'reference' or 'gather_scatter', got {moe_impl!r}")
    rows = 2 if cfg else 1
    tokens = tokens_for_image(config, width, height, cfg=cfg, extra_tokens=extra_tokens)
    layer = _layer_peak_bytes(config, tokens, rows)
    vae = width * height * VAE_BYTES_PER_PIXEL
    held = kv_cache_bytes(config, tokens) + rope_bytes(config, rows)
    peak = max(layer, vae) * CALIBRATION
    if step_cache_order is not None:  # its differences live through the steps (dropped before the decode)
        cache_held, cache_update = step_cache_bytes(config, tokens, step_cache_order)
        peak = max(layer * CALIBRATION + cache_held, vae * CALIBRATION, cache_update)
    return peak / GIB + held / GIB + OVERHEAD_GB

"""VRAM estimator: reference formula, token counts, config-derived gather/scatter estimate."""

from __future__ import annotations

import pytest

from hunyuan_image3.memory import estimator as est


def test_reference_formula() -> None:
    assert est.reference_inference_gb(1.0) == pytest.approx(12.0)
    assert est.reference_inference_gb(2.0) == pytest.approx(12.0 * 2**1.4)
    assert est.reference_inference_gb(0.0) == 0.0
    assert est.megapixels(1000, 1000) == 1.0
    assert est.estimate_inference_gb(1024, 1024) == pytest.approx(est.reference_inference_gb(1024 * 1024 / 1e6))


def test_tokens_match_the_measured_cfg_counts() -> None:
    assert est.tokens_for_image(None, 1024, 1024) == 8448
    assert est.tokens_for_image(None, 1024, 1024, cfg=False) == 4224
    test_cfg = {"patch_size": 4, "vae_downsample_factor": [16, 16]}
    assert est.tokens_for_image(test_cfg, 1280, 1280) == 2 * (400 + est.TEXT_TOKENS_PER_HALF)


class _Cfg:
    hidden_size = 4096
    num_attention_heads = 32
    num_key_value_heads = 8
    attention_head_dim = 128
    num_experts = 64
    moe_topk = [8] * 32
    moe_intermediate_size = [3072] * 32
    intermediate_size = 3072
    vae_downsample_factor = [16, 16]
    patch_size = 1


@pytest.mark.parametrize("config", [None, _Cfg()])
def test_gather_scatter_is_sensible_for_the_real_config(config) -> None:
    sizes = [(1024, 1024), (1408, 1408), (1920, 1920), (2048, 2048)]
    gs = [est.estimate_inference_gb(w, h, config=config, moe_impl="gather_scatter") for w, h in sizes]
    ref = [est.estimate_inference_gb(w, h, moe_impl="reference") for w, h in sizes]
    assert gs == sorted(gs)
    assert 1.0 < gs[0] < 6.0 and gs[-1] < 16.0
    assert all(g < r for g, r in zip(gs, ref))
    assert ref[-1] / gs[-1] > 5


def test_moe_part_agrees_with_the_measured_calibration() -> None:
    """MoE working set per token within 2x of the H200 measurement (0.21 GiB at 8,448 tokens)."""
    layer = est._layer_peak_bytes(None, 8448, 2)
    assert 0.1 * est.GIB < layer < 1.5 * est.GIB


def test_bad_impl() -> None:
    with pytest.raises(ValueError):
        est.estimate_inference_gb(1024, 1024, moe_impl="flashinfer")


@pytest.mark.parametrize("rows,length", [(2, 10), (1, 7)])
def test_kv_cache_is_what_the_official_cache_allocates(rows: int, length: int) -> None:
    """The official HunyuanStaticCache is a transformers StaticCache (modeling_hunyuan_image_3.py:895) made
    with max_cache_len = the sequence and one row per CFG half (M:2779-2785); its layers allocate keys and
    values of that many positions on the first update, in the model's dtype."""
    import torch
    from transformers import PretrainedConfig
    from transformers.cache_utils import StaticCache

    ours = {"num_hidden_layers": 3, "num_key_value_heads": 2, "attention_head_dim": 4}
    config = PretrainedConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=16,
                              head_dim=4)
    cache = StaticCache(config=config, max_batch_size=rows, max_cache_len=length, dtype=torch.bfloat16)
    for layer in range(3):
        k = torch.zeros(rows, 2, 1, 4, dtype=torch.bfloat16)
        cache.update(k, k, layer, {"cache_position": torch.tensor([0])})
    allocated = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert est.kv_cache_bytes(ours, rows * length) == allocated


def test_the_plan_holds_the_kv_cache_and_rope_beside_the_layer_peak() -> None:
    tokens = est.tokens_for_image(None, 1024, 1024)
    held = est.kv_cache_bytes(None, tokens) + est.rope_bytes(None, 2)
    layer = est._layer_peak_bytes(None, tokens, 2)
    vae = 1024 * 1024 * est.VAE_BYTES_PER_PIXEL
    expected = max(layer, vae) * est.CALIBRATION / est.GIB + held / est.GIB + est.OVERHEAD_GB
    assert est.estimate_inference_gb(1024, 1024, moe_impl="gather_scatter") == pytest.approx(expected)
    assert 0.9 < est.kv_cache_bytes(None, tokens) / est.GIB < 1.2  # 128 KiB per token for the real model
    longer = est.estimate_inference_gb(1024, 1024, moe_impl="gather_scatter", extra_tokens=1000)
    grown = longer - est.estimate_inference_gb(1024, 1024, moe_impl="gather_scatter")
    assert grown >= est.kv_cache_bytes(None, 2000) / est.GIB - 1e-9  # think text / references: both rows' caches


def test_the_step_cache_adds_its_differences_and_its_frequency_split() -> None:
    """hooks/step_cache.py holds low and high differences up to the order (+ the last output) in bf16; the
    split after a full step needs ~40 bytes per output element (float32 input, complex spectrum, inverse
    FFTs): ~1 GB at 1 MP, as the H200 run of the step cache bench saw."""
    tokens = est.tokens_for_image(None, 1024, 1024)
    held, update = est.step_cache_bytes(None, tokens, 2)
    assert held == pytest.approx((2 * 3 + 1) * tokens * 4096 * 2)
    assert 0.9 < (update - held) / est.GIB < 1.5
    layer = est._layer_peak_bytes(None, tokens, 2) * est.CALIBRATION
    vae = 1024 * 1024 * est.VAE_BYTES_PER_PIXEL * est.CALIBRATION
    kept = est.kv_cache_bytes(None, tokens) + est.rope_bytes(None, 2)
    for order in (2, 4):
        held, update = est.step_cache_bytes(None, tokens, order)
        expected = (max(layer + held, vae, update) + kept) / est.GIB + est.OVERHEAD_GB
        assert est.estimate_inference_gb(1024, 1024, moe_impl="gather_scatter", step_cache_order=order) == (
            pytest.approx(expected))
    off = est.estimate_inference_gb(1024, 1024, moe_impl="gather_scatter")
    on = [est.estimate_inference_gb(1024, 1024, moe_impl="gather_scatter", step_cache_order=o) for o in (2, 4)]
    assert off <= on[0] < on[1]  # the VAE decode may still be the larger peak; more differences kept count

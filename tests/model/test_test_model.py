"""The tiny HunyuanImage-3.0 test checkpoint: build, load (bf16/int8/nf4), generate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_model import load_test_model

from hunyuan_image3.hunyuan_loader.model.resolution import model_buckets, resolution_buckets, snap_to_bucket
from hunyuan_image3.hunyuan_loader.test_model import make_test_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _count_steps(model) -> list[int]:
    calls: list[int] = []
    sched = model.pipeline.scheduler
    orig = sched.step

    def step(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    sched.step = step
    return calls


def test_build_is_fast_sharded_and_deterministic(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    a = make_test_model(tmp_path / "ck_a", "base", seed=3)
    assert time.perf_counter() - t0 < 20
    b = make_test_model(tmp_path / "ck_b", "base", seed=3)
    index = json.loads((a / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    for shard in shards:
        assert (a / shard).read_bytes() == (b / shard).read_bytes()
    assert sum(p.stat().st_size for p in a.iterdir()) < 8 * 2**20
    names = set(index["weight_map"])
    for key in (
        "model.wte.weight", "model.ln_f.weight", "lm_head.weight",
        "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.query_layernorm.weight",
        "model.layers.3.mlp.gate.wg.weight", "model.layers.0.mlp.experts.7.gate_and_up_proj.weight",
        "model.layers.0.mlp.shared_mlp.down_proj.weight",
    ):
        assert key in names
    for prefix in ("vae.encoder.", "vae.decoder.", "vision_model.", "vision_aligner.", "patch_embed.",
                   "final_layer.", "time_embed.", "time_embed_2.", "timestep_emb."):
        assert any(n.startswith(prefix) for n in names), prefix
    with pytest.raises(FileExistsError):
        make_test_model(a, "base")
    make_test_model(a, "instruct", overwrite=True)
    assert (a / "modeling_hunyuan_image_3.py").exists() and not (a / "hunyuan.py").exists()


@pytest.mark.parametrize("variant", ["base", "instruct", "distil"])
def test_config_tells_variants_apart(tmp_path: Path, variant: str) -> None:
    path = make_test_model(tmp_path / f"v_{variant}", variant)
    cfg = json.loads((path / "config.json").read_text())
    gen = json.loads((path / "generation_config.json").read_text())
    assert cfg["model_type"] == "hunyuan_image_3_moe"
    assert cfg["architectures"] == ["HunyuanImage3ForCausalMM"]
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is False
    assert cfg["_no_split_modules"] == ["HunyuanImage3DecoderLayer"] and cfg["moe_impl"] == "eager"
    modeling = cfg["auto_map"]["AutoModelForCausalLM"].split(".")[0]
    assert (path / f"{modeling}.py").exists()
    if variant == "base":
        assert modeling == "hunyuan" and (path / "tokenizer_wrapper.py").exists()
        assert gen["diff_infer_steps"] == 50
    else:
        assert modeling == "modeling_hunyuan_image_3" and (path / "tokenization_hunyuan_image_3.py").exists()
        assert "Instruct" in cfg["model_version"]
    assert cfg["cfg_distilled"] is (variant == "distil")
    if variant == "distil":
        assert (gen["diff_infer_steps"], gen["diff_guidance_scale"], gen["flow_shift"]) == (8, 2.5, 3.0)
    src = (path / f"{modeling}.py").read_text()
    assert "hunyuan_image3" not in src and "hunyuan_loader" not in src


def test_bf16_load_module_tree_and_base_generation(base_checkpoint: Path) -> None:
    model = load_test_model(base_checkpoint)
    layers = model.model.layers
    assert isinstance(layers, torch.nn.ModuleList)
    assert all(type(layer).__name__ == "HunyuanImage3DecoderLayer" for layer in layers)
    mlp = layers[0].mlp
    assert mlp.gate.wg.weight.dtype == torch.float32
    assert mlp.experts[0].gate_and_up_proj.weight.dtype == torch.bfloat16
    assert model.vae.decoder.conv_in.weight.dtype == torch.bfloat16  # from_pretrained(dtype=bf16), as official
    buckets = resolution_buckets("base")
    assert model_buckets(model) == buckets

    calls = _count_steps(model)
    img = model.generate_image("a red fox", seed=7, image_size="1024x768", diff_infer_steps=3)
    assert img.mode == "RGB" and img.size == snap_to_bucket(768, 1024, buckets) == (896, 1152)  # no 3:4 on base
    assert len(calls) == 3
    again = model.generate_image("a red fox", seed=7, image_size="1024x768", diff_infer_steps=3)
    assert np.array_equal(np.asarray(img), np.asarray(again))
    other = model.generate_image("a red fox", seed=8, image_size="1024x768", diff_infer_steps=3)
    assert not np.array_equal(np.asarray(img), np.asarray(other))
    calls.clear()
    model.generate_image("x", seed=1, image_size="<img_ratio_0>", diff_infer_steps=2)
    assert len(calls) == 2
    auto = model.generate_image("x", seed=1, image_size="auto", diff_infer_steps=1)
    assert auto.size in buckets
    # base reads "H:W" (official base image_processor.py:67-68)
    assert model.generate_image("x", seed=1, image_size="9:16", diff_infer_steps=1).size == snap_to_bucket(
        16, 9, buckets
    )
    assert model.generate_image("x", seed=1, image_size="1280x1280", diff_infer_steps=1).size == (1024, 1024)


def test_scheduler_exception_propagates(base_checkpoint: Path) -> None:
    model = load_test_model(base_checkpoint)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("cancel")

    model.pipeline.scheduler.step = boom
    with pytest.raises(KeyboardInterrupt):
        model.generate_image("x", seed=1, image_size="512x512", diff_infer_steps=2)


def test_2048_generates_in_a_few_seconds(distil_checkpoint: Path) -> None:
    model = load_test_model(distil_checkpoint)
    t0 = time.perf_counter()
    cot, images = model.generate_image(prompt="p", seed=1, image_size="2048x512")
    assert cot is None and images[0].size == (512, 2048)
    assert time.perf_counter() - t0 < 30


def test_instruct_ignores_kwargs_and_thinks(instruct_checkpoint: Path) -> None:
    model = load_test_model(instruct_checkpoint)
    model.generation_config.diff_infer_steps = 2
    calls = _count_steps(model)
    cot, images = model.generate_image(prompt="a cat", seed=3, image_size="512x512", diff_infer_steps=9,
                                       diff_guidance_scale=1.0)
    assert cot is None and len(images) == 1 and images[0].size == (1024, 1024)  # snapped to 1:1
    assert len(calls) == 2
    calls.clear()
    cot, images = model.generate_image(prompt="a cat", seed=3, image_size="512x512", bot_task="think",
                                       )
    assert isinstance(cot, list) and isinstance(cot[0], str) and len(calls) == 2
    # flow_shift is read when the pipeline is built
    model.generation_config.flow_shift = 7.0
    assert model.pipeline.scheduler.shift == 3.0
    model._pipeline = None
    assert model.pipeline.scheduler.shift == 7.0


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_loads(base_checkpoint: Path, quant: str) -> None:
    import bitsandbytes as bnb

    model = load_test_model(base_checkpoint, quant)
    mlp = model.model.layers[1].mlp
    qtype = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    assert isinstance(mlp.experts[0].gate_and_up_proj, qtype)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, qtype)
    for mod in (mlp.gate.wg, mlp.shared_mlp.down_proj, model.lm_head):
        assert type(mod) is torch.nn.Linear
    # transformers 4.57 casts it under bnb (the pack restores it); 5.x keeps the float32 the model created
    from hunyuan_image3.hunyuan_loader.core import hf_compat

    assert mlp.gate.wg.weight.dtype == (torch.float32 if hf_compat.is_v5() else torch.bfloat16)
    calls = _count_steps(model)
    img = model.generate_image("q", seed=2, image_size="512x512", diff_infer_steps=2)
    assert img.size == (1024, 1024) and len(calls) == 2


def test_pack_buckets_follow_the_official_walk() -> None:
    """The pack's pre-load copy of the bucket math (the model's image processor is the judge at run
    time: tests/model/test_model_interface.py compares the two per variant)."""
    base, instruct = resolution_buckets("base"), resolution_buckets("instruct")
    assert len(base) == 33 and len(instruct) == 37 and instruct[:33] == [
        (w - w % 16, h - h % 16) for w, h in base
    ]
    assert instruct[33:] == [(768, 1024), (720, 1280), (1024, 768), (1280, 720)]  # appended as HxW
    ratios = [h / w for w, h in base]
    assert ratios == sorted(ratios) and base[16] == (1024, 1024)
    assert base[0] == (2048, 512) and base[-1] == (512, 2048)
    assert snap_to_bucket(1920, 1080, instruct) == (1280, 720)
    assert snap_to_bucket(1920, 1080, base) == (1280, 768)
    assert all(512 <= min(w, h) and max(w, h) <= 2048 for w, h in instruct)

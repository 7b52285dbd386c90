"""The stand-in behaves like the OFFICIAL HunyuanImage-3.0 code wherever the pack touches it.

Each test pins one interface and cites where the official code does it. Official files:
M = modeling_hunyuan_image_3.py, P = hunyuan_image_3_pipeline.py, IP = image_processor.py
(Instruct / Instruct-Distil, suryatmodulus/HunyuanImage-3.0 @1ea1526); H = hunyuan.py and
base IP = image_processor.py, TW = tokenizer_wrapper.py (base, Tencent-Hunyuan/HunyuanImage-3.0
@1d011c8). docs/model_interface.md has the table. Each test fails against the stand-in's old
behaviour (2-D experts, a (t, dtype) embedder, one CFG row at guidance <= 1, exact sizes,
log-ratio snapping, a device-built base mask, greedy CoT, a float32-kept router under bnb).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_model import load_test_model

from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate
from hunyuan_image3.hunyuan_loader.quantization import (
    checkpoint_tensor_names,
    is_quantizable,
    quantized_module_names,
    skip_modules_for,
    transformers_skips,
)
from hunyuan_image3.hunyuan_loader.resolution import (
    model_buckets,
    rendered_size,
    resolution_buckets,
    snap_to_bucket,
)
from hunyuan_image3.hunyuan_loader.spec import LoadSpec

pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = ("base", "instruct", "distil")


@pytest.fixture(scope="module")
def models(base_checkpoint: Path, instruct_checkpoint: Path, distil_checkpoint: Path) -> dict:
    paths = {"base": base_checkpoint, "instruct": instruct_checkpoint, "distil": distil_checkpoint}
    return {name: load_test_model(path) for name, path in paths.items()}


def test_expert_mlp_takes_3d_input(models: dict) -> None:
    # M:1080 HunyuanMLP.forward: gate_and_up_proj(x).chunk(2, dim=2): 2-D input is an IndexError.
    expert = models["base"].model.layers[0].mlp.experts[0]
    x = torch.randn(5, expert.gate_and_up_proj.in_features, dtype=torch.bfloat16)
    with pytest.raises(IndexError):
        expert(x)
    assert expert(x[None]).shape == (1, 5, expert.down_proj.out_features)


def test_reference_moe_feeds_each_expert_one_capacity_row(models: dict) -> None:
    # M:1203: dispatched_input.chunk(num_experts, dim=0) -> each expert gets [1, capacity, hidden].
    moe = models["base"].model.layers[0].mlp
    shapes = []
    hooks = [e.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape))) for e in moe.experts]
    try:
        moe(torch.randn(1, 7, moe.gate.wg.in_features, dtype=torch.bfloat16))
    finally:
        for h in hooks:
            h.remove()
    assert len(shapes) == len(moe.experts)
    assert all(len(s) == 3 and s[0] == 1 for s in shapes) and len({s[1] for s in shapes}) == 1


def test_timestep_embedders_cast_their_input_to_the_first_weight_dtype(models: dict) -> None:
    # M:591 TimestepEmbedder.forward: timestep_embedding(t).type(self.mlp[0].weight.dtype).
    emb = models["base"].time_embed_2
    t = torch.tensor([500.0])
    assert emb(t).dtype == torch.bfloat16
    emb.float()
    try:
        assert emb(t).dtype == torch.float32
    finally:
        emb.to(torch.bfloat16)
    assert isinstance(emb.mlp[1], torch.nn.GELU)


def test_distil_has_guidance_and_timestep_r_embedders(models: dict) -> None:
    # M:1717-1720: guidance_emb if config.cfg_distilled, timestep_r_emb if config.use_meanflow.
    for name, model in models.items():
        has = {n for n in ("guidance_emb", "timestep_r_emb") if hasattr(model, n)}
        assert has == ({"guidance_emb", "timestep_r_emb"} if name == "distil" else set()), name


@pytest.mark.parametrize("variant", ["base", "instruct"])
def test_cfg_checkpoints_fail_at_guidance_one_or_below(models: dict, variant: str) -> None:
    # M:2732 / H:2263: prepare_model_inputs builds two CFG rows for gen_image whatever the
    # guidance; P:776 batches 1 + (guidance > 1) latents -> a batch mismatch at <= 1.
    model = models[variant]
    gen = model.generation_config
    saved = gen.diff_infer_steps, gen.diff_guidance_scale
    gen.diff_infer_steps, gen.diff_guidance_scale = 1, 1.0
    try:
        with pytest.raises(RuntimeError):
            model.generate_image(prompt="x", seed=1, image_size="1024x1024", diff_infer_steps=1,
                                 diff_guidance_scale=1.0)
        gen.diff_guidance_scale = 1.5
        model.generate_image(prompt="x", seed=1, image_size="1024x1024", diff_infer_steps=1, diff_guidance_scale=1.5)
    finally:
        gen.diff_infer_steps, gen.diff_guidance_scale = saved


def test_distil_runs_at_guidance_one(models: dict) -> None:
    # P:776-778: cfg_distilled -> cfg_factor 1 (guidance enters through guidance_emb).
    model = models["distil"]
    gen = model.generation_config
    saved = gen.diff_infer_steps, gen.diff_guidance_scale
    gen.diff_infer_steps, gen.diff_guidance_scale = 1, 1.0
    try:
        _, images = model.generate_image(prompt="x", seed=1, image_size="1024x1024")
    finally:
        gen.diff_infer_steps, gen.diff_guidance_scale = saved
    assert images[0].size == (1024, 1024)


@pytest.mark.parametrize("variant,count", [("base", 33), ("instruct", 37), ("distil", 37)])
def test_buckets_per_variant_come_from_the_image_processor(models: dict, variant: str, count: int) -> None:
    # base IP:53 + TW:107-143: ResolutionGroup(1024), 33 ratios; IP:236: Instruct appends 4 extras.
    model = models[variant]
    buckets = model_buckets(model)
    assert len(buckets) == count
    assert buckets == resolution_buckets("base" if variant == "base" else "instruct")
    assert ((1280, 720) in buckets) == (variant != "base")


def test_sizes_always_snap_by_height_over_width(models: dict) -> None:
    # IP:312 / base IP:80: get_target_size picks argmin |r - h/w| (TW:139-143); no exact sizes.
    for name, model in models.items():
        buckets = model_buckets(model)
        for w, h in [(1000, 1500), (2048, 2048), (1280, 720), (1920, 1080), (600, 1900)]:
            assert rendered_size(model, w, h) == snap_to_bucket(w, h, buckets), (name, w, h)
    base = models["base"]
    assert rendered_size(base, 1280, 720) == (1280, 768)  # 1280x720 is not a base bucket
    # h/w distance and log(w/h) distance disagree here (log would give 896x1152): the model's rule wins.
    assert rendered_size(base, 500, 604) == (960, 1088)
    img = base.generate_image("x", seed=1, image_size="1500x1000", diff_infer_steps=1, diff_guidance_scale=2.0)
    assert img.size == snap_to_bucket(1000, 1500, model_buckets(base))
    assert not hasattr(base, "supports_exact_image_size")  # no exact-size extension


def test_base_builds_its_text_mask_on_the_cpu_and_the_pack_moves_it(models: dict) -> None:
    # H:2396 _prepare_attention_mask_for_generation: torch.ones(...) on the CPU; it only works under
    # accelerate's device-alignment hooks (H:1285 "attn_bias is on cpu" otherwise).
    from hunyuan_image3.hunyuan_loader.remote_code_fixes import _align_attention_mask, install_mask_alignment

    assert models["base"]._text_attention_mask(4).device.type == "cpu"
    assert models["instruct"]._text_attention_mask(4).device == models["instruct"].model.wte.weight.device
    embeds = torch.zeros(1, 4, 8, device="meta")
    _, kwargs = _align_attention_mask(None, (), {"inputs_embeds": embeds, "attention_mask": torch.ones(1, 1, 4, 4)})
    assert kwargs["attention_mask"].device.type == "meta"
    model = models["base"]
    assert install_mask_alignment(model) and not install_mask_alignment(model)


def test_cot_text_samples_on_the_global_rng(models: dict) -> None:
    # M:2762: only the diffusion generator is seeded from `seed`; the text stage samples on torch's RNG.
    model = models["instruct"]
    model.generation_config.diff_infer_steps, model.generation_config.diff_guidance_scale = 1, 2.0

    def text(global_seed: int) -> str:
        torch.manual_seed(global_seed)
        cot, _ = model.generate_image(prompt="a cat", seed=3, image_size="1024x1024", bot_task="think",
                                      max_new_tokens=12)
        return cot[0]

    assert text(1) == text(1)
    assert len({text(s) for s in range(1, 6)}) > 1


def test_router_is_cast_to_bf16_by_transformers_under_bnb(instruct_checkpoint: Path) -> None:
    # M:1102 creates wg in float32 (no _keep_in_fp32_modules); transformers casts non-quantized
    # floats to the model dtype under a bitsandbytes quantization_config.
    model = load_test_model(instruct_checkpoint, "nf4")
    assert model.model.layers[0].mlp.gate.wg.weight.dtype == torch.bfloat16
    assert getattr(model, "_keep_in_fp32_modules", None) in (None, [])


def test_quantized_layers_are_multiples_of_64(models: dict) -> None:
    # Real shapes: hidden 4096, expert width 3072, heads 128-wide; bnb 4-bit works in 64-wide blocks.
    for name, module in models["base"].named_modules():
        if isinstance(module, torch.nn.Linear) and is_quantizable(name):
            assert module.in_features % 64 == 0 and module.out_features % 64 == 0, name


def test_code_imports_diffusers(base_checkpoint: Path, instruct_checkpoint: Path) -> None:
    from hunyuan_image3.hunyuan_loader.checkpoint import code_imports

    for path in (base_checkpoint, instruct_checkpoint):
        assert "diffusers" in code_imports(path)


def test_missing_code_dependency_is_a_clear_error_before_loading(base_checkpoint: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.modules["diffusers"] = None  # as if not installed
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from hunyuan_loader.standalone import load_pack
        load_pack()
        from hunyuan_image3.hunyuan_loader.errors import DependencyError
        from hunyuan_image3.hunyuan_loader.loading import load_model
        from hunyuan_image3.hunyuan_loader.spec import LoadSpec
        try:
            load_model(LoadSpec({str(base_checkpoint)!r}))
        except DependencyError as exc:
            print("DEPENDENCY:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "DEPENDENCY:" in out.stdout, out.stderr[-2000:]
    assert "diffusers" in out.stdout and "pip install diffusers" in out.stdout


# --------------------------------------------------------------------------- what the pack does with it
@pytest.mark.parametrize("variant", VARIANTS)
def test_quantized_modules_are_exactly_attention_and_experts(request, variant: str) -> None:
    """The skip list derived from the checkpoint, through transformers' own matching, quantizes
    exactly the attention projections and routed experts: no embedder (time_embed_2,
    guidance_emb, timestep_r_emb), router, shared expert, VAE or vision part."""
    path = request.getfixturevalue(f"{variant}_checkpoint")
    names = checkpoint_tensor_names(path)
    skips = skip_modules_for(names)
    model = load_test_model(path, "int8")
    quantized = quantized_module_names(model)
    expected = sorted(
        n for n, m in model.named_modules() if type(m).__name__ == "Linear8bitLt" or is_quantizable(n)
    )
    assert quantized == expected
    layers = model.config.num_hidden_layers
    assert len(quantized) == layers * (2 + 2 * model.config.num_experts)
    for must_keep in ("time_embed", "time_embed_2", "timestep_emb", "model.layers.0.mlp.gate.wg",
                      "model.layers.0.mlp.shared_mlp.down_proj", "lm_head"):
        assert transformers_skips(must_keep + ".mlp.0" if "emb" in must_keep else must_keep, skips)
    if variant == "distil":
        assert {"guidance_emb", "timestep_r_emb"} <= set(skips)


def test_skip_rule_matches_transformers_replace_with_bnb_linear(base_checkpoint: Path) -> None:
    """Our copy of the matching rule agrees with transformers' own replace_with_bnb_linear."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    skips = skip_modules_for(checkpoint_tensor_names(base_checkpoint))
    config = AutoConfig.from_pretrained(str(base_checkpoint), trust_remote_code=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    replace_with_bnb_linear(model, skips, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    replaced = {n for n, m in model.named_modules() if type(m).__name__ == "Linear8bitLt"}
    assert replaced == {n for n in linears if not transformers_skips(n, skips)}
    assert replaced == {n for n in linears if is_quantizable(n)}


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_pack_routes_in_float32_under_bnb(cache, base_checkpoint: Path, quant: str) -> None:
    handle = cache.load(LoadSpec(str(base_checkpoint), quant=quant))
    model = cache.get(handle).model
    reference = load_test_model(base_checkpoint)
    for mine, ref in zip(model.model.layers, reference.model.layers):
        assert mine.mlp.gate.wg.weight.dtype == torch.float32
        assert torch.equal(mine.mlp.gate.wg.weight, ref.mlp.gate.wg.weight)


def test_pack_seeds_the_text_stage(cache, instruct_checkpoint: Path) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(instruct_checkpoint))))
    req = GenerationRequest("a cat", seed=11, steps=1, guidance=2.0, bot_task="think")
    first = generate(loaded, req)
    torch.manual_seed(12345)  # the global RNG moved on: the pack must not depend on it
    second = generate(loaded, req)
    assert first.cot_text and first.cot_text == second.cot_text
    assert torch.equal(first.image, second.image)
    assert np.isfinite(first.image.numpy()).all()

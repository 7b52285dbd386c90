"""The stand-in behaves like the OFFICIAL HunyuanImage-3.0 code wherever the pack touches it.

Each test pins one interface and cites where the official code does it. Official files:
M = modeling_hunyuan_image_3.py, P = hunyuan_image_3_pipeline.py, IP = image_processor.py
(Instruct / Instruct-Distil, suryatmodulus/HunyuanImage-3.0 @1ea1526); H = hunyuan.py and
base IP = image_processor.py, TW = tokenizer_wrapper.py (base, Tencent-Hunyuan/HunyuanImage-3.0
@1d011c8). docs/model_interface.md has the table. Each test fails against the stand-in's old
behaviour (2-D experts, a (t, dtype) embedder, one CFG row at guidance <= 1, exact sizes,
log-ratio snapping, a device-built base mask, greedy CoT, a float32-kept router under bnb, a text stage
that re-ran the whole sequence per token without a KV cache).
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

from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.formats.builtin import quantized_module_names
from hunyuan_image3.hunyuan_loader.formats.quantization import (
    checkpoint_tensor_names,
    is_quantizable,
    skip_modules_for,
    transformers_skips,
)
from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate
from hunyuan_image3.hunyuan_loader.model.resolution import (
    model_buckets,
    rendered_size,
    resolution_buckets,
    snap_to_bucket,
)

pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = ("base", "instruct", "distil")


@pytest.fixture(scope="module")
def models(base_checkpoint: Path, instruct_checkpoint: Path, distil_checkpoint: Path) -> dict:
    paths = {"base": base_checkpoint, "instruct": instruct_checkpoint, "distil": distil_checkpoint}
    return {name: load_test_model(path) for name, path in paths.items()}  # with the 5.x fixes


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
    from hunyuan_image3.hunyuan_loader.hooks.remote_code_fixes import (
        _align_attention_mask,
        install_mask_alignment,
    )

    # Base passes no device (so the mask lands on the default device, the CPU): under a meta default
    # device it follows it; Instruct names the model's device explicitly.
    with torch.device("meta"):
        assert models["base"]._text_attention_mask(4).device.type == "meta"
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
    # M:1102 creates wg in float32 (no _keep_in_fp32_modules); transformers 4.57 casts non-quantized
    # floats to the model dtype under a bitsandbytes quantization_config (quantization.restore_float32_routers
    # gives the pack's loads float32 back); 5.x keeps the dtype the model created.
    from hunyuan_image3.hunyuan_loader.core import hf_compat

    model = load_test_model(instruct_checkpoint, "nf4")
    want = torch.float32 if hf_compat.is_v5() else torch.bfloat16
    assert model.model.layers[0].mlp.gate.wg.weight.dtype == want
    assert not getattr(model, "_keep_in_fp32_modules", None)  # None / [] on 4.57, an empty set on 5.x


def test_quantized_layers_are_multiples_of_64(models: dict) -> None:
    # Real shapes: hidden 4096, expert width 3072, heads 128-wide; bnb 4-bit works in 64-wide blocks.
    for name, module in models["base"].named_modules():
        if isinstance(module, torch.nn.Linear) and is_quantizable(name):
            assert module.in_features % 64 == 0 and module.out_features % 64 == 0, name


def test_code_imports_diffusers(base_checkpoint: Path, instruct_checkpoint: Path) -> None:
    from hunyuan_image3.hunyuan_loader.checkpoint.validate import code_imports

    for path in (base_checkpoint, instruct_checkpoint):
        assert "diffusers" in code_imports(path)


def test_missing_code_dependency_is_a_clear_error_before_loading(base_checkpoint: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.modules["diffusers"] = None  # as if not installed
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from hunyuan_loader.standalone import load_pack
        load_pack()
        from hunyuan_image3.hunyuan_loader.core.errors import DependencyError
        from hunyuan_image3.hunyuan_loader.load.pipeline import load_model
        from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
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


# --------------------------------------------------------------------------- Instruct: images and the text stage
def _ref_image(width: int, height: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


class _Recorder:
    """A transformers StoppingCriteria that counts its calls and keeps the last input_ids."""

    def __init__(self) -> None:
        from transformers import StoppingCriteria

        outer = self
        self.calls, self.ids = 0, None

        class Hook(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                outer.calls += 1
                outer.ids = input_ids.clone()
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        self.criteria = Hook()


def _scripted(model, script: dict[int, int]):
    """Make the text stage emit script[k] as its k-th new token (a large logit on it); other steps sample.
    The k-th new token comes from the k-th forward of the text stage (the prompt's, then one per token:
    M:2872-2990), so the forwards are counted (one text stage per hook)."""
    calls = [0]

    def hook(module, args, out):
        token = script.get(calls[0])
        calls[0] += 1
        if token is None:
            return out
        out = out.clone()
        out[:, -1, token] += 100.0
        return out

    return model.lm_head.register_forward_hook(hook)


def test_generate_image_forwards_stopping_criteria_to_the_text_stage(models: dict) -> None:
    # M:3245 max_new_tokens popped; every other kwarg goes to self.generate(**model_inputs, ..., **kwargs)
    # (M:3317-3326, M:3370, M:3383); gen_text -> super().generate(stopping_criteria=...) (M:3162-3166):
    # transformers calls it once per new token. The pack's text progress / cancel hook relies on this.
    from transformers import StoppingCriteriaList

    model = models["instruct"]
    model.generation_config.diff_infer_steps, model.generation_config.diff_guidance_scale = 1, 2.0
    counts = {}
    for task, size in (("think", "1024x1024"), ("image", "1024x1024"), ("image", "auto")):
        rec = _Recorder()
        model.generate_image(prompt="x", image=_ref_image(64, 48), seed=1, image_size=size, bot_task=task,
                             max_new_tokens=5, stopping_criteria=StoppingCriteriaList([rec.criteria]))
        counts[(task, size)] = rec.calls
    # think: 5 tokens (random weights rarely stop early; a stop is still one call per token)
    assert 1 <= counts[("think", "1024x1024")] <= 5
    assert counts[("image", "1024x1024")] == 0  # no text stage at all
    assert counts[("image", "auto")] == 1  # the ratio token (M:3370)
    with pytest.raises(TypeError):  # logits_processor is passed explicitly: a second one collides (M:3326)
        model.generate_image(prompt="x", seed=1, image_size="1024x1024", bot_task="think", max_new_tokens=2,
                             logits_processor=[])


def test_reference_images_are_a_pil_image_a_path_or_a_list(models: dict, tmp_path: Path) -> None:
    # M:2293-2312 check_inputs / M:2330-2345 _validate_and_batchify_image: one image or a list of PIL images,
    # paths, base64 or bytes; IP:499-544 build_cond_images: one condition per image, in order.
    model = models["instruct"]
    model.generation_config.diff_infer_steps = 1
    path = tmp_path / "ref.png"
    _ref_image(40, 40).save(path)
    proc, seen = model.image_processor, []
    original = proc.build_cond_images

    def spy(image_list=None, **kwargs):
        seen.append(len(image_list))
        return original(image_list=image_list, **kwargs)

    proc.build_cond_images = spy
    try:
        for image, count in ((_ref_image(40, 30), 1), (str(path), 1), ([_ref_image(30, 40), str(path), _ref_image(50, 20)], 3)):
            seen.clear()
            model.generate_image(prompt="x", image=image, seed=1, image_size="1024x1024", bot_task="image")
            assert seen == [count]
        with pytest.raises(AssertionError):
            model.generate_image(prompt="x", image=np.zeros((8, 8, 3)), seed=1, image_size="1024x1024")
    finally:
        del proc.build_cond_images


def test_reference_image_tokens_come_from_the_image_processor(models: dict) -> None:
    # IP:477 the VAE half is resized to vae_reso_group.get_target_size(w, h); IP:357 its tokens are
    # (h // vae_info.h_factor) x (w // w_factor), IP:184 factor = VAE downsample x patch_size; IP:269 / IP:379
    # the ViT half is always vit_info.max_token_length = vit_processor.max_num_patches tokens (padded).
    from hunyuan_image3.hunyuan_loader.generation import reference_image_tokens
    from hunyuan_image3.memory.estimator import SPECIAL_TOKENS_PER_REFERENCE_IMAGE

    proc = models["instruct"].image_processor
    cfg = models["instruct"].config
    assert proc.vae_info.h_factor == cfg.vae_downsample_factor[0] * cfg.patch_size
    assert proc.vit_info.max_token_length == proc.vit_processor.max_num_patches
    images = [_ref_image(500, 300, 1), _ref_image(120, 400, 2)]
    conds = proc.build_cond_images(image_list=images)
    expected = 0
    for image, cond in zip(images, conds):
        w, h = proc.vae_reso_group.get_target_size(*image.size)
        assert tuple(cond.vae_image.shape[-2:]) == (h, w)
        assert cond.vae_image.i.image_token_length == (h // proc.vae_info.h_factor) * (w // proc.vae_info.w_factor)
        assert cond.vit_image.shape[0] == cond.vit_image.i.image_token_length == proc.vit_info.max_token_length
        expected += cond.i.image_token_length + SPECIAL_TOKENS_PER_REFERENCE_IMAGE
    assert reference_image_tokens(models["instruct"], images) == expected


@pytest.mark.parametrize("variant,rows", [("instruct", 2), ("distil", 1)])
def test_both_cfg_rows_carry_the_reference_images(models: dict, variant: str, rows: int) -> None:
    # M:2732-2734 cfg_factor gen_image 2 (1 if cfg_distilled); M:2482 / M:2518 the condition images are
    # repeated cfg_factor times: the unconditional row carries them too (the estimator doubles them).
    model = models[variant]
    image = _ref_image(64, 64)
    inputs = model.prepare_model_inputs(prompt="a cat", image=[image, image], mode="gen_image", image_size="1024x1024")
    ids = inputs["input_ids"]
    assert ids.shape[0] == rows
    img_id = model.tokenizer.img_token_id
    per_image = inputs["batch_cond_images"][0][0].i.image_token_length
    assert ((ids == img_id).sum(dim=1) == 2 * per_image).all()


def test_think_recaption_transitions_and_the_returned_text(models: dict) -> None:
    # M:3265-3296: think_recaption forces <recaption> after </think> (_StageTransitionLogitsProcessor,
    # M:2990-3026); with image_size "auto" </recaption> forces [<answer>,] <boi> <img_size_1024>, then only
    # ratio tokens, greedily (_ConditionalSliceVocabLogitsProcessor, M:3028-3058, force_greedy M:3311), and a
    # ratio token ends the text; M:3333-3344 the text is the task token + everything up to </recaption>;
    # M:3357 the last token picks the bucket.
    from transformers import StoppingCriteriaList

    model = models["instruct"]
    tok = model.tokenizer
    model.generation_config.diff_infer_steps, model.generation_config.diff_guidance_scale = 1, 2.0
    a, b, c = (ord(ch) for ch in "abc")
    script = {0: a, 1: b, 2: tok.end_of_think_token_id, 4: c, 5: tok.end_of_recaption_token_id,
              9: tok.ratio_token_id(5)}
    rec = _Recorder()
    handle = _scripted(model, script)
    try:
        cot, images = model.generate_image(prompt="x", seed=1, image_size="auto", bot_task="think_recaption",
                                           max_new_tokens=30, stopping_criteria=StoppingCriteriaList([rec.criteria]))
    finally:
        handle.remove()
    assert cot == ["<think>ab</think><recaption>c</recaption>"]
    new = rec.ids[0, -10:].tolist()
    assert new == [a, b, tok.end_of_think_token_id, tok.recaption_token_id, c, tok.end_of_recaption_token_id,
                   tok.answer_token_id, tok.boi_token_id, tok.size_token_id(1024), tok.ratio_token_id(5)]
    bucket = model.image_processor.vae_reso_group[5]
    assert images[0].size == (bucket.width, bucket.height)
    # think alone, fixed size: stops at </think> (or </recaption>), the text ends there
    handle = _scripted(model, {0: a, 1: tok.end_of_think_token_id, 2: b})
    try:
        cot, _ = model.generate_image(prompt="x", seed=1, image_size="1024x1024", bot_task="think", max_new_tokens=30)
    finally:
        handle.remove()
    assert cot == ["<think>a</think>"]


def test_auto_size_after_a_truncated_text_is_a_value_error(models: dict) -> None:
    # M:3357 + M:3060-3066: with "auto" the last generated token must be a ratio token; a text cut at
    # max_new_tokens ends elsewhere -> ValueError "Unknown ratio token id" (the pack turns it into an InputError).
    model = models["instruct"]
    model.generation_config.diff_infer_steps, model.generation_config.diff_guidance_scale = 1, 2.0
    handle = _scripted(model, {0: ord("a"), 1: ord("b")})
    try:
        with pytest.raises(ValueError, match="Unknown ratio token id"):
            model.generate_image(prompt="x", seed=1, image_size="auto", bot_task="think_recaption", max_new_tokens=2)
    finally:
        handle.remove()


def test_infer_align_image_size_stretches_the_reference_and_resizes_the_output(models: dict) -> None:
    # IP:537 infer_align_image_size -> crop type "resize" (stretch) instead of a centre crop; IP:614-700
    # postprocess_outputs: an output in the reference's bucket takes the reference's own aspect ratio
    # (area base_size^2) when the two differ by 0.01 or more.
    proc = models["instruct"].image_processor
    image = _ref_image(500, 290, 3)  # h/w 0.58: the 0.6 bucket (1280x768), 0.02 off
    stretched = proc.build_cond_images(image_list=[image], infer_align_image_size=True)[0].vae_image
    cropped = proc.build_cond_images(image_list=[image], infer_align_image_size=False)[0].vae_image
    assert stretched.shape == cropped.shape and not torch.equal(stretched, cropped)
    group = proc.vae_reso_group
    idx = stretched.i.ratio_index
    from PIL import Image

    out = [Image.new("RGB", (group[idx].width, group[idx].height))]
    proc.postprocess_outputs(out, [[proc.build_cond_images(image_list=[image])[0]]], infer_align_image_size=True)
    assert abs(out[0].width / out[0].height - 500 / 290) < 0.01
    assert abs(out[0].width * out[0].height - group.base_size**2) < 0.01 * group.base_size**2
    same = [Image.new("RGB", (group[idx].width, group[idx].height))]
    proc.postprocess_outputs(same, [[stretched]], infer_align_image_size=False)
    assert same[0].size == (group[idx].width, group[idx].height)


def test_an_input_longer_than_generation_config_max_length_is_refused(models: dict) -> None:
    # T:1448-1452 (tokenization_hunyuan_image_3.py apply_general_template): the whole sequence (system prompt,
    # reference images, prompt, text, the generated image's tokens) must fit max_length, which generate_image
    # reads from generation_config only (M:2682 preprocess_inputs). Real: 12,800 of 22,800 positions.
    model = models["instruct"]
    assert model.config.max_position_embeddings == 22800 and model.generation_config.max_length == 12800
    model.generation_config.diff_infer_steps, model.generation_config.diff_guidance_scale = 1, 2.0
    model.generation_config.max_length = 200
    try:
        with pytest.raises(ValueError, match="Encoded token length \\d+ exceeds max_length 200"):
            model.generate_image(prompt="x", image=_ref_image(64, 64), seed=1, image_size="1024x1024", bot_task="image")
        model.generation_config.max_length = 12800
        model.generate_image(prompt="x", image=_ref_image(64, 64), seed=1, image_size="1024x1024", bot_task="image")
    finally:
        model.generation_config.max_length = 12800


def test_pack_casts_float_inputs_of_the_image_modules_on_cpu() -> None:
    # The official pipeline relies on CUDA autocast (hunyuan_image_3_pipeline.py:856): float32 latents
    # reach bf16 convs / GroupNorms, which a CPU refuses; the pack's pre-hooks cast what autocast would.
    from hunyuan_image3.hunyuan_loader.hooks.remote_code_fixes import install_cpu_input_casts

    model = torch.nn.Module()
    model.patch_embed = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8))
    model.patch_embed.to(torch.bfloat16)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(RuntimeError):
        model.patch_embed(x)
    assert install_cpu_input_casts(model) == 1 and install_cpu_input_casts(model) == 0
    assert model.patch_embed(x).dtype == torch.bfloat16


def test_instruct_leaves_the_vision_mask_on_the_cpu_and_the_pack_moves_it(models: dict) -> None:
    # M:117-124 to_device moves tensors and lists and returns a dict as it is; the SigLIP2 kwargs are such a
    # dict (M:2538-2553, sent through to_device at M:2831), so the attention mask stays on the CPU and the eager
    # attention fails on a GPU at `attn_weights + attention_mask` (siglip2.py:210). The stand-in does the same.
    import importlib

    from hunyuan_image3.hunyuan_loader.hooks.remote_code_fixes import (
        _move_tensor_inputs,
        install_vision_input_alignment,
    )

    model = models["instruct"]
    code = importlib.import_module(type(model).__module__)
    mask = torch.ones(1, 4)
    assert code._to_device({"attention_mask": mask}, "meta")["attention_mask"].device.type == "cpu"
    assert code._to_device([mask], "meta")[0].device.type == "meta"
    # the fix: every tensor input of the vision encoder goes to the encoder's device
    vision = torch.nn.Linear(2, 2, device="meta")
    args, kwargs = _move_tensor_inputs(vision, (torch.zeros(1, 2),), {"attention_mask": mask, "n": 3})
    assert args[0].device.type == "meta" and kwargs["attention_mask"].device.type == "meta" and kwargs["n"] == 3
    hooks = len(model.vision_model._forward_pre_hooks)
    install_vision_input_alignment(model)
    assert not install_vision_input_alignment(model)  # idempotent: one hook however often it is asked
    assert len(model.vision_model._forward_pre_hooks) <= hooks + 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_decoder_runs_once_per_step_with_mode_and_first_step(models: dict, variant: str) -> None:
    # The pipeline calls the model once per step with first_step=(i == 0) (P:859; base pipeline :821), and
    # the model calls its decoder self.model(..., mode=mode, first_step=first_step) (M:2199-2211, M:2232-2244,
    # H:2019-2032); the text stage with mode="gen_text". The pack's step_cache entry counts steps from these.
    model = models[variant]
    seen: list[tuple] = []
    handle = model.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append((kw.get("mode"), kw.get("first_step"))), with_kwargs=True)
    model.generation_config.diff_infer_steps, model.generation_config.diff_guidance_scale = 3, 2.0
    try:
        kwargs = dict(bot_task="think", max_new_tokens=2) if variant != "base" else {}
        if variant == "base":
            model.generate_image(prompt="x", seed=1, image_size="1024x1024", diff_infer_steps=3,
                                 diff_guidance_scale=2.0, **kwargs)
        else:
            model.generate_image(prompt="x", seed=1, image_size="1024x1024", **kwargs)
    finally:
        handle.remove()
    image = [first for mode, first in seen if mode == "gen_image"]
    assert image == [True, False, False]
    assert all(mode == "gen_text" for mode, _ in seen if mode != "gen_image")
    assert (variant == "base") == (len(seen) == 3)  # Instruct's think text ran the decoder too


def test_the_official_taylor_switch_is_off_unless_asked(models: dict) -> None:
    # generate_image(use_taylor_cache=False, taylor_cache_interval=None, ...) (M:3234-3242), switched on for
    # the image stage only when asked (M:3376); the pack never asks (its step_cache entry is the cache), so
    # the stand-in refuses it and every pack test would fail if the pack passed it.
    import inspect

    sig = inspect.signature(models["instruct"].generate_image)
    assert sig.parameters["use_taylor_cache"].default is False
    for name in ("interval", "order", "enable_first_enhance", "first_enhance_steps", "enable_tailing_enhance",
                 "tailing_enhance_steps", "low_freqs_order", "high_freqs_order"):
        assert sig.parameters[f"taylor_cache_{name}"].default is None
    with pytest.raises(NotImplementedError, match="step_cache"):
        models["instruct"].generate_image(prompt="x", seed=1, image_size="1024x1024", use_taylor_cache=True)


def test_vae_has_the_official_interface_and_the_pipeline_scales(models: dict) -> None:
    """AutoencoderKLConv3D (autoencoder_kl_3d.py:438-464, :770-834): config.scaling_factor / shift_factor,
    ffactor_spatial / ffactor_temporal, encode -> latent_dist (mode()), decode of [B, C, 1, h, w] -> the
    last frame [B, 3, 1, H, W]; the pipeline unscales, unshifts and adds the time axis (P:880-892), and the
    model's vae_encode shifts and scales (M:2412-2431). The previews drive the VAE the same way."""
    vae = models["base"].vae
    assert vae.config.scaling_factor and hasattr(vae, "ffactor_temporal") and vae.ffactor_spatial == 16
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.inference_mode():
        dist = vae.encode(x.to(torch.bfloat16)).latent_dist
        z = dist.mode()
        assert z.shape == (1, 32, 1, 4, 6)
        (decoded,) = vae.decode(z, return_dict=False)
        assert decoded.shape == (1, 3, 1, 64, 96)
        latents = models["base"].vae_encode(x.to(torch.bfloat16))
        assert latents.shape == (1, 32, 4, 6)
        torch.testing.assert_close(latents.float(), z[:, :, 0].float() * vae.config.scaling_factor, atol=0.02, rtol=0.02)


# -- the Instruct text stage's KV cache, RoPE object and decode steps ------------------------------------
def _module_of(model):
    return sys.modules[type(model).__module__]


def _count_items(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    item = torch.Tensor.item

    def counting(self):
        calls[0] += 1
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting)
    return calls


def test_the_text_cache_writes_at_cache_position_and_a_dynamic_one_ends_at_the_last(models: dict,
                                                                                  monkeypatch) -> None:
    # M:895-970 HunyuanStaticCache(StaticCache): ``dynamic`` popped from the kwargs (M:902-904); update
    # initialises a layer with lazy_initialization(key_states) on first use (M:932-933), writes with
    # index_copy_ at cache_position, 1-D (M:944-946) or one row per batch row (M:953-962), and in dynamic
    # mode returns the cache up to cache_position[-1].item() + 1 (M:947-951, 964-968), else all of it.
    from hunyuan_image3.hunyuan_loader.core import hf_compat
    from hunyuan_image3.hunyuan_loader.hooks.registry import _CLASS_PATCHES as class_patches
    from hunyuan_image3.hunyuan_loader.hooks.registry import hook_names

    model = models["instruct"]
    cls = _module_of(model).HunyuanStaticCache
    assert issubclass(cls, __import__("transformers").cache_utils.StaticCache) and "update" in cls.__dict__
    heads, dim = model.config.num_key_value_heads, model.config.attention_head_dim

    def states(n: int, start: int) -> torch.Tensor:
        return torch.arange(start, start + n, dtype=torch.float32)[None, None, :, None].expand(1, heads, n, dim)

    def cache(dynamic: bool):
        return cls(config=model.config, max_batch_size=1, max_cache_len=8, dtype=torch.float32, dynamic=dynamic)

    # the class as shipped (a loaded model's static_cache_init wraps it while any model of this code holds it)
    patches = class_patches.get((cls, "update"))
    shipped = patches.shipped if patches is not None else cls.__dict__["update"]
    prompt = (states(3, 0), states(3, 0), 0, {"cache_position": torch.arange(3)[None]})
    if hf_compat.lazy_init_takes_values():  # 5.x: the official one-argument call fails as shipped ...
        with pytest.raises(TypeError):
            shipped(cache(True), *prompt)
        assert "static_cache_init" in hook_names(model)  # ... and runs with the pack's fix (load_test_model)
    else:
        assert shipped(cache(True), *prompt)[0].shape[2] == 3 and "static_cache_init" not in hook_names(model)
    items = _count_items(monkeypatch)
    dyn = cache(True)
    assert dyn.dynamic and not cache(False).dynamic
    keys, values = dyn.update(states(3, 0), states(3, 100), 0, {"cache_position": torch.arange(3)[None]})
    assert keys.shape[2] == 3 and items[0] == 1  # the prompt: its 3 positions, the end read once
    keys, values = dyn.update(states(1, 3), states(1, 103), 0, {"cache_position": torch.tensor([[3]])})
    assert keys.shape[2] == 4 and items[0] == 2  # one decode token: one more position
    assert torch.equal(keys[0, 0, :, 0], torch.arange(4.0))
    assert torch.equal(values[0, 0, :, 0], 100 + torch.arange(4.0))
    keys, _ = dyn.update(states(2, 50), states(2, 50), 0, {"cache_position": torch.tensor([5, 6])})  # 1-D
    assert keys.shape[2] == 7 and torch.equal(keys[0, 0, 5:, 0], torch.tensor([50.0, 51.0])) and items[0] == 3
    static = cache(False)
    keys, _ = static.update(states(3, 0), states(3, 0), 0, {"cache_position": torch.arange(3)[None]})
    assert keys.shape[2] == 8 and items[0] == 3  # not dynamic: the whole cache, no end read
    assert dyn.layers[1].keys is None  # each layer initialised on its own first use


def test_cached_rope_never_stores_its_key_and_gathers_by_position(models: dict) -> None:
    # M:973-1022 CachedRoPE: __init__ sets seq_len / rope_image_info to None (M:980-981) and __call__ compares
    # against them (M:997) but never assigns them, so every call rebuilds cos_cache / sin_cache ("If cache miss,
    # compute and cache it"); with position_ids [rows, tokens] it gathers the table's rows (M:1016-1020). The
    # Instruct model holds it as model.cached_rope (M:1736) and calls it with max_position_embeddings
    # positions at inference (M:2143-2153). The base code has none (H:2310 builds its RoPE per generation).
    model = models["instruct"]
    rope = model.cached_rope
    assert type(rope).__name__ == "CachedRoPE" and not hasattr(models["base"], "cached_rope")
    seq_len, layout = model.config.max_position_embeddings, [[slice(2, 5)]]
    positions = torch.tensor([[0, 1, 7, seq_len - 1]])
    cos, sin = rope(seq_len, "cpu", rope_image_info=layout, position_ids=positions)
    first = rope.cos_cache
    assert rope.seq_len is None and rope.rope_image_info is None  # the key is never stored ...
    assert first.shape[1] == seq_len
    again, _ = rope(seq_len, "cpu", rope_image_info=layout, position_ids=positions)
    assert rope.cos_cache is not first and torch.equal(again, cos)  # ... so the same call builds it again
    # the stand-in's table is its 1-D RoPE: the image stage's values for the same positions
    ref_cos, ref_sin = _module_of(model)._rope(positions, model.config.attention_head_dim, model.config.rope_theta)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin) and cos.shape == (1, 4, ref_cos.shape[-1])
    full, _ = rope(seq_len, "cpu")  # no position ids: the whole table
    assert full.shape[1] == seq_len


def test_the_text_stage_decodes_one_token_per_forward_after_the_prompt(models: dict) -> None:
    # M:2775-2786: the text stage's HunyuanStaticCache holds prompt + max_new_tokens positions, dynamic; M:2788-2790
    # the prompt's position ids. prepare_inputs_for_generation (M:2872-2910): with a cache, a decode step gathers
    # the ids at position_ids (the new token only). _update_model_kwargs_for_generation (M:2912-2990): after the
    # prompt's forward position_ids = real_pos (the first position after the prompt), then position_ids + 1 per
    # step, and no attention mask (M:2981-2984: attention over the whole cache). M:2276-2285: lm_head over every
    # position of the forward, logits upcast.
    model = models["instruct"]
    model.generation_config.diff_infer_steps, model.generation_config.diff_guidance_scale = 1, 2.0
    seen: list[dict] = []

    def record(_m, _args, kw):
        ids, pos, cache = kw.get("input_ids"), kw.get("position_ids"), kw.get("past_key_values")
        seen.append(dict(ids=tuple(ids.shape), pos=pos.tolist(), cache=cache, mask=kw.get("attention_mask"),
                         prompt=kw.get("prefix_embeds") is not None))

    logits: list[torch.Tensor] = []
    handles = [model.register_forward_pre_hook(record, with_kwargs=True),
               model.register_forward_hook(lambda _m, _a, out: logits.append(out.logits))]
    try:
        torch.manual_seed(0)  # the text samples on the global RNG (M:2762): no early stop with this one
        model.generate_image(prompt="a cat", seed=1, image_size="1024x1024", bot_task="think", max_new_tokens=5)
    finally:
        for handle in handles:
            handle.remove()
    first, steps = seen[0], seen[1:]
    n = first["ids"][1]
    assert first["prompt"] and first["pos"] == [list(range(n))]  # its mask is built from the image slices
    assert len(steps) == 4  # 5 tokens: the prompt's forward gives the first
    for k, step in enumerate(steps):
        assert step["ids"] == (1, 1) and step["pos"] == [[n + k]] and step["mask"] is None and not step["prompt"]
        assert step["cache"] is first["cache"]
    cache = first["cache"]
    assert type(cache).__name__ == "HunyuanStaticCache" and cache.dynamic
    assert cache.layers[0].keys.shape[2] == n + 5  # prompt + max_new_tokens
    assert logits[0].shape[1] == n and logits[0].dtype == torch.float32
    assert all(out.shape[1] == 1 for out in logits[1:])

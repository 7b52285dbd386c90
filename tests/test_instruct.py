"""Instruct through the pack: editing (1 reference image), multi-image fusion (2-3), the model's
think / recaption text, per-token text progress and cancel, base refusals, reference-image tokens
in the memory estimate. Runs the real stack on the Instruct test checkpoint (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hunyuan_image3.hunyuan_loader import generation as gen
from hunyuan_image3.hunyuan_loader.core.errors import GenerationCancelled, InputError
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate

pytestmark = pytest.mark.usefixtures("one_thread")


def _picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


EDIT = _picture(320, 200, 1)  # wide: snaps to a landscape bucket
FUSE = _picture(180, 240, 2)


def _loaded(cache, checkpoint: Path, quant: str = "bf16"):
    return cache.get(cache.load(LoadSpec(str(checkpoint), quant=quant)))


def _run(loaded, **kw):
    events: list[tuple[str, int, int]] = []
    req = GenerationRequest(**({"prompt": "make the sky green", "seed": 5, "steps": 2, "guidance": 2.0} | kw))
    result = generate(loaded, req, progress=lambda d, t: events.append(("step", d, t)),
                      text_progress=lambda d, t: events.append(("text", d, t)))
    image = result.image
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and image.dtype == torch.float32
    assert np.isfinite(image.numpy()).all() and float(image.std()) > 0.01
    return result, events


@pytest.mark.parametrize("quant", ["bf16", "int8", "nf4"])
def test_edit_fusion_and_text_tasks_in_each_format(cache, instruct_checkpoint: Path, quant: str) -> None:
    loaded = _loaded(cache, instruct_checkpoint, quant)
    # edit: one image, the model picks the size; the output takes the reference's aspect ratio
    edit, events = _run(loaded, images=[EDIT], resolution="auto")
    assert edit.cot_text is None and edit.text_tokens == 0 and edit.text_seconds == 0.0
    assert [e for e in events if e[0] == "text"] == []  # the one-token ratio pick is not a text stage
    assert [e[1:] for e in events] == [(1, 2), (2, 2)]
    # fusion: two images, think then recaption, a fixed size
    fusion, events = _run(loaded, images=[EDIT, FUSE], resolution="1024x1024", bot_task="think_recaption",
                          max_new_tokens=4)
    assert (fusion.width, fusion.height) == (1024, 1024)
    assert fusion.cot_text.startswith("<think>") and fusion.text_tokens == 4
    assert events == [("text", i, 4) for i in range(1, 5)] + [("step", 1, 2), ("step", 2, 2)]
    assert fusion.text_seconds > 0 and fusion.diffusion_seconds > 0
    # recaption without images (text-to-image with a rewritten prompt)
    recap, _ = _run(loaded, resolution="768x1024", bot_task="recaption", max_new_tokens=3)
    assert recap.cot_text.startswith("<recaption>") and (recap.width, recap.height) == (768, 1024)


def test_seeds_reproduce_images_and_text(cache, instruct_checkpoint: Path) -> None:
    loaded = _loaded(cache, instruct_checkpoint)
    kw = dict(images=[EDIT, FUSE], resolution="1024x768", bot_task="think", max_new_tokens=5)
    a, _ = _run(loaded, **kw)
    torch.manual_seed(999)  # the global RNG moved on: the pack seeds the text stage itself
    b, _ = _run(loaded, **kw)
    c, _ = _run(loaded, **(kw | {"seed": 6}))
    assert a.cot_text == b.cot_text and torch.equal(a.image, b.image)
    assert (a.cot_text, a.image.sum().item()) != (c.cot_text, c.image.sum().item())
    # the reference images matter: another image, another result
    d, _ = _run(loaded, **(kw | {"images": [FUSE, EDIT]}))
    assert not torch.equal(a.image, d.image)


def test_cancel_during_the_text_stage_stops_within_a_token_and_the_model_stays_usable(
    cache, instruct_checkpoint: Path
) -> None:
    loaded = _loaded(cache, instruct_checkpoint)
    kw = dict(images=[EDIT], resolution="1024x1024", bot_task="think", max_new_tokens=50)
    seen: list[tuple[str, int]] = []

    def cancel() -> None:
        if len(seen) >= 3:
            raise GenerationCancelled("cancelled")

    req = GenerationRequest("x", seed=3, steps=2, guidance=2.0, **kw)
    with pytest.raises(GenerationCancelled):
        generate(loaded, req, progress=lambda d, t: seen.append(("step", d)), cancel=cancel,
                 text_progress=lambda d, t: seen.append(("text", d)))
    assert seen == [("text", 1), ("text", 2), ("text", 3)]  # cancel checked before the 4th token's report
    assert "step" not in loaded.model.pipeline.scheduler.__dict__  # the step hook is gone
    short = dict(kw, max_new_tokens=3)
    again, _ = _run(loaded, seed=3, **short)
    fresh = generate(_loaded(cache, instruct_checkpoint), GenerationRequest("make the sky green", seed=3, steps=2,
                                                                            guidance=2.0, **short))
    assert again.cot_text == fresh.cot_text and torch.equal(again.image, fresh.image)


def test_truncated_text_with_auto_size_is_a_clear_error(cache, instruct_checkpoint: Path) -> None:
    # With 'auto' the model picks the ratio at the end of its text; cut short, it never does.
    loaded = _loaded(cache, instruct_checkpoint)
    with pytest.raises(InputError, match="raise max_new_tokens, or pick a resolution"):
        _run(loaded, resolution="auto", bot_task="think_recaption", max_new_tokens=2)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"images": [EDIT]}, "base checkpoints take no reference images"),
        ({"bot_task": "think"}, "bot_task 'think' needs an Instruct checkpoint"),
    ],
)
def test_base_refuses_images_and_text_tasks_before_loading(cache, base_checkpoint: Path, kw, message) -> None:
    from hunyuan_image3.hunyuan_loader.input_checks import check_request, checkpoint_variant
    from hunyuan_image3.nodes.generate import HunyuanImage3Generate

    req = GenerationRequest("x", **kw)
    with pytest.raises(InputError, match=message):
        check_request(req, checkpoint_variant(base_checkpoint))  # config.json only
    # the node refuses before the cache loads anything
    node_kw = {"image_1": gen.pil_to_image_tensor(EDIT)} if "images" in kw else {"bot_task": kw["bot_task"]}
    handle = type("Handle", (), {"spec": LoadSpec(str(base_checkpoint))})()
    loads = cache.load_count
    with pytest.raises(InputError, match=message):
        HunyuanImage3Generate().generate(handle, "x", 1, 2, 5.0, "1024x1024", 1024, 1024, **node_kw)
    assert cache.load_count == loads and cache.loaded is None
    # and the library refuses on a loaded base model too
    loaded = _loaded(cache, base_checkpoint)
    with pytest.raises(InputError, match=message):
        generate(loaded, req)
    assert generate(loaded, GenerationRequest("x", steps=1, bot_task="image")).image.shape == (1, 1024, 1024, 3)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"bot_task": "auto"}, "bot_task 'auto' is not one of image, think, recaption, think_recaption"),
        ({"max_new_tokens": 0}, "max_new_tokens must be between 1"),
        ({"images": [EDIT] * 4}, "4 reference images were given"),
        ({"images": ["a.png"]}, "reference image 1 is a str"),
        ({"images": [_picture(8, 40, 0)]}, "8x40: use one of at least 16x16"),
    ],
)
def test_bad_instruct_inputs(kw, message) -> None:
    with pytest.raises(InputError, match=message):
        gen.validate_request(GenerationRequest("x", **kw))


def test_node_outputs_image_and_text_and_counts_batch_frames(cache, instruct_checkpoint: Path) -> None:
    from hunyuan_image3.nodes.generate import HunyuanImage3Generate

    node = HunyuanImage3Generate()
    assert node.RETURN_TYPES == ("IMAGE", "STRING")
    optional = HunyuanImage3Generate.INPUT_TYPES()["optional"]
    assert [k for k in optional if k.startswith("image_")] == ["image_1", "image_2", "image_3"]
    assert optional["bot_task"][0] == ["image", "think", "recaption", "think_recaption"]
    handle = cache.load(LoadSpec(str(instruct_checkpoint)))
    batch = torch.cat([gen.pil_to_image_tensor(FUSE)] * 2)  # a batch of 2 frames: 2 images
    out = node.generate(handle, "blend them", 4, 2, 2.0, "1024x1024", 1024, 1024, bot_task="recaption",
                        max_new_tokens=3, image_1=gen.pil_to_image_tensor(EDIT), image_2=batch)
    image, text = out["result"]
    assert image.shape == (1, 1024, 1024, 3) and text.startswith("<recaption>")
    assert out["ui"]["text"][-1] == f"model text: {text}"
    assert "text 3 tokens" in out["ui"]["text"][0]
    plain = node.generate(handle, "a cat", 4, 1, 2.0, "1024x1024", 1024, 1024)
    assert plain["result"][1] == "" and not any(t.startswith("model text") for t in plain["ui"]["text"])
    with pytest.raises(InputError, match="4 reference images"):
        node.generate(handle, "x", 4, 1, 2.0, "1024x1024", 1024, 1024, image_1=batch, image_2=batch)


def test_reference_images_and_text_enter_the_memory_estimate(cache, instruct_checkpoint: Path, monkeypatch) -> None:
    from hunyuan_image3.hunyuan_loader.load.per_run import inference_bytes
    from hunyuan_image3.memory import estimator

    loaded = _loaded(cache, instruct_checkpoint)
    proc = loaded.model.image_processor
    per_image = []
    for image in (EDIT, FUSE):
        w, h = proc.vae_reso_group.get_target_size(*image.size)
        per_image.append((h // proc.vae_info.h_factor) * (w // proc.vae_info.w_factor) + proc.vit_info.max_token_length
                         + estimator.SPECIAL_TOKENS_PER_REFERENCE_IMAGE)
    assert gen.reference_image_tokens(loaded.model, [EDIT, FUSE]) == sum(per_image)
    req = GenerationRequest("x", images=[EDIT, FUSE], bot_task="think", max_new_tokens=100)
    assert gen.extra_tokens(loaded, req) == sum(per_image) + 100
    base = estimator.tokens_for_image(loaded.model.config, 1024, 1024)
    assert estimator.tokens_for_image(loaded.model.config, 1024, 1024, extra_tokens=500) == base + 2 * 500  # CFG
    assert inference_bytes(loaded, 1024, 1024, 10**6) > inference_bytes(loaded, 1024, 1024)  # tiny model: VAE-bound
    # the real model (config None = its sizes): 3 reference images at 1 MP + 729 ViT tokens each
    three = 3 * (4096 + 729 + estimator.SPECIAL_TOKENS_PER_REFERENCE_IMAGE)
    real = estimator.estimate_inference_gb(1024, 1024, moe_impl="gather_scatter")
    assert estimator.estimate_inference_gb(1024, 1024, moe_impl="gather_scatter", extra_tokens=three) > 1.8 * real
    ref = estimator.estimate_inference_gb(1024, 1024, moe_impl="reference", extra_tokens=4096 + 729)
    assert ref > estimator.estimate_inference_gb(1024, 1024, moe_impl="reference") * 1.5
    # the run's placement (auto-offload decision, OOM retry) gets the count
    seen: list[int] = []
    real = gen.run_placement

    def spy(*args, **kwargs):
        seen.append(kwargs.get("extra_tokens", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "run_placement", spy)
    _run(loaded, images=[EDIT, FUSE], resolution="1024x1024", bot_task="think", max_new_tokens=2)
    assert seen == [sum(per_image) + 2]


def test_long_inputs_get_the_models_full_length_for_the_call(cache, instruct_checkpoint: Path) -> None:
    # The official code caps the input at generation_config.max_length (12,800 of 22,800 positions): the pack
    # raises it to the model's positions for the call, restores it, and says clearly when even that is short.
    loaded = _loaded(cache, instruct_checkpoint)
    cfg, config = loaded.model.generation_config, loaded.model.config
    cfg.max_length = 300  # shorter than 2 reference images (2 x 278 tokens) + the 256-token image
    try:
        result, _ = _run(loaded, images=[EDIT, FUSE], resolution="1024x1024")
        assert result.image.shape == (1, 1024, 1024, 3) and cfg.max_length == 300
        positions, config.max_position_embeddings = config.max_position_embeddings, 400
        try:
            with pytest.raises(InputError, match=r"would be \d+ tokens \(2 reference image\(s\), .*more than it takes \(400\)"):
                _run(loaded, images=[EDIT, FUSE], resolution="1024x1024")
        finally:
            config.max_position_embeddings = positions
    finally:
        cfg.max_length = 12800


def test_cli_images_bot_task_and_model_text(cache, instruct_checkpoint: Path, base_checkpoint: Path, tmp_path: Path,
                                            capsys) -> None:
    from hunyuan_image3.hunyuan_loader.cli import main as cli

    EDIT.save(tmp_path / "a.png")
    FUSE.save(tmp_path / "b.jpg")
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(instruct_checkpoint), "--image", str(tmp_path / "a.png"), "--image",
            str(tmp_path / "b.jpg"), "--bot-task", "think_recaption", "--max-new-tokens", "3", "--steps", "1",
            "--guidance", "2", "--out", str(out)]
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    text = [ln for ln in lines if ln.startswith("model text:")]
    assert len(text) == 1 and text[0].startswith("model text: <think>")
    assert any(ln.startswith("stages:     text") and "(3 tokens)" in ln for ln in lines)
    assert Image.open(out).size == (1024, 1024)
    loads = cache.load_count
    for bad, message in (
        (["--model", str(base_checkpoint), "--image", str(tmp_path / "a.png")], "base checkpoints take no reference"),
        (["--model", str(base_checkpoint), "--bot-task", "think"], "bot_task 'think' needs an Instruct checkpoint"),
        (["--model", str(instruct_checkpoint), "--image", str(tmp_path / "nope.png")], "nope.png: no such file"),
        (["--model", str(instruct_checkpoint), "--max-new-tokens", "0"], "max_new_tokens must be between 1"),
    ):
        assert cli.main(["generate", *bad, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert cache.load_count == loads  # refused before loading

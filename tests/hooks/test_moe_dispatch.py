"""Gather/scatter MoE dispatch reproduces the reference GShard routing exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_model import build, load_test_model

from hunyuan_image3.hunyuan_loader.hooks.moe_dispatch import (
    active_moe_impl,
    find_moe_blocks,
    install_moe_dispatch,
    routing_for,
)
from hunyuan_image3.hunyuan_loader.hooks.registry import registry
from hunyuan_image3.hunyuan_loader.test_model import load_remote_code, wrap_moe_block

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def modeling():
    return load_remote_code("base")


def _block(modeling, dtype=torch.bfloat16, seed=0, **cfg):
    config = modeling.HunyuanImage3Config(**cfg)
    torch.manual_seed(seed)
    block = modeling.HunyuanMoE(config, 0)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    block.to(dtype)
    block.gate.wg.float()
    return wrap_moe_block(block, config), block


def _skew(block, mode: str) -> None:
    w = block.gate.wg.weight.data
    if mode == "skewed":
        w[0] += 3.0 * w.mean(0)
        w[1] = w[0] * 0.98
        w *= 4.0
    elif mode == "ties":
        w[1] = w[0]
        w[5] = w[4]
    elif mode == "one_hot":  # one expert wins by far; softmax underflows for the rest
        w[3] = 50.0


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("mode", ["uniform", "skewed", "ties", "one_hot"])
@pytest.mark.parametrize("topk", [1, 2, 3])
def test_layer_equivalence_random_inputs(modeling, drop: bool, mode: str, topk: int) -> None:
    model, block = _block(modeling, moe_topk=[topk], moe_drop_tokens=drop, capacity_factor=0.5,
                          norm_topk_prob=topk != 3, routed_scaling_factor=1.7)
    _skew(block, mode)
    x = torch.randn(3, 97, 64, dtype=torch.bfloat16) + 0.5
    with torch.no_grad():
        ref = block(x)
        assert install_moe_dispatch(model, "gather_scatter") == 1
        assert active_moe_impl(model) == "gather_scatter"
        ours = block(x)
        install_moe_dispatch(model, "reference")
        assert active_moe_impl(model) == "reference"
        again = block(x)
    assert torch.equal(ref, again)
    # bit-identical on this CPU; other CPUs' bf16 kernels (AVX512-BF16) may differ by one bf16 step
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1.6e-2, atol=2e-2)
    if drop:  # drops really happen: without them the output differs
        _, combine, _, counts = block.gate(x.reshape(-1, 64))
        assert int(counts.max()) > combine.shape[-1]


def test_install_is_idempotent_and_finds_blocks(base_checkpoint: Path) -> None:
    model = load_test_model(base_checkpoint)
    blocks = find_moe_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    assert all(b is layer.mlp for b, layer in zip(blocks, model.model.layers))
    assert install_moe_dispatch(model, "gather_scatter") == 4
    assert install_moe_dispatch(model, "gather_scatter") == 4
    install_moe_dispatch(model, "reference")
    assert "forward" not in blocks[0].__dict__
    with pytest.raises(ValueError):
        install_moe_dispatch(model, "flashinfer")


def test_routing_reads_per_layer_topk(modeling) -> None:
    config = modeling.HunyuanImage3Config(moe_topk=[2, 3, 1], moe_drop_tokens=True, capacity_factor=0.25)
    assert [routing_for(config, i).topk for i in range(4)] == [2, 3, 1, 1]
    assert routing_for(config, 0).drop_tokens and routing_for(config, 0).capacity_factor == 0.25


def test_works_under_layer_hooks(modeling) -> None:
    """A pre-hook on the decoder layer that swaps weights in (like block streaming) still applies."""
    config = modeling.HunyuanImage3Config()
    torch.manual_seed(1)
    layer = modeling.HunyuanImage3DecoderLayer(config, 0).to(torch.bfloat16)
    layer.mlp.gate.wg.float()
    host = {k: v.clone() for k, v in layer.state_dict().items()}
    for p in layer.mlp.experts.parameters():
        p.data.zero_()

    def stream_in(module, args):
        module.load_state_dict(host)

    layer.register_forward_pre_hook(stream_in)
    holder = torch.nn.Module()
    holder.config, holder.layers = config, torch.nn.ModuleList([layer])
    x = torch.randn(2, 33, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = layer(x)[0]
        install_moe_dispatch(holder, "gather_scatter")
        ours = layer(x)[0]
    # bit-identical on this CPU; other CPUs' bf16 kernels (AVX512-BF16) may differ by one bf16 step
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1.6e-2, atol=2e-2)


def _images(path: Path, quant, impl: str, **kw):
    model = load_test_model(path, quant, **kw)
    install_moe_dispatch(model, impl)
    model.generation_config.diff_infer_steps = 3  # Instruct reads steps from here only
    img = model.generate_image("a lighthouse", seed=5, image_size="512x2048",
                               diff_infer_steps=3, diff_guidance_scale=4.0)
    if isinstance(img, tuple):
        img = img[1][0]
    x = torch.randn(2, 50, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model(inputs_embeds=x.to(torch.bfloat16)).float()
    return np.asarray(img).astype(np.int16), hidden


@pytest.mark.parametrize(
    ("variant", "quant", "drop"),
    [("base", None, False), ("base", None, True), ("base", "int8", False), ("base", "nf4", True),
     ("instruct", None, True), ("instruct", "int8", True), ("instruct", "nf4", False)],
)
def test_images_match_reference(tmp_path_factory, variant: str, quant, drop: bool) -> None:
    path = _checkpoint(tmp_path_factory, variant, drop)
    ref_img, ref_hidden = _images(path, quant, "reference")
    img, hidden = _images(path, quant, "gather_scatter")
    torch.testing.assert_close(hidden, ref_hidden, rtol=2e-2, atol=2e-2)
    diff = np.abs(img - ref_img)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8


_BUILT: dict[tuple[str, bool], Path] = {}


def _checkpoint(tmp_path_factory, variant: str, drop: bool) -> Path:
    key = (variant, drop)
    if key not in _BUILT:
        overrides = {"moe_drop_tokens": True, "capacity_factor": 0.5} if drop else {}
        _BUILT[key] = build(tmp_path_factory, variant, **overrides)
    return _BUILT[key]


@pytest.mark.gpu
def test_cuda_equivalence_and_memory(modeling) -> None:
    model, block = _block(modeling, moe_topk=[2], norm_topk_prob=True)
    _skew(block, "skewed")
    model.cuda()
    x = torch.randn(2, 4096, 64, dtype=torch.bfloat16, device="cuda") + 0.5
    peaks = {}
    outs = {}
    for impl in ("reference", "gather_scatter"):
        install_moe_dispatch(model, impl)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            outs[impl] = block(x)
        torch.cuda.synchronize()
        peaks[impl] = torch.cuda.max_memory_allocated() - base
    ref = outs["reference"].float()
    assert float((outs["gather_scatter"].float() - ref).abs().max()) <= 1e-2 * float(ref.abs().max())
    assert peaks["gather_scatter"] * 5 < peaks["reference"]


def test_per_layer_topk_list_checkpoint(tmp_path_factory) -> None:
    path = build(tmp_path_factory, "base", moe_topk=[2, 1, 3, 2], moe_drop_tokens=True, capacity_factor=0.75)
    model = load_test_model(path)
    assert [b.gate.moe_topk for b in find_moe_blocks(model)] == [2, 1, 3, 2]
    x = torch.randn(2, 64, model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        ref = model.model(inputs_embeds=x)
        install_moe_dispatch(model, "gather_scatter")
        assert [r.topk for r in registry(model).get("moe_dispatch").rules] == [2, 1, 3, 2]
        ours = model.model(inputs_embeds=x)
    # bit-identical on this CPU; other CPUs' bf16 kernels (AVX512-BF16) may differ by one bf16 step
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1.6e-2, atol=2e-2)

"""bench/e2e.py: the stage timeline of one image on the test checkpoint (CPU), and the 32-layer projection."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name: str):
    """A module of bench/ (its scripts import each other by plain name)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def e2e():
    return _bench_module("e2e")


def test_projection_scales_the_layers_and_keeps_the_rest(e2e) -> None:
    st = e2e.Stages(text_tokens=10, text_s=1.0, text_ms_per_token=100.0, text_layer_ms_per_token=40.0, prep_s=2.0,
                    step_ms=[300.0, 50.0, 60.0, 50.0], step_layer_ms=[200.0, 40.0, 40.0, 44.0], vae_s=0.5,
                    total_s=4.0)
    p = e2e.projection(st, n_layers=4, steps=3)
    # later steps: median 50 ms, of which layers 40 (10 per layer): 32 x 10 + 10 of the rest
    assert p["per_layer_ms"] == pytest.approx(10.0) and p["rest_ms"] == pytest.approx(10.0)
    assert p["step_ms"] == pytest.approx(330.0)
    assert p["token_ms"] == pytest.approx(40.0 * 8 + 60.0)  # the layers' 40 ms x 32/4, the other 60 as measured
    assert p["image_s"] == pytest.approx(2.0 + 3 * 0.330 + 0.5 + 10 * 0.380)


def test_timeline_of_one_image_on_the_test_checkpoint(e2e, base_checkpoint: Path) -> None:
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
    from hunyuan_image3.hunyuan_loader.load.pipeline import load_model
    from hunyuan_image3.hunyuan_loader.request import GenerationRequest

    loaded = load_model(LoadSpec(str(base_checkpoint)))
    before = {m: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in loaded.model.modules()}
    tl = e2e.Timeline(torch.device("cpu"))
    result = e2e.run_image(loaded, GenerationRequest("a fox", seed=1, steps=3, resolution="256x256"), tl)
    st = e2e.stages(tl)
    n_layers = len(loaded.model.model.layers)
    assert result.steps == 3 and len(tl.step_ends) == 3
    assert len(st.step_ms) == 3 and len(st.step_layer_ms) == 3
    assert all(0 < lay <= step for lay, step in zip(st.step_layer_ms, st.step_ms))  # the layers are inside the step
    assert st.text_tokens == 0 and st.prep_s >= 0 and len(tl.vae) == 2 and st.vae_s > 0
    assert st.total_s >= st.prep_s + sum(st.step_ms) / 1e3 + st.vae_s
    # the bench's hooks are gone: every module has the pack's hooks only, the VAE its own decode
    assert {m: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in loaded.model.modules()} == before
    assert "decode" not in loaded.model.vae.__dict__
    assert n_layers >= 1


@pytest.fixture(scope="module")
def e2e_profile():
    return _bench_module("e2e_profile")


def test_profile_summary_counts_host_syncs_and_ranks_the_ops(e2e_profile) -> None:
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            a.sum().item()  # three values read back: three host syncs on a GPU
        for _ in range(20):
            a = torch.mm(a, a) / 256
    s = e2e_profile.summarise(prof.key_averages(), passes=4, rows=3)
    assert s.passes == 4 and s.syncs.get("aten::item") == 3
    assert len(s.top_host) == 3 and s.top_host[0].ms >= s.top_host[-1].ms
    assert "aten::mm" in [op.name for op in s.top_host]
    assert s.top_device == [] and s.launches == 0  # a CPU profile has no device time and no launches


def test_profile_of_one_image_on_the_test_checkpoint(e2e, e2e_profile, base_checkpoint: Path) -> None:
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
    from hunyuan_image3.hunyuan_loader.load.pipeline import load_model
    from hunyuan_image3.hunyuan_loader.request import GenerationRequest

    loaded = load_model(LoadSpec(str(base_checkpoint)))
    req = GenerationRequest("a fox", seed=1, steps=2, resolution="256x256")
    s = e2e_profile.profile_image(loaded, req, e2e.run_image, e2e.Timeline(torch.device("cpu")), rows=5)
    assert s.passes == 2  # base: one decoder pass per step, both CFG rows in one batch
    assert len(s.top_host) == 5 and all(op.calls > 0 for op in s.top_host)
    assert "decode" not in loaded.model.vae.__dict__  # the bench's wraps came off


def test_without_runs_the_image_without_the_named_entries_then_with_them(e2e, base_checkpoint: Path) -> None:
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
    from hunyuan_image3.hunyuan_loader.hooks.registry import hook_names
    from hunyuan_image3.hunyuan_loader.load.pipeline import load_model
    from hunyuan_image3.hunyuan_loader.request import GenerationRequest

    loaded = load_model(LoadSpec(str(base_checkpoint)))
    names = hook_names(loaded.model)
    assert "moe_dispatch" in names
    seen = []
    real_run = e2e.run_image

    def spying_run(loaded_, req_, tl_):
        seen.append(hook_names(loaded_.model))
        return real_run(loaded_, req_, tl_)

    req = GenerationRequest("a fox", seed=1, steps=3, resolution="256x256")
    e2e.run_image, saved = spying_run, e2e.run_image
    try:
        off, on, ratios = e2e.compare_without(loaded, req, ["moe_dispatch"], torch.device("cpu"))
    finally:
        e2e.run_image = saved
    assert seen == [[n for n in names if n != "moe_dispatch"], names]  # without it, then with it again
    assert hook_names(loaded.model) == names
    assert len(off.step_ms) == len(on.step_ms) == 3
    assert ratios["step_ms"] > 0 and ratios["total_s"] > 0 and ratios["text_ms_per_token"] == 0.0
    with pytest.raises(SystemExit, match="rope_cache not installed"):
        e2e.compare_without(loaded, req, ["rope_cache"], torch.device("cpu"))

"""The model's hook registry (hunyuan_loader/hooks/registry.py): one documented order whatever the
install order, every loader / placement's hooks by name, and remove_all giving the official forward back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_model import load_test_model
from model_compare import logits
from residency_models import inputs, make_model
from torch import nn

from hunyuan_image3.hunyuan_loader.core import hf_compat
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate
from hunyuan_image3.hunyuan_loader.hooks.registry import (
    HOOK_ORDER,
    HookRegistry,
    ModuleHooks,
    forward_hook_count,
    hook_names,
    registry,
    remove_all_hooks,
)
from hunyuan_image3.hunyuan_loader.hooks.split_exec import SplitExecution
from hunyuan_image3.hunyuan_loader.hooks.streaming import connect_streaming
from hunyuan_image3.hunyuan_loader.load import multi_gpu
from hunyuan_image3.hunyuan_loader.load.pipeline import load_model
from hunyuan_image3.memory import devices as dv
from hunyuan_image3.memory.residency.multi import MultiDeviceResidency

CUDA = torch.cuda.is_available()
# transformers 5.x: the test model's prepare_inputs_for_generation takes 5.x generate's ``cache`` keyword too
_V5 = ["cache_kwarg_name"] if hf_compat.cache_kwarg_renamed() else []
# the test model's code defines the official HunyuanStaticCache (base and Instruct code both do): its end is
# read once per forward, and on 5.x its one-argument lazy_initialization is fixed
_CACHE = [*(["static_cache_init"] if hf_compat.lazy_init_takes_values() else []), "cache_end_once"]
FIXES_CPU = [*_CACHE, *_V5, "mask_alignment", "vision_input_alignment", "cpu_input_casts"]  # every CPU load
FIXES_GPU = [*_CACHE, *_V5, "mask_alignment", "vision_input_alignment"]
# ... and the Instruct test model's ViT processor is told to return tensors, as the official one needs, and
# its CachedRoPE (M:973-1022) hits its cache
_V5_INSTRUCT = ["vit_return_tensors"] if hf_compat.image_processors_return_lists() else []
_INSTRUCT_CPU = [*_CACHE, *_V5, *_V5_INSTRUCT, "rope_cache", *FIXES_CPU[len(_CACHE) + len(_V5):]]


# -- the registry on its own ----------------------------------------------------------------------
class _Recorder(ModuleHooks):
    """A pre-hook and a post-hook on ``module`` that write ``name`` to ``log``."""

    def __init__(self, module: nn.Module, name: str, log: list[str]) -> None:
        super().__init__()
        self.module, self.name, self.log = module, name, log

    def hooks(self):
        return [(self.module, "pre", lambda *_: self.log.append("pre " + self.name)),
                (self.module, "post", lambda *_: self.log.append("post " + self.name))]


@pytest.mark.parametrize("install_order", [HOOK_ORDER, tuple(reversed(HOOK_ORDER)),
                                           HOOK_ORDER[1::2] + HOOK_ORDER[::2]])
def test_any_install_order_runs_in_the_documented_order(install_order) -> None:
    module, log = nn.Linear(2, 2), []
    reg = HookRegistry()
    for name in install_order:
        assert reg.install(name, _Recorder(module, name, log))
    assert reg.names() == list(HOOK_ORDER)
    module(torch.zeros(1, 2))
    assert log == [f"pre {n}" for n in HOOK_ORDER] + [f"post {n}" for n in HOOK_ORDER]
    # every handle kept: one pre and one post per entry, nothing else on the module
    assert [len(reg.get(n).handles) for n in HOOK_ORDER] == [2] * len(HOOK_ORDER)
    assert len(module._forward_pre_hooks) == len(module._forward_hooks) == len(HOOK_ORDER)


def test_install_is_idempotent_remove_and_remove_all() -> None:
    module, log = nn.Linear(2, 2), []
    reg = HookRegistry()
    first = _Recorder(module, "block_streaming", log)
    assert reg.install("block_streaming", first)
    assert not reg.install("block_streaming", _Recorder(module, "again", log))  # the first one stays
    assert reg.get("block_streaming") is first and len(module._forward_pre_hooks) == 1
    with pytest.raises(ValueError, match="HOOK_ORDER"):
        reg.install("my_new_hook", _Recorder(module, "x", log))
    reg.install("mask_alignment", _Recorder(module, "mask_alignment", log))
    assert reg.remove("block_streaming") and not reg.remove("block_streaming")
    assert reg.names() == ["mask_alignment"] and len(module._forward_pre_hooks) == 1
    reg.remove_all()
    assert reg.names() == [] and forward_hook_count(module) == 0


def test_per_call_entry_is_listed_only_while_active() -> None:
    reg, seen = HookRegistry(), []
    with reg.active("diffusion_progress", _Recorder(nn.Linear(1, 1), "p", [])):
        seen = reg.names()
        with pytest.raises(RuntimeError, match="already installed"):
            with reg.active("diffusion_progress", _Recorder(nn.Linear(1, 1), "p", [])):
                pass
    assert seen == ["diffusion_progress"] and reg.names() == []


# -- split boundaries and block streaming on the same blocks (CPU parts, the streamer synchronous) -----
def _split(model: nn.Module):
    n = len(model.model.layers)
    tmp = MultiDeviceResidency(model, list(model.model.layers), dv.plan_split([1] * n, 0, ["cpu"], [10**9], 0))
    sizes, other = tmp.block_bytes, tmp.other_bytes
    tmp.close()
    room = other + 3 * sizes[0] + 1000  # three blocks per part
    return dv.plan_split(sizes, other, ["cpu", "cpu"], [room, room - other], 1000, prefetch_slots=1)


@pytest.mark.parametrize("split_first", [True, False])
def test_split_boundaries_run_before_block_streaming_in_either_install_order(split_first: bool) -> None:
    model = make_model("bf16", n=6)
    blocks = list(model.model.layers)
    split = _split(model)
    ref = model(inputs())
    execution = SplitExecution(blocks, split.block_devices, "cpu", starts=[0, 3], attach=False)
    if split_first:
        registry(model).install("split_boundaries", execution)
    res = MultiDeviceResidency(model, blocks, split, prefetch_slots=1, allow_cpu_streaming=True)
    res.apply_split()
    connect_streaming(model, res.managers)
    res.usable_by_device = lambda: [10**12, 5]
    _, extra = res.extra_needed(res.block_bytes[0] + 5)
    with res.stream_extra(extra) as plan:  # the second part streams blocks 3 and 5 for this run
        assert plan.streamed == [3, 5]
        if not split_first:
            registry(model).install("split_boundaries", execution)
        assert hook_names(model) == ["split_boundaries", "block_streaming"]
        pres = list(blocks[5]._forward_pre_hooks.values())
        posts = list(blocks[5]._forward_hooks.values())
        assert len(pres) == len(posts) == 2
        assert pres[0] is execution._pres[5] and posts[0] == execution._after_last  # the split's first
        with torch.no_grad():
            assert torch.equal(model(inputs()), ref)
    assert hook_names(model) == ["split_boundaries"]  # the run's streamer closed: its entry went with it
    res.close()
    remove_all_hooks(model)
    assert forward_hook_count(model) == 0


# -- every loader and placement on the stand-in checkpoint ------------------------------------------
LOADS = [  # (variant, spec keywords, the model's hooks on a CPU, the CFG replica's)
    ("base", dict(quant="bf16"), [*FIXES_CPU, "moe_dispatch"], None),
    ("base", dict(quant="int8"), [*FIXES_CPU, "moe_dispatch"], None),  # w8a16
    ("base", dict(quant="int8", int8_format="bnb"), [*FIXES_CPU, "moe_dispatch"], None),
    ("base", dict(quant="nf4"), [*FIXES_CPU, "moe_dispatch"], None),
    ("base", dict(quant="bf16", moe_impl="reference"), FIXES_CPU, None),
    ("base", dict(quant="bf16", engine="from_pretrained"), [*FIXES_CPU, "moe_dispatch"], None),
    ("base", dict(quant="bf16", devices="cpu,cpu", multi_gpu="split"),
     [*FIXES_CPU, "split_boundaries", "moe_dispatch"], None),
    ("base", dict(quant="bf16", devices="cpu,cpu", multi_gpu="cfg_parallel"),
     [*FIXES_CPU, "moe_dispatch", "cfg_rows"], ["moe_dispatch"]),
    ("instruct", dict(quant="bf16"), [*_INSTRUCT_CPU, "moe_dispatch"], None),
]


def _load(path: Path, kw: dict):
    kw = dict(kw)
    engine = kw.pop("engine", "blocks")
    return load_model(LoadSpec(str(path), **kw), engine=engine)


@pytest.mark.parametrize(("variant", "kw", "names", "replica"), LOADS,
                         ids=["-".join(f"{v}" for v in (c[0], *c[1].values())) for c in LOADS])
def test_hooks_of_each_loader_and_placement(request, monkeypatch, one_thread, variant, kw, names, replica) -> None:
    monkeypatch.setenv(multi_gpu.LOGICAL_ENV, "1")
    loaded = _load(request.getfixturevalue(f"{variant}_checkpoint"), kw)
    try:
        assert hook_names(loaded.model) == names
        if replica is not None:
            assert hook_names(loaded.residency.parallel.replicas[0].module) == replica
    finally:
        if loaded.residency is not None:
            loaded.residency.close()
    if replica is not None:  # closing the residency took the CFG wrapper off (the replicas are gone)
        assert "cfg_rows" not in hook_names(loaded.model)


@pytest.mark.parametrize("variant", ["base", "instruct"])
def test_per_call_hooks_are_listed_during_a_generate_call_only(cache, request, one_thread, variant) -> None:
    path = request.getfixturevalue(f"{variant}_checkpoint")
    loaded = cache.get(cache.load(LoadSpec(str(path))))
    seen: list[list[str]] = []
    # a few think tokens: the text stage runs under text_progress (more tokens only take minutes)
    req = GenerationRequest("a red fox", seed=1, steps=2, resolution="1024x1024",
                            bot_task="think" if variant == "instruct" else None, max_new_tokens=4)
    generate(loaded, req, progress=lambda *_: seen.append(hook_names(loaded.model)))
    # Instruct: the per-token criteria and the last-position logits for the whole generate_image call
    per_call = ("diffusion_progress", "finite_output", "text_progress", "last_logits")
    expected = list(per_call) if variant == "instruct" else list(per_call[:2])
    assert seen and all([n for n in names if n in per_call] == expected for names in seen), seen
    assert not any(n in per_call for n in hook_names(loaded.model))


def test_the_preview_entry_is_listed_inside_the_progress_wrap_during_a_call_only(
    cache, base_checkpoint: Path, one_thread, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    seen: list[list[str]] = []
    req = GenerationRequest("a red fox", seed=1, steps=2, resolution="1024x1024")
    generate(loaded, req, preview=lambda *_: seen.append(hook_names(loaded.model)))
    # the preview right after (inside) the progress wrap; then the call's decode check (HOOK_ORDER)
    assert seen and all(names[-3:] == ["diffusion_progress", "diffusion_preview", "finite_output"]
                        for names in seen), seen
    assert not any(n.startswith("diffusion_") for n in hook_names(loaded.model))


# -- remove_all: the official model's forward, bit for bit ---------------------------------------------
@pytest.mark.parametrize("kw", [dict(quant="bf16"), dict(quant="bf16", devices="cpu,cpu", multi_gpu="split"),
                                dict(quant="bf16", devices="cpu,cpu", multi_gpu="cfg_parallel")],
                         ids=["one-device", "split", "cfg_parallel"])
def test_remove_all_gives_the_official_forward_back(base_checkpoint: Path, monkeypatch, one_thread, kw) -> None:
    monkeypatch.setenv(multi_gpu.LOGICAL_ENV, "1")
    loaded = _load(base_checkpoint, kw)
    model = loaded.model
    assert forward_hook_count(model) > 0 and "moe_dispatch" in hook_names(model)
    remove_all_hooks(model)
    assert hook_names(model) == []
    assert forward_hook_count(model) == 0
    for name, module in model.named_modules():
        assert "forward" not in module.__dict__ and "_old_forward" not in module.__dict__, name
        assert not [a for a in module.__dict__ if a.startswith("_hy3")], name
    official = load_test_model(base_checkpoint)  # transformers alone: the checkpoint's own MoE dispatch
    assert forward_hook_count(official) == 0
    assert torch.equal(logits(model), logits(official))
    if loaded.residency is not None:
        loaded.residency.close()


# -- GPU: block streaming is an entry while blocks stream ------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="weight streaming needs CUDA")
def test_gpu_smart_streaming_hooks(base_checkpoint: Path, monkeypatch) -> None:
    import json

    n = json.loads((base_checkpoint / "config.json").read_text())["num_hidden_layers"]
    monkeypatch.setenv("HUNYUAN_MIN_STREAMED_BLOCKS", str(n // 2))
    loaded = load_model(LoadSpec(str(base_checkpoint), offload="budget", vram_budget_gb=1000.0, headroom_gb=0.0))
    res = loaded.residency
    try:
        assert res.plan.streamed
        assert hook_names(loaded.model) == [*FIXES_GPU, "block_streaming", "moe_dispatch"]
        streamed = loaded.model.model.layers[res.plan.streamed[0]]
        assert len(streamed._forward_pre_hooks) == len(streamed._forward_hooks) == 1
        ref = logits(loaded.model)
        res.park()
        assert hook_names(loaded.model) == [*FIXES_GPU, "moe_dispatch"]
        res.restore()
        assert hook_names(loaded.model) == [*FIXES_GPU, "block_streaming", "moe_dispatch"]
        assert torch.equal(logits(loaded.model), ref)
    finally:
        res.close()
    assert hook_names(loaded.model) == [*FIXES_GPU, "moe_dispatch"]
    remove_all_hooks(loaded.model)
    assert forward_hook_count(loaded.model) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="weight streaming needs CUDA")
def test_gpu_split_and_cfg_parallel_hooks(base_checkpoint: Path, monkeypatch) -> None:
    monkeypatch.setenv(multi_gpu.LOGICAL_ENV, "1")
    split = load_model(LoadSpec(str(base_checkpoint), devices="cuda:0,cuda:0", multi_gpu="split"))
    try:
        assert hook_names(split.model) == [*FIXES_GPU, "split_boundaries", "moe_dispatch"]
    finally:
        split.residency.close()
    del split
    from hunyuan_image3.hunyuan_loader.cli.card_plan import checkpoint_sizes

    sizes = checkpoint_sizes(base_checkpoint)
    block, other = max(sizes.block_bytes["bf16"]), sizes.other_bytes["bf16"]
    cfg = load_model(LoadSpec(str(base_checkpoint), devices="cuda:0,cuda:0", multi_gpu="cfg_parallel",
                              offload="budget", vram_budget_gb=(other + 3.5 * block + 2**20) / dv.GIB,
                              headroom_gb=2**20 / dv.GIB))
    try:
        assert cfg.residency.plan.streamed
        assert hook_names(cfg.model) == [*FIXES_GPU, "block_streaming", "moe_dispatch", "cfg_rows"]
        assert hook_names(cfg.residency.parallel.replicas[0].module) == ["block_streaming", "moe_dispatch"]
    finally:
        cfg.residency.close()

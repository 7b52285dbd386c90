"""Several devices at run time: the split (activations moved at block boundaries) and CFG-parallel
(the CFG rows on replicas at once), run on the CPU with two logical CPU parts and, marked gpu, on one
GPU with two logical parts ("cuda:0,cuda:0") and across a real device boundary ("cuda:0,cpu").
Per-device bookkeeping (bytes per device, soft unload, streaming more on the short device only)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from residency_models import inputs, make_model
from torch import nn

from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate
from hunyuan_image3.hunyuan_loader.hooks.cfg_parallel import (
    CfgParallel,
    CfgParallelResidency,
    clone_decoder,
    merge_rows,
    take_rows,
)
from hunyuan_image3.hunyuan_loader.hooks.registry import move_to
from hunyuan_image3.hunyuan_loader.hooks.split_exec import SplitExecution, SplitResidency
from hunyuan_image3.hunyuan_loader.load import multi_gpu
from hunyuan_image3.memory import devices as dv
from hunyuan_image3.memory.residency import ResidencyState, weight_tensors
from hunyuan_image3.memory.residency.multi import MultiDeviceResidency

REQ = GenerationRequest("a red fox in snow", seed=3, steps=3, resolution="1024x1024")
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _logical(monkeypatch):
    monkeypatch.setenv(multi_gpu.LOGICAL_ENV, "1")


def _image(cache, path: Path, req: GenerationRequest = REQ, **spec) -> tuple[torch.Tensor, object, list[str]]:
    loaded = cache.get(cache.load(LoadSpec(str(path), **spec)))
    result = generate(loaded, req)
    return result.image, loaded, result.notes


# -- CPU: two logical CPU parts ---------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["bf16", "int8"])
def test_split_over_two_cpu_parts_gives_the_same_image(cache, base_checkpoint: Path, quant: str) -> None:
    ref, _, _ = _image(cache, base_checkpoint, quant=quant)
    img, loaded, notes = _image(cache, base_checkpoint, quant=quant, devices="cpu,cpu", multi_gpu="split")
    assert isinstance(loaded.residency, SplitResidency)
    assert loaded.residency.split.ranges == ((0, 2), (2, 4))
    assert torch.equal(img, ref)
    assert any(n.startswith("split over cpu: blocks 0-1") for n in notes), notes
    execution = loaded.residency.execution
    assert len(execution.handles) == 5  # every block (the rope / mask reach each one), after the last
    assert execution.starts == [0, 2] and execution.moves == 0  # both parts on the CPU: nothing to move


@pytest.mark.parametrize("mode", ["split", "cfg_parallel"])
def test_several_devices_load_through_the_one_pipeline(base_checkpoint: Path, mode: str) -> None:
    """A load on several devices takes the same steps as one on one device (plan, read+place,
    finish, adopt; the reader's statistics kept), and its residency is a Residency like any other."""
    from hunyuan_image3.hunyuan_loader.load.pipeline import load_model
    from hunyuan_image3.memory.residency import Residency

    one = load_model(LoadSpec(str(base_checkpoint)))
    loaded = load_model(LoadSpec(str(base_checkpoint), devices="cpu,cpu", multi_gpu=mode))
    try:
        assert isinstance(loaded.residency, Residency)
        st, ref = loaded.load_stats, one.load_stats
        assert set(st.phases) == set(ref.phases)  # (one device, bf16: planned once more from the headers first)
        assert {"plan", "read+place", "finish", "adopt"} <= set(st.phases)
        assert st.bytes_read == st.bytes_total == ref.bytes_total > 0 and st.order == ref.order
    finally:
        loaded.residency.close()


@pytest.mark.parametrize("variant,quant", [("base", "bf16"), ("instruct", "bf16"), ("base", "int8")])
def test_cfg_parallel_over_two_cpu_replicas(cache, request, variant: str, quant: str) -> None:
    path = request.getfixturevalue(f"{variant}_checkpoint")
    ref, _, _ = _image(cache, path, quant=quant)
    img, loaded, notes = _image(cache, path, quant=quant, devices="cpu,cpu", multi_gpu="cfg_parallel")
    residency = loaded.residency
    assert isinstance(residency, CfgParallelResidency)
    par = residency.parallel
    assert par.parallel_calls == REQ.steps  # every diffusion forward ran its two rows on the two replicas
    assert (img - ref).abs().max() <= 2 / 255
    assert any("CFG-parallel: the conditional and unconditional rows run at once on cpu, cpu" in n for n in notes)
    rep = par.replicas[0]
    assert rep.module is not loaded.model.model and rep.owned_bytes == 0  # same device: weights shared


def _rows_one_at_a_time(decoder: nn.Module):
    """The one-device decoder running each CFG row alone (what each replica computes): on a GPU the
    batched forward uses other GEMM shapes (M = 2 x tokens), so its bf16 rounding differs; this one does
    not. Returns a function that puts the decoder back."""
    from hunyuan_image3.hunyuan_loader.hooks.cfg_parallel import batch_size

    original = decoder.forward

    def forward(*args, **kwargs):
        b = batch_size(args, kwargs)
        if not b or b < 2:
            return original(*args, **kwargs)
        outs = [original(*take_rows(args, b, r, r + 1, {}), **take_rows(kwargs, b, r, r + 1, {})) for r in range(b)]
        return merge_rows(outs, {})

    decoder.forward = forward
    return lambda: decoder.__dict__.pop("forward", None)


INSTRUCT_REQ = dict(prompt="make the fox blue", seed=5, steps=2, resolution="1024x1024", bot_task="think",
                    max_new_tokens=6)


def _instruct_req() -> GenerationRequest:
    from PIL import Image

    return GenerationRequest(**INSTRUCT_REQ, images=[Image.new("RGB", (512, 512), (200, 80, 40))])


def test_cfg_parallel_instruct_with_text_stage_and_reference_image_on_cpu(cache, instruct_checkpoint: Path) -> None:
    """The GPU case that differed (think + a reference image): on the CPU, where bf16 GEMMs do not
    depend on the batch, the parallel image is the one-device image bit for bit, and so is the
    one-device image with the CFG rows run one at a time (the GPU test's reference)."""
    req = _instruct_req()
    loaded = cache.get(cache.load(LoadSpec(str(instruct_checkpoint))))
    ref = generate(loaded, req)
    undo = _rows_one_at_a_time(loaded.model.model)
    rows = generate(loaded, req)
    undo()
    par = cache.get(cache.load(LoadSpec(str(instruct_checkpoint), devices="cpu,cpu", multi_gpu="cfg_parallel")))
    result = generate(par, req)
    assert par.residency.parallel.parallel_calls == req.steps  # the diffusion rows ran on the two replicas
    assert par.residency.parallel.calls > req.steps  # the text stage (one row) went through the first device
    assert result.cot_text == ref.cot_text == rows.cot_text
    assert torch.equal(rows.image, ref.image) and torch.equal(result.image, ref.image)


def test_auto_mode_on_cpu_parts(cache, base_checkpoint: Path, distil_checkpoint: Path) -> None:
    _, loaded, _ = _image(cache, base_checkpoint, devices="cpu,cpu")
    assert isinstance(loaded.residency, CfgParallelResidency)  # each part holds the model: CFG-parallel
    _, loaded, notes = _image(cache, distil_checkpoint, devices="cpu,cpu", req=GenerationRequest("a fox", steps=2))
    assert isinstance(loaded.residency, SplitResidency)  # CFG-distilled (one row): the first device alone
    assert loaded.residency.split.devices == ("cpu",) and loaded.residency.execution is None


@pytest.mark.parametrize("mode", ["split", "cfg_parallel"])
def test_soft_unload_and_back_on_every_device(cache, base_checkpoint: Path, mode: str) -> None:
    ref, loaded, _ = _image(cache, base_checkpoint, devices="cpu,cpu", multi_gpu=mode)
    report = cache.unload("park")
    assert "Soft-unloaded" in report and loaded.residency.state is ResidencyState.PARKED
    if mode == "cfg_parallel":
        assert loaded.residency.parallel is None  # replicas are copies: dropped, copied again on the way back
    img, again, _ = _image(cache, base_checkpoint, devices="cpu,cpu", multi_gpu=mode)
    assert again is loaded and loaded.residency.state is not ResidencyState.PARKED
    assert torch.equal(img, ref)


def test_force_unload_report_on_cpu(cache, base_checkpoint: Path) -> None:
    _image(cache, base_checkpoint, devices="cpu,cpu", multi_gpu="split")
    text = cache.force_unload().text()
    assert "Force Unload: dropped" in text and "Per GPU" not in text  # no GPU: nothing per device
    assert cache.loaded is None


# -- per-device bookkeeping on a tiny model ---------------------------------------------------------
def _split_model(n: int = 6) -> tuple[nn.Module, MultiDeviceResidency, SplitExecution]:
    model = make_model("bf16", n=n)
    blocks = list(model.model.layers)
    tmp = MultiDeviceResidency(model, blocks, dv.plan_split([1] * n, 0, ["cpu"], [10**9], 0))
    sizes, other = tmp.block_bytes, tmp.other_bytes
    tmp.close()
    room = other + 3 * sizes[0] + 1000  # three blocks per device, exactly
    split = dv.plan_split(sizes, other, ["cpu", "cpu"], [room, room - other], 1000, prefetch_slots=1)
    res = MultiDeviceResidency(model, blocks, split, prefetch_slots=1, allow_cpu_streaming=True)
    res.apply_split()
    return model, res, SplitExecution(blocks, split.block_devices, "cpu")


def _forward(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs())


def test_bytes_per_device_and_transitions_keep_outputs() -> None:
    model, res, ex = _split_model()
    ref = _forward(model)
    sizes = res.block_bytes
    assert res.split.ranges == ((0, 3), (3, 6))
    assert res.gpu_bytes_by_device() == {"cpu": res.other_bytes + sum(sizes)}  # both parts count on "cpu"
    assert [m.gpu_bytes() for m in res.managers] == [res.other_bytes + sum(sizes[:3]), sum(sizes[3:])]
    assert res.plan.gpu_weight_bytes == res.gpu_bytes() and res.state is ResidencyState.RESIDENT
    # the second part is short of room: only it streams more for the run, then all comes back
    res.usable_by_device = lambda: [10**12, 5]
    low, extra = res.extra_needed(sizes[0] + 5)
    assert (low, extra) == (5, sizes[0])
    with res.stream_extra(extra) as plan:
        assert plan.parts[0].streamed == [] and plan.parts[1].streamed == [0, 2], plan.describe()
        assert plan.streamed == [3, 5]
        assert res.state is ResidencyState.STREAMING
        assert torch.equal(_forward(model), ref)
    assert res.plan.streamed == [] and res.state is ResidencyState.RESIDENT
    report = res.park(available_ram_bytes=10**12)
    assert report.moved_bytes == res.other_bytes + sum(sizes) and res.state is ResidencyState.PARKED
    assert res.gpu_bytes() == 0
    res.restore()
    assert res.state is ResidencyState.RESIDENT and torch.equal(_forward(model), ref)
    ex.close()
    res.close()


def test_stream_every_block_and_back() -> None:
    from hunyuan_image3.memory.residency import Placement, ResidencyPlan

    model, res, ex = _split_model()
    ref = _forward(model)
    previous = res.plan
    res.apply(ResidencyPlan.uniform(Placement.STREAM, res.block_bytes, res.other_bytes))
    assert res.plan.streamed == [0, 1, 2, 3, 4, 5] and len(res.plan.parts) == 2
    assert torch.equal(_forward(model), ref)
    res.apply(previous)
    assert res.plan.streamed == [] and torch.equal(_forward(model), ref)
    ex.close()
    res.close()


# -- the pieces: moves, rows, caches, replicas --------------------------------------------------------
def test_move_to_reaches_nested_tensors_once_and_leaves_caches() -> None:
    from transformers import DynamicCache

    cache = DynamicCache()
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    cos = torch.randn(4, 8)
    value = (torch.randn(2, 4, 8), {"attention_mask": mask, "position_embeddings": (cos, cos), "past_key_value": cache,
                                    "use_cache": True})
    memo: dict = {}
    moved = move_to(value, torch.device("meta"), memo)
    assert moved[0].device.type == "meta" and moved[1]["attention_mask"].device.type == "meta"
    pe = moved[1]["position_embeddings"]
    assert pe[0] is pe[1]  # the same tensor is copied once
    assert moved[1]["past_key_value"] is cache and moved[1]["use_cache"] is True
    again = move_to({"m": mask}, torch.device("meta"), memo)
    assert again["m"] is moved[1]["attention_mask"]  # remembered for the rest of the pass
    same = (torch.zeros(1), [1, 2])
    assert move_to(same, torch.device("cpu")) is same  # nothing to move: the same object


# The official decoder loop, modeling_hunyuan_image_3.py:1615-1628 (Instruct) and hunyuan.py:1667-1681
# (base): every layer is called with the SAME attention_mask / position_ids / past_key_values /
# custom_pos_emb=(cos, sin) objects, made once on the first device; only hidden_states comes from the
# layer before. The test model passes position_embeddings=(cos, sin) the same way.
OFFICIAL_LAYER_KWARGS = {
    "instruct/hunyuan_image_3/modeling_hunyuan_image_3.py": {
        "attention_mask", "position_ids", "past_key_value", "output_attentions", "use_cache", "custom_pos_emb",
        "mode", "first_step"},
    "base/hunyuan_image_3/hunyuan.py": {
        "attention_mask", "position_ids", "past_key_value", "output_attentions", "use_cache", "custom_pos_emb",
        "mode", "first_step", "gen_timestep_scatter_index"},
}


def test_official_decoder_layer_call_is_the_one_the_split_hooks_expect() -> None:
    import re

    root = Path("/tmp/official")
    if not root.is_dir():
        pytest.skip("the official HunyuanImage-3.0 code is not at /tmp/official")
    for rel, expected in OFFICIAL_LAYER_KWARGS.items():
        text = (root / rel).read_text(encoding="utf-8")
        call = re.search(r"layer_outputs = decoder_layer\((.*?)\n\s*\)\n", text, re.S)
        assert call is not None, rel
        args = [a.strip() for a in call.group(1).split(",") if a.strip()]
        assert args[0] == "hidden_states", (rel, args)
        assert {a.split("=")[0] for a in args[1:]} == expected, (rel, args)
        assert "custom_pos_emb=custom_pos_emb" in args  # the tuple (cos, sin), the same object for every layer


class _OfficialLayer(nn.Module):
    """A decoder layer with the official signature that uses every tensor it is given."""

    def __init__(self, h: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(h, h)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, custom_pos_emb=None, mode="gen_image", first_step=None,
                gen_timestep_scatter_index=None, position_embeddings=None):
        cos, sin = custom_pos_emb if custom_pos_emb is not None else position_embeddings
        h = self.proj(hidden_states) * cos + sin + position_ids[..., None]
        h = h.masked_fill(~attention_mask[:, 0, :, :1], 0.0) + gen_timestep_scatter_index[:, :1, None]
        return (h, past_key_value) if use_cache else (h,)


class _OfficialStack(nn.Module):
    def __init__(self, n: int = 5, h: int = 8, *, test_model_kwarg: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(_OfficialLayer(h) for _ in range(n))
        self.test_model_kwarg = test_model_kwarg

    def forward(self, x: torch.Tensor, cache: object) -> torch.Tensor:
        b, t, h = x.shape
        pos = torch.arange(t)[None].expand(b, -1)  # made once, on the first device, as the official code does
        cos, sin = torch.randn(b, t, h).cos(), torch.randn(b, t, h).sin()
        mask = torch.ones(b, 1, t, t, dtype=torch.bool)
        index = torch.arange(b * 2).reshape(b, 2).float()
        for layer in self.layers:
            rope = {"position_embeddings": (cos, sin)} if self.test_model_kwarg else {"custom_pos_emb": (cos, sin)}
            x = layer(x, attention_mask=mask, position_ids=pos, past_key_value=cache, output_attentions=False,
                      use_cache=True, mode="gen_image", first_step=True, gen_timestep_scatter_index=index, **rope)[0]
        return x


@pytest.mark.parametrize("test_model_kwarg", [False, True])
def test_split_moves_every_tensor_each_block_receives(test_model_kwarg: bool) -> None:
    """Blocks 2-4 on a second device ("meta" stands for it on a CPU machine): every tensor reaching ANY of
    them, nested ones included, must be on that device, not only at the boundary block (the GPU failure:
    the rope of block 3 was still on cuda:0 while its weights were on the CPU)."""
    from transformers import DynamicCache

    stack = _OfficialStack(test_model_kwarg=test_model_kwarg)
    devices = ["cpu", "cpu", "meta", "meta", "meta"]
    for layer, dev in zip(stack.layers, devices):
        layer.to(dev)
    seen: list[tuple[int, str, str]] = []

    def tensors(value, where, out):
        if isinstance(value, torch.Tensor):
            out.append((where, str(value.device)))
        elif isinstance(value, (tuple, list)):
            for j, v in enumerate(value):
                tensors(v, f"{where}[{j}]", out)
        elif isinstance(value, dict):
            for k, v in value.items():
                tensors(v, f"{where}.{k}", out)

    def recorder(i):
        def pre(_m, args, kwargs):
            found: list = []
            tensors((args, kwargs), "", found)
            seen.extend((i, where, dev) for where, dev in found)
        return pre

    ex = SplitExecution(list(stack.layers), devices, "meta")  # output stays on "meta": nothing copies out of it
    for i, layer in enumerate(stack.layers):  # registered after the split's hooks: sees what the block gets
        layer.register_forward_pre_hook(recorder(i), with_kwargs=True)
    cache = DynamicCache()
    with torch.no_grad():
        out = stack(torch.randn(2, 4, 8), cache)
    wrong = [(i, where, dev) for i, where, dev in seen if dev != devices[i]]
    assert not wrong, wrong
    assert {i for i, _, _ in seen} == set(range(5)) and len(seen) >= 5 * 6  # hidden, mask, pos, cos, sin, index
    assert out.device.type == "meta" and ex.moves == 3  # blocks 2-4 got copies (made once, at block 2)
    ex.close()
    assert all(not layer._forward_pre_hooks or len(layer._forward_pre_hooks) == 1 for layer in stack.layers)


def test_rows_split_and_merge() -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPast

    x = torch.arange(24.0).reshape(2, 3, 4)
    shared = torch.randn(3, 4)  # not batch-major: passed whole
    args, kwargs = (x,), {"mask": x[:, :1], "pos": (shared, shared), "n": 5}
    parts = [(take_rows(args, 2, r, r + 1, {}), take_rows(kwargs, 2, r, r + 1, {})) for r in range(2)]
    assert torch.equal(parts[1][0][0], x[1:]) and parts[0][1]["pos"][0] is shared and parts[1][1]["n"] == 5
    outs = [BaseModelOutputWithPast(last_hidden_state=a[0] * 2) for a, _ in parts]
    merged = merge_rows(outs, {})
    assert isinstance(merged, BaseModelOutputWithPast) and torch.equal(merged.last_hidden_state, x * 2)


class _CachedStack(nn.Module):
    """A decoder that keeps keys in a transformers cache across calls (as the image stage does)."""

    def __init__(self, n: int = 2, h: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(h, h) for _ in range(n))

    def forward(self, inputs_embeds, past_key_values=None, cache_position=None):
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            k = layer(h)[:, None]  # [batch, heads=1, seq, dim]
            keys, values = past_key_values.update(k, k, i, {"cache_position": cache_position})
            h = h + keys.mean(dim=2) + values[:, 0, -1:, :]
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=past_key_values)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cfg_parallel_keeps_one_cache_per_replica(kind: str) -> None:
    from transformers import DynamicCache, PretrainedConfig, StaticCache

    def new_cache():  # the official image stage uses a StaticCache subclass (HunyuanStaticCache)
        if kind == "dynamic":
            return DynamicCache()
        cfg = PretrainedConfig(num_hidden_layers=2, hidden_size=8, num_attention_heads=1, num_key_value_heads=1,
                               head_dim=8)
        return StaticCache(config=cfg, max_cache_len=8)

    x1, x2 = torch.randn(2, 5, 8), torch.randn(2, 1, 8)
    p1, p2 = torch.arange(5), torch.tensor([5])
    ref_model = _CachedStack()
    ref_cache = new_cache()
    with torch.no_grad():
        ref = [ref_model(x1, ref_cache, p1).last_hidden_state, ref_model(x2, ref_cache, p2).last_hidden_state]
    model = _CachedStack()
    par = CfgParallel(model, "cpu", [clone_decoder(model, "cpu")])
    cache = new_cache()
    with torch.no_grad():
        out1 = model(x1, past_key_values=cache, cache_position=p1)
        out2 = model(x2, past_key_values=out1.past_key_values, cache_position=p2)
    assert out1.past_key_values is cache and par.parallel_calls == 2
    assert torch.allclose(out1.last_hidden_state, ref[0], atol=1e-6)
    assert torch.allclose(out2.last_hidden_state, ref[1], atol=1e-6)
    with torch.no_grad():
        single = model(x1[:1], past_key_values=new_cache(), cache_position=p1)  # one row: the first device alone
        par.enabled = False
        started = model(x1, past_key_values=new_cache(), cache_position=p1).past_key_values  # both rows, unsplit
        par.enabled = True
        late = model(x2, past_key_values=started, cache_position=p2)  # a cache holding keys is not split by rows
    assert par.calls == 5 and par.parallel_calls == 2
    assert torch.allclose(single.last_hidden_state, ref[0][:1], atol=1e-6)
    assert torch.allclose(late.last_hidden_state, ref[1], atol=1e-6)
    par.close()
    assert "forward" not in model.__dict__


def test_clone_decoder_copies_weights_not_hooks() -> None:
    model = make_model("bf16", n=2)
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model.model.layers[1].mlp.experts[1].down_proj.weight = model.model.layers[1].mlp.experts[0].down_proj.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = clone_decoder(model.model, "cpu", keep=[model], copy_same_device=True)
    mine, theirs = weight_tensors(rep.module), weight_tensors(model.model)
    assert len(mine) == len(theirs)  # the tied weight is still one tensor in the copy
    assert all(torch.equal(a.tensor, b.tensor) and a.tensor.data_ptr() != b.tensor.data_ptr()
               for a, b in zip(mine, theirs))
    assert rep.owned_bytes == sum(w.nbytes for w in theirs)
    assert not rep.module.layers[0]._forward_pre_hooks
    with torch.no_grad():
        x = model.model.wte(inputs())
        assert torch.equal(rep.module.layers[0](x), model.model.layers[0](x))
    assert calls == [1]  # the original's hook ran once, the copy has none
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched
    same = clone_decoder(model.model, "cpu")
    assert same.owned_bytes == 0 and same.module.layers[0].mlp is not model.model.layers[0].mlp
    assert same.module.layers[0].mlp.gate.wg.weight.data_ptr() == model.model.layers[0].mlp.gate.wg.weight.data_ptr()
    # a decoder already wrapped (a forward bound to another object, which holds a lock and threads)
    par = CfgParallel(model.model, "cpu", [same])
    again = clone_decoder(model.model, "cpu")
    assert "forward" not in again.module.__dict__ and model.model.__dict__["forward"] == par._forward
    assert model.model.layers[0]._forward_pre_hooks  # the original keeps its hooks
    par.close()


# -- one GPU: two logical parts, and a real device boundary ---------------------------------------------
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("quant", ["bf16", "int8"])
def test_gpu_split_on_one_card_is_identical(cache, base_checkpoint: Path, quant: str) -> None:
    ref, _, _ = _image(cache, base_checkpoint, quant=quant)
    img, loaded, _ = _image(cache, base_checkpoint, quant=quant, devices="cuda:0,cuda:0", multi_gpu="split")
    assert isinstance(loaded.residency, SplitResidency) and len(loaded.residency.managers) == 2
    assert all(w.tensor.device.type == "cuda" for w in weight_tensors(loaded.model))
    assert torch.equal(img, ref)


@gpu
def test_gpu_split_across_a_real_device_boundary(cache, base_checkpoint: Path) -> None:
    img, loaded, notes = _image(cache, base_checkpoint, devices="cuda:0,cpu", multi_gpu="split")
    res = loaded.residency
    blocks = loaded.model.model.layers
    assert res.split.block_devices == ["cuda:0", "cuda:0", "cpu", "cpu"]
    assert blocks[3].input_layernorm.weight.device.type == "cpu" and blocks[0].input_layernorm.weight.is_cuda
    assert res.execution.moves >= 2 * REQ.steps  # to the CPU and back, every step
    assert torch.isfinite(img).all() and img.std() > 0.01
    assert any("split over cuda:0: blocks 0-1" in n for n in notes)
    # the hooked decoder equals the same blocks run by hand with explicit moves
    cfg = loaded.model.config
    rope = sys.modules[type(loaded.model.model).__module__]._rope  # the checkpoint's own rope
    x = torch.randn(2, 40, cfg.hidden_size, device="cuda:0", dtype=torch.bfloat16)
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool, device="cuda:0")
    with torch.no_grad():
        hooked = loaded.model.model(inputs_embeds=x, attention_mask=mask)
        res.execution.close()
        cos, sin = rope(torch.arange(40, device="cuda:0")[None], cfg.attention_head_dim, cfg.rope_theta)
        h = x
        for i, block in enumerate(blocks):
            dev = torch.device(res.split.block_devices[i])
            pe = (cos[:, None].to(dev), sin[:, None].to(dev))
            h = block(h.to(dev), attention_mask=mask.to(dev), position_embeddings=pe)[0]
        manual = loaded.model.model.ln_f(h.to("cuda:0"))
    assert torch.equal(hooked, manual)


@gpu
@pytest.mark.parametrize("offload", ["disabled", "budget"])
def test_gpu_cfg_parallel_on_one_card(cache, base_checkpoint: Path, offload: str) -> None:
    ref, _, _ = _image(cache, base_checkpoint)
    kw = dict(devices="cuda:0,cuda:0", multi_gpu="cfg_parallel", offload=offload)
    if offload == "budget":  # small enough that blocks stream: the replica streams from the same pinned copy
        from hunyuan_image3.hunyuan_loader.cli.card_plan import checkpoint_sizes

        sizes = checkpoint_sizes(base_checkpoint)
        block, other = max(sizes.block_bytes["bf16"]), sizes.other_bytes["bf16"]
        kw.update(vram_budget_gb=(other + 3.5 * block + 2**20) / dv.GIB, headroom_gb=2**20 / dv.GIB)
    img, loaded, notes = _image(cache, base_checkpoint, **kw)
    res = loaded.residency
    assert isinstance(res, CfgParallelResidency) and res.parallel.parallel_calls == REQ.steps
    if offload == "budget":
        rep = res.parallel.replicas[0]
        assert res.plan.streamed and rep.streamer is not None and rep.streamer.copies > 0
    assert (img - ref).abs().max() <= 4 / 255, float((img - ref).abs().max())
    assert any("CFG-parallel: the conditional" in n for n in notes)


@gpu
@pytest.mark.parametrize("devices,mode", [("cuda:0,cuda:0", "split"), ("cuda:0,cuda:0", "cfg_parallel"),
                                          ("cuda:0,cpu", "split")])
def test_gpu_force_unload_returns_every_device_to_its_baseline(cache, base_checkpoint: Path, devices, mode) -> None:
    _image(cache, base_checkpoint, devices=devices, multi_gpu=mode)  # first run: cuBLAS workspaces, streams
    cache.force_unload()
    base = dv.allocated_by_device()
    _, loaded, _ = _image(cache, base_checkpoint, devices=devices, multi_gpu=mode)
    weights = loaded.residency.gpu_bytes_by_device()["cuda:0"]
    assert dv.allocated_by_device()["cuda:0"] - base["cuda:0"] >= weights > 0
    del loaded
    report = cache.force_unload().text()
    after = dv.allocated_by_device()
    assert all(abs(after[d] - base[d]) < 64 << 10 for d in base), (base, after)
    assert "Per GPU" in report or len(base) == 1


@gpu
def test_gpu_cfg_parallel_soft_unload_and_back(cache, base_checkpoint: Path) -> None:
    ref, loaded, _ = _image(cache, base_checkpoint, devices="cuda:0,cuda:0", multi_gpu="cfg_parallel")
    before = torch.cuda.memory_allocated(0)
    assert "Soft-unloaded" in cache.unload("park")
    assert torch.cuda.memory_allocated(0) < before
    img, _, _ = _image(cache, base_checkpoint, devices="cuda:0,cuda:0", multi_gpu="cfg_parallel")
    assert torch.equal(img, ref)


@gpu
@pytest.mark.parametrize("devices,mode", [("cuda:0,cuda:0", "cfg_parallel"), ("cuda:0,cpu", "split")])
def test_gpu_instruct_text_stage_and_image_on_several_devices(cache, instruct_checkpoint: Path, devices, mode) -> None:
    req = _instruct_req()
    one = cache.get(cache.load(LoadSpec(str(instruct_checkpoint))))
    ref = generate(one, req)
    undo = _rows_one_at_a_time(one.model.model)
    rows = generate(one, req)  # one GPU, each CFG row alone: the GEMM shapes each replica sees
    undo()
    del one
    loaded = cache.get(cache.load(LoadSpec(str(instruct_checkpoint), devices=devices, multi_gpu=mode)))
    result = generate(loaded, req)
    assert result.text_tokens > 0 and result.cot_text and torch.isfinite(result.image).all()
    if mode == "cfg_parallel":  # the text stage is one row: it runs on the first device, as on one GPU
        assert result.cot_text == ref.cot_text
        assert loaded.residency.parallel.parallel_calls == req.steps
        to_rows, to_batched = (result.image - rows.image).abs(), (result.image - ref.image).abs()
        info = (f"vs rows one at a time: max {float(to_rows.max()):.4f}; vs the batched one-GPU image: max "
                f"{float(to_batched.max()):.4f} mean {float(to_batched.mean()):.5f}; rows vs batched: max "
                f"{float((rows.image - ref.image).abs().max()):.4f}")
        # Threads, streams and replicas add nothing: the same image as one GPU running the rows one by one.
        assert to_rows.max() <= 1 / 255, info
        # Against the batched one-GPU forward only bf16 GEMM-shape rounding differs, which this random tiny
        # MoE amplifies where a token's top-k experts are nearly tied (a flipped expert changes a patch):
        # a bf16-sized perturbation of each block's output moves this image by up to 0.43 on the CPU.
        assert to_batched.mean() <= 4 / 255, info
    else:
        assert loaded.residency.execution.moves > 0

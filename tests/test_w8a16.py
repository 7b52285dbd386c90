"""W8A16 INT8 format (hunyuan_loader/w8a16*.py): quantization to its definition, the plain-torch
path, the Triton kernel's logic (CPU interpreter, when Triton is installed), loading through
transformers, pre-quantized save/load, the MoE dispatch, residency. GPU tests are marked."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from residency_models import inputs, make_model
from torch import nn

from hunyuan_image3.hunyuan_loader import w8a16
from hunyuan_image3.hunyuan_loader.errors import InputError
from hunyuan_image3.hunyuan_loader.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.w8a16 import (
    Int8WeightOnlyLinear,
    dequantize_weight,
    quantize_block_w8a16,
    quantize_experts_w8a16,
    quantize_w8a16,
    quantize_weight,
    torch_w8a16,
)
from hunyuan_image3.memory.residency import ResidencyManager, ResidencyState, weight_tensors
from hunyuan_image3.memory.residency.weights import module_weight_bytes

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def _reference_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, written out in float64 row by row (independent of the implementation)."""
    rows, scales = [], []
    for row in w.double():
        absmax = float(row.abs().max())
        s = torch.tensor(absmax / 127, dtype=torch.float32).to(torch.bfloat16)  # fp32 division, bf16 scale
        sd = float(s) if float(s) > 0 else float(torch.finfo(torch.float32).tiny)
        rows.append(torch.clamp(torch.round(torch.tensor([float(torch.tensor(v, dtype=torch.float32)
                                                                  / torch.tensor(sd, dtype=torch.float32))
                                                            for v in row.tolist()])), -127, 127))
        scales.append(s)
    return torch.stack(rows).to(torch.int8), torch.stack(scales)


def _weight(out: int = 24, inp: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, inp, generator=g) * 0.02).to(torch.bfloat16)
    w[1] = 0  # an all-zero row
    w[2, 3] = 0.5  # one outlier
    w[3] = torch.arange(inp, dtype=torch.float32).to(torch.bfloat16) * 0.001  # evenly spaced: rounding ties
    return w


# -- the format --------------------------------------------------------------------------------
def test_quantize_matches_its_definition() -> None:
    w = _weight()
    q, s = quantize_weight(w)
    rq, rs = _reference_quantize(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and q.shape == w.shape and s.shape == (w.shape[0],)
    assert torch.equal(s, rs)
    assert torch.equal(q, rq)
    assert int(q.abs().max()) == 127 and int(q[1].abs().max()) == 0 and float(s[1]) == 0.0
    # every weight is within half a step of its dequantized value (a step is the row's scale)
    err = (w.float() - dequantize_weight(q, s)).abs()
    assert bool((err <= s.float()[:, None] * 0.5 * (1 + 1e-2) + 1e-12).all())


def test_dequantize_then_quantize_is_the_identity() -> None:
    q, s = quantize_weight(_weight(seed=3))
    q2, s2 = quantize_weight(dequantize_weight(q, s, torch.float32))
    assert torch.equal(q2, q) and torch.equal(s2, s)


def test_plain_path_matches_the_definition_in_float64() -> None:
    lin = nn.Linear(40, 24, bias=True).to(torch.bfloat16)
    lin.weight.data = _weight()
    m = Int8WeightOnlyLinear.from_linear(lin)
    x = torch.randn(1, 7, 40).to(torch.bfloat16)  # 3-D, as the MoE dispatch calls experts
    y = m(x)
    assert y.shape == (1, 7, 24) and y.dtype == torch.bfloat16
    ref = x.double() @ (m.weight.double() * m.weight_scale.double()[:, None]).T + m.bias.double()
    # two bf16 roundings (matmul output, scaled output) at most
    assert float((y.double() - ref).abs().max()) <= 2 * 2**-8 * float(ref.abs().max())
    # and the layer is close to the bf16 Linear it came from
    base = lin(x).detach().double()
    assert float((y.double() - base).norm() / base.norm()) < 0.02
    # float32 activations work too (the plain path follows x's dtype)
    y32 = m(x.float())
    assert y32.dtype == torch.float32
    assert float((y32.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_module_holds_plain_parameters_and_state_dict_keys() -> None:
    m = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32, bias=False).to(torch.bfloat16))
    assert set(m.state_dict()) == {"weight", "weight_scale"}
    assert not any(p.requires_grad for p in m.parameters())
    assert module_weight_bytes(m) == 32 * 64 + 32 * 2  # int8 weight + bf16 scales: bnb int8 size or less
    refs = weight_tensors(m)
    assert sorted(r.refs[0].name for r in refs) == ["weight", "weight_scale"]


def test_quantize_selects_experts_and_attention_by_name() -> None:
    model = make_model("bf16", n=2)
    n_exp = quantize_experts_w8a16(model.model.layers[0])
    assert n_exp == 4 * 2  # 4 experts x (gate_and_up_proj, down_proj)
    layer0 = model.model.layers[0]
    assert isinstance(layer0.mlp.experts[0].down_proj, Int8WeightOnlyLinear)
    assert type(layer0.self_attn.qkv_proj) is nn.Linear  # experts only
    assert quantize_block_w8a16(layer0) == 2  # now the attention projections
    n_all = quantize_w8a16(model, prefix="")
    assert n_all == 4 * 2 + 2  # block 1 only: block 0 is done
    for block in model.model.layers:
        assert type(block.mlp.gate.wg) is nn.Linear and block.mlp.gate.wg.weight.dtype == torch.float32
        assert type(block.mlp.shared_mlp.down_proj) is nn.Linear
    assert type(model.final_layer) is nn.Linear


def test_fused_path_is_not_used_on_cpu(monkeypatch) -> None:
    x = torch.randn(3, 8).to(torch.bfloat16)
    assert not w8a16.fused_available(x)
    q, s = quantize_weight(torch.randn(5, 8))
    assert torch.equal(w8a16.w8a16_linear(x, q, s), torch_w8a16(x, q, s))


# -- LoadSpec and formats ----------------------------------------------------------------------
def test_loadspec_int8_format() -> None:
    assert LoadSpec("x", quant="int8").int8_format == "w8a16"
    assert LoadSpec("x", quant="int8", int8_format="bnb").int8_format == "bnb"
    assert LoadSpec("x", quant="bf16", int8_format="bnb") == LoadSpec("x", quant="bf16")  # one cache key
    assert "int8 bnb" in LoadSpec("x", quant="int8", int8_format="bnb").describe()
    with pytest.raises(InputError, match="int8_format 'fp8' is not one of w8a16, bnb"):
        LoadSpec("x", quant="int8", int8_format="fp8")


def test_resolve_int8_format_prefers_the_checkpoint() -> None:
    bnb_cfg = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}
    ours = {"quantization_config": w8a16.config_entry(["lm_head"])}
    assert w8a16.resolve_int8_format("int8", "w8a16", {}) == "w8a16"
    assert w8a16.resolve_int8_format("int8", "bnb", {}) == "bnb"
    assert w8a16.resolve_int8_format("bf16", "w8a16", {}) is None
    assert w8a16.resolve_int8_format("int8", "w8a16", bnb_cfg) == "bnb"  # a bnb pre-quantized folder loads as bnb
    assert w8a16.resolve_int8_format("int8", "bnb", ours) == "w8a16"


# -- transformers: load, save, load pre-quantized -------------------------------------------------
def _load_w8a16(path: Path, *, fresh: bool = True):
    from transformers import AutoModelForCausalLM

    from hunyuan_image3.hunyuan_loader.quantization import checkpoint_tensor_names, skip_modules_for
    from hunyuan_image3.hunyuan_loader.w8a16_transformers import quantization_config, register

    register()
    kwargs = {}
    if fresh:
        kwargs["quantization_config"] = quantization_config(skip_modules_for(checkpoint_tensor_names(path)))
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=torch.bfloat16,
                                                device_map="cpu", **kwargs).eval()


@pytest.fixture(scope="module")
def w8a16_model(base_checkpoint, one_thread):
    return _load_w8a16(base_checkpoint)


def test_transformers_load_converts_exactly_the_bnb_module_set(w8a16_model, base_checkpoint) -> None:
    from fixtures_model import load_test_model

    from hunyuan_image3.hunyuan_loader.quantization import check_quantized_modules, is_quantizable

    names = w8a16.w8a16_module_names(w8a16_model)
    assert names and all(is_quantizable(n) for n in names)
    check_quantized_modules(w8a16_model)
    bnb = load_test_model(base_checkpoint, "int8")
    bnb_names = sorted(n for n, m in bnb.named_modules() if type(m).__name__ == "Linear8bitLt")
    assert names == bnb_names
    # each converted weight is the quantization of the checkpoint's bf16 weight
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(base_checkpoint), trust_remote_code=True,
                                               dtype=torch.bfloat16, device_map="cpu")
    for name in names[:6]:
        q, s = quantize_weight(ref.get_submodule(name).weight)
        mod = w8a16_model.get_submodule(name)
        assert torch.equal(mod.weight, q) and torch.equal(mod.weight_scale, s)


def test_prequantized_save_and_load_round_trip(w8a16_model, tmp_path) -> None:
    out = tmp_path / "HunyuanImage-3-w8a16"
    w8a16_model.save_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == w8a16.QUANT_METHOD
    assert w8a16.checkpoint_int8_format(config) == "w8a16"
    from safetensors import safe_open

    keys = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            keys.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})
    name = w8a16.w8a16_module_names(w8a16_model)[0]
    assert keys[f"{name}.weight"] == "I8" and keys[f"{name}.weight_scale"] == "BF16"
    again = _load_w8a16(out, fresh=False)
    a, b = w8a16_model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(w8a16_model(input_ids=IDS).logits, again(input_ids=IDS).logits)


def test_skeleton_then_tensors_by_name_is_the_block_loader_path(w8a16_model) -> None:
    """What a block-by-block loader does for a pre-quantized folder: build the block from the
    model's code on meta, swap its Linears for W8A16 skeletons, assign the saved tensors by name."""
    block = w8a16_model.model.layers[1]
    state = {k: v.clone() for k, v in block.state_dict().items()}
    with torch.device("meta"):
        empty = type(block)(w8a16_model.config, 1)
    swapped = w8a16.replace_with_w8a16(empty, w8a16.is_block_quantizable)
    assert sorted(swapped) == w8a16.w8a16_module_names(block)
    empty.load_state_dict(state, assign=True)
    assert empty.mlp.gate.wg.weight.dtype == block.mlp.gate.wg.weight.dtype
    x = torch.randn(1, 5, w8a16_model.config.hidden_size).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(empty.mlp.experts[0](x), block.mlp.experts[0](x))
        assert torch.equal(empty.mlp(x), block.mlp(x))


def test_loader_int8_default_is_w8a16_and_generates(cache, base_checkpoint) -> None:
    from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate

    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint), quant="int8")))
    experts = loaded.model.model.layers[0].mlp.experts
    assert isinstance(experts[0].gate_and_up_proj, Int8WeightOnlyLinear)
    assert loaded.model.model.layers[0].mlp.gate.wg.weight.dtype == torch.float32  # router restored
    seen: list[int] = []
    hook = experts[0].gate_and_up_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].dim()))
    try:
        result = generate(loaded, GenerationRequest("a red fox", seed=1, steps=2, resolution="1024x1024"))
    finally:
        hook.remove()
    assert result.image.shape == (1, 1024, 1024, 3) and float(result.image.std()) > 0.01
    assert seen and set(seen) == {3}  # the gather/scatter dispatch calls experts with [1, n, hidden]


def test_moe_dispatch_with_w8a16_experts_matches_reference(w8a16_model) -> None:
    from hunyuan_image3.hunyuan_loader.moe_dispatch import install_moe_dispatch

    x = torch.randn(2, 40, w8a16_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        install_moe_dispatch(w8a16_model, "reference")
        ref = w8a16_model.model(inputs_embeds=x.to(torch.bfloat16)).float()
        install_moe_dispatch(w8a16_model, "gather_scatter")
        ours = w8a16_model.model(inputs_embeds=x.to(torch.bfloat16)).float()
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)


# -- residency ------------------------------------------------------------------------------------
def _w8a16_tiny(n: int, **size):
    model = make_model("bf16", n=n, **size)
    quantize_w8a16(model)
    return model


def test_residency_enumerates_moves_streams_and_parks_w8a16(one_thread) -> None:
    model = _w8a16_tiny(4)
    block = model.model.layers[0]
    tensors = weight_tensors(block)
    q_params = [p for m in block.modules() if isinstance(m, Int8WeightOnlyLinear) for p in m.parameters()]
    ids = {w.tensor.data_ptr() for w in tensors}
    assert all(p.data_ptr() in ids for p in q_params)
    x = inputs()
    with torch.no_grad():
        ref = model(x)
    mgr = ResidencyManager(model, model.model.layers, "cpu", allow_cpu_streaming=True)
    plan = mgr.plan_for_budget(mgr.other_bytes + 3 * max(mgr.block_bytes), 0)
    assert plan.streamed, plan.describe()
    mgr.apply(plan)
    assert mgr.state is ResidencyState.STREAMING
    with torch.no_grad():
        assert torch.equal(model(x), ref) and torch.equal(model(x), ref)
    mgr.park(available_ram_bytes=10**12)
    mgr.restore()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    mgr.close()
    types = {w.tensor.dtype for m in model.modules() if isinstance(m, Int8WeightOnlyLinear)
             for w in weight_tensors(m, recurse=False)}
    assert types == {torch.int8, torch.bfloat16}


def test_force_unload_strips_w8a16_weights() -> None:
    from hunyuan_image3.memory.unload import strip_module_weights

    model = _w8a16_tiny(1)
    total = module_weight_bytes(model)
    assert strip_module_weights(model) == total
    assert module_weight_bytes(model) == 0


# -- the Triton kernel's logic on the CPU interpreter ------------------------------------------
_KERNEL_CHECK = r"""
import sys, torch
sys.path.insert(0, {root!r})
from hunyuan_loader.standalone import load_pack
load_pack()
from hunyuan_image3.hunyuan_loader import w8a16_kernel as k
from hunyuan_image3.hunyuan_loader.w8a16 import quantize_weight, torch_w8a16
torch.manual_seed(0)
# the interpreter's dot has no bf16 (numpy), so fp16 activations exercise the same code
worst = 0.0
for m, n, kk, bias in [(1, 40, 64, False), (5, 40, 72, True), (70, 64, 128, False), (33, 48, 200, True)]:
    x = torch.randn(1, m, kk).half()
    q, s = quantize_weight(torch.randn(n, kk) * 0.05)
    b = torch.randn(n).half() if bias else None
    ref = (x.double() @ (q.double() * s.double()[:, None]).T) + (b.double() if bias else 0)
    plain = torch_w8a16(x, q, s, b)
    for swap in (False, True):
        cfg = dict(BLOCK_M=16, BLOCK_N=16 if swap else 32, BLOCK_K=32 if kk % 64 else 64, GROUP_M=2, SWAP=swap)
        y = k.launch(x, q, s, b, config=cfg)
        assert y.shape == (1, m, n) and y.dtype == torch.float16, (y.shape, y.dtype)
        err = float((y.double() - ref).abs().max() / ref.abs().max())
        assert err < 2e-3, (m, n, kk, swap, err)
        assert float((y.double() - plain.double()).abs().max() / ref.abs().max()) < 4e-3
        worst = max(worst, err)
assert k.m_bucket(1) == 16 and k.m_bucket(1056) == 2048 and k.m_bucket(100000) == k.MAX_BUCKET
print("KERNEL OK", worst)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed here")
def test_kernel_logic_in_the_triton_interpreter(tmp_path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _KERNEL_CHECK.format(root=str(ROOT))],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "KERNEL OK" in out.stdout


# -- GPU ---------------------------------------------------------------------------------------
# (N, K) of the experts (gate_and_up, down), an odd small one; activation dtypes; token counts
CASES = [(6144, 4096, torch.bfloat16), (4096, 3072, torch.bfloat16), (100, 200, torch.bfloat16),
         (100, 200, torch.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k", "dtype"), CASES)
def test_gpu_fused_kernel_matches_the_plain_path(n: int, k: int, dtype: torch.dtype) -> None:
    from hunyuan_image3.hunyuan_loader import w8a16_kernel

    g = torch.Generator(device="cuda").manual_seed(n + k)
    q, s = quantize_weight(torch.randn(n, k, device="cuda", generator=g) * 0.02)
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    for m, b in ((1, None), (7, bias), (100, None), (1056, None), (3000, bias)):
        x = torch.randn(1, m, k, device="cuda", generator=g).to(dtype)
        assert w8a16.fused_available(x)
        y = w8a16_kernel.launch(x, q, s, b)
        assert y.shape == (1, m, n) and y.dtype == dtype
        plain = torch_w8a16(x, q, s, b)
        ref = (x.double() @ (q.double() * s.double()[:, None]).T) + (b.double() if b is not None else 0)
        scale = float(ref.abs().max())
        assert float((y.double() - ref).abs().max()) <= 2**-7 * scale, (m, n, k)  # one rounding + sums
        assert float((y.double() - plain.double()).abs().max()) <= 2**-6 * scale, (m, n, k)
        # the module runs the same (autotuned, deterministic) kernel on CUDA
        mod = Int8WeightOnlyLinear(k, n, b is not None, device="cuda", dtype=dtype)
        mod.weight.data, mod.weight_scale.data = q, s
        if b is not None:
            mod.bias.data = b
        assert torch.equal(mod(x), y)
    assert w8a16._kernel, "the fused kernel failed and was switched off"


@pytest.mark.gpu
def test_gpu_quantization_is_bit_identical_to_cpu() -> None:
    w = (torch.randn(512, 384) * 0.02).to(torch.bfloat16)
    q_cpu, s_cpu = quantize_weight(w)
    q_gpu, s_gpu = quantize_weight(w, "cuda")
    assert torch.equal(q_cpu, q_gpu.cpu()) and torch.equal(s_cpu, s_gpu.cpu())


@pytest.mark.gpu
def test_gpu_streamed_resident_and_parked_are_bit_identical() -> None:
    dev = torch.device("cuda", 0)
    model = _w8a16_tiny(6, h=256, w=512, e=4)
    x = inputs(batch=2, seq=64).to(dev)
    mgr = ResidencyManager(model, model.model.layers, dev)
    mgr.apply(mgr.plan_for_budget(10**12, 0))
    with torch.no_grad():
        ref = model(x).cpu()
    b = mgr.block_bytes[0]
    plan = mgr.plan_for_budget(mgr.other_bytes + 5 * b, 0)
    assert len(plan.streamed) == 3
    mgr.apply(plan)
    with torch.no_grad():
        outs = [model(x).cpu() for _ in range(3)]
    assert all(torch.equal(o, ref) for o in outs)
    on_gpu = mgr.gpu_bytes()
    report = mgr.park()
    assert report.freed_bytes >= 0.9 * on_gpu  # int8 weights, scales and slots all left the GPU
    assert all(w.tensor.device.type == "cpu" for w in weight_tensors(model))
    mgr.restore()
    with torch.no_grad():
        assert torch.equal(model(x).cpu(), ref)
    mgr.close()


@pytest.mark.gpu
@pytest.mark.parametrize("int8_format", ["w8a16", "bnb"])
def test_gpu_budget_loader_streams_bit_identical_both_int8_formats(cache, base_checkpoint, int8_format) -> None:
    from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate
    from hunyuan_image3.memory.residency import Placement, ResidencyPlan

    req = GenerationRequest("a lighthouse at dusk", seed=11, steps=3, resolution="1024x1024")
    cache.get(cache.load(LoadSpec(str(base_checkpoint), quant="int8", int8_format=int8_format)))
    manager = cache.loaded.residency
    budget_gb = (manager.other_bytes + 2 * max(manager.block_bytes) + sum(manager.block_bytes) // 2) / 1024**3
    spec = LoadSpec(str(base_checkpoint), quant="int8", int8_format=int8_format, offload="budget",
                    vram_budget_gb=budget_gb, headroom_gb=1e-6)
    loaded = cache.get(cache.load(spec))
    quantized = {type(m).__name__ for m in loaded.model.modules()}
    assert ("Int8WeightOnlyLinear" if int8_format == "w8a16" else "Linear8bitLt") in quantized
    assert loaded.residency.plan.streamed
    streamed = generate(loaded, req).image
    manager = loaded.residency
    manager.apply(ResidencyPlan.uniform(Placement.GPU, manager.block_bytes, manager.other_bytes))
    assert torch.equal(generate(loaded, req).image, streamed)
    cache.unload("park")
    again = generate(cache.get(cache.load(spec)), req).image
    assert torch.equal(again, streamed)


@pytest.mark.gpu
def test_gpu_accelerate_offload_with_w8a16_matches_resident(cache, base_checkpoint) -> None:
    """device_map="auto" with CPU-offloaded modules: accelerate's hooks move int8 weights and
    scales like any parameter; the image matches the resident one."""
    from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate

    req = GenerationRequest("a lighthouse at dusk", seed=11, steps=2, resolution="1024x1024")
    resident = generate(cache.get(cache.load(LoadSpec(str(base_checkpoint), quant="int8"))), req).image
    total = cache.loaded.residency.other_bytes + sum(cache.loaded.residency.block_bytes)
    spec = LoadSpec(str(base_checkpoint), quant="int8", offload="accelerate", vram_budget_gb=total / 2 / 1024**3)
    loaded = cache.get(cache.load(spec))
    assert "cpu" in set(map(str, getattr(loaded.model, "hf_device_map", {}).values()))
    assert isinstance(loaded.model.model.layers[0].mlp.experts[0].down_proj, Int8WeightOnlyLinear)
    # same weights and kernels; the two load paths may place the non-block parts differently
    torch.testing.assert_close(generate(loaded, req).image, resident, rtol=0, atol=2 / 255)

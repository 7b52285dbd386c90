"""W8A16 INT8 format (hunyuan_loader/w8a16*.py): quantization to its definition, the plain-torch
path, the Triton kernel's logic (CPU interpreter, when Triton is installed), loading through
transformers, pre-quantized save/load, the MoE dispatch, residency. GPU tests are marked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from residency_models import inputs, make_model
from torch import nn
from triton_interpreter import PRELUDE, interpret, needs_triton

from hunyuan_image3.hunyuan_loader.core.errors import InputError
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.formats import w8a16
from hunyuan_image3.hunyuan_loader.formats.w8a16 import (
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

ROOT = Path(__file__).resolve().parents[2]
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

    from hunyuan_image3.hunyuan_loader.formats.quantization import checkpoint_tensor_names, skip_modules_for
    from hunyuan_image3.hunyuan_loader.formats.w8a16_transformers import quantization_config, register

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

    from hunyuan_image3.hunyuan_loader.formats.builtin import check_quantized_modules
    from hunyuan_image3.hunyuan_loader.formats.quantization import is_quantizable

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
    from hunyuan_image3.hunyuan_loader.hooks.moe_dispatch import install_moe_dispatch

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
# (triton_interpreter.PRELUDE: the pack imported, the NumPy >= 2.4 loop-bound fix.) Everything
# runs in fp16: the interpreter has no bf16 dot.
_INTERPRETER_PRELUDE = PRELUDE + r"""
from hunyuan_image3.hunyuan_loader.kernels import w8a16_kernel as k
from hunyuan_image3.hunyuan_loader.formats.w8a16 import quantize_weight, torch_w8a16
torch.manual_seed(0)
def operands(m, n, kk, bias, row_pad=0):
    # row_pad > 0: x is a column slice of a wider tensor (row stride kk + row_pad)
    x = torch.randn(1, m, kk + row_pad).half()[..., :kk]
    q, s = quantize_weight(torch.randn(n, kk) * 0.05)
    b = torch.randn(n).half() if bias else None
    return x, q, s, b
def check(x, q, s, b, cfg, tol=2e-3):
    m, kk = x.shape[-2:]
    y = k.launch(x, q, s, b, config=cfg)
    assert y.shape == (1, m, q.shape[0]) and y.dtype == torch.float16, (y.shape, y.dtype)
    err = k.reference_error(y.reshape(m, -1), x.reshape(m, kk), q, s, b)
    assert err < tol, (str(cfg), m, q.shape, err)
    plain = torch_w8a16(x, q, s, b).double()
    assert float((y.double() - plain).abs().max() / plain.abs().max()) < 2 * tol, (str(cfg), m)
    return err
"""

_KERNEL_SMALL = _INTERPRETER_PRELUDE + r"""
worst = 0.0
for m, n, kk, bias in [(1, 40, 64, False), (5, 40, 72, True), (70, 64, 128, False), (33, 48, 200, True)]:
    x, q, s, b = operands(m, n, kk, bias)
    for swap in (False, True):
        cfg = dict(BLOCK_M=16, BLOCK_N=16 if swap else 32, BLOCK_K=32 if kk % 64 else 64, GROUP_M=2, SWAP=swap)
        worst = max(worst, check(x, q, s, b, cfg))
assert k.m_bucket(1) == 16 and k.m_bucket(1056) == 2048 and k.m_bucket(100000) == k.MAX_BUCKET
assert [(c.BLOCK_M, c.SWAP) for c in k.candidates(1)] == [(32, False), (32, True)]
assert len(k.candidates(1056)) == len(k.configs())
print("KERNEL OK", worst)
"""

# Every real config at the token count that failed on the H200 (1056 = 8 full 128-row tiles +
# 32 rows; 4 full 256-row tiles + 32), a partial channel tile for BLOCK_N 256 (384 = 256 + 128),
# a K that BLOCK_K 128 does not divide (192), a bias, and a row stride that is not K.
_KERNEL_EVERY_CONFIG = _INTERPRETER_PRELUDE + r"""
x, q, s, b = operands(1056, 384, 192, True, row_pad=8)
assert x.stride(1) == 200
for cfg in k.configs():
    err = check(x, q, s, b, cfg)
    print("CONFIG OK", cfg, err, flush=True)
print("KERNEL OK")
"""

# The tuner (launch without a config): a config whose output is wrong is left out, the key is
# tuned once, and every call afterwards runs the kept config.
_KERNEL_TUNER = _INTERPRETER_PRELUDE + r"""
x, q, s, b = operands(40, 96, 64, False)
cands = k.candidates(40)
assert [c.BLOCK_M for c in cands] == [64, 32, 64, 32], cands
bad = cands[0]
real_run = k._run
def corrupting_run(cfg, x2, weight, scale, bias, y):
    real_run(cfg, x2, weight, scale, bias, y)
    if cfg == bad:
        y[-1, :16] += 1.0  # one wrong block in the last row: the M edge
k._run = corrupting_run
y = k.launch(x, q, s, b)
tuned = k.tunings()
assert len(tuned) == 1, tuned
(key, t), = tuned.items()
assert key[:5] == (64, 96, 64, torch.float16, False), key
assert bad in t.rejected and "error" in t.rejected[bad], t.rejected
same = {c for c in cands if c != bad and k.numerics_class(c) == k.numerics_class(t.reference)}
assert t.config in cands and t.config != bad and set(t.timings) == same, t  # only the reference's class is timed
assert k.reference_error(y.reshape(40, 96), x.reshape(40, 64), q, s, b) < 2e-3
assert torch.equal(k.launch(x, q, s, b), y) and len(k.tunings()) == 1
def racing_run(cfg, x2, weight, scale, bias, y, calls=[0]):
    real_run(cfg, x2, weight, scale, bias, y)
    calls[0] += 1
    if cfg == cands[1] and calls[0] % 2:
        y[0, 0] += 0.001  # differs between two runs, within the error tolerance
k._run = racing_run
x2, b2 = torch.randn(1, 50, 64).half(), torch.randn(96).half()  # a bias: another key, same candidates
k.launch(x2, q, s, b2)
t2 = k.tunings()[k.tuning_key(x2.reshape(50, 64), q, b2)]
assert cands[1] in t2.rejected and "differ" in t2.rejected[cands[1]], t2.rejected
k._run = lambda *a: (real_run(*a), a[-1].add_(1.0))  # every config wrong: the key is given up, once
x3 = torch.randn(1, 3, 64).half()
for _ in range(2):
    try:
        k.launch(x3, q, s, b)
        raise AssertionError("expected Unsupported")
    except k.Unsupported as exc:
        assert "no W8A16 kernel config passed" in str(exc), exc
t3 = k.tunings()[k.tuning_key(x3.reshape(3, 64), q, b)]
assert t3.config is None and not t3.timings and len(t3.rejected) == len(k.candidates(3)) and len(k.tunings()) == 3
# the module path: Unsupported means the plain path for that call, the kernel stays on
from hunyuan_image3.hunyuan_loader.formats import w8a16
w8a16._kernel = k
w8a16.fused_available = lambda x: True
torch.cuda.device = lambda device: __import__("contextlib").nullcontext()  # CPU tensors stand in for CUDA ones
y3 = w8a16.w8a16_linear(x3, q, s, b)
assert w8a16._kernel is k and torch.equal(y3, torch_w8a16(x3, q, s, b))
print("KERNEL OK")
"""


# Compiles every config for an H100/H200 (sm_90) on the CPU, as the JIT would for the expert
# shapes (bf16, K = 4096, strides 1 specialised, M not), and looks at the TTGIR: the configs
# without a register operand must be free of the wgmma hazard, so that every token bucket keeps
# safe candidates on Hopper; the swap config that gave wrong outputs on the H200 is flagged.
_KERNEL_HOPPER_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
sys.path.insert(0, {root!r})
from hunyuan_loader.standalone import load_pack
load_pack()
from hunyuan_image3.hunyuan_loader.kernels import w8a16_kernel as k
kern = k._w8a16_kernel
names = kern.arg_names
def compile_for(cfg, capability):
    sig = dict.fromkeys(["M", "N", "K", "stride_xm", "stride_wn", "stride_ym"], "i32")
    sig.update(x_ptr="*bf16", w_ptr="*i8", s_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16")
    consts = dict(stride_xk=1, stride_wk=1, stride_yn=1, HAS_BIAS=False, EVEN_K=True, **cfg._asdict())
    consts.pop("num_warps"), consts.pop("num_stages")
    sig.update(dict.fromkeys(consts, "constexpr"))
    sig = {name: sig[name] for name in names}
    aligned = ["x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm", "stride_wn", "stride_ym"]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(fn=kern, constexprs=consts, signature=sig, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    options = triton.compiler.make_backend(target).parse_options(dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return triton.compile(src, target=target, options=options.__dict__)
found = {cfg: k.compiled_hazard(compile_for(cfg, 90)) for cfg in k.configs()}
for cfg, why in found.items():
    print("sm_90", cfg, why, flush=True)
assert all(found[c] is None for c in k.configs() if not c.SWAP), found
for m in (1, 16, 33, 64, 100, 1056, 3000, 20000):
    assert any(found[c] is None for c in k.candidates(m)), m
if triton.__version__.startswith("3.6."):
    assert found[k.Config(256, 128, 64, 8, True, 8, 3)] is not None
print("KERNEL OK")
"""

# TTGIR lines of the 256x128x64 swap config as Triton 3.6 compiles it for sm_90 (abridged
# types), and of a config whose operands are both in shared memory.
_TTGIR_REGISTER_OPERAND = """
  %a = ttng.warp_group_dot %w_op, %xt_s, %acc {inputPrecision = 0 : i32, isAsync = true} : tensor<128x16xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>> * !ttg.memdesc<16x256xbf16, #shared1, #smem, 64x256> -> tensor<128x256xf32, #mma> loc(#loc1)
  %b:2 = ttng.warp_group_dot_wait %a, %xt_s {pendings = 3 : i32} : tensor<128x256xf32, #mma>, !ttg.memdesc<16x256xbf16, #shared1, #smem, 64x256> loc(#loc2)
"""
_TTGIR_SHARED_OPERANDS = """
  %a = ttng.warp_group_dot %xa_s, %w_s, %acc {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<128x64xbf16, #shared, #smem, mutable> * !ttg.memdesc<64x256xbf16, #shared2, #smem> -> tensor<128x256xf32, #mma>
  %b:3 = ttng.warp_group_dot_wait %a, %xa_s, %w_s {pendings = 0 : i32} : tensor<128x256xf32, #mma>
"""


@needs_triton
def test_kernel_logic_in_the_triton_interpreter() -> None:
    interpret(_KERNEL_SMALL)


@needs_triton
def test_every_kernel_config_in_the_triton_interpreter() -> None:
    out = interpret(_KERNEL_EVERY_CONFIG)
    from hunyuan_image3.hunyuan_loader.kernels.w8a16_kernel import configs

    assert out.count("CONFIG OK") == len(configs()) >= 8


@needs_triton
def test_kernel_tuner_leaves_out_wrong_configs_in_the_triton_interpreter() -> None:
    interpret(_KERNEL_TUNER)


@needs_triton
def test_wgmma_register_operand_hazard_is_recognised() -> None:
    from hunyuan_image3.hunyuan_loader.kernels.w8a16_kernel import hazard

    assert "register operand" in hazard(_TTGIR_REGISTER_OPERAND)
    assert hazard(_TTGIR_SHARED_OPERANDS) is None
    # a register operand waited on at once (pendings 0) is fine; so is a synchronous dot
    assert hazard(_TTGIR_REGISTER_OPERAND.replace("pendings = 3", "pendings = 0")) is None
    assert hazard(_TTGIR_REGISTER_OPERAND.replace("isAsync = true", "isAsync = false")) is None


@needs_triton
def test_hopper_compile_of_every_config_on_the_cpu() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _KERNEL_HOPPER_COMPILE.replace("{root!r}", repr(str(ROOT)))],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "KERNEL OK" in out.stdout


# -- GPU ---------------------------------------------------------------------------------------
# (N, K) of the experts (gate_and_up, down) and an odd small one; activation dtype; bias or not
CASES = [(6144, 4096, torch.bfloat16, False), (4096, 3072, torch.bfloat16, True), (100, 200, torch.bfloat16, False),
         (100, 200, torch.float16, True)]
TOKENS = (1, 7, 100, 1056, 3000)  # 1056: 8,448 tokens x top-8 / 64 experts, the 1 MP mean per expert


def _gpu_operands(n: int, k: int, dtype: torch.dtype, with_bias: bool):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    q, s = quantize_weight(torch.randn(n, k, device="cuda", generator=g) * 0.02)
    bias = torch.randn(n, device="cuda", generator=g).to(dtype) if with_bias else None
    xs = {m: torch.randn(1, m, k, device="cuda", generator=g).to(dtype) for m in TOKENS}
    return q, s, bias, xs


def _reference(x, q, s, b) -> torch.Tensor:
    return (x.double() @ (q.double() * s.double()[:, None]).T) + (b.double() if b is not None else 0)


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k", "dtype", "with_bias"), CASES)
def test_gpu_every_kernel_config_matches_the_reference(n: int, k: int, dtype: torch.dtype, with_bias: bool) -> None:
    """Each config forced in turn (not only the one the tuner picks), twice: within one output
    rounding of the float64 reference and bit-identical between the runs. Lists every failure.
    A config whose compiled code has the register-operand wgmma hazard is never used by the
    tuner and is not run here (on Hopper with Triton 3.6: the swap configs)."""
    from triton.runtime.errors import OutOfResources

    from hunyuan_image3.hunyuan_loader.kernels import w8a16_kernel

    q, s, b, xs = _gpu_operands(n, k, dtype, with_bias)
    failures, ran, excluded = [], set(), set()
    for m, x in xs.items():
        ref = _reference(x, q, s, b)
        scale = float(ref.abs().max())
        for cfg in w8a16_kernel.configs():
            try:
                if cfg in excluded or w8a16_kernel.config_hazard(cfg, x, q, s, b):
                    excluded.add(cfg)
                    continue
                y1 = w8a16_kernel.launch(x, q, s, b, config=cfg)
                y2 = w8a16_kernel.launch(x, q, s, b, config=cfg)
            except OutOfResources:  # a smaller GPU than the configs were written for
                continue
            ran.add(cfg)
            assert y1.shape == (1, m, n) and y1.dtype == dtype
            err = float((y1.double() - ref).abs().max()) / scale
            same = torch.equal(y1, y2)
            if err > 2**-7 or not same:
                rows = ((y1.double() - ref).abs() > 2**-7 * scale).any(-1).nonzero()[:, 1]
                where = f"rows {int(rows.min())}..{int(rows.max())} ({rows.numel()})" if rows.numel() else "-"
                failures.append(f"{cfg} m={m}: error {err:.3g} of max, wrong {where}, "
                                f"runs {'identical' if same else 'DIFFER'}")
    assert any(not c.SWAP for c in ran), f"no plain config could run on this GPU (left out: {excluded})"
    assert all(c.SWAP for c in excluded), excluded  # only a register operand has the hazard
    if torch.cuda.get_device_capability() < (9, 0):
        assert not excluded, excluded  # no wgmma before Hopper: nothing to leave out
    assert not failures, f"(N={n}, K={k}, {dtype}):\n" + "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k", "dtype", "with_bias"), CASES)
def test_gpu_tuned_kernel_matches_the_plain_path(n: int, k: int, dtype: torch.dtype, with_bias: bool) -> None:
    from hunyuan_image3.hunyuan_loader.kernels import w8a16_kernel

    q, s, b, xs = _gpu_operands(n, k, dtype, with_bias)
    for m, x in xs.items():
        assert w8a16.fused_available(x)
        y = w8a16_kernel.launch(x, q, s, b)
        assert y.shape == (1, m, n) and y.dtype == dtype
        plain = torch_w8a16(x, q, s, b)
        ref = _reference(x, q, s, b)
        scale = float(ref.abs().max())
        assert float((y.double() - ref).abs().max()) <= 2**-7 * scale, (m, n, k)  # one rounding + sums
        assert float((y.double() - plain.double()).abs().max()) <= 2**-6 * scale, (m, n, k)
        tuned = w8a16_kernel.tunings()[w8a16_kernel.tuning_key(x.reshape(m, k), q, b)]
        assert tuned.config in tuned.timings and not set(tuned.timings) & set(tuned.rejected)
        # the module runs the same (tuned, deterministic) kernel on CUDA
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
def test_gpu_accelerate_offload_with_w8a16_matches_resident(cache, base_checkpoint, monkeypatch) -> None:
    """device_map="auto" with CPU-offloaded modules: accelerate's hooks move int8 weights and
    scales like any parameter; the image matches the resident one."""
    from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate
    from hunyuan_image3.hunyuan_loader.hooks import moe_grouped

    # the same kernels on both sides: accelerate's hooked experts run one by one, so the resident
    # model does too (grouped, its dequant engines round the weight, not the accumulator)
    monkeypatch.setenv(moe_grouped.GROUPED_ENV, "0")
    req = GenerationRequest("a lighthouse at dusk", seed=11, steps=2, resolution="1024x1024")
    resident = generate(cache.get(cache.load(LoadSpec(str(base_checkpoint), quant="int8"))), req).image
    total = cache.loaded.residency.other_bytes + sum(cache.loaded.residency.block_bytes)
    spec = LoadSpec(str(base_checkpoint), quant="int8", offload="accelerate", vram_budget_gb=total / 2 / 1024**3)
    loaded = cache.get(cache.load(spec))
    assert "cpu" in set(map(str, getattr(loaded.model, "hf_device_map", {}).values()))
    assert isinstance(loaded.model.model.layers[0].mlp.experts[0].down_proj, Int8WeightOnlyLinear)
    # same weights and kernels; the two load paths may place the non-block parts differently
    torch.testing.assert_close(generate(loaded, req).image, resident, rtol=0, atol=2 / 255)

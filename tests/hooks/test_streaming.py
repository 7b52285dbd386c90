"""Block streaming as a registry entry, expert-granular (hooks/streaming.py): a forward of a few tokens
copies a streamed MoE block's base plus only the experts its tokens use, bit-identical to the resident
run, in every weight format; a large forward copies whole blocks as before. CPU (synchronous)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from residency_models import make_model
from torch import nn

from hunyuan_image3.hunyuan_loader.formats.w8a16 import quantize_w8a16
from hunyuan_image3.hunyuan_loader.hooks.moe_dispatch import install_moe_dispatch, route, router_logits
from hunyuan_image3.hunyuan_loader.hooks.moe_grouped import grouped_w8a16_reason
from hunyuan_image3.hunyuan_loader.hooks.registry import registry, remove_all_hooks
from hunyuan_image3.hunyuan_loader.hooks.streaming import connect_streaming
from hunyuan_image3.memory.residency import Placement, ResidencyManager, ResidencyPlan
from hunyuan_image3.memory.residency.parts import block_parts

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
FORMATS = ["bf16", "int8", "nf4", "w8a16"]
E, K = 16, 2  # experts, top-k: a forward of up to 7 rows copies experts only (7 * 2 < 16)


def _model(fmt: str, n: int = 5, seed: int = 0) -> nn.Module:
    model = make_model("bf16" if fmt == "w8a16" else fmt, n=n, e=E, seed=seed)
    if fmt == "w8a16":
        quantize_w8a16(model)
    for layer in model.model.layers:
        layer.mlp.moe_topk = K  # what routing_for reads when the model has no config
        for ex in layer.mlp.experts:  # the official expert's SiLU MLP: W8A16 may run grouped
            ex.hidden_act, ex.act_fn = "silu", nn.SiLU()
    install_moe_dispatch(model)
    return model


def _streamed(model: nn.Module, streamed: set[int]) -> ResidencyManager:
    mgr = ResidencyManager(model, model.model.layers, "cpu", allow_cpu_streaming=True)
    connect_streaming(model, [mgr])  # what a load does: the registry attaches the streamer
    n = len(mgr.blocks)
    mgr.apply(ResidencyPlan(tuple(Placement.STREAM if i in streamed else Placement.GPU for i in range(n)),
                            tuple(mgr.block_bytes), mgr.other_bytes))
    return mgr


def _used_experts(model: nn.Module, blocks: list[int]) -> tuple[dict[int, list[int]], list]:
    """Expert ids with tokens per block, from each MoE block's input as the dispatch routes it."""
    used: dict[int, list[int]] = {}
    handles = []
    for i in blocks:
        moe = model.model.layers[i].mlp

        def record(mod, args, i=i):
            x = args[0].reshape(-1, args[0].shape[-1])
            top, _ = route(router_logits(mod.gate, x), registry(model).get("moe_dispatch").rules[i])
            used[i] = sorted(set(top.flatten().tolist()))

        handles.append(moe.register_forward_pre_hook(record))
    return used, handles


def _run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_token_copies_the_base_and_its_experts_only_and_matches_resident(fmt, one_thread, monkeypatch) -> None:
    if fmt == "w8a16":
        monkeypatch.setenv("HY3_MOE_GROUPED", "linear")  # the grouped engine, forced on CPU
    model = _model(fmt)
    if fmt == "w8a16":  # the experts run through one grouped engine, not module by module
        x = torch.zeros(1, 64, dtype=torch.bfloat16)
        assert grouped_w8a16_reason(model.model.layers[1].mlp.experts, x) is None
    token, prompt = torch.tensor([[7]]), torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_token, ref_prompt = _run(model, token), _run(model, prompt)
    streamed = [1, 2, 4]  # three streamed blocks through two slots: every forward copies each
    mgr = _streamed(model, set(streamed))
    st = mgr.streamer
    parts = {i: block_parts(st.packed[i], model.model.layers[i], list(model.model.layers[i].mlp.experts))[0]
             for i in streamed}
    assert all(p is not None for p in parts.values())
    assert all(len(r) == 1 for p in parts.values() for r in p.parts)  # one expert: one memcpy
    used, handles = _used_experts(model, streamed)
    try:
        st.reset()
        out = _run(model, token)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(out, ref_token)
    assert all(0 < len(used[i]) <= K for i in streamed)
    want = sum(parts[i].base_bytes + sum(parts[i].part_bytes(e) for e in used[i]) for i in streamed)
    want += parts[streamed[0]].base_bytes  # the last block prefetches the first one's base (the next token)
    assert st.copied_bytes == want
    whole = sum(st.packed[i].nbytes for i in streamed)
    assert st.copied_bytes < 0.5 * whole
    # a large forward (the prompt) copies whole blocks, as without expert streaming, and matches
    st.reset()
    copies, copied = st.copies, st.copied_bytes
    assert torch.equal(_run(model, prompt), ref_prompt)
    assert st.copies - copies == len(streamed) + 1
    assert st.copied_bytes - copied == whole + st.packed[streamed[0]].nbytes
    # and tokens after it: the right bits again (slots hold whole blocks and partial ones in turn)
    assert torch.equal(_run(model, token), ref_token) and torch.equal(_run(model, prompt), ref_prompt)
    mgr.close()


def test_off_by_setting_or_on_the_reference_dispatch_copies_whole_blocks(one_thread, monkeypatch) -> None:
    model = _model("bf16")
    token = torch.tensor([[7]])
    ref = _run(model, token)
    mgr = _streamed(model, {1, 2, 4})
    st = mgr.streamer
    whole = sum(st.packed[i].nbytes for i in (1, 2, 4)) + st.packed[1].nbytes

    def copied(expected: torch.Tensor) -> int:
        st.reset()
        before = st.copied_bytes
        assert torch.equal(_run(model, token), expected)
        return st.copied_bytes - before

    assert copied(ref) < whole
    monkeypatch.setenv("HY3_EXPERT_STREAMING", "0")
    parts_before = st.part_copies
    assert copied(ref) == whole and st.part_copies == parts_before
    monkeypatch.delenv("HY3_EXPERT_STREAMING")
    install_moe_dispatch(model, "reference")  # the model's own MoE forward: it reads every expert
    mgr.streamer.detach()
    ref_own = _run(model, token)  # the resident run (the streamer's hooks off: blocks on their host copy)
    mgr.streamer.attach()
    assert copied(ref_own) == whole
    install_moe_dispatch(model, "gather_scatter")
    assert copied(ref) < whole
    mgr.close()


def test_a_block_whose_experts_share_their_weights_streams_whole_and_says_why(one_thread, caplog) -> None:
    model = _model("bf16", n=3)
    ex = model.model.layers[2].mlp.experts
    ex[3] = ex[4]  # one module in two places: its weights are no one expert's own
    token = torch.tensor([[7]])
    ref = _run(model, token)
    with caplog.at_level(logging.INFO, logger="hunyuan_image3.hunyuan_loader.hooks.streaming"):
        mgr = _streamed(model, {1, 2})
    assert "streamed block 2 moves whole in every forward: the groups overlap" in caplog.text
    st = mgr.streamer
    st.reset()
    assert torch.equal(_run(model, token), ref)
    p1 = block_parts(st.packed[1], model.model.layers[1], list(model.model.layers[1].mlp.experts))[0]
    assert p1 is not None and st.copied_bytes > st.packed[2].nbytes + p1.base_bytes
    mgr.close()


def test_detach_takes_the_fetch_off_and_remove_all_gives_the_official_forward(one_thread) -> None:
    from hunyuan_image3.hunyuan_loader.hooks.registry import dispatched_topk, expert_fetch

    model = _model("bf16", n=3)
    mgr = _streamed(model, {1, 2})
    moes = [model.model.layers[i].mlp for i in (1, 2)]
    assert all(expert_fetch(m) and dispatched_topk(m) == K for m in moes) and mgr.streamer._parts
    remove_all_hooks(model)
    assert not any(expert_fetch(m) or dispatched_topk(m) for m in moes) and not mgr.streamer._parts
    mgr.close()


def test_instruct_think_with_expert_streaming_matches_resident_and_a_token_copies_its_experts_only(
        instruct_checkpoint, one_thread, monkeypatch) -> None:
    """The Instruct checkpoint loaded by the pack, every block but the first streamed, expert streaming
    wired as a load wires it. (1) think + image: the same text and image as resident and as whole-block
    streaming. The text stage decodes as the official one does (modeling_hunyuan_image_3.py:2872-2990: the
    prompt's forward, then one new token per forward, past keys cached; pinned in
    tests/model/test_model_interface.py), so each text token after the first is a one-token forward: it
    copies the base plus its routed experts of each streamed block, less than the whole blocks that the
    prompt's forward, every diffusion step and every forward with expert streaming off copy. (2) A
    one-token decoder forward on its own copies exactly the base plus the experts its token routes to,
    with the resident output."""
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
    from hunyuan_image3.hunyuan_loader.generation import GenerationRequest, generate
    from hunyuan_image3.hunyuan_loader.load.pipeline import load_model

    loaded = load_model(LoadSpec(str(instruct_checkpoint)))
    model = loaded.model
    layers = model.model.layers
    req = GenerationRequest(prompt="a lighthouse at dusk", seed=5, steps=2, guidance=2.0, resolution="1024x1024",
                            bot_task="think", max_new_tokens=4)
    ref = generate(loaded, req)
    token = torch.tensor([[int(model.tokenizer.convert_tokens_to_ids("<think>"))]])
    with torch.no_grad():
        ref_token = model.model(input_ids=token)
    assert ref.cot_text and ref.text_tokens == 4
    n = len(layers)
    streamed = list(range(1, n))
    mgr = _streamed(model, set(streamed))
    st = mgr.streamer
    whole = sum(st.packed[i].nbytes for i in streamed)
    forwards: list[int] = []  # copied bytes when each forward started
    tokens: list[int] = []  # the tokens of each forward

    def started(_module, args):
        forwards.append(st.copied_bytes)
        tokens.append(args[0].shape[1])

    handle = layers[0].register_forward_pre_hook(started)

    def run():
        forwards.clear()
        tokens.clear()
        st.reset()
        result = generate(loaded, req)
        ends = forwards[1:] + [st.copied_bytes]
        return result, [end - begin for begin, end in zip(forwards, ends)], list(tokens)

    try:
        on, per_on, tokens_on = run()
        monkeypatch.setenv("HY3_EXPERT_STREAMING", "0")
        off, per_off, tokens_off = run()
        monkeypatch.delenv("HY3_EXPERT_STREAMING")
        parts = {i: block_parts(st.packed[i], layers[i], list(layers[i].mlp.experts))[0] for i in streamed}
        used, hooks = _used_experts(model, streamed)
        st.reset()
        with torch.no_grad():
            out_token = model.model(input_ids=token)
        for h in hooks:
            h.remove()
    finally:
        handle.remove()
        mgr.close()
    assert on.cot_text == off.cot_text == ref.cot_text
    assert torch.equal(on.image, ref.image) and torch.equal(off.image, ref.image)
    # the prompt's forward, 3 one-token forwards (4 think tokens), then the diffusion steps
    assert tokens_on == tokens_off and tokens_on[1:4] == [1, 1, 1] and all(t > 1 for t in tokens_on[4:])
    assert all(b == whole for b in per_off[1:])  # expert streaming off: whole blocks, every forward
    text_on, text_off = per_on[1:4], per_off[1:4]
    assert all(b < 0.5 * whole for b in text_on) and sum(text_on) < 0.5 * sum(text_off)  # per text token
    # many-token forwards (the steps) copy whole blocks either way (the first one after a token copies the
    # first block again: the token's last block prefetched only its base)
    assert all(b >= whole for b in per_on[4:]) and per_on[5:] == per_off[5:]
    assert torch.equal(out_token, ref_token)
    topk = model.config.moe_topk
    assert all(0 < len(used[i]) <= topk < len(layers[i].mlp.experts) for i in streamed)
    want = sum(parts[i].base_bytes + sum(parts[i].part_bytes(e) for e in used[i]) for i in streamed)
    assert st.copied_bytes - sum(per_on) - sum(per_off) == want + parts[streamed[0]].base_bytes
    assert want < whole

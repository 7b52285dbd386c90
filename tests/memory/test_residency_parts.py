"""A packed block split into a base and per-expert parts (memory/residency/parts.py), and the
streamer copying parts on demand (BlockStreamer.set_parts / fetch), on CPU (synchronous)."""

from __future__ import annotations

import warnings

import pytest
import torch
from residency_models import make_model

from hunyuan_image3.memory.residency import Placement, ResidencyManager, ResidencyPlan, weight_tensors
from hunyuan_image3.memory.residency.packed import PackedBlock
from hunyuan_image3.memory.residency.parts import block_parts, merge
from hunyuan_image3.memory.residency.weights import module_weight_bytes

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
MODES = ["bf16", "int8", "nf4"]


def _packed(mode: str, e: int = 6):
    model = make_model(mode, n=1, e=e)
    block = model.model.layers[0]
    return block, PackedBlock(weight_tensors(block), pin=False)


@pytest.mark.parametrize("mode", MODES)
def test_each_expert_is_one_run_of_its_own_bytes_and_the_rest_is_the_base(mode) -> None:
    block, pb = _packed(mode)
    experts = list(block.mlp.experts)
    parts, why = block_parts(pb, block, experts)
    assert parts is not None, why
    assert all(len(p) == 1 for p in parts.parts)  # module order: one expert is one memcpy
    spans = [r for p in parts.parts for r in p] + list(parts.base)
    covered = sum(b - a for a, b in merge(spans))
    assert covered == sum(b - a for a, b in spans)  # no byte in two places
    tensor_bytes = sum(w.nbytes for w in pb.tensors)
    assert tensor_bytes <= covered <= parts.total == pb.nbytes
    for i, e in enumerate(experts):
        own = module_weight_bytes(e)
        # its weights, plus at most the 256-byte alignment between them
        assert own <= parts.part_bytes(i) < own + 256 * len(weight_tensors(e))
    if mode == "bf16":  # nothing shared: the base is exactly the block's other tensors
        rest = [m for m in block.modules() if not any(m is x for e in experts for x in e.modules())]
        assert parts.base_bytes >= sum(w.nbytes for w in weight_tensors(rest))
    # the ranges of two adjacent experts merge into one copy
    assert len(parts.ranges([2, 3])) == 1 and len(parts.ranges([1, 3])) == 2


def test_a_tensor_shared_between_experts_stays_in_the_base_and_an_expert_with_nothing_of_its_own_fails() -> None:
    model = make_model("bf16", n=1, e=4)
    block = model.model.layers[0]
    ex = block.mlp.experts
    ex[1].down_proj.weight = ex[0].down_proj.weight  # tied: both experts read it
    pb = PackedBlock(weight_tensors(block), pin=False)
    parts, why = block_parts(pb, block, list(ex))
    assert parts is not None, why
    down = ex[0].down_proj.weight.nbytes
    assert parts.part_bytes(0) == parts.part_bytes(2) - down == module_weight_bytes(ex[2]) - down
    ex[1].gate_and_up_proj.weight = ex[0].gate_and_up_proj.weight  # expert 1 has nothing of its own now
    pb = PackedBlock(weight_tensors(block), pin=False)
    parts, why = block_parts(pb, block, list(ex))
    assert parts is None and "group 0 holds no weight of its own" in why
    parts, why = block_parts(pb, block, [ex[0], ex[0]])
    assert parts is None and "overlap" in why


def _manager(mode: str, n: int = 4, e: int = 8):
    model = make_model(mode, n=n, e=e)
    mgr = ResidencyManager(model, model.model.layers, "cpu", allow_cpu_streaming=True)
    streamed = set(range(1, n))
    mgr.apply(ResidencyPlan(tuple(Placement.STREAM if i in streamed else Placement.GPU for i in range(n)),
                            tuple(mgr.block_bytes), mgr.other_bytes))
    return model, mgr


def test_a_partial_forward_that_never_fetches_is_refused() -> None:
    """A forward told to run on parts whose experts never came must not return an output."""
    model, mgr = _manager("bf16")
    st = mgr.streamer
    for idx in st.order:
        parts, _ = block_parts(st.packed[idx], model.model.layers[idx], list(model.model.layers[idx].mlp.experts))
        st.set_parts(idx, parts, lambda rows: True)  # nobody calls fetch: the block's own MoE forward runs
    with torch.no_grad(), pytest.raises(RuntimeError, match="never fetched its parts"):
        model(torch.tensor([[3]]))
    assert st.active is None
    st.clear_parts()
    with torch.no_grad():
        model(torch.tensor([[3]]))  # whole blocks again
    mgr.close()


def test_fetch_copies_only_missing_parts_and_a_large_forward_gets_the_whole_block() -> None:
    model, mgr = _manager("bf16", n=2)  # one streamed block, two slots: it stays in its slot
    st = mgr.streamer
    layer = model.model.layers[1]
    parts, _ = block_parts(st.packed[1], layer, list(layer.mlp.experts))
    st.set_parts(1, parts, lambda rows: rows < 4)
    st.reset()
    st.before(1, rows=1)
    assert st.copied_bytes == parts.base_bytes and st.copies == 1
    st.fetch(1, [2, 5])
    st.fetch(1, [5])
    assert st.copied_bytes == parts.base_bytes + parts.part_bytes(2) + parts.part_bytes(5) and st.part_copies == 2
    st.after(1)
    st.before(1, rows=2)  # the next token: the block is still in its slot with experts 2 and 5
    st.fetch(1, [5, 6])
    st.after(1)
    assert st.part_copies == 3
    before = st.copied_bytes
    st.before(1, rows=100)  # a large forward: the whole buffer, over the partial copy
    st.fetch(1, [0, 1, 2])  # runs on the whole copy: nothing more to copy
    st.after(1)
    assert st.copied_bytes - before == parts.total and st.copies == 2
    mgr.close()

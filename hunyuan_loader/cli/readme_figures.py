"""README figures computed by the code they describe (`plan --readme-block memory|projection`): the
MoE dispatch's activation memory from memory/estimator.py, and the real model's projected steps on a
96 GB card from card_plan's planner and bench figures. tests/test_docs.py compares the README's
generated blocks with these."""

from __future__ import annotations

from ...memory.estimator import estimate_inference_gb, megapixels
from . import card_plan as cp

MEMORY_SIZES = (1024, 1408, 1920, 2048)  # square images, 1 to 4.2 MP


def moe_memory_block() -> str:
    rows = [
        "| image | MP | reference MoE dispatch (12 x MP^1.4) | gather_scatter (default) |",
        "|---|---|---|---|",
    ]
    for side in MEMORY_SIZES:
        ref = estimate_inference_gb(side, side, moe_impl="reference")
        ours = estimate_inference_gb(side, side, moe_impl="gather_scatter")
        rows.append(f"| {side}x{side} | {megapixels(side, side):.1f} | {ref:.1f} GB | {ours:.1f} GB |")
    return "\n".join(rows) + (
        "\n\nActivation memory of one generation (both CFG halves), as `memory/estimator.py` plans it for the "
        "real model: the reference dispatch's field formula, and the figure derived from the config for "
        "gather_scatter (its largest layer's live tensors, or the VAE decode's, x 1.3, + the KV cache and RoPE "
        "tables the whole generation holds, + 0.5 GB)."
    )


def projection_block() -> str:
    sizes = cp.real_model_sizes()
    card = cp.Card(96, 128)
    options = {(o.quant, o.mode): o for o in cp.plan_card(sizes, card)}
    bf16, int8, nf4 = options[("bf16", "smart")], options[("int8", "disabled")], options[("nf4", "disabled")]
    streamed = len(bf16.plan.placements) - len(bf16.plan.resident)
    bnb = int8.step_seconds / cp.W8A16_RATIO * cp.BNB_INT8_RATIO
    return (
        "Projected from these figures for the real model on a 96 GB card with 128 GB of RAM "
        "(`python -m hunyuan_loader plan --vram-gb 96 --ram-gb 128`): "
        f"{bf16.step_seconds:.2f} s/step BF16 smart ({bf16.resident.split('/')[0]} of 32 blocks on the GPU, "
        f"{streamed} streamed), {int8.step_seconds:.2f} s/step INT8 (the default W8A16, all resident, "
        f"{cp.W8A16_RATIO:.2f}x the BF16 step; bnb LLM.int8 would be ~{bnb:.1f}: it measured "
        f"{cp.BNB_INT8_RATIO:.1f}x the BF16 step) and {nf4.step_seconds:.2f} s/step NF4 all resident."
    )

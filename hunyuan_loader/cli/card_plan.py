"""Which loader and offload mode fit a card: the library behind `python -m hunyuan_loader plan`.

For the real model (built in) or a checkpoint folder (its safetensors headers, no weights read):
- weight bytes per decoder block and outside the blocks, per format, from the tensor shapes and
  the pack's own quantization rule (``quantization.is_quantizable``: attention projections and
  routed experts; everything else stays bf16, the router float32); INT8 is the INT8 loader's
  default W8A16 format (docs/w8a16.md) unless ``int8_format="bnb"``;
- activation headroom at the resolution from ``memory.estimator`` (gather_scatter MoE);
- which blocks stay on the GPU and which stream from pinned RAM from
  ``memory.residency.plan_placement``, the planner the loaders run;
- a step time PROJECTED from the H200 bench figures (``H200_BENCH``), never measured here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...memory.estimator import REAL_DEFAULTS, config_value, estimate_inference_gb, tokens_for_image
from ...memory.residency.planner import InsufficientVRAMError, ResidencyPlan, plan_placement
from ..checkpoint.layout import parse_header
from ..core.units import GIB
from ..formats.builtin import for_load, loader_quants
from ..formats.quantization import ROUTER_SUFFIX, is_quantizable
from .gpus import BENCH_GPU, Gpu, bench_gpu

QUANT_ORDER = ("bf16", "int8", "nf4")  # the loaders the table and the README show (formats.loader_quants: all)
REAL_BLOCKS = 32
# Outside the decoder blocks (token embedding, lm_head, VAE, vision encoder and aligner,
# patch_embed / final_layer, timestep embedders): ~5 GB, all kept in bf16 by every loader. The
# same figure as bench/offload.py's projection; with 32 blocks of ~4.99 GB it gives the
# ~165 GB of the BF16 checkpoint (160-170 GB, docs/HUNYUAN3_FACTS).
REAL_OTHER_BYTES = 5 * 10**9
NO_RAM_LIMIT_GIB = 4096.0  # "RAM not given": plan as if it were no limit, then say what each mode needs
RAM_RESERVE_GIB = 8.0  # kept free for the OS, ComfyUI and Python: an assumption, said in the output
_BLOCK = re.compile(r"^model\.layers\.(\d+)\.")
_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class BenchFigures:
    """Rates measured once, which the step-time projection scales."""

    source: str
    copy_bytes_per_s: float  # pinned host -> GPU
    block_seconds: dict[str, float]  # one resident decoder block, one step (both CFG halves)
    tokens: int  # tokens per step the block times were measured at
    stream_overhead: float  # measured streamed step / max(compute, copies)
    gpu: str = BENCH_GPU  # the card these figures are for (measured, or scaled by figures_for_gpu)
    scaling: str = ""  # how they were scaled from the bench's card ("" = measured)


# bench/int8.py --tokens 8448,16640 --skip-configs, one H200 run: s/step of 10 real-size layers resident,
# each layer's experts through the loaders' MoE dispatch (README, Measured; docs/w8a16.md's current row).
INT8_BENCH = {"bf16": 0.178, "w8a16": 0.196, "bnb": 0.712}
W8A16_RATIO = INT8_BENCH["w8a16"] / INT8_BENCH["bf16"]  # the INT8 loader's default, against bf16
BNB_INT8_RATIO = INT8_BENCH["bnb"] / INT8_BENCH["bf16"]  # int8_format "bnb" (LLM.int8), against bf16

H200_BENCH = BenchFigures(
    source=(
        "bench/offload.py on one H200 (README, Measured): 10 real-size layers, 8,448 tokens per step; "
        "resident 0.165 s (BF16) / 0.228 s (bnb NF4) per step for the 10; INT8 = the loader's default W8A16 "
        f"at {W8A16_RATIO:.2f}x the BF16 step (bench/int8.py, same 10 layers: {INT8_BENCH['w8a16']} s vs BF16 "
        f"{INT8_BENCH['bf16']} s; bnb LLM.int8 {INT8_BENCH['bnb']} s, {BNB_INT8_RATIO:.1f}x), so "
        f"{0.165 * W8A16_RATIO:.3f} s; pinned host->GPU copy 55.3 GB/s; a streamed step 1.01x its copy-bound ideal"
    ),
    copy_bytes_per_s=55.3e9,
    block_seconds={"bf16": 0.165 / 10, "int8": 0.165 * W8A16_RATIO / 10, "nf4": 0.228 / 10},
    tokens=8448,
    stream_overhead=1.01,
)


def figures_for_gpu(gpu: Gpu, base: BenchFigures = H200_BENCH) -> BenchFigures:
    """The bench figures scaled to another card: compute by the cards' dense BF16 TFLOPS, the pinned copy
    rate by their PCIe links (the bench reached ``copy / link`` of its own; the same share of the other)."""
    ref = bench_gpu()
    if gpu == ref:
        return base
    compute = ref.tflops / gpu.tflops
    copy = base.copy_bytes_per_s * gpu.link_gbps / ref.link_gbps
    share = base.copy_bytes_per_s / 1e9 / ref.link_gbps
    return BenchFigures(
        source=base.source,
        copy_bytes_per_s=copy,
        block_seconds={q: t * compute for q, t in base.block_seconds.items()},
        tokens=base.tokens,
        stream_overhead=base.stream_overhead,
        gpu=gpu.name,
        scaling=(
            f"scaled to the {gpu.name}: compute x {compute:.2f} ({ref.tflops:g} / {gpu.tflops:g} dense BF16 TFLOPS), "
            f"pinned copies at {copy / 1e9:.1f} GB/s (PCIe {gpu.pcie_gen}.0 x16, {gpu.link_gbps:g} GB/s, at the "
            f"bench's {share:.0%} of its link)"
        ),
    )


def project_step_seconds(
    n_blocks: int, streamed_bytes: int, compute_s_per_block: float, copy_bytes_per_s: float, overhead: float
) -> float:
    """One step: the blocks' compute overlaps the copies of the streamed blocks (prefetched one
    block ahead), so it takes the longer of the two, times our measured overhead over that ideal."""
    compute = n_blocks * compute_s_per_block
    if streamed_bytes <= 0:
        return compute
    return max(compute, streamed_bytes / copy_bytes_per_s) * overhead


# -- weight sizes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightSizes:
    """Bytes on the GPU per decoder block and outside the blocks, for each loader format."""

    source: str
    config: Any  # what memory.estimator reads (dict or None for the real model's defaults)
    block_bytes: dict[str, tuple[int, ...]]
    other_bytes: dict[str, int]
    int8_format: str = "w8a16"

    def total(self, quant: str) -> int:
        return sum(self.block_bytes[quant]) + self.other_bytes[quant]


def tensor_bytes(name: str, shape: Sequence[int], quant: str, int8_format: str = "w8a16") -> int:
    """GPU bytes of one checkpoint tensor once loaded in ``quant`` (bf16, router float32): the weight
    format's size model (formats/registry.py), exact (no alignment), quantized where the pack's skip
    rules quantize (attention projections and routed experts)."""
    module, _, leaf = name.rpartition(".")
    quantized = leaf == "weight" and len(shape) == 2 and is_quantizable(module)
    fmt = for_load(quant, int8_format)
    return fmt.placed_bytes(shape, 4 if module.endswith(ROUTER_SUFFIX) else 2, quantized, align=False)


def _sizes(tensors: Iterable[tuple[str, Sequence[int]]], n_blocks: int, int8_format: str) -> tuple[dict, dict]:
    quants = loader_quants()  # every registered format's loader, the README's three among them
    block = {q: [0] * n_blocks for q in quants}
    other = dict.fromkeys(quants, 0)
    for name, shape in tensors:
        match = _BLOCK.match(name)
        for quant in quants:
            nbytes = tensor_bytes(name, shape, quant, int8_format)
            if match is None:
                other[quant] += nbytes
            else:
                block[quant][int(match.group(1))] += nbytes
    return {q: tuple(v) for q, v in block.items()}, other


def real_model_sizes(int8_format: str = "w8a16") -> WeightSizes:
    """HunyuanImage-3.0 as released: 32 blocks, hidden 4096, 32 query / 8 KV heads of 128,
    64 experts x (4096x6144 + 3072x4096) + a shared expert of the same width, a float32 router."""
    c = REAL_DEFAULTS
    h, d, w, e = c["hidden_size"], c["attention_head_dim"], c["moe_intermediate_size"], c["num_experts"]
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * d
    p = "model.layers.0."
    tensors: list[tuple[str, Sequence[int]]] = [
        (p + "input_layernorm.weight", (h,)),
        (p + "self_attn.qkv_proj.weight", (qkv, h)),
        (p + "self_attn.o_proj.weight", (h, c["num_attention_heads"] * d)),
        (p + "self_attn.query_layernorm.weight", (d,)),
        (p + "self_attn.key_layernorm.weight", (d,)),
        (p + "post_attention_layernorm.weight", (h,)),
        (p + "mlp.gate.wg.weight", (e, h)),
        (p + "mlp.shared_mlp.gate_and_up_proj.weight", (2 * c["intermediate_size"], h)),
        (p + "mlp.shared_mlp.down_proj.weight", (h, c["intermediate_size"])),
    ]
    for m in range(e):
        tensors += [(p + f"mlp.experts.{m}.gate_and_up_proj.weight", (2 * w, h)),
                    (p + f"mlp.experts.{m}.down_proj.weight", (h, w))]
    one, _ = _sizes(tensors, 1, int8_format)
    return WeightSizes(
        source="HunyuanImage-3.0, built-in config (no --model)",
        config=None,
        block_bytes={q: b * REAL_BLOCKS for q, b in one.items()},
        other_bytes=dict.fromkeys(one, REAL_OTHER_BYTES),
        int8_format=int8_format,
    )


def checkpoint_sizes(path: str | Path, int8_format: str = "w8a16") -> WeightSizes:
    """Sizes of a checkpoint folder from its config.json and safetensors headers (no weights read)."""
    from ..checkpoint.validate import validate_checkpoint

    info = validate_checkpoint(path)
    tensors: list[tuple[str, Sequence[int]]] = []
    for shard in info.shard_files:
        for name, meta in parse_header(shard)[1].items():
            if name != "__metadata__":
                tensors.append((name, tuple(meta["shape"])))
    n_blocks = 1 + max((int(m.group(1)) for n, _ in tensors if (m := _BLOCK.match(n))), default=-1)
    block, other = _sizes(tensors, n_blocks, int8_format)
    return WeightSizes(f"{info.path} (its safetensors headers)", info.config, block, other, int8_format)


# -- plans ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One loader format and offload mode on one card."""

    quant: str
    mode: str
    fits: bool
    problem: str  # why it does not fit ("" if it fits)
    plan: ResidencyPlan | None
    pinned_bytes: int  # streamed blocks held in pinned host RAM
    park_bytes: int  # Soft Unload parks all weights in RAM
    step_seconds: float | None

    @property
    def resident(self) -> str:
        if self.plan is None:
            return ""
        return f"{len(self.plan.resident)}/{len(self.plan.placements)}"


@dataclass(frozen=True)
class Card:
    vram_gib: float
    ram_gib: float
    width: int = 1024
    height: int = 1024
    budget_gib: float | None = None  # the Budget loader's vram_budget_gb (None: no budget row)
    cfg: bool = True  # both CFG halves in every step (base, Instruct); False: Instruct-Distil


def moe_workspace_bytes(sizes: WeightSizes, quant: str) -> int:
    """What W8A16 experts run together hold on the GPU during a MoE call (moe_grouped.workspace_bytes_for)."""
    if quant != "int8" or sizes.int8_format != "w8a16":
        return 0
    from ..hooks.moe_grouped import workspace_bytes_for

    inter = config_value(sizes.config, "moe_intermediate_size")
    inter = max(inter) if isinstance(inter, (list, tuple)) else inter
    return workspace_bytes_for(int(config_value(sizes.config, "hidden_size")), int(inter))


def plan_option(sizes: WeightSizes, card: Card, quant: str, mode: str, figures: BenchFigures = H200_BENCH) -> Option:
    """Plan one loader/mode the way the loaders do; say whether it fits the card's VRAM and RAM."""
    blocks, other = sizes.block_bytes[quant], sizes.other_bytes[quant]
    headroom = int(estimate_inference_gb(card.width, card.height, config=sizes.config, moe_impl="gather_scatter") * GIB)
    headroom += moe_workspace_bytes(sizes, quant)
    budget = card.budget_gib if mode == "budget" and card.budget_gib is not None else card.vram_gib
    total = sum(blocks) + other
    park = total
    try:
        plan: ResidencyPlan | None = plan_placement(blocks, other, int(budget * GIB), headroom)
    except InsufficientVRAMError:
        plan = None
    problem = ""
    if mode == "disabled" and (plan is None or plan.streamed):
        need = (total + headroom) / GIB
        return Option(quant, mode, False, f"VRAM: all weights + activations need {need:.0f} GB", None, 0, park, None)
    if plan is None:
        floor = other + 2 * max(blocks, default=0) + headroom
        return Option(quant, mode, False, f"VRAM: {floor / GIB:.0f} GB even with every block streamed", None, 0,
                      park, None)
    pinned = plan.streamed_bytes
    if pinned / GIB + RAM_RESERVE_GIB > card.ram_gib:
        problem = f"RAM: {pinned / GIB:.0f} GB of streamed blocks + {RAM_RESERVE_GIB:.0f} reserve"
    tokens = tokens_for_image(sizes.config, card.width, card.height, cfg=card.cfg)
    per_block = figures.block_seconds[quant] * tokens / figures.tokens
    step = project_step_seconds(len(blocks), pinned, per_block, figures.copy_bytes_per_s, figures.stream_overhead)
    return Option(quant, mode, not problem, problem, plan, pinned, park, step)


def plan_card(
    sizes: WeightSizes, card: Card, quants: Sequence[str] = QUANT_ORDER, figures: BenchFigures = H200_BENCH
) -> list[Option]:
    """Every loader format x offload mode (budget only with a budget) on one card."""
    modes = ("disabled", "smart") + (("budget",) if card.budget_gib is not None else ())
    return [plan_option(sizes, card, q, m, figures) for q in quants for m in modes]


def best_option(options: Sequence[Option]) -> Option | None:
    """The fitting option with the shortest projected step (offload disabled wins a tie)."""
    fitting = [o for o in options if o.fits and o.step_seconds is not None]
    return min(fitting, key=lambda o: (round(o.step_seconds or 0, 2), o.mode != "disabled"), default=None)


# -- text -------------------------------------------------------------------------------------------
def _gb(n: float) -> str:
    gb = n / GIB
    return f"{gb:.1f}" if gb >= 0.1 or gb == 0 else f"{gb:.2g}"  # the test checkpoint is a few MB


def describe_sizes(sizes: WeightSizes) -> str:
    per = " / ".join(f"{_gb(max(sizes.block_bytes[q], default=0))} {q.upper()}" for q in QUANT_ORDER)
    totals = " / ".join(f"{_gb(sizes.total(q))}" for q in QUANT_ORDER)
    return (
        f"{sizes.source}: {len(sizes.block_bytes['bf16'])} decoder blocks of {per} GB, "
        f"{_gb(sizes.other_bytes['bf16'])} GB outside them; whole model {totals} GB (BF16 / INT8 / NF4)"
    )


def describe_card(sizes: WeightSizes, card: Card) -> str:
    tokens = tokens_for_image(sizes.config, card.width, card.height)
    headroom = estimate_inference_gb(card.width, card.height, config=sizes.config, moe_impl="gather_scatter")
    ram = (f"{card.ram_gib:g} GB RAM ({RAM_RESERVE_GIB:g} GB of it kept for the OS and ComfyUI)"
           if card.ram_gib < NO_RAM_LIMIT_GIB else "RAM not given (planned as no limit)")
    return (
        f"card: {card.vram_gib:g} GB VRAM, {ram}; {card.width}x{card.height}: {tokens:,} tokens per step, ~{headroom:.1f} GB of activations "
        "(gather_scatter MoE, memory/estimator.py). GB = 2^30 bytes."
    )


def projection_note(figures: BenchFigures = H200_BENCH) -> str:
    card = (f"; {figures.scaling}" if figures.scaling else
            f". These are the {figures.gpu}'s: `plan --gpu NAME` scales them to another card's compute and link")
    return (
        "s/step is a PROJECTION, not a measurement: max(compute of every block, copies of the streamed "
        f"blocks) x {figures.stream_overhead}, compute scaled linearly with tokens, from {figures.source}{card}."
    )


def option_table(options: Sequence[Option]) -> str:
    rows = ["| loader | offload | fits | blocks on GPU | GPU use GB | pinned RAM GB | s/step (projected) |",
            "|---|---|---|---|---|---|---|"]
    for o in options:
        gpu = _gb(o.plan.gpu_bytes) if o.plan is not None else ""
        pinned = _gb(o.pinned_bytes) if o.plan is not None else ""
        step = f"~{o.step_seconds:.2f}" if o.step_seconds is not None else ""
        fits = "yes" if o.fits else f"no ({o.problem})"
        rows.append(f"| {o.quant.upper()} | {o.mode} | {fits} | {o.resident} | {gpu} | {pinned} | {step} |")
    return "\n".join(rows)


def _cell(option: Option | None, best: Option | None) -> str:
    if option is None:
        return "no"
    if not option.fits:
        return f"no ({option.problem.split(':')[0]})"
    text = (f"{option.mode}: {option.resident} blocks on GPU, {_gb(option.pinned_bytes)} GB pinned RAM, "
            f"~{option.step_seconds:.1f} s/step")
    return f"**{text}**" if option is best else text


README_CARDS = (24, 32, 48, 80, 96)
README_RAM = (64, 128)


def readme_table(sizes: WeightSizes | None = None) -> str:
    """The README's "Which loader for my card" table, generated (tests/cli/test_card_plan.py compares)."""
    sizes = sizes or real_model_sizes()
    lines = [
        "| GPU | RAM | BF16 | INT8 | NF4 |",
        "|---|---|---|---|---|",
    ]
    for vram in README_CARDS:
        for ram in README_RAM:
            options = plan_card(sizes, Card(vram, ram))
            best = best_option(options)
            cells = []
            for quant in QUANT_ORDER:
                mine = [o for o in options if o.quant == quant]
                cells.append(_cell(best_option(mine) or mine[-1], best))
            lines.append(f"| {vram} GB | {ram} GB | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"1024x1024, gather_scatter MoE. {describe_sizes(sizes)}. Each cell: the fastest offload mode that "
        f"fits VRAM and RAM (keeping {RAM_RESERVE_GIB:.0f} GB of RAM for the OS and ComfyUI); bold: the "
        "fastest of the row; \"no (RAM)\" / \"no (VRAM)\": what is short. " + projection_note(),
    ]
    return "\n".join(lines)

"""Per-step time and peak VRAM: all resident vs accelerate offload vs our pinned streaming
vs bnb INT8 / NF4 resident, on N real-size HunyuanImage-3 layers, from ONE run.

    python bench/offload.py [--layers 10] [--stream-frac 0.4] [--steps 3] [--tokens 8448]

Needs CUDA (prints that and exits 0 otherwise). Asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
from _synthetic import GB, Stack, copy_rates, make_layer, quantize_layer, start_bench, step_input, time_steps


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _quantized_stack(dev, n: int, mode: str) -> tuple[Stack, float]:
    t0 = time.perf_counter()
    layers = []
    for i in range(n):
        layers.append(quantize_layer(make_layer(dev, seed=i), mode))
        _free()
    return Stack(layers, dev), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--stream-frac", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--accel-steps", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=8448)
    ap.add_argument("--skip-quant", action="store_true")
    args = ap.parse_args()
    if not start_bench("bench/offload.py"):
        return 0
    from accelerate import cpu_offload

    from hunyuan_image3.memory.residency import (
        Placement,
        ResidencyManager,
        ResidencyPlan,
        move_module_weights,
    )

    dev = torch.device("cuda", 0)
    n = args.layers
    pinned, pageable = copy_rates(dev)
    print(f"host->GPU copy: pinned {pinned / GB:.1f} GB/s, pageable {pageable / GB:.1f} GB/s "
          f"({pinned / pageable:.1f}x)")

    model = Stack([make_layer(dev, seed=i) for i in range(n)], dev)
    x = step_input(dev, args.tokens)
    rows = {}
    t_res, out_res, peak_res = time_steps(model, x, args.steps)
    rows["bf16 all resident (floor)"] = (t_res, peak_res)

    mgr = ResidencyManager(model, model.layers, dev)
    blk = mgr.block_bytes[0]
    k = max(3, round(args.stream_frac * n))
    headroom = peak_res - torch.cuda.memory_allocated(dev)
    budget = mgr.other_bytes + (n - k + 2) * blk + headroom
    plan = mgr.plan_for_budget(budget, headroom)
    t0 = time.perf_counter()
    mgr.apply(plan)
    t_apply = time.perf_counter() - t0
    print(f"plan at budget {budget / GB:.1f} GB: {plan.describe()} (applied in {t_apply:.1f} s)")
    t_str, out_str, peak_str = time_steps(model, x, args.steps)
    rows["bf16 ours: pinned streaming"] = (t_str, peak_str)
    identical = torch.equal(out_res, out_str)
    copies = mgr.streamer.copies

    # accelerate: the same blocks offloaded with cpu_offload (pageable CPU weights, hooks per module)
    mgr.apply(ResidencyPlan.uniform(Placement.GPU, mgr.block_bytes, mgr.other_bytes))
    mgr.close()
    for i in plan.streamed:
        move_module_weights(model.layers[i], "cpu")
        cpu_offload(model.layers[i], execution_device=dev)
    _free()
    t_acc, out_acc, peak_acc = time_steps(model, x, args.accel_steps)
    rows["bf16 accelerate cpu_offload"] = (t_acc, peak_acc)
    acc_identical = torch.equal(out_res, out_acc)
    del model, mgr, out_acc, out_str
    _free()

    qinfo = ""
    if not args.skip_quant:
        for mode in ("int8", "nf4"):
            qmodel, tq = _quantized_stack(dev, n, mode)
            t_q, _, peak_q = time_steps(qmodel, x, args.steps)
            rows[f"bnb {mode.upper()} all resident"] = (t_q, peak_q)
            qinfo += f" {mode} quantized on the GPU in {tq:.1f} s;"
            del qmodel
            _free()

    s = len(plan.streamed)
    print(f"\n{n} layers x {blk / GB:.2f} GB, {args.tokens} tokens/step, {s} streamed through "
          f"{plan.n_slots} slots;{qinfo}")
    print("| mode | s/step | vs resident | peak VRAM GB |\n|---|---|---|---|")
    for name, (t, peak) in rows.items():
        print(f"| {name} | {t:.3f} | {t / t_res:.2f}x | {peak / GB:.1f} |")
    copy_t = blk / pinned
    added = (t_str - t_res) / s
    print(f"\nstreamed-block copy time at the pinned rate: {copy_t * 1e3:.1f} ms; "
          f"added per streamed block: ours {added * 1e3:.1f} ms, accelerate {(t_acc - t_res) / s * 1e3:.1f} ms")
    ideal = max(t_res, s * copy_t)
    print(f"ours vs copy-bound ideal max(resident, {s} x copy) = {ideal:.3f} s: {t_str / ideal:.2f}x (target <= 1.15x); "
          f"per streamed block {t_str / s * 1e3:.1f} ms vs {copy_t * 1e3:.1f} ms copy = {t_str / s / copy_t:.2f}x")
    print(f"ours vs accelerate: {t_acc / t_str:.1f}x faster (target >= 6x)")
    if "bnb INT8 all resident" in rows:
        t8 = rows["bnb INT8 all resident"][0]
        print(f"ours vs INT8 resident: {t8 / t_str:.2f}x ({'no slower' if t_str <= t8 else 'SLOWER'})")
    print(f"bit-identical streamed vs resident: {identical}; accelerate vs resident: {acc_identical}; "
          f"copies issued {copies} over {args.steps + 1} steps")

    # projection for the full model on a 96 GB card, from THIS run's rates, through the same
    # code as `python -m hunyuan_loader plan` (hunyuan_loader/cli/card_plan.py)
    from hunyuan_image3.hunyuan_loader.cli import card_plan as cp

    block_s = {"bf16": t_res / n}
    for quant in ("int8", "nf4"):
        if f"bnb {quant.upper()} all resident" in rows:
            block_s[quant] = rows[f"bnb {quant.upper()} all resident"][0] / n
    figures = cp.BenchFigures("this run", pinned, block_s, args.tokens, t_str / ideal)
    sizes, card = cp.real_model_sizes(), cp.Card(96, 1024)
    ours = cp.plan_option(sizes, card, "bf16", "smart", figures)
    ks = len(ours.plan.streamed) if ours.plan is not None else 0
    acc32 = len(ours.plan.placements) * t_res / n + ks * (t_acc - t_res) / s if ours.plan is not None else float("nan")
    line = (f"\nprojection, real model on a 96 GB card (card_plan.py): {ks} blocks stream; "
            f"ours {ours.step_seconds:.2f} s/step, accelerate {acc32:.2f} s/step")
    for quant in ("int8", "nf4"):
        if quant in block_s:
            opt = cp.plan_option(sizes, card, quant, "disabled", figures)
            line += f", {quant.upper()} resident {opt.step_seconds:.2f} s/step"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

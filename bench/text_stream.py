"""One-token forwards (the Instruct text stage decodes one token per forward) through N real-size streamed
MoE layers: whole-block streaming vs expert-granular streaming (each layer's base + the experts its token
routes to, top-8 of 64), from ONE run, per weight format.

    python bench/text_stream.py [--layers 4] [--tokens 32] [--quant bf16,w8a16,nf4]

Every layer streams (two GPU slots); the same token vectors run resident first (the floor), then
whole-block (HY3_EXPERT_STREAMING=0), then expert-granular. Prints ms and GB copied per token, the ratio,
the copy-bound ideal at this machine's pinned rate and whether the three outputs are bit-identical.
Routing here is random (random weights and tokens): real consecutive tokens share experts more, which
only helps when a layer's slot outlives a token (as many streamed layers as slots). Needs CUDA (prints
that and exits 0 otherwise). Asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
from _synthetic import (
    GB,
    TOPK,
    H,
    Stack,
    copy_rates,
    make_layer,
    quantize_layer,
    settings_refresh,
    start_bench,
)


def _stack(dev: torch.device, n: int, quant: str) -> Stack:
    layers = []
    for i in range(n):
        layer = make_layer(dev, seed=i)
        layers.append(layer if quant == "bf16" else quantize_layer(layer, quant))
        gc.collect()
        torch.cuda.empty_cache()
    return Stack(layers, dev)


def time_tokens(model: torch.nn.Module, xs: list[torch.Tensor], streamer=None, warmup: int = 2):
    """(seconds per token, bytes copied per token, outputs) of one forward per token vector in ``xs``."""
    dev = xs[0].device
    cuda = dev.type == "cuda"
    with torch.no_grad():
        if streamer is not None:
            streamer.reset()
        for x in xs[:warmup]:
            model(x)
        if cuda:
            torch.cuda.synchronize(dev)
        before = streamer.copied_bytes if streamer is not None else 0
        t0 = time.perf_counter()
        outs = [model(x) for x in xs]
        if cuda:
            torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    copied = (streamer.copied_bytes - before) if streamer is not None else 0
    return seconds / len(xs), copied / len(xs), outs


def expert_streaming(on: bool) -> None:
    os.environ["HY3_EXPERT_STREAMING"] = "1" if on else "0"
    settings_refresh()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--quant", default="bf16,w8a16,nf4", help="comma-separated: bf16, w8a16, int8, nf4")
    args = ap.parse_args()
    if not start_bench("bench/text_stream.py"):
        return 0
    from hunyuan_image3.hunyuan_loader.hooks.moe_dispatch import install_moe_dispatch
    from hunyuan_image3.hunyuan_loader.hooks.streaming import connect_streaming
    from hunyuan_image3.memory.residency import Placement, ResidencyManager, ResidencyPlan
    from hunyuan_image3.memory.residency.parts import block_parts

    dev = torch.device("cuda", 0)
    pinned, _ = copy_rates(dev)
    n = args.layers
    g = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(1, 1, H, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(args.tokens)]
    print(f"{torch.cuda.get_device_name(dev)}; host->GPU pinned {pinned / GB:.1f} GB/s; {n} layers, all streamed "
          f"through 2 slots; {args.tokens} one-token forwards")
    print("| format | GB/layer | resident ms/token | whole-block ms/token | GB/token | expert ms/token | GB/token "
          "| whole/expert time | bytes | expert vs copy-bound | bit-identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for quant in args.quant.split(","):
        model = _stack(dev, n, quant)
        install_moe_dispatch(model)
        t_res, _, ref = time_tokens(model, xs)
        mgr = ResidencyManager(model, model.layers, dev)
        connect_streaming(model, [mgr])
        mgr.apply(ResidencyPlan(tuple(Placement.STREAM for _ in range(n)), tuple(mgr.block_bytes), mgr.other_bytes))
        st = mgr.streamer
        p0 = block_parts(st.packed[0], model.layers[0], list(model.layers[0].mlp.experts))[0]
        if p0 is None:
            notes.append(f"{quant}: no expert split (whole blocks only)")
        else:
            ideal = p0.base_bytes + TOPK * p0.part_bytes(0)
            notes.append(f"{quant}: base {p0.base_bytes / GB:.3f} GB + {p0.part_bytes(0) / GB:.4f} GB per expert; "
                         f"top-{TOPK} {ideal / GB:.3f} GB of a {p0.total / GB:.3f} GB layer ({p0.total / ideal:.1f}x fewer)")
        expert_streaming(False)
        t_whole, b_whole, out_whole = time_tokens(model, xs, st)
        expert_streaming(True)
        t_exp, b_exp, out_exp = time_tokens(model, xs, st)
        same = all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(ref, out_whole, out_exp))
        blk = mgr.block_bytes[0]
        print(f"| {quant} | {blk / GB:.2f} | {t_res * 1e3:.1f} | {t_whole * 1e3:.1f} | {b_whole / GB:.2f} "
              f"| {t_exp * 1e3:.1f} | {b_exp / GB:.2f} | {t_whole / t_exp:.2f}x | {b_whole / max(b_exp, 1):.2f}x "
              f"| {t_exp / (b_exp / pinned):.2f}x | {same} |")
        mgr.close()
        del model, mgr, st, ref, out_whole, out_exp
        gc.collect()
        torch.cuda.empty_cache()
    print("\n" + "\n".join(notes))
    os.environ.pop("HY3_EXPERT_STREAMING", None)
    settings_refresh()
    return 0


if __name__ == "__main__":
    sys.exit(main())

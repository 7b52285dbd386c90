"""MoE dispatch benchmark: reference GShard dispatch vs gather/scatter on one real-size layer.

One HunyuanImage-3.0-size MoE layer (hidden 4096, 64 experts of width 3072, top-8,
float32 router, shared expert, bf16) at the CFG token counts of 1, 2 and 3.7 MP
(8,448 / 16,640 / 30,496 tokens), near-uniform and skewed router. Prints peak memory
(max_memory_allocated minus the baseline), time (CUDA events, median), ratios, the
outputs' agreement, and the measured gather/scatter bytes per token next to the
estimator's figure (its calibration). Needs CUDA; on CPU it says so and exits 0.

    python bench/moe.py [--tokens 8448,16640,30496] [--runs 3]
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bootstrap():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from hunyuan_loader.standalone import load_pack

    return load_pack()


def build_layer(modeling):
    config = modeling.HunyuanImage3Config(
        hidden_size=4096, num_experts=64, moe_topk=8, moe_intermediate_size=3072,
        intermediate_size=3072, num_shared_expert=1, moe_drop_tokens=False,
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            block = modeling.HunyuanMoE(config, 0)
    finally:
        torch.set_default_dtype(old)
    block.gate.wg.float()
    from hunyuan_image3.hunyuan_loader.test_model import wrap_moe_block

    return wrap_moe_block(block, config), block


def set_router(block, skewed: bool, seed: int = 0) -> torch.Tensor:
    """Router weights; returns the shared input offset direction (skew comes from it)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(block.gate.wg.weight.shape, generator=g, device="cuda") * 0.01
    direction = torch.randn(w.shape[1], generator=g, device="cuda")
    direction /= direction.norm()
    if skewed:  # Zipf-like preference along one input direction, as trained routers show
        pref = 1.0 / torch.arange(1, w.shape[0] + 1, device="cuda", dtype=torch.float32)
        w += 2.0 * pref[:, None] * direction[None]
    block.gate.wg.weight.data.copy_(w)
    return direction


def measure(block, x, runs: int):
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        with torch.no_grad():
            out = block(x)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            times = []
            for _ in range(runs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                block(x)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
        return out, peak, statistics.median(times), None
    except torch.OutOfMemoryError as exc:
        m = re.search(r"Tried to allocate ([\d.]+ [GMK]iB)", str(exc))
        return None, None, None, f"OOM (asked for {m.group(1) if m else '?'})"
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="8448,16640,30496")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/moe.py needs a CUDA GPU (none found); nothing to do.")
        return 0
    pack = _bootstrap()
    from importlib import import_module

    test_model = import_module(f"{pack.__name__}.hunyuan_loader.test_model")
    moe = import_module(f"{pack.__name__}.hunyuan_loader.hooks.moe_dispatch")
    est = import_module(f"{pack.__name__}.memory.estimator")

    modeling = test_model.load_remote_code("base")
    holder, block = build_layer(modeling)
    gib = 1024**3
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"layer weights: {torch.cuda.memory_allocated() / gib:.2f} GiB")
    header = f"{'router':<8} {'tokens':>7} {'max/mean load':>13} | {'ref peak':>22} {'ref time':>9} | " \
             f"{'g/s peak':>9} {'g/s time':>9} | {'mem ratio':>9} {'speedup':>8} {'max rel err':>11}"
    print(header)
    print("-" * len(header))
    per_token: list[float] = []
    for skewed in (False, True):
        direction = set_router(block, skewed)
        for tokens in [int(t) for t in args.tokens.split(",")]:
            g = torch.Generator(device="cuda").manual_seed(tokens)
            x = torch.randn(tokens, 4096, generator=g, device="cuda", dtype=torch.bfloat16)
            x = (x + 4.0 * direction.to(torch.bfloat16)).view(2, tokens // 2, 4096)
            with torch.no_grad():
                idx = torch.topk(block.gate.wg(x.reshape(-1, 4096).float()), 8, dim=1).indices
                load = torch.bincount(idx.reshape(-1), minlength=64).float()
            balance = float(load.max() / load.mean())
            moe.install_moe_dispatch(holder, "reference")
            ref, ref_peak, ref_t, ref_err = measure(block, x, args.runs)
            moe.install_moe_dispatch(holder, "gather_scatter")
            ours, peak, t, err = measure(block, x, args.runs)
            per_token.append(peak / tokens)
            if ref is not None and ours is not None:
                rel = float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())
                ratio, speed = f"{ref_peak / peak:8.1f}x", f"{ref_t / t:7.1f}x"
                ref_s, ref_ts = f"{ref_peak / gib:9.2f} GiB", f"{ref_t:8.3f}s"
            else:
                rel, ratio, speed, ref_s, ref_ts = float("nan"), "-", "-", ref_err, "-"
            print(f"{'skewed' if skewed else 'uniform':<8} {tokens:>7} {balance:>13.2f} | {ref_s:>22} {ref_ts:>9} | "
                  f"{peak / gib:>5.2f} GiB {t:>8.3f}s | {ratio:>9} {speed:>8} {rel:>11.2e}")
            del ref, ours, x
    measured = max(per_token)
    predicted = est._layer_peak_bytes(None, 8448, 2)
    print(f"\ngather/scatter peak per token (max over runs): {measured / 1024:.1f} KiB")
    print(f"estimator layer working set per token (real config, incl. residual + shared): "
          f"{predicted / 8448 / 1024:.1f} KiB; x CALIBRATION {est.CALIBRATION} = "
          f"{predicted * est.CALIBRATION / 8448 / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

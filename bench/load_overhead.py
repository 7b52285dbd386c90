"""The fixed costs of a block-order load, on ANY machine (CPU is fine): a checkpoint with the real
module COUNT (64 experts per layer, --layers decoder blocks) but tiny dims, so the time is the
per-module / per-tensor Python work, not the disk.

    python bench/load_overhead.py [--layers 5] [--dir /tmp/hy3-overhead] [--kinds nf4,int8,bf16]
                                  [--repeat 5] [--profile nf4] [--adopt]

Builds the test checkpoint (make_test_model with num_experts 64) and its NF4 and INT8 (W8A16)
pre-quantized copies once (kept in --dir), warms imports with one load of each format from the
BF16 files (as in bench/load.py, where the copies are loaded after the loads that made them),
then prints, per kind, the minimum over --repeat loads of every LoadStats phase. --profile KIND
adds a cProfile of one more load; --adopt times ResidencyManager.adopt on the loaded model (on a
CPU device the load itself makes no manager).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(root: Path, layers: int) -> dict[str, Path]:
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
    from hunyuan_image3.hunyuan_loader.load.pipeline import load_model, save_quantized_copy
    from hunyuan_image3.hunyuan_loader.test_model import make_test_model

    base = root / f"L{layers}" / "HunyuanImage-3-base"
    if not (base / "config.json").is_file():
        make_test_model(base, "base", overwrite=True,
                        config_overrides={"num_hidden_layers": layers, "num_experts": 64, "moe_topk": 8})
    paths = {"bf16": base}
    for quant in ("nf4", "int8"):
        copy = base.parent / f"HunyuanImage-3-base-{quant.upper()}"
        if not copy.is_dir():
            save_quantized_copy(load_model(LoadSpec(str(base), quant=quant)), copy)
        paths[quant] = copy
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/hy3-overhead")
    ap.add_argument("--kinds", default="nf4,int8,bf16")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", default="")
    ap.add_argument("--adopt", action="store_true")
    args = ap.parse_args()

    from hunyuan_loader.standalone import load_pack

    load_pack()
    import torch

    torch.set_num_threads(1)
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
    from hunyuan_image3.hunyuan_loader.load.pipeline import load_model

    paths = build(Path(args.dir), args.layers)
    for quant in ("nf4", "int8"):  # imports, bitsandbytes and kernels warmed as in a long-running process
        load_model(LoadSpec(str(paths["bf16"]), quant=quant))
        gc.collect()
    for kind in args.kinds.split(","):
        best: dict[str, float] = {}
        totals = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            loaded = load_model(LoadSpec(str(paths[kind]), quant=kind))
            totals.append(time.perf_counter() - t0)
            for k, v in loaded.load_stats.phases.items():
                best[k] = min(best.get(k, float("inf")), v)
            tensors = loaded.load_stats.tensors
            model = loaded.model
            del loaded
            gc.collect()
        print(f"{kind} ({tensors} tensors): load min {min(totals):.3f} s, median {sorted(totals)[len(totals) // 2]:.3f} "
              "| " + ", ".join(f"{k} {v:.3f}" for k, v in best.items() if v >= 0.0005), flush=True)
        if args.adopt:
            from hunyuan_image3.hunyuan_loader.load.placement import decoder_blocks
            from hunyuan_image3.memory.residency import Placement, ResidencyManager, ResidencyPlan

            def uniform(m):
                return ResidencyPlan.uniform(Placement.GPU, m.block_bytes, m.other_bytes)

            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                ResidencyManager.adopt(model, decoder_blocks(model), "cpu", {}, uniform)
                times.append(time.perf_counter() - t0)
            print(f"{kind}: ResidencyManager.adopt min {min(times):.4f} s", flush=True)
        del model
        if kind == args.profile:
            prof = cProfile.Profile()
            prof.enable()
            load_model(LoadSpec(str(paths[kind]), quant=kind))
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
            print(out.getvalue())


if __name__ == "__main__":
    main()

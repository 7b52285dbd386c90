"""Command line: `python -m hunyuan_loader generate|make-test-model ...` (run from the pack's root).

Without --model, `generate` builds the small test checkpoint in a temp folder: the demo.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..memory import stats
from .cache import get_cache
from .errors import HunyuanError
from .generation import GenerationRequest, generate
from .spec import MOE_IMPLS, OFFLOAD_MODES, QUANTS, LoadSpec


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hunyuan_loader", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="load a checkpoint and generate one image")
    gen.add_argument("--model", help="checkpoint folder (default: build the test checkpoint in a temp folder)")
    gen.add_argument("--variant", default="base", help="test checkpoint variant when --model is not given")
    gen.add_argument("--quant", choices=QUANTS, default="bf16")
    gen.add_argument("--offload", choices=OFFLOAD_MODES, default="disabled")
    gen.add_argument("--budget-gb", type=float, help="VRAM budget (offload budget)")
    gen.add_argument("--headroom-gb", type=float, help="inference headroom (offload budget)")
    gen.add_argument("--moe-impl", choices=MOE_IMPLS, default="gather_scatter")
    gen.add_argument("--prompt", default="a red fox in fresh snow, morning light, photograph")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--steps", type=int, help="default: the checkpoint's generation_config")
    gen.add_argument("--guidance", type=float, help="default: the checkpoint's generation_config")
    gen.add_argument("--resolution", default="1024x1024", help="auto, WIDTHxHEIGHT (snapped to a bucket) or custom")
    gen.add_argument("--width", type=int, default=1024, help="with --resolution custom")
    gen.add_argument("--height", type=int, default=1024, help="with --resolution custom")
    gen.add_argument("--out", default="hunyuan_image3.png")
    mk = sub.add_parser("make-test-model", help="write the small HunyuanImage-3-shaped test checkpoint")
    mk.add_argument("dest")
    mk.add_argument("--variant", choices=("base", "instruct", "distil"), default="base")
    mk.add_argument("--overwrite", action="store_true")
    return parser


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / stats.GIB


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from .test_model import make_test_model

    model_dir = args.model
    if model_dir is None:
        model_dir = str(make_test_model(Path(tempfile.mkdtemp(prefix="hy3-demo-")) / "HunyuanImage-3-test",
                                        variant=args.variant))
        print(f"test checkpoint: {model_dir}")
    spec = LoadSpec(model_dir, quant=args.quant, offload=args.offload, vram_budget_gb=args.budget_gb,
                    headroom_gb=args.headroom_gb, moe_impl=args.moe_impl)
    cache = get_cache()
    start = time.perf_counter()
    handle = cache.load(spec)
    load_s = time.perf_counter() - start
    request = GenerationRequest(prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                                resolution=args.resolution, width=args.width, height=args.height)

    def progress(done: int, total: int) -> None:
        print(f"\rstep {done}/{total}", end="", flush=True)

    result = generate(cache.get(handle), request, progress=progress)
    print()
    image = (result.image[0].numpy() * 255).round().clip(0, 255).astype("uint8")
    Image.fromarray(image).save(args.out)
    print(f"model:      {spec.describe()}")
    print(f"load:       {load_s:.2f} s")
    print(f"generate:   {result.seconds:.2f} s ({result.steps} steps, {result.width}x{result.height})")
    print(f"peak RAM:   {_peak_rss_gib():.2f} GiB (process RSS)")
    if torch.cuda.is_available():
        print(f"peak VRAM:  {torch.cuda.max_memory_allocated() / stats.GIB:.2f} GiB allocated")
    for note in result.notes:
        print(f"note:       {note}")
    if result.cot_text:
        print(f"model text: {result.cot_text}")
    print(f"image:      {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: no hub retries
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "make-test-model":
            from .test_model import make_test_model

            print(make_test_model(args.dest, variant=args.variant, overwrite=args.overwrite))
            return 0
        return _generate(args)
    except HunyuanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

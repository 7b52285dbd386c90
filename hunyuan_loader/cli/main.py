"""Command line: `python -m hunyuan_loader generate|make-test-model ...` (run from the pack's root).

Without --model, `generate` uses the small test checkpoint (built once, cached): the demo.
Every input is checked before anything loads; a user error is one `error: ...` line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time

import torch

from ...memory import stats
from ..cache import get_cache
from ..core import quiet, settings
from ..core.errors import HunyuanError, InputError
from ..core.spec import INT8_FORMATS, MOE_IMPLS, OFFLOAD_MODES, QUANTS, LoadSpec
from ..generation import generate, open_reference_images
from ..input_checks import check_output_path, check_request, check_resolution, checkpoint_variant, model_sizes
from ..load.multi_gpu import MODES as MULTI_GPU_MODES
from ..preview.files import PreviewFiles, check_preview_dir
from ..request import BOT_TASKS, DEFAULT_MAX_NEW_TOKENS, GenerationRequest

TEST_VARIANTS = ("base", "instruct", "distil")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: `error: ...`, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show library warnings and info logs too")
    parser = _Parser(prog="python -m hunyuan_loader", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", parents=[common], help="load a checkpoint and generate one image")
    gen.add_argument("--model", help="checkpoint folder (default: the cached test checkpoint, random weights)")
    gen.add_argument("--variant", choices=TEST_VARIANTS,
                     help="test checkpoint variant when --model is not given (default base)")
    gen.add_argument("--quant", choices=QUANTS, default="bf16")
    gen.add_argument("--int8-format", choices=INT8_FORMATS, default=INT8_FORMATS[0],
                     help="INT8 kernels: w8a16 (int8 weights x bf16 activations, fused) or bnb (LLM.int8)")
    gen.add_argument("--offload", choices=OFFLOAD_MODES, default="disabled")
    gen.add_argument("--budget-gb", type=float, help="VRAM budget (offload budget)")
    gen.add_argument("--headroom-gb", type=float, help="inference headroom (offload budget)")
    gen.add_argument("--moe-impl", choices=MOE_IMPLS, default="gather_scatter")
    gen.add_argument("--devices", default="auto",
                     help="GPUs for the model: auto (every visible GPU) or a list such as cuda:0,cuda:1")
    gen.add_argument("--multi-gpu", choices=MULTI_GPU_MODES, default="auto",
                     help="with several GPUs: auto, split (blocks over the GPUs), cfg_parallel (the CFG halves on "
                          "different GPUs at once) or off (the first GPU only)")
    gen.add_argument("--prompt", default="a red fox in fresh snow, morning light, photograph")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--steps", type=int, help="default: the checkpoint's generation_config")
    gen.add_argument("--guidance", type=float, help="default: the checkpoint's generation_config")
    gen.add_argument("--resolution", default="1024x1024",
                     help="auto, one of the model's sizes as WIDTHxHEIGHT, or custom (with --width/--height)")
    gen.add_argument("--width", type=int, help="with --resolution custom (default 1024)")
    gen.add_argument("--height", type=int, help="with --resolution custom (default 1024)")
    gen.add_argument("--out", default="hunyuan_image3.png", help="image file; its folder must exist")
    gen.add_argument("--preview-dir", metavar="DIR",
                     help="write live previews of the image forming as numbered PNGs into DIR (made if missing)")
    gen.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="Instruct: a reference image (once = edit, 2-3 times = multi-image fusion)")
    gen.add_argument("--bot-task", choices=BOT_TASKS,
                     help="Instruct: image (default), think, recaption or think_recaption (text before drawing)")
    gen.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                     help="Instruct: the most tokens of think / recaption text")
    pl = sub.add_parser("plan", parents=[common],
                        help="which loaders and offload modes fit a card, host RAM, projected s/step")
    pl.add_argument("--vram-gb", type=float, help="the GPU's memory (GB)")
    pl.add_argument("--ram-gb", type=float, help="the machine's RAM (GB)")
    pl.add_argument("--quant", choices=QUANTS, help="one loader format (default: all three)")
    pl.add_argument("--resolution", default="1024x1024", help="WIDTHxHEIGHT to plan for, or auto (1024x1024)")
    pl.add_argument("--budget-gb", type=float, help="also plan the Budget loader with this vram_budget_gb")
    pl.add_argument("--copy-gbps", type=float,
                    help="host->GPU pinned copy rate for the projection (default: 55.3, the H200 bench)")
    pl.add_argument("--model", help="checkpoint folder (default: the real HunyuanImage-3.0, built in)")
    pl.add_argument("--readme-table", action="store_true",
                    help="print the README's 'Which loader for my card' table (24-96 GB cards, 64/128 GB RAM)")
    qu = sub.add_parser("quantize", parents=[common],
                        help="write a pre-quantized int8/nf4 copy of a BF16 checkpoint (loads in a fraction of the time)")
    qu.add_argument("--model", required=True, help="the BF16 checkpoint folder")
    qu.add_argument("--quant", choices=("int8", "nf4"), required=True)
    qu.add_argument("--out", required=True, help="the new folder (must not exist); its parent must")
    qu.add_argument("--int8-format", choices=INT8_FORMATS, default=INT8_FORMATS[0], help="with --quant int8")
    qu.add_argument("--offload", choices=("disabled", "smart"), default="smart",
                    help="smart: blocks that do not fit the GPU stream through pinned RAM while quantizing")
    mk = sub.add_parser("make-test-model", parents=[common],
                        help="write the small HunyuanImage-3-shaped test checkpoint")
    mk.add_argument("dest")
    mk.add_argument("--variant", choices=TEST_VARIANTS, default="base")
    mk.add_argument("--overwrite", action="store_true")
    return parser


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / stats.GIB


def _check_flags(args: argparse.Namespace) -> None:
    """Flag combinations that would otherwise be silently ignored."""
    if args.model is not None and args.variant is not None:
        raise InputError(
            "--variant picks the test checkpoint; with --model the variant is read from its config.json: drop --variant."
        )
    given = [f"--{name}" for name in ("width", "height") if getattr(args, name) is not None]
    if given and args.resolution != "custom":
        verb, them = ("apply", "them") if len(given) == 2 else ("applies", "it")
        raise InputError(
            f"{' and '.join(given)} {verb} only with --resolution custom (got --resolution {args.resolution}): "
            f"add --resolution custom, or drop {them}."
        )
    if args.budget_gb is not None and args.offload == "disabled":
        raise InputError("--budget-gb applies with --offload budget, smart or accelerate: add one of them.")


def _request(args: argparse.Namespace) -> GenerationRequest:
    return GenerationRequest(prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                             resolution=args.resolution, width=args.width or 1024, height=args.height or 1024,
                             bot_task=args.bot_task, images=open_reference_images(args.image),
                             max_new_tokens=args.max_new_tokens)


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from ..checkpoint.validate import validate_checkpoint
    from ..formats.builtin import for_config, for_load
    from .demo import NOISE_NOTE, cached_test_model

    # Every check before anything loads: flags, output file, request, checkpoint folder, variant.
    _check_flags(args)
    out = check_output_path(args.out)
    request = _request(args)
    check_request(request)
    preview_dir = check_preview_dir(args.preview_dir) if args.preview_dir else None
    demo = args.model is None
    if demo:
        model_dir = str(cached_test_model(args.variant or "base"))
        print(f"test checkpoint: {model_dir}")
        print(f"note:       {NOISE_NOTE}")
    else:
        model_dir = args.model
    spec = LoadSpec(model_dir, quant=args.quant, offload=args.offload, vram_budget_gb=args.budget_gb,
                    headroom_gb=args.headroom_gb, moe_impl=args.moe_impl, int8_format=args.int8_format,
                    devices=args.devices, multi_gpu=args.multi_gpu)
    info = validate_checkpoint(model_dir)
    variant = checkpoint_variant(model_dir)
    check_request(request, variant)
    check_resolution(request.resolution, model_sizes(variant))
    # the weight format's dependencies (bitsandbytes for its formats, none for W8A16), before loading
    pre = for_config(info.config.get("quantization_config"))
    (pre if pre is not None and pre.quant == spec.quant else for_load(spec.quant, spec.int8_format)).prepare()

    cache = get_cache()
    start = time.perf_counter()

    def load_progress(done: int, total: int) -> None:
        print(f"\rload {done / stats.GIB:.2f} / {total / stats.GIB:.2f} GiB".ljust(30), end="", flush=True)

    handle = cache.load(spec, progress=load_progress)
    print()
    load_s = time.perf_counter() - start

    def progress(done: int, total: int) -> None:
        print(f"\rstep {done}/{total}".ljust(30), end="", flush=True)

    def text_progress(done: int, total: int) -> None:
        print(f"\rtext token {done}/{total}".ljust(30), end="", flush=True)

    previews = PreviewFiles(preview_dir, progress) if preview_dir is not None else None
    result = generate(cache.get(handle), request, progress=progress, text_progress=text_progress, preview=previews,
                      preview_every=settings.get(settings.PREVIEW_EVERY))
    print()
    image = (result.image[0].numpy() * 255).round().clip(0, 255).astype("uint8")
    Image.fromarray(image).save(out)
    print(f"model:      {spec.describe()}")
    print(f"load:       {load_s:.2f} s")
    print(f"generate:   {result.seconds:.2f} s ({result.steps} steps, {result.width}x{result.height})")
    if result.text_tokens:
        print(f"stages:     text {result.text_seconds:.2f} s ({result.text_tokens} tokens), "
              f"diffusion {result.diffusion_seconds:.2f} s")
    print(f"peak RAM:   {_peak_rss_gib():.2f} GiB (process RSS)")
    if torch.cuda.is_available():
        print(f"peak VRAM:  {torch.cuda.max_memory_allocated() / stats.GIB:.2f} GiB allocated")
    for note in result.notes:
        print(f"note:       {note}")
    if result.cot_text:
        print(f"model text: {result.cot_text}")
    if previews is not None:
        print(f"previews:   {len(previews.written)} PNG files in {preview_dir}")
    print(f"image:      {out}" + ("  (noise by design: test checkpoint, random weights)" if demo else ""))
    return 0


def _plan(args: argparse.Namespace) -> int:
    import dataclasses

    from ..request import parse_size
    from . import card_plan as cp

    if args.readme_table:
        print(cp.readme_table())
        return 0
    for flag, value in (("--vram-gb", args.vram_gb), ("--ram-gb", args.ram_gb)):
        if value is None:
            raise InputError(f"plan needs {flag}: e.g. `plan --vram-gb 24 --ram-gb 64`.")
        if value <= 0:
            raise InputError(f"{flag} must be positive (got {value:g}).")
    for flag, value in (("--budget-gb", args.budget_gb), ("--copy-gbps", args.copy_gbps)):
        if value is not None and value <= 0:
            raise InputError(f"{flag} must be positive (got {value:g}).")
    width, height = (1024, 1024) if args.resolution == "auto" else parse_size(args.resolution)
    if not (256 <= width <= 4096 and 256 <= height <= 4096):
        raise InputError(f"--resolution {args.resolution}: plan for 256..4096 px a side.")
    sizes = cp.real_model_sizes() if args.model is None else cp.checkpoint_sizes(args.model)
    figures = cp.H200_BENCH
    if args.copy_gbps is not None:
        figures = dataclasses.replace(figures, copy_bytes_per_s=args.copy_gbps * 1e9)
    card = cp.Card(args.vram_gb, args.ram_gb, width, height, args.budget_gb)
    options = cp.plan_card(sizes, card, [args.quant] if args.quant else cp.QUANT_ORDER, figures)
    print(cp.describe_sizes(sizes))
    print(cp.describe_card(sizes, card))
    print()
    print(cp.option_table(options))
    print()
    best = cp.best_option(options)
    if best is None:
        print("fits: nothing on this card; the rows say what is short (VRAM or RAM).")
    else:
        print(f"fastest that fits: {best.quant.upper()}, offload {best.mode} (~{best.step_seconds:.2f} s/step "
              "projected)")
    print("Soft Unload parks all weights in RAM: "
          + ", ".join(f"{q.upper()} {sizes.total(q) / cp.GIB:.1f} GB" for q in cp.QUANT_ORDER) + ".")
    if args.copy_gbps is not None:
        print(f"copy rate: {args.copy_gbps:g} GB/s (--copy-gbps) instead of the bench's "
              f"{cp.H200_BENCH.copy_bytes_per_s / 1e9:g} GB/s.")
    print(cp.projection_note(figures))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize_checkpoint

    start = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        print(f"\r{stage} {done / stats.GIB:.2f} / {total / stats.GIB:.2f} GiB".ljust(40), end="", flush=True)

    out = quantize_checkpoint(args.model, args.quant, args.out, int8_format=args.int8_format,
                              offload=args.offload, progress=progress)
    print()
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / stats.GIB:.2f} GiB) in {time.perf_counter() - start:.1f} s; load it with the "
          f"{args.quant.upper()} loader")
    return 0


def main(argv: list[str] | None = None) -> int:
    settings.hub_offline_by_default()  # local folders only: no hub retries
    args = _parser().parse_args(argv)
    quiet.set_verbose(args.verbose)
    quiet.install()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "make-test-model":
            from ..test_model import make_test_model

            try:
                print(make_test_model(args.dest, variant=args.variant, overwrite=args.overwrite))
            except FileExistsError as exc:
                hint = "" if args.overwrite else "; --overwrite replaces an earlier test checkpoint"
                raise InputError(f"cannot write the test checkpoint: {exc}{hint}.") from None
            except OSError as exc:
                raise InputError(f"cannot write the test checkpoint to {args.dest}: {exc}.") from None
            return 0
        if args.command == "plan":
            return _plan(args)
        if args.command == "quantize":
            return _quantize(args)
        return _generate(args)
    except HunyuanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

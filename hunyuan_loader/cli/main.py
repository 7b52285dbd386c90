"""Command line: `python -m hunyuan_loader generate|plan|quantize|make-test-model ...` (the parser: args.py).

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
from ..core.spec import LoadSpec
from ..generation import generate, open_reference_images
from ..input_checks import check_output_path, check_request, check_resolution, checkpoint_variant, model_sizes
from ..preview.files import PreviewFiles, check_preview_dir
from ..request import GenerationRequest
from . import step_cache_args
from .args import TEST_VARIANTS, parse  # noqa: F401 - TEST_VARIANTS is part of this module's interface

CANCELLED_EXIT = 130  # 128 + SIGINT: what a shell reports for a program stopped by Ctrl-C


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
                             max_new_tokens=args.max_new_tokens, step_cache=step_cache_args.settings(args))


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from ..checkpoint.validate import validate_checkpoint
    from ..formats.builtin import for_config, for_load
    from .demo import NOISE_NOTE, cached_test_model
    from .save import SaveError, save_image_atomically

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
    try:
        save_image_atomically(Image.fromarray(image), out)
        save_error = None
    except SaveError as exc:  # the timings below still print; the error is the last line
        save_error = str(exc)
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
    if save_error is not None:
        print(f"error: {save_error}", file=sys.stderr)
        return 1
    print(f"image:      {out}" + ("  (noise by design: test checkpoint, random weights)" if demo else ""))
    return 0


def _plan(args: argparse.Namespace) -> int:
    import dataclasses

    from ..request import parse_size
    from . import card_plan as cp

    if args.readme_table:
        print(cp.readme_table())
        return 0
    if args.readme_block:
        from . import card_guide, readme_figures

        blocks = {"guide": card_guide.readme_guide, "memory": readme_figures.moe_memory_block,
                  "projection": readme_figures.projection_block}
        print(blocks[args.readme_block]())
        return 0
    gpu = _plan_gpu(args)
    for flag, value in (("--vram-gb", args.vram_gb), ("--ram-gb", args.ram_gb)):
        if value is None:
            raise InputError(f"plan needs {flag}: e.g. `plan --vram-gb 24 --ram-gb 64`, or `plan --gpu 4090`.")
        if value <= 0:
            raise InputError(f"{flag} must be positive (got {value:g}).")
    for flag, value in (("--budget-gb", args.budget_gb), ("--copy-gbps", args.copy_gbps)):
        if value is not None and value <= 0:
            raise InputError(f"{flag} must be positive (got {value:g}).")
    width, height = (1024, 1024) if args.resolution == "auto" else parse_size(args.resolution)
    if not (256 <= width <= 4096 and 256 <= height <= 4096):
        raise InputError(f"--resolution {args.resolution}: plan for 256..4096 px a side.")
    sizes = cp.real_model_sizes() if args.model is None else cp.checkpoint_sizes(args.model)
    figures = cp.H200_BENCH if gpu is None else cp.figures_for_gpu(gpu)
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
        print(f"copy rate: {args.copy_gbps:g} GB/s (--copy-gbps) instead of "
              f"{cp.figures_for_gpu(gpu).copy_bytes_per_s / 1e9:.1f} GB/s." if gpu else
              f"copy rate: {args.copy_gbps:g} GB/s (--copy-gbps) instead of the bench's "
              f"{cp.H200_BENCH.copy_bytes_per_s / 1e9:g} GB/s.")
    if gpu is not None and args.ram_given is None:
        print("RAM: not given (--ram-gb), so planned as no limit: each row's pinned RAM + "
              f"{cp.RAM_RESERVE_GIB:g} GB for the OS and ComfyUI is what it needs.")
    print(cp.projection_note(figures))
    return 0


def _plan_gpu(args: argparse.Namespace):
    """--gpu NAME: the card's memory (unless --vram-gb) and, without --ram-gb, RAM as no limit."""
    from . import card_plan as cp
    from .gpus import find_gpu, gpu_names

    args.ram_given = args.ram_gb
    if args.gpu is None:
        return None
    gpu = find_gpu(args.gpu)
    if gpu is None:
        raise InputError(f"--gpu {args.gpu!r} is not a card plan knows ({gpu_names()}): pick one, or give "
                         "--vram-gb (and --copy-gbps for its link).")
    if args.vram_gb is None:
        args.vram_gb = gpu.vram_gb
    if args.ram_gb is None:
        args.ram_gb = cp.NO_RAM_LIMIT_GIB
    print(f"GPU: {gpu.name}, {gpu.vram_gb:g} GB, {gpu.tflops:g} dense BF16 TFLOPS, PCIe {gpu.pcie_gen}.0 x16")
    return gpu


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
    args = parse(argv)
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
    except KeyboardInterrupt:  # Ctrl-C: the model stays as it was; no traceback into the model's code
        print("\ncancelled", file=sys.stderr)
        return CANCELLED_EXIT

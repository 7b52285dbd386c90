"""The command line's parser. It imports nothing heavy (no torch), so ``--help`` and usage errors
answer at once; ``hunyuan_loader/__main__.py`` parses with it before the pack is imported."""

from __future__ import annotations

import argparse

from ..core.choices import (
    BOT_TASKS,
    DEFAULT_MAX_NEW_TOKENS,
    INT8_FORMATS,
    MOE_IMPLS,
    MULTI_GPU_MODES,
    OFFLOAD_MODES,
)
from ..core.quants import QUANTS
from . import step_cache_args
from .gpus import gpu_names

TEST_VARIANTS = ("base", "instruct", "distil")
DESCRIPTION = """HunyuanImage-3.0 outside ComfyUI.

commands:
  generate         load a checkpoint and generate one image (without --model: the small test checkpoint)
  plan             which loaders and offload modes fit a card (--gpu 4090, or --vram-gb/--ram-gb)
  quantize         write a pre-quantized INT8 / NF4 copy of a BF16 checkpoint
  make-test-model  write the small HunyuanImage-3-shaped test checkpoint

Every input is checked before anything loads; a mistake is one `error: ...` line (exit code 2).
`python -m hunyuan_loader COMMAND --help` lists a command's options."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: `error: ...`, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show library warnings and info logs too")
    parser = Parser(prog="python -m hunyuan_loader", description=DESCRIPTION,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
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
    step_cache_args.add_arguments(gen)
    pl = sub.add_parser("plan", parents=[common],
                        help="which loaders and offload modes fit a card, host RAM, projected s/step")
    pl.add_argument("--gpu", metavar="NAME",
                    help=f"a common card, projected with its own memory, compute and PCIe link: {gpu_names()}")
    pl.add_argument("--vram-gb", type=float, help="the GPU's memory (GB; with --gpu: the card's)")
    pl.add_argument("--ram-gb", type=float,
                    help="the machine's RAM (GB; with --gpu and without it: the RAM each option needs is listed)")
    pl.add_argument("--quant", choices=QUANTS, help="one loader format (default: all three)")
    pl.add_argument("--resolution", default="1024x1024", help="WIDTHxHEIGHT to plan for, or auto (1024x1024)")
    pl.add_argument("--budget-gb", type=float, help="also plan the Budget loader with this vram_budget_gb")
    pl.add_argument("--copy-gbps", type=float,
                    help="host->GPU pinned copy rate for the projection (default: 55.3, the H200 bench)")
    pl.add_argument("--model", help="checkpoint folder (default: the real HunyuanImage-3.0, built in)")
    pl.add_argument("--readme-table", action="store_true",
                    help="print the README's 'Which loader for my card' table (24-96 GB cards, 64/128 GB RAM)")
    pl.add_argument("--readme-block", choices=("guide", "memory", "projection"),
                    help="print one of the README's generated blocks: the guide per card (every --gpu), the MoE "
                         "memory table, the 96 GB projection")
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


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)

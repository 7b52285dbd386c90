"""``python -m hunyuan_loader ...`` (from the pack's folder, or anywhere with the pack on the path:
``./dev setup`` puts it there for its .venv), or ``python /path/to/the/pack/hunyuan_loader ...``.

The arguments are parsed first (no torch), so ``--help`` and usage errors answer at once; then the
pack is imported and the command runs. Ctrl-C at any point: one ``cancelled`` line, exit code 130.
"""

import sys
from pathlib import Path

CANCELLED_EXIT = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C


def pack_root_on_path(path: list[str], here: Path) -> list[str]:
    """``sys.path`` for a run as a folder (`python .../hunyuan_loader`): Python put the folder itself
    first, which makes its sub-packages top-level modules (its ``kernels`` then hides the PyPI package
    ``kernels`` that transformers 5.x imports); the pack's root goes there instead."""
    folder = here.resolve()
    return [str(folder.parent)] + [p for p in path if Path(p or ".").resolve() != folder]


def _run() -> int:
    if not __package__:  # run as a folder: the pack's root onto the path, not the folder
        sys.path[:] = pack_root_on_path(sys.path, Path(__file__).parent)
    from hunyuan_loader.cli.args import parse

    parse(sys.argv[1:])  # --help and usage errors exit here, before torch is imported
    from hunyuan_loader.standalone import load_pack

    pack = load_pack()
    from importlib import import_module

    return import_module(f"{pack.__name__}.hunyuan_loader.cli.main").main(sys.argv[1:])


if __name__ == "__main__":
    try:
        sys.exit(_run())
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        sys.exit(CANCELLED_EXIT)

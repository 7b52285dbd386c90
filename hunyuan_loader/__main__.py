"""``python -m hunyuan_loader ...`` from the pack's root folder."""

import sys

from hunyuan_loader.standalone import load_pack

if __name__ == "__main__":
    pack = load_pack()
    from importlib import import_module

    sys.exit(import_module(f"{pack.__name__}.hunyuan_loader.cli.main").main())

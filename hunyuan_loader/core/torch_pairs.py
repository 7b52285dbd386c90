"""Which torchvision goes with the installed torch, and how to install it.

The official model's image processor imports torchvision, and a torchvision wheel works only beside
the torch release it was built for (torch 2.N pairs with torchvision 0.(N+15): 2.9 with 0.24, 2.13
with 0.28). requirements.txt leaves both to ComfyUI, which installs them as a pair; outside ComfyUI
``./dev setup --model`` installs the one that matches (``python hunyuan_loader/core/torch_pairs.py``
prints it). Standard library only: the dev script runs this file before the pack can be imported.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

DEV_SETUP = "./dev setup --model"  # what installs it for the pack's own .venv (the CLI)


def installed_torch() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def torchvision_for(torch_version: str | None) -> str:
    """The pip requirement of the torchvision release built for ``torch_version`` ("2.13.0+cpu" ->
    "torchvision==0.28.*"); plain "torchvision" when the version is unknown or not a torch 2 release."""
    match = re.match(r"2\.(\d+)\b", torch_version or "")
    return f"torchvision==0.{int(match.group(1)) + 15}.*" if match else "torchvision"


def torchvision_hint(torch_version: str | None = None) -> str:
    """Where torchvision comes from, for the error that names it missing."""
    torch_version = torch_version or installed_torch()
    want = torchvision_for(torch_version)
    built = f" (the release built for torch {torch_version})" if torch_version else ""
    return (
        f"torchvision must match torch, so requirements.txt does not list it: ComfyUI installs it with torch; "
        f"for this pack's command line run `{DEV_SETUP}`, or `python -m pip install --no-deps '{want}'`{built}"
    )


if __name__ == "__main__":
    print(torchvision_for(sys.argv[1] if len(sys.argv) > 1 else installed_torch()))

"""Import the node pack as one package outside ComfyUI (CLI, tests, benchmarks).

ComfyUI imports the pack folder as a package named after the folder; every module
inside uses relative imports so that no generic top-level name (``memory``) lands in
``sys.modules``. Outside ComfyUI we register the same folder under a fixed package
name, so the same relative imports work.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE_NAME = "hunyuan_image3"
PACK_ROOT = Path(__file__).resolve().parents[1]


def load_pack(name: str = PACKAGE_NAME) -> ModuleType:
    """Import the pack folder as package ``name`` (idempotent) and return it."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module

"""The pack imports as ComfyUI imports it (any folder name) and registers its public node API."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hunyuan_image3 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]

REQUIRED = {
    "HunyuanImage3LoaderINT8": ["model_name", "offload_mode"],
    "HunyuanImage3LoaderNF4": ["model_name", "offload_mode"],
    "HunyuanImage3LoaderBF16": ["model_name", "offload_mode"],
    "HunyuanImage3LoaderBudget": ["model_name", "quantization", "vram_budget_gb", "inference_headroom_gb"],
    "HunyuanImage3Generate": ["model", "prompt", "seed", "steps", "guidance_scale", "resolution", "width", "height"],
    "HunyuanImage3ForceUnload": ["nuke_orphaned_tensors"],
    "HunyuanImage3SoftUnload": ["model"],
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_node_public_api(name: str) -> None:
    cls = NODE_CLASS_MAPPINGS[name]
    types = cls.INPUT_TYPES()
    assert list(types["required"]) == REQUIRED[name]
    assert cls.CATEGORY == "HunyuanImage3"
    assert name in NODE_DISPLAY_NAME_MAPPINGS
    for section in ("required", "optional"):
        for inp, spec in types.get(section, {}).items():
            assert len(spec) == 2 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    assert callable(getattr(cls(), cls.FUNCTION))


def test_loaders_output_the_handle_type() -> None:
    for name in REQUIRED:
        if name.startswith("HunyuanImage3Loader"):
            assert NODE_CLASS_MAPPINGS[name].RETURN_TYPES == ("HUNYUAN_IMAGE3",)
    assert NODE_CLASS_MAPPINGS["HunyuanImage3Generate"].RETURN_TYPES == ("IMAGE", "STRING")  # image, model text
    assert NODE_CLASS_MAPPINGS["HunyuanImage3ForceUnload"].OUTPUT_NODE is True
    assert NODE_CLASS_MAPPINGS["HunyuanImage3ForceUnload"].RETURN_NAMES == ("trigger", "report")


def test_offload_and_resolution_choices() -> None:
    loader = NODE_CLASS_MAPPINGS["HunyuanImage3LoaderINT8"].INPUT_TYPES()["required"]
    assert loader["offload_mode"][0] == ["disabled", "smart"]
    res = NODE_CLASS_MAPPINGS["HunyuanImage3Generate"].INPUT_TYPES()["required"]["resolution"][0]
    assert res[0] == "auto" and res[-1] == "custom" and "1024x1024" in res
    assert all("x" in r for r in res[1:-1])


def test_imports_like_comfyui_under_a_dashed_folder_name_without_generic_modules(tmp_path: Path) -> None:
    link = tmp_path / "ComfyUI-HunyuanImage3"
    link.symlink_to(ROOT, target_is_directory=True)
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        path = {str(link)!r}
        spec = importlib.util.spec_from_file_location("ComfyUI-HunyuanImage3", path + "/__init__.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["ComfyUI-HunyuanImage3"] = mod
        spec.loader.exec_module(mod)
        assert len(mod.NODE_CLASS_MAPPINGS) == 7, mod.NODE_CLASS_MAPPINGS
        generic = [m for m in ("memory", "nodes", "hunyuan_loader") if m in sys.modules]
        assert not generic, generic
        heavy = [m for m in ("transformers", "bitsandbytes", "accelerate") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_only_the_adapter_modules_import_comfyui() -> None:
    """comfy.* / folder_paths appear only in nodes/comfy_adapter.py (folders, progress, cancel)
    and nodes/comfy_memory.py (ComfyUI's memory management), which imports through the adapter."""
    import re

    pattern = re.compile(r"""^\s*(import|from)\s+(comfy\b|folder_paths\b)|["'](comfy\.[a-z_.]+|folder_paths)["']""", re.M)
    skip = {"tests", "bench"}
    hits = sorted(
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        # the pack's own folders: not tests/bench, nor hidden ones (.venv, .git, local scratch copies)
        if not any(part in skip or part.startswith(".") for part in p.relative_to(ROOT).parts)
        and pattern.search(p.read_text(encoding="utf-8"))
    )
    assert hits == ["nodes/comfy_adapter.py", "nodes/comfy_memory.py"], hits

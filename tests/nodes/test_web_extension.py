"""The frontend extension that shows the nodes' text on the canvas: ComfyUI serves it from the pack's
WEB_DIRECTORY, and the nodes it names return the ``{"ui": {"text": [...]}}`` it reads.

ComfyUI's rule (nodes.py, load_custom_node): a module with WEB_DIRECTORY, a folder relative to the
pack, gets every ``*.js`` under it listed by GET /extensions and served at
/extensions/<pack folder>/<path>; the frontend imports each. The real server and a real browser are
checked by tests/e2e/run_comfyui_e2e.py (browser_text_check.mjs)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

import hunyuan_image3
from hunyuan_image3 import NODE_CLASS_MAPPINGS
from hunyuan_image3.nodes.generate import HunyuanImage3Generate
from hunyuan_image3.nodes.unload import HunyuanImage3ForceUnload, HunyuanImage3SoftUnload

ROOT = Path(__file__).resolve().parents[2]


def _extension() -> tuple[Path, str]:
    web = Path(hunyuan_image3.__file__).parent / hunyuan_image3.WEB_DIRECTORY
    scripts = sorted(web.rglob("*.js"))
    assert len(scripts) == 1, f"expected the one extension under {web}, found {scripts}"
    return scripts[0], scripts[0].read_text(encoding="utf-8")


def test_the_extension_is_served_from_web_directory() -> None:
    assert "WEB_DIRECTORY" in hunyuan_image3.__all__
    script, text = _extension()
    web = (Path(hunyuan_image3.__file__).parent / hunyuan_image3.WEB_DIRECTORY).resolve()
    assert script.resolve().is_relative_to(web) and web.is_relative_to(ROOT.resolve())
    # the two frontend modules it imports, relative to /extensions/<pack>/<file>
    assert 'from "../../scripts/app.js"' in text and 'from "../../scripts/widgets.js"' in text
    assert "registerExtension" in text and "onExecuted" in text


def _named_nodes(text: str) -> list[str]:
    found = re.search(r"const NODES = \[([^\]]*)\]", text)
    assert found, "the extension lists the nodes it shows text for in `const NODES = [...]`"
    return re.findall(r'"([A-Za-z0-9_]+)"', found.group(1))


def test_it_names_the_nodes_that_return_text_and_reads_their_text_key() -> None:
    _, text = _extension()
    named = _named_nodes(text)
    assert sorted(named) == ["HunyuanImage3ForceUnload", "HunyuanImage3Generate", "HunyuanImage3SoftUnload"]
    assert all(name in NODE_CLASS_MAPPINGS for name in named)
    assert "output?.text" in text  # the key of {"ui": {"text": [...]}}, as the 'executed' message carries it


def _is_text(out: dict) -> bool:
    lines = out.get("ui", {}).get("text")
    return isinstance(lines, list) and bool(lines) and all(isinstance(line, str) and line for line in lines)


def test_the_named_nodes_return_the_text_it_reads(tmp_path: Path, base_checkpoint: Path, cache,
                                                  monkeypatch) -> None:
    root = tmp_path / "models"
    shutil.copytree(base_checkpoint, root / base_checkpoint.name)
    monkeypatch.setenv("HUNYUAN_MODELS_DIR", str(root))
    from hunyuan_image3.nodes.loaders import HunyuanImage3LoaderBF16

    (handle,) = HunyuanImage3LoaderBF16().load(base_checkpoint.name, "disabled")
    out = HunyuanImage3Generate().generate(handle, prompt="a fox", seed=0, steps=1, guidance_scale=5.0,
                                           resolution="1024x1024", width=1024, height=1024)
    assert _is_text(out) and out["ui"]["text"][0].startswith("1024x1024, 1 steps")
    assert isinstance(out["result"][0], torch.Tensor)
    assert _is_text(HunyuanImage3SoftUnload().unload(handle))
    assert _is_text(HunyuanImage3ForceUnload().unload(False))

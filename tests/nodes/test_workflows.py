"""The example workflows match our nodes' INPUT_TYPES (widgets in order, outputs), without a server.

The e2e runner checks them against a live ComfyUI's /object_info; this catches a node that gained an
input while workflows/ was not rebuilt (`python tests/e2e/build_workflows.py`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from workflow_check import check_api, check_ui  # noqa: E402

from hunyuan_image3 import NODE_CLASS_MAPPINGS  # noqa: E402


def _object_info() -> dict:
    return {
        name: {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES)}
        for name, cls in NODE_CLASS_MAPPINGS.items()
    }


def _ours(errors: list[str]) -> list[str]:
    return [e for e in errors if "missing on the server" not in e]  # ComfyUI's own nodes: e2e checks them


@pytest.mark.parametrize("path", sorted((ROOT / "workflows").glob("*.json")), ids=lambda p: p.name)
def test_workflow_matches_the_nodes(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    info = _object_info()
    if path.name.endswith(".api.json"):
        assert _ours(check_api(data, info)) == []
    else:
        ours = [n for n in data["nodes"] if n["type"] in NODE_CLASS_MAPPINGS]
        assert ours, "no HunyuanImage3 node in the workflow"
        assert _ours(check_ui(data, info)) == []


# -- layout: what the frontend draws (LiteGraph constants of ComfyUI's frontend, LGraphNode.computeSize) --
TITLE_HEIGHT = 30  # the title bar, drawn above a node's pos
SLOT_HEIGHT = 20  # one row of input / output sockets
WIDGET_HEIGHT = 24  # a widget (20) and its spacing (4)
MULTILINE_MIN = 60  # a multiline text box at its smallest
SOCKET_TYPES = {"HUNYUAN_IMAGE3", "IMAGE", "*"}  # inputs drawn as sockets, not widgets


def min_height(cls: type) -> int:
    """The least height the frontend gives one of our nodes: its socket rows, then each widget (a seed
    adds its control_after_generate widget; a multiline text box takes more), as computeSize counts."""
    types = cls.INPUT_TYPES()
    inputs = {**types["required"], **types.get("optional", {})}
    sockets = sum(1 for spec in inputs.values() if isinstance(spec[0], str) and spec[0] in SOCKET_TYPES)
    rows = max(sockets, len(cls.RETURN_TYPES), 1)
    widgets = 0
    for name, spec in inputs.items():
        if isinstance(spec[0], str) and spec[0] in SOCKET_TYPES:
            continue
        options = spec[1] if len(spec) > 1 else {}
        widgets += (MULTILINE_MIN + 4) if options.get("multiline") else WIDGET_HEIGHT
        widgets += WIDGET_HEIGHT if name == "seed" else 0
    return rows * SLOT_HEIGHT + widgets + 8 + 6


def _box(node: dict) -> tuple[float, float, float, float]:
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "workflows").glob("*.json")
                                        if not p.name.endswith(".api.json")), ids=lambda p: p.name)
def test_workflow_nodes_are_tall_enough_and_do_not_overlap(path: Path) -> None:
    """Each of our nodes is saved at least as tall as its widgets need, and no node (title bar included)
    covers another: a node drawn on top of a loader would hide its widgets."""
    nodes = json.loads(path.read_text(encoding="utf-8"))["nodes"]
    short = [f"{n['title']}: saved height {n['size'][1]} < {min_height(NODE_CLASS_MAPPINGS[n['type']])}"
             for n in nodes if n["type"] in NODE_CLASS_MAPPINGS
             and n["size"][1] < min_height(NODE_CLASS_MAPPINGS[n["type"]])]
    assert short == []
    overlaps = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            ax0, ay0, ax1, ay1 = _box(a)
            bx0, by0, bx1, by1 = _box(b)
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                overlaps.append(f"{a['title']} and {b['title']}")
    assert overlaps == []


def test_one_workflow_uses_the_step_cache() -> None:
    """workflows/hunyuan_image3_step_cache: Generate with the official Taylor cache, in both formats."""
    api = json.loads((ROOT / "workflows" / "hunyuan_image3_step_cache.api.json").read_text(encoding="utf-8"))
    gen = [n["inputs"] for n in api.values() if n["class_type"] == "HunyuanImage3Generate"]
    assert len(gen) == 1 and gen[0]["step_cache"] == "taylor" and gen[0]["steps"] == 50
    ui = json.loads((ROOT / "workflows" / "hunyuan_image3_step_cache.json").read_text(encoding="utf-8"))
    node = next(n for n in ui["nodes"] if n["type"] == "HunyuanImage3Generate")
    assert "taylor" in node["widgets_values"]
    assert _ours(check_api(api, _object_info())) == [] and _ours(check_ui(ui, _object_info())) == []

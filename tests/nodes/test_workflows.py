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


def test_one_workflow_uses_the_step_cache() -> None:
    """workflows/hunyuan_image3_step_cache: Generate with the official Taylor cache, in both formats."""
    api = json.loads((ROOT / "workflows" / "hunyuan_image3_step_cache.api.json").read_text(encoding="utf-8"))
    gen = [n["inputs"] for n in api.values() if n["class_type"] == "HunyuanImage3Generate"]
    assert len(gen) == 1 and gen[0]["step_cache"] == "taylor" and gen[0]["steps"] == 50
    ui = json.loads((ROOT / "workflows" / "hunyuan_image3_step_cache.json").read_text(encoding="utf-8"))
    node = next(n for n in ui["nodes"] if n["type"] == "HunyuanImage3Generate")
    assert "taylor" in node["widgets_values"]
    assert _ours(check_api(api, _object_info())) == [] and _ours(check_ui(ui, _object_info())) == []

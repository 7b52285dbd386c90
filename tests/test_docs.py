"""The user docs (README.md, docs/*.md) match the code: generated figures are the code's output, the
measured ratios follow from the tables they quote, one set of INT8 step figures, node names and
workflow node ids as registered, shipped example images, complete dependencies, a LICENSE, no
placeholder address and no development-log words."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hunyuan_image3 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from hunyuan_image3.hunyuan_loader.cli import card_plan as cp
from hunyuan_image3.hunyuan_loader.cli import readme_figures

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMFY_CORE_NODES = {"SaveImage", "LoadImage", "PreviewAny"}  # ComfyUI's own nodes the workflows use


def _block(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:start[^>]*-->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert match, f"the <!-- {name}:start --> ... <!-- {name}:end --> block is missing"
    return match.group(1).strip()


@pytest.mark.parametrize(("name", "make"), [("moe-memory", readme_figures.moe_memory_block),
                                            ("projection", readme_figures.projection_block)])
def test_generated_readme_blocks_are_the_codes_output(name: str, make) -> None:
    assert _block(README, name) == make().strip(), (
        f"README's {name} block is stale: paste `python -m hunyuan_loader plan --readme-block "
        f"{'memory' if name == 'moe-memory' else name}`")


def test_the_memory_formula_examples_are_the_formula() -> None:
    rows = re.findall(r"\| (\d+)x\d+ \| ([\d.]+) \| ([\d.]+) GB \|", _block(README, "moe-memory"))
    assert len(rows) >= 3
    for side, _, gb in rows:
        assert float(gb) == pytest.approx(12 * (int(side) ** 2 / 1e6) ** 1.4, abs=0.05)
    assert "2 MP: 22 GB" not in README and "3.7 MP: 45 GB" not in README


def _offload_row(label: str) -> float:
    match = re.search(rf"^\| \**{re.escape(label)}\** \| \**([\d.]+)\** \|", README, re.M)
    assert match, label
    return float(match.group(1))


def test_streaming_ratios_follow_from_the_table() -> None:
    ours = _offload_row("BF16, our pinned streaming")
    accelerate, bnb = _offload_row("BF16, accelerate offload"), _offload_row("bnb INT8 all resident")
    assert f"Ours is {accelerate / ours:.1f}x faster than accelerate's offload and {bnb / ours:.2f}x faster than\n" \
           "bnb LLM.int8 resident" in README
    assert "faster than\nINT8 resident" not in README and "faster than INT8" not in README


def test_one_set_of_int8_step_figures() -> None:
    bench = cp.INT8_BENCH
    assert (f"bf16 {bench['bf16']} s/step, W8A16 (the INT8\nloader's default) {bench['w8a16']} "
            f"({cp.W8A16_RATIO:.2f}x), bnb LLM.int8 {bench['bnb']} ({cp.BNB_INT8_RATIO:.1f}x") in README
    w8a16 = (ROOT / "docs" / "w8a16.md").read_text(encoding="utf-8")
    current = re.search(r"^\| \d+ \(current code\) \|.*$", w8a16, re.M)
    assert current and current.group(0).split("|")[6].strip() == f"{cp.W8A16_RATIO:.2f}x"  # 10-layer step
    assert f"{cp.BNB_INT8_RATIO:.1f}x the bf16 step" in w8a16
    assert f"{cp.W8A16_RATIO:.2f}x the BF16 step" in cp.H200_BENCH.source
    for doc in USER_DOCS:  # the retired figures of earlier runs
        text = doc.read_text(encoding="utf-8")
        for old in ("1.14x the BF16", "4.1-6.8x", "2.2-3.6", "4-8x the bf16"):
            assert old not in text, (doc.name, old)


def test_node_names_are_the_registered_ones() -> None:
    rows = dict(re.findall(r"^\| (HunyuanImage-3 [^`|]+?) `(HunyuanImage3\w+)` \|", README, re.M))
    assert {v: k for k, v in rows.items()} == NODE_DISPLAY_NAME_MAPPINGS
    headings = re.findall(r"^## (HunyuanImage-3 .+)$", (ROOT / "docs" / "nodes.md").read_text(encoding="utf-8"), re.M)
    single = [h for h in headings if "/" not in h]  # "Loader (INT8 / NF4 / BF16)" covers three
    assert single and set(single) <= set(NODE_DISPLAY_NAME_MAPPINGS.values()), single


def _workflow_ids() -> str:
    lines = []
    for path in sorted((ROOT / "workflows").glob("*.api.json")):
        nodes = json.loads(path.read_text(encoding="utf-8"))
        ids = ", ".join(f'`"{k}"` {v["class_type"]}' for k, v in sorted(nodes.items(), key=lambda kv: int(kv[0])))
        lines.append(f"- `{path.name[:-len('.api.json')]}`: {ids}")
    return "\n".join(lines)


def test_api_doc_node_ids_are_the_workflows() -> None:
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert _block(api, "workflow-ids") == _workflow_ids(), "docs/api.md's node ids: paste\n" + _workflow_ids()
    types = set(re.findall(r'`"\d+"` (\w+)', _workflow_ids()))
    assert types <= set(NODE_CLASS_MAPPINGS) | COMFY_CORE_NODES, types - set(NODE_CLASS_MAPPINGS)


def test_example_images_the_workflows_name_are_shipped() -> None:
    from PIL import Image

    named = set()
    for path in (ROOT / "workflows").glob("*.api.json"):
        for node in json.loads(path.read_text(encoding="utf-8")).values():
            if node["class_type"] == "LoadImage":
                named.add(node["inputs"]["image"])
    assert named
    for name in named:
        with Image.open(ROOT / "workflows" / "input" / name) as image:
            assert image.size[0] >= 256
    assert "workflows/input/" in (ROOT / "docs" / "nodes.md").read_text(encoding="utf-8")


def test_pyproject_dependencies_are_requirements_txt() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    wanted = {line.split("#")[0].strip() for line in lines} - {""}
    assert set(project["dependencies"]) == wanted


def test_license_file_is_the_one_pyproject_names() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_no_placeholder_address_or_icon() -> None:
    for path in [*USER_DOCS, ROOT / "pyproject.toml"]:
        text = path.read_text(encoding="utf-8")
        assert "github.com/hunyuanimage3-nodes" not in text, path.name
        assert not re.search(r'^Icon = ""', text, re.M), path.name
    assert "install it from a copy of\nthis folder (a local clone" in README


def test_the_w8a16_copy_needs_the_pack_as_the_readme_says() -> None:
    fresh = subprocess.run([sys.executable, "-c", "from transformers.quantizers.auto import "
                            "AUTO_QUANTIZATION_CONFIG_MAPPING as m; print('hy3_w8a16' in m)"],
                           capture_output=True, text=True, timeout=300)
    assert fresh.stdout.strip() == "False", fresh.stderr[-2000:]  # transformers alone does not know it
    assert "through these loaders or plain\ntransformers `from_pretrained`" not in README
    assert "`quant_method: hy3_w8a16` is this pack's format, unknown to transformers alone" in README


# Words of a development log, not of a user guide: who worked when, on which ticket, in which attempt.
DEV_LOG = [r"\bsessions?\b", r"\bissues? \d+", r"\bthe issue'?s?\b", r"\bcalls? \d", r"\bcall \d/", r"throwaway",
           r"throw-away", r"\bnever committed\b", r"\bclosing notes?\b"]


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_no_development_log_words(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    found = [(pattern, m.group(0)) for pattern in DEV_LOG for m in re.finditer(pattern, text, re.I)]
    assert found == [], f"{doc.name}: {found}"

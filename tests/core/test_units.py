"""The GiB, the 256-byte alignment and the safetensors header parser are each defined once."""

from __future__ import annotations

import ast

import pytest
from test_settings import ROOT, runtime_files

from hunyuan_image3.hunyuan_loader.core import units
from hunyuan_image3.memory import devices, estimator, stats


def test_values() -> None:
    assert units.GIB == 1024**3 and units.MIB == 1024**2 and units.ALIGN == 256
    assert [units.aligned(n) for n in (0, 1, 255, 256, 257, 512)] == [0, 256, 256, 256, 512, 512]
    assert units.aligned(17, 16) == 32
    assert stats.GIB == devices.GIB == estimator.GIB == units.GIB  # the names other modules use


def own_definitions(source: str) -> list[str]:
    """What ``source`` defines that belongs to units.py or checkpoint/layout.py: a GiB constant, a
    256-byte alignment, an alignment helper, a safetensors header length read."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.BinOp, ast.Constant)):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            text = ast.unparse(node.value).replace(" ", "")
            if text in ("1024**3", "2**30", "1<<30", "1073741824") or any(n.lower() == "gib" for n in names):
                found.append(f"{names}={text}")
            elif text == "256" and any(n.upper().endswith("ALIGN") and n != "OUT_ALIGN" for n in names):
                found.append(f"{names}={text}")
        elif isinstance(node, ast.FunctionDef) and node.name in ("_align", "_aligned", "aligned"):
            found.append(f"def {node.name}")
        elif isinstance(node, ast.Constant) and node.value == "<Q":
            found.append("struct '<Q'")
    return found


@pytest.mark.parametrize("source", [
    "GIB = 1024**3", "GiB = 1024 ** 3", "_ALIGN = 256", "def _align(n):\n    return n",
    "import struct\n(length,) = struct.unpack('<Q', head)",
])
def test_the_check_finds_a_planted_copy(source: str) -> None:
    assert own_definitions(source)


def test_each_is_defined_once() -> None:
    owners = {ROOT / "hunyuan_loader" / "core" / "units.py", ROOT / "hunyuan_loader" / "checkpoint" / "layout.py"}
    found = {str(f.relative_to(ROOT)): hits for f in runtime_files() if f not in owners
             if (hits := own_definitions(f.read_text(encoding="utf-8")))}
    assert found == {}, f"import these from hunyuan_loader/core/units.py or checkpoint/layout.py: {found}"

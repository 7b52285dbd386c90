"""The pack's requirements never downgrade a ComfyUI stack: lower bounds only, an upper bound or pin
only with its reason on the comment line above it, torch not named, pyproject.toml agreeing."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
_REQ = re.compile(r"^([A-Za-z0-9_.\-]+)\s*(.*)$")


def _requirements() -> list[tuple[str, str, str]]:
    """(name, specifier, the comment line just above or '') of each line of requirements.txt."""
    out, comment = [], ""
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#"):
            comment = line
            continue
        if line:
            name, spec = _REQ.match(line).groups()
            out.append((name.lower().replace("_", "-"), spec.replace(" ", ""), comment))
        comment = ""
    return out


def test_no_upper_bound_without_its_reason_and_no_torch() -> None:
    reqs = _requirements()
    assert {"transformers", "huggingface-hub", "diffusers"} <= {n for n, _, _ in reqs}
    for name, spec, comment in reqs:
        assert name not in ("torch", "torchvision", "torchaudio"), f"{name}: ComfyUI owns it"
        if "<" in spec or "==" in spec or "~=" in spec:
            assert comment, f"{name}{spec}: an upper bound needs the reason (a proven breakage) above it"


def test_pyproject_declares_the_same_bounds() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    declared = {}
    for dep in deps:
        name, spec = _REQ.match(dep.split(";")[0].strip()).groups()
        declared[name.lower().replace("_", "-")] = spec.replace(" ", "")
    reqs = {n: s for n, s, _ in _requirements()}
    for name, spec in declared.items():
        assert reqs.get(name) == spec, f"pyproject {name}{spec} != requirements.txt {name}{reqs.get(name)}"

"""What the Comfy Registry's validator (`comfy node validate`, comfy-cli 1.23.0) checks, run here
without comfy-cli (too heavy for CI):

- its security check is exactly `python -m ruff check . -q --select S102,S307,E702 --exit-zero`
  in the pack's root (comfy_cli/command/custom_nodes/command.py, validate_node_for_publishing):
  any output is a warning ("We will soon disable exec and eval, and multiple statements in a
  single line"); S102 is exec(), S307 eval(), E702 `a; b` on one line;
- its pyproject.toml reading (comfy_cli/registry/config_parser.py, extract_node_configuration)
  fails on an empty [project] version and warns on a license that is neither {file} nor {text}.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_registry_security_check_prints_nothing() -> None:
    cmd = [sys.executable, "-m", "ruff", "check", ".", "-q", "--select", "S102,S307,E702", "--exit-zero"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "", "the Comfy Registry validator would warn:\n" + res.stdout


def test_registry_check_catches_exec(tmp_path: Path) -> None:
    """Control: the same command flags an exec() (so the test above can fail)."""
    (tmp_path / "bad.py").write_text("exec('x = 1')\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "ruff", "check", ".", "-q", "--select", "S102,S307,E702", "--exit-zero",
           "--no-cache"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "S102" in res.stdout


def test_pyproject_has_what_the_registry_reads() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project, comfy = data["project"], data["tool"]["comfy"]
    assert project["name"] and project["version"] and project["description"]
    license_ = project["license"]
    assert isinstance(license_, str) or ("file" in license_ or "text" in license_)
    assert comfy["PublisherId"] and comfy["DisplayName"]
    repo = project.get("urls", {}).get("Repository")  # optional; when given, a real GitHub address
    assert repo is None or (repo.startswith("https://github.com/") and "hunyuanimage3-nodes" not in repo)
    assert comfy.get("Icon", None) != ""  # an empty Icon is a placeholder: leave the key out

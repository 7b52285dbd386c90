"""One settings module: the only runtime reader of the environment, one boolean rule, parsed once,
and docs/settings.md lists exactly its variables."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from hunyuan_image3.hunyuan_loader.core import devices, quiet, settings
from hunyuan_image3.hunyuan_loader.core.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_FILE = ROOT / "hunyuan_loader" / "core" / "settings.py"
ENV_API = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}
BOOLEANS = [name for name, s in settings.SETTINGS.items() if s.parse is settings.parse_bool]


# -- the checker: nothing but core/settings.py touches the environment ------------------------------
def env_accesses(source: str) -> list[int]:
    """Lines of ``source`` that read or write the process environment through ``os``."""
    tree = ast.parse(source)
    os_names = {"os"} | {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                         for a in n.names if a.name == "os"}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "posix", "nt"):
            if any(a.name in ENV_API for a in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr in ENV_API:
            if isinstance(node.value, ast.Name) and node.value.id in os_names:
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            target, *rest = node.args
            if (isinstance(target, ast.Name) and target.id in os_names and rest
                    and isinstance(rest[0], ast.Constant) and rest[0].value in ENV_API):
                lines.append(node.lineno)
    return sorted(lines)


def runtime_files() -> list[Path]:
    """The pack's runtime code: the root __init__.py, hunyuan_loader/ (not the stand-in checkpoint's
    own code, test_model/), memory/ and nodes/."""
    files = [ROOT / "__init__.py"]
    for folder in ("hunyuan_loader", "memory", "nodes"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if "test_model" not in f.relative_to(ROOT).parts]


@pytest.mark.parametrize("source", [
    "import os\nvalue = os.environ.get('HUNYUAN_X', '')",
    "import os\nvalue = os.getenv('HUNYUAN_X')",
    "import os\nos.environ.setdefault('HF_HUB_OFFLINE', '1')",
    "import os as _o\nvalue = _o.environ['HUNYUAN_X']",
    "from os import environ\nvalue = environ.get('HUNYUAN_X')",
    "from os import getenv as g\n",
    "import os\nvalue = getattr(os, 'environ')['HUNYUAN_X']",
    "def f():\n    import os\n    return 'HUNYUAN_X' in os.environ",
])
def test_checker_finds_a_planted_read(source: str) -> None:
    assert env_accesses(source)


@pytest.mark.parametrize("source", [
    "import os\npath = os.path.join('a', 'b')",
    "class Q:\n    def validate_environment(self):\n        return self.environ",
    "from . import settings\nvalue = settings.get(settings.VERBOSE)",
])
def test_checker_leaves_other_code_alone(source: str) -> None:
    assert env_accesses(source) == []


def test_only_the_settings_module_reads_the_environment() -> None:
    files = runtime_files()
    assert len(files) > 40 and SETTINGS_FILE in files
    found = {str(f.relative_to(ROOT)): lines for f in files if f != SETTINGS_FILE
             if (lines := env_accesses(f.read_text(encoding="utf-8")))}
    assert found == {}, f"read the environment through hunyuan_loader/core/settings.py, not here: {found}"
    assert env_accesses(SETTINGS_FILE.read_text(encoding="utf-8"))  # the checker does see the real reads


# -- booleans: one rule everywhere ------------------------------------------------------------------
def test_the_boolean_settings() -> None:
    assert set(BOOLEANS) == {settings.VERBOSE, settings.LOGICAL_DEVICES, settings.MOE_OVERLAP,
                             settings.MOE_PAIR_DEQUANT, settings.EXPERT_STREAMING}


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize(("text", "expected"), [
    ("1", True), ("true", True), ("yes", True), ("on", True), ("TRUE", True), (" Yes ", True), ("On", True),
    ("0", False), ("false", False), ("no", False), ("off", False), ("FALSE", False), (" No ", False),
    ("Off", False),
])
def test_each_boolean_spelling(monkeypatch, name: str, text: str, expected: bool) -> None:
    monkeypatch.setenv(name, text)
    assert settings.get(name) is expected


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize("text", ["maybe", "2", "-1", "tru", "y", "enabled"])
def test_a_bad_boolean_names_the_variable_and_the_spellings(monkeypatch, name: str, text: str) -> None:
    monkeypatch.setenv(name, text)
    with pytest.raises(ValueError, match=rf"{name}=.*1, true, yes or on.*0, false, no or off"):
        settings.get(name)


@pytest.mark.parametrize("name", BOOLEANS)
def test_unset_or_blank_is_the_default(monkeypatch, name: str) -> None:
    monkeypatch.delenv(name, raising=False)
    default = settings.get(name)
    assert default is (settings.SETTINGS[name].default == "on")
    monkeypatch.setenv(name, "  ")
    assert settings.get(name) is default


def test_false_switches_verbose_and_logical_devices_off(monkeypatch) -> None:
    """The bug this module fixed: "false" used to switch both features ON."""
    monkeypatch.setattr(quiet, "_verbose", None)  # the variable decides (an in-process CLI run may have set it)
    monkeypatch.setenv(settings.VERBOSE, "false")
    monkeypatch.setenv(settings.LOGICAL_DEVICES, "false")
    assert quiet.is_verbose() is False
    assert devices.logical_devices_allowed() is False
    with pytest.raises(InputError, match="lists 'cpu'"):
        devices.parse_devices("cpu")
    monkeypatch.setenv(settings.VERBOSE, "yes")
    monkeypatch.setenv(settings.LOGICAL_DEVICES, "yes")
    assert quiet.is_verbose() is True
    assert devices.parse_devices("cpu,cpu") == ("cpu", "cpu")


def test_the_cli_flag_overrides_the_variable(monkeypatch) -> None:
    monkeypatch.setenv(settings.VERBOSE, "1")
    monkeypatch.setattr(quiet, "_verbose", False)  # as quiet.set_verbose(False) from the CLI's args
    assert quiet.is_verbose() is False


# -- the other settings -----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "text", "expected"), [
    (settings.VRAM_LIMIT_GB, "22.5", 22.5),
    (settings.RAM_LIMIT_GB, " 64 ", 64.0),
    (settings.MIN_STREAMED_BLOCKS, "3", 3),
    (settings.MOE_GROUPED, " Linear ", "linear"),
    (settings.MOE_GROUPED, "per_expert", "off"),
    (settings.MOE_GROUPED, "0", "off"),
    (settings.MOE_GROUPED, "false", "off"),
    (settings.MOE_SCRATCH_MB, "1024", 1024),
    (settings.DEQUANT_KERNEL, "FLAT", "flat"),
    (settings.W8A16_KERNEL, "torch", "torch"),
    (settings.MODELS_DIR, os.pathsep.join(["/a", "/b"]), [Path("/a"), Path("/b")]),
    (settings.CACHE_HOME, "/tmp/cache", Path("/tmp/cache")),
])
def test_values(monkeypatch, name: str, text: str, expected: object) -> None:
    monkeypatch.setenv(name, text)
    assert settings.get(name) == expected


@pytest.mark.parametrize(("name", "text", "allowed"), [
    (settings.VRAM_LIMIT_GB, "lots", "positive number of GiB"),
    (settings.VRAM_LIMIT_GB, "0", "positive number of GiB"),
    (settings.RAM_LIMIT_GB, "-8", "positive number of GiB"),
    (settings.RAM_LIMIT_GB, "nan", "positive number of GiB"),
    (settings.MIN_STREAMED_BLOCKS, "1.5", "whole number >= 0"),
    (settings.MIN_STREAMED_BLOCKS, "-1", "whole number >= 0"),
    (settings.MOE_GROUPED, "cutlass", "auto, triton, dequant, linear or 0"),
    (settings.MOE_SCRATCH_MB, "0", "positive whole number of MiB"),
    (settings.DEQUANT_KERNEL, "fast", "rows or flat"),
    (settings.W8A16_KERNEL, "triton", "auto or torch"),
    (settings.PREVIEW_EVERY, "0", "whole number >= 1"),
])
def test_a_bad_value_names_the_variable_and_the_allowed_values(monkeypatch, name: str, text: str,
                                                               allowed: str) -> None:
    monkeypatch.setenv(name, text)
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        settings.get(name)
    assert allowed in str(info.value) and repr(text) in str(info.value)


def test_defaults_when_unset(monkeypatch) -> None:
    for name in settings.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert {name: settings.get(name) for name in settings.SETTINGS} == {
        settings.VERBOSE: False, settings.LOGICAL_DEVICES: False, settings.VRAM_LIMIT_GB: None,
        settings.RAM_LIMIT_GB: None, settings.MIN_STREAMED_BLOCKS: 0, settings.MODELS_DIR: [],
        settings.MOE_GROUPED: "auto", settings.MOE_SCRATCH_MB: None, settings.MOE_OVERLAP: False,
        settings.MOE_PAIR_DEQUANT: True, settings.DEQUANT_KERNEL: "rows", settings.W8A16_KERNEL: "auto",
        settings.CACHE_HOME: None, settings.PREVIEW_EVERY: 1, settings.EXPERT_STREAMING: True,
    }


def test_parsed_once_until_refresh() -> None:
    """Cached (the MoE reads its settings on every call); ``refresh()`` reads the environment again.
    pytest.MonkeyPatch, not the fixture: the fixture refreshes on every setenv."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(settings.MOE_GROUPED, "linear")
        settings.refresh()
        assert settings.get(settings.MOE_GROUPED) == "linear"
        mp.setenv(settings.MOE_GROUPED, "dequant")
        assert settings.get(settings.MOE_GROUPED) == "linear"
        settings.refresh()
        assert settings.get(settings.MOE_GROUPED) == "dequant"
    settings.refresh()


def test_a_bad_value_is_not_cached(monkeypatch) -> None:
    monkeypatch.setenv(settings.MOE_SCRATCH_MB, "big")
    for _ in range(2):
        with pytest.raises(ValueError, match=settings.MOE_SCRATCH_MB):
            settings.get(settings.MOE_SCRATCH_MB)


def test_hub_offline_is_a_default_the_user_can_override(monkeypatch) -> None:
    monkeypatch.delenv(settings.HUB_OFFLINE, raising=False)
    settings.hub_offline_by_default()
    assert os.environ[settings.HUB_OFFLINE] == "1"
    monkeypatch.setenv(settings.HUB_OFFLINE, "0")
    settings.hub_offline_by_default()
    assert os.environ[settings.HUB_OFFLINE] == "0"


# -- the users' table -------------------------------------------------------------------------------
def _doc_rows() -> dict[str, tuple[str, str]]:
    """docs/settings.md's table: variable -> (type, default), backticks dropped."""
    rows = {}
    for line in (ROOT / "docs" / "settings.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_the_docs_table_lists_exactly_the_settings() -> None:
    rows = _doc_rows()
    assert sorted(rows) == sorted(settings.SETTINGS)
    for name, setting in settings.SETTINGS.items():
        assert rows[name] == (setting.type, setting.default), name
        assert setting.effect


def test_the_readme_links_the_table() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Other memory settings", 1)[1].split("\n## ", 1)[0]
    assert "docs/settings.md" in section


def test_benches_that_change_a_setting_read_it_again() -> None:
    """The settings are parsed once: a bench that sets a variable mid-run (the per-expert row of
    bench/int8.py, the smart rows of bench/load.py) must call settings_refresh() or its row silently runs
    with the old value (the per-expert row measured the grouped path once)."""
    root = Path(__file__).resolve().parents[2] / "bench"
    changed = [p.name for p in sorted(root.glob("*.py")) if re.search(r"os\.environ\[[^\]]+\]\s*(,|=[^=])", p.read_text())]
    assert changed, "no bench sets a variable: the check has nothing to look at"
    missing = [name for name in changed if "settings_refresh()" not in (root / name).read_text()]
    assert not missing, missing

"""The path rule for model_name inside ComfyUI (issue 15): a listed folder NAME, never a path.

Uses ComfyUI's real folder_paths when it is importable, else a stand-in module with the two
functions the adapter calls (add_model_folder_path, get_folder_paths). A second root is
registered the way extra_model_paths.yaml entries are (add_model_folder_path).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from hunyuan_image3.hunyuan_loader.core.errors import CheckpointError, HunyuanError, InputError
from hunyuan_image3.nodes import comfy_adapter, model_paths
from hunyuan_image3.nodes.loaders import HunyuanImage3LoaderBudget, HunyuanImage3LoaderINT8

KEY = comfy_adapter.MODEL_FOLDER


def make_checkpoint(path: Path, marker: Path | None = None) -> Path:
    """A folder with config.json; with ``marker``, also remote code that writes it on import."""
    path.mkdir(parents=True)
    config = {"model_type": "hunyuan_image_3_moe", "architectures": ["HunyuanImage3ForCausalMM"]}
    if marker is not None:
        (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        config["auto_map"] = {"AutoModelForCausalLM": "evil.Evil"}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def comfy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """models/HunyuanImage-3 (registered by the pack) and an extra_model_paths.yaml root."""
    models = tmp_path / "comfy" / "models"
    try:
        import folder_paths as fp  # a real ComfyUI on sys.path
    except ImportError:
        fp = types.ModuleType("folder_paths")
        fp.folder_names_and_paths = {}

        def add_model_folder_path(name: str, path: str, is_default: bool = False) -> None:
            paths = fp.folder_names_and_paths.setdefault(name, ([], set()))[0]
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)

        fp.add_model_folder_path = add_model_folder_path
        fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
        monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setattr(fp, "models_dir", str(models), raising=False)
    monkeypatch.setitem(fp.folder_names_and_paths, KEY, ([], set()))
    extra = tmp_path / "other_disk" / "hy3"
    fp.add_model_folder_path(KEY, str(extra))  # what an extra_model_paths.yaml entry does
    comfy_adapter.register_model_folder()
    root = models / KEY
    root.mkdir(parents=True)
    extra.mkdir(parents=True)
    outside = tmp_path / "comfy" / "input" / "upload"
    return types.SimpleNamespace(root=root, extra=extra, outside=outside, marker=tmp_path / "MARKER")


def refused(name: str, *words: str) -> str:
    with pytest.raises(HunyuanError) as info:
        comfy_adapter.resolve_model_path(name)
    msg = str(info.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, msg
    return msg


def test_roots_are_comfyui_registered_folders(comfy) -> None:
    assert comfy_adapter.in_comfyui()
    assert {p.resolve() for p in comfy_adapter.model_roots()} == {comfy.root.resolve(), comfy.extra.resolve()}


def test_valid_names_in_both_roots_resolve_and_are_listed(comfy) -> None:
    a = make_checkpoint(comfy.root / "HunyuanImage-3")
    b = make_checkpoint(comfy.extra / "HunyuanImage-3-Instruct")
    dotted = make_checkpoint(comfy.root / "HunyuanImage-3.0")  # dots inside a name are fine
    assert comfy_adapter.resolve_model_path("HunyuanImage-3") == a.resolve()
    assert comfy_adapter.resolve_model_path("HunyuanImage-3-Instruct") == b.resolve()
    assert comfy_adapter.resolve_model_path("HunyuanImage-3.0") == dotted.resolve()
    assert comfy_adapter.list_model_names() == ["HunyuanImage-3", "HunyuanImage-3-Instruct", "HunyuanImage-3.0"]
    assert HunyuanImage3LoaderINT8.VALIDATE_INPUTS("HunyuanImage-3.0") is True
    assert HunyuanImage3LoaderBudget.VALIDATE_INPUTS("HunyuanImage-3-Instruct") is True


def test_absolute_path_refused_even_to_a_real_checkpoint(comfy) -> None:
    inside = make_checkpoint(comfy.root / "HunyuanImage-3")
    outside = make_checkpoint(comfy.outside, marker=comfy.marker)
    for path in (outside, inside):
        refused(str(path), "absolute path", "models/HunyuanImage-3")
    refused("C:\\models\\x", "absolute path")
    refused("C:x", "absolute path")  # drive-relative on Windows


@pytest.mark.parametrize(
    "name, why",
    [
        ("../../input/upload", "'..'"),
        ("..", "'..'"),
        ("HunyuanImage-3/../../input/upload", "'..'"),
        ("..\\input\\upload", "'..'"),
        ("HunyuanImage-3/sub", "path separator"),
        ("HunyuanImage-3\\sub", "path separator"),
        (".hidden", "hidden"),
        (".", "hidden"),
        ("", "No HunyuanImage-3 model folder"),
        ("a\x00b", "control characters"),
    ],
)
def test_path_like_names_refused(comfy, name: str, why: str) -> None:
    make_checkpoint(comfy.outside, marker=comfy.marker)
    make_checkpoint(comfy.root / "HunyuanImage-3" / "sub")
    make_checkpoint(comfy.root / ".hidden")
    refused(name, why, "models/HunyuanImage-3")
    assert not comfy.marker.exists()


def test_dot_dot_into_an_uploaded_folder_is_refused_by_validation_and_load(comfy) -> None:
    """The attack of issue 15: input/<subfolder> reached with ../../; its code must never run."""
    make_checkpoint(comfy.outside, marker=comfy.marker)
    make_checkpoint(comfy.root / "HunyuanImage-3")
    for name in ("../../input/upload", str(comfy.outside)):
        msg = HunyuanImage3LoaderINT8.VALIDATE_INPUTS(name)
        assert isinstance(msg, str) and "models/HunyuanImage-3" in msg and "extra_model_paths.yaml" in msg
        assert isinstance(HunyuanImage3LoaderBudget.VALIDATE_INPUTS(name), str)
        with pytest.raises(InputError):
            HunyuanImage3LoaderINT8().load(name, "disabled")
        with pytest.raises(InputError):
            HunyuanImage3LoaderBudget().load(name, "int8", 80.0, 0.0)
    assert not comfy.marker.exists()


def test_hidden_folder_not_listed(comfy) -> None:
    make_checkpoint(comfy.root / ".cache")
    make_checkpoint(comfy.root / "HunyuanImage-3")
    assert comfy_adapter.list_model_names() == ["HunyuanImage-3"]


def test_symlink_escaping_a_root_is_refused_and_not_listed(comfy) -> None:
    target = make_checkpoint(comfy.outside, marker=comfy.marker)
    (comfy.root / "escape").symlink_to(target, target_is_directory=True)
    (comfy.extra / "escape-too").symlink_to(comfy.root.parent, target_is_directory=True)  # up and over
    assert comfy_adapter.list_model_names() == [comfy_adapter.NO_MODELS]
    refused("escape", "outside", "extra_model_paths.yaml")
    refused("escape-too", "outside")
    assert HunyuanImage3LoaderINT8.VALIDATE_INPUTS("escape") != True  # noqa: E712
    assert not comfy.marker.exists()


def test_symlink_inside_its_root_and_a_linked_root_are_fine(comfy, tmp_path: Path) -> None:
    real = make_checkpoint(comfy.root / "HunyuanImage-3.0")
    (comfy.root / "HY3").symlink_to(real, target_is_directory=True)
    assert comfy_adapter.resolve_model_path("HY3") == real.resolve()
    # models/HunyuanImage-3 itself may be a link to another disk: the check uses the resolved root
    disk = tmp_path / "big_disk"
    make_checkpoint(disk / "HunyuanImage-3-Instruct")
    comfy.extra.rmdir()
    comfy.extra.symlink_to(disk, target_is_directory=True)
    assert comfy_adapter.resolve_model_path("HunyuanImage-3-Instruct") == (disk / "HunyuanImage-3-Instruct").resolve()
    assert comfy_adapter.list_model_names() == ["HY3", "HunyuanImage-3-Instruct", "HunyuanImage-3.0"]


def test_broken_link_and_folder_without_config_are_refused(comfy) -> None:
    (comfy.root / "dangling").symlink_to(comfy.root / "nowhere", target_is_directory=True)
    (comfy.root / "empty").mkdir()
    (comfy.root / "file.txt").write_text("x")
    assert comfy_adapter.list_model_names() == [comfy_adapter.NO_MODELS]
    refused("dangling", "broken link")
    refused("empty", "no config.json")
    refused("file.txt", "not a folder")
    msg = refused("missing", "not found", str(comfy.root.resolve()), "models/HunyuanImage-3")
    assert str(comfy.extra.resolve()) in msg
    assert comfy.root.name in HunyuanImage3LoaderINT8.VALIDATE_INPUTS("missing")


def test_first_root_with_a_valid_entry_wins(comfy) -> None:
    """Listing and resolving agree when one root's entry escapes and another's does not."""
    (comfy.extra / "HunyuanImage-3").symlink_to(make_checkpoint(comfy.outside), target_is_directory=True)
    good = make_checkpoint(comfy.root / "HunyuanImage-3")
    assert comfy_adapter.resolve_model_path("HunyuanImage-3") == good.resolve()
    assert comfy_adapter.list_model_names() == ["HunyuanImage-3"]


def test_listed_names_are_exactly_the_names_that_resolve(comfy, tmp_path: Path) -> None:
    make_checkpoint(comfy.root / "ok")
    make_checkpoint(comfy.root / "ok.v2")
    make_checkpoint(comfy.root / ".hidden")
    make_checkpoint(comfy.outside)
    (comfy.root / "link-out").symlink_to(comfy.outside, target_is_directory=True)
    (comfy.root / "link-in").symlink_to(comfy.root / "ok", target_is_directory=True)
    (comfy.root / "no-config").mkdir()
    make_checkpoint(comfy.extra / "extra-ok")
    listed = set(comfy_adapter.list_model_names())
    for root in (comfy.root, comfy.extra):
        for child in root.iterdir():
            try:
                comfy_adapter.resolve_model_path(child.name)
                resolves = True
            except HunyuanError:
                resolves = False
            assert (child.name in listed) == resolves, child.name
    assert listed == {"ok", "ok.v2", "link-in", "extra-ok"}


def test_linked_value_passes_validation_and_is_checked_at_load(comfy) -> None:
    # A model_name that comes through a link is None at validation time (ComfyUI passes None).
    assert HunyuanImage3LoaderINT8.VALIDATE_INPUTS(None) is True


def test_output_folder_rule_for_inputs_that_create_a_folder(comfy) -> None:
    """The same rule for a future output-folder input (e.g. a quantized copy)."""
    roots = comfy_adapter.model_roots()
    out = model_paths.resolve_name("HunyuanImage-3-int8", roots, must_exist=False, what="output folder")
    assert out == roots[0].resolve() / "HunyuanImage-3-int8"
    for bad in ("../x", "/tmp/x", ".x", "a/b"):
        with pytest.raises(InputError):
            model_paths.resolve_name(bad, roots, must_exist=False, what="output folder")
    # a dangling link would make the folder outside the root: refused like a link that escapes
    (comfy.root / "out-link").symlink_to(comfy.outside, target_is_directory=True)
    with pytest.raises(InputError, match="broken link"):
        model_paths.resolve_name("out-link", roots, must_exist=False)
    comfy.outside.mkdir(parents=True)
    with pytest.raises(InputError, match="outside"):
        model_paths.resolve_name("out-link", roots, must_exist=False)


def test_adapter_output_folder_uses_the_rule(comfy) -> None:
    roots = comfy_adapter.model_roots()
    assert comfy_adapter.resolve_output_folder("HunyuanImage-3-int8") == roots[0].resolve() / "HunyuanImage-3-int8"
    for bad in ("../../input/x", str(comfy.outside), ".x", "a/b"):
        with pytest.raises(InputError, match="output folder"):
            comfy_adapter.resolve_output_folder(bad)


def test_outside_comfyui_any_path_is_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI / library users run on their own machine: absolute paths and HUNYUAN_MODELS_DIR names."""
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    assert not comfy_adapter.in_comfyui()
    ckpt = make_checkpoint(tmp_path / "anywhere" / "HunyuanImage-3.0")
    assert comfy_adapter.resolve_model_path(str(ckpt)) == ckpt
    monkeypatch.setenv("HUNYUAN_MODELS_DIR", str(ckpt.parent))
    assert comfy_adapter.resolve_model_path("HunyuanImage-3.0") == ckpt
    assert comfy_adapter.list_model_names() == ["HunyuanImage-3.0"]
    with pytest.raises(CheckpointError, match="not found"):
        comfy_adapter.resolve_model_path("nope")
    assert comfy_adapter.resolve_output_folder(str(tmp_path / "copy")) == tmp_path / "copy"


def test_name_problem_accepts_plain_names() -> None:
    for name in ("HunyuanImage-3", "HunyuanImage-3.0", "hy3 int8", "a..b", "x."):
        assert model_paths.name_problem(name) is None, name

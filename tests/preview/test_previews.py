"""Previews through the one Generate call: images while it samples, the final image bit-identical with
previews on or off (base, Instruct edit / fusion, Distil, each weight format), the registry entry only
during the call, previews that fail never fail the image, the CLI's --preview-dir, ComfyUI's setting."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.generation import generate
from hunyuan_image3.hunyuan_loader.hooks.registry import hook_names
from hunyuan_image3.hunyuan_loader.preview import vae_fit
from hunyuan_image3.hunyuan_loader.request import GenerationRequest

EDIT = Image.new("RGB", (96, 64), (200, 40, 40))
FUSE = Image.new("RGB", (64, 64), (30, 160, 220))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


class Recorder:
    def __init__(self, model) -> None:
        self.model, self.calls, self.names = model, [], []

    def __call__(self, step: int, steps: int, image) -> None:
        self.calls.append((step, steps, None if image is None else image.size))
        self.names.append(hook_names(self.model))

    @property
    def previews(self) -> list:
        return [c for c in self.calls if c[2] is not None]


def _pair(loaded, every: int = 1, **req):
    request = GenerationRequest(prompt="a red fox", seed=3, **req)
    plain = generate(loaded, request)
    rec = Recorder(loaded.model)
    with_previews = generate(loaded, request, preview=rec, preview_every=every)
    return plain, with_previews, rec


@pytest.mark.parametrize("quant", ["bf16", "int8", "nf4"])
def test_base_previews_come_and_the_image_is_bit_identical(cache, one_thread, base_checkpoint: Path, quant) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint), quant=quant)))
    plain, previewed, rec = _pair(loaded, steps=4, resolution="1152x896")
    assert torch.equal(plain.image, previewed.image)
    assert [c[:2] for c in rec.calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]  # progress as before
    # on a CPU every preview is ready at its own step: one per step but the last, at the latent grid (16x)
    assert rec.previews == [(1, 4, (72, 56)), (2, 4, (72, 56)), (3, 4, (72, 56))]
    assert all(n[-3:] == ["diffusion_progress", "diffusion_preview", "finite_output"] for n in rec.names)
    assert "diffusion_preview" not in hook_names(loaded.model)


def test_previews_every_n_steps(cache, one_thread, base_checkpoint: Path) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    plain, previewed, rec = _pair(loaded, every=2, steps=5, resolution="1024x1024")
    assert torch.equal(plain.image, previewed.image)
    assert [c[0] for c in rec.previews] == [2, 4] and len(rec.calls) == 5


def test_instruct_edit_fusion_and_distil_previews(cache, one_thread, instruct_checkpoint: Path,
                                                  distil_checkpoint: Path) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(instruct_checkpoint))))
    plain, previewed, rec = _pair(loaded, steps=3, images=[EDIT], resolution="auto")
    assert torch.equal(plain.image, previewed.image) and len(rec.previews) == 2
    plain, previewed, rec = _pair(loaded, steps=3, images=[EDIT, FUSE], resolution="1024x1024",
                                  bot_task="think", max_new_tokens=3)
    assert torch.equal(plain.image, previewed.image) and plain.cot_text == previewed.cot_text
    assert [c[0] for c in rec.previews] == [1, 2]
    loaded = cache.get(cache.load(LoadSpec(str(distil_checkpoint))))
    plain, previewed, rec = _pair(loaded, resolution="1024x1024")  # the checkpoint's 8 steps
    assert torch.equal(plain.image, previewed.image)
    assert [c[0] for c in rec.previews] == list(range(1, 8)) and rec.calls[-1][:2] == (8, 8)


def test_a_failing_preview_never_fails_the_image(cache, one_thread, base_checkpoint: Path, monkeypatch) -> None:
    loaded = cache.get(cache.load(LoadSpec(str(base_checkpoint))))

    def broken(model):
        raise RuntimeError("no VAE here")

    monkeypatch.setattr(vae_fit, "projection_for", broken)
    plain, previewed, rec = _pair(loaded, steps=2, resolution="1024x1024")
    assert torch.equal(plain.image, previewed.image) and rec.calls == []  # progress goes the plain way
    monkeypatch.undo()

    from hunyuan_image3.hunyuan_loader.hooks import standard

    def raising(*args, **kwargs):
        raise ValueError("projection broke mid-run")

    monkeypatch.setattr(standard, "flow_x0", raising)
    plain, previewed, rec = _pair(loaded, steps=3, resolution="1024x1024")
    assert torch.equal(plain.image, previewed.image)
    assert [c[:2] for c in rec.calls] == [(1, 3), (2, 3), (3, 3)] and rec.previews == []


def test_cli_writes_numbered_previews(cache, base_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from hunyuan_image3.hunyuan_loader.cli import main as cli

    folder = tmp_path / "previews" / "run1"  # made if missing
    rc = cli.main(["generate", "--model", str(base_checkpoint), "--steps", "3", "--resolution", "1024x1024",
                   "--preview-dir", str(folder), "--out", str(tmp_path / "x.png")])
    assert rc == 0, capsys.readouterr()
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["preview_0001.png", "preview_0002.png"]
    assert all(Image.open(folder / f).size == (512, 512) for f in files)
    assert "previews:   2 PNG files" in capsys.readouterr().out
    (tmp_path / "afile").write_text("x")
    rc = cli.main(["generate", "--model", str(base_checkpoint), "--preview-dir", str(tmp_path / "afile"),
                   "--out", str(tmp_path / "y.png")])
    assert rc == 2 and "--preview-dir" in capsys.readouterr().err and not (tmp_path / "y.png").exists()


@pytest.fixture
def fake_comfy(monkeypatch):
    """comfy.utils.ProgressBar and comfy.cli_args.args as ComfyUI has them (only what the adapter reads)."""
    updates: list[tuple] = []

    class ProgressBar:
        def __init__(self, total, node_id=None) -> None:
            self.total = total

        def update_absolute(self, value, total=None, preview=None) -> None:
            updates.append((value, total, preview))

    method = types.SimpleNamespace(value="auto")
    args = types.SimpleNamespace(preview_method=method, preview_size=256)
    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = args
    comfy.utils, comfy.cli_args = utils, cli_args
    for name, mod in (("comfy", comfy), ("comfy.utils", utils), ("comfy.cli_args", cli_args)):
        monkeypatch.setitem(sys.modules, name, mod)
    return updates, args


def test_comfyui_preview_setting_and_progress_with_preview(fake_comfy) -> None:
    from hunyuan_image3.nodes import comfy_adapter

    updates, args = fake_comfy
    progress, preview = comfy_adapter.step_reporters(4)
    image = Image.new("RGB", (8, 8))
    preview(1, 4, image)
    preview(2, 4, None)
    progress(3, 4)
    assert updates == [(1, 4, ("JPEG", image, 256)), (2, 4, None), (3, 4, None)]
    args.preview_method = types.SimpleNamespace(value="none")  # --preview-method none (ComfyUI's default)
    progress, preview = comfy_adapter.step_reporters(4)
    assert progress is not None and preview is None
    assert comfy_adapter.preview_size() is None

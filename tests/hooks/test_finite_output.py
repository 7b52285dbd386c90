"""NaN / inf in the latents or the decoded image stop the run with an error naming the checkpoint
(hooks/finite_output.py), in the CLI (one `error:` line, exit 2, no image file) and in the Generate
node; a good checkpoint is untouched. The damage is a shard overwritten in place (same size)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_model import damaged_copy

from hunyuan_image3.hunyuan_loader.cache import ModelHandle
from hunyuan_image3.hunyuan_loader.cli import main as cli
from hunyuan_image3.hunyuan_loader.core.errors import CheckpointError
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.hooks.finite_output import NonFiniteOutput, check_finite, first_tensor
from hunyuan_image3.nodes.generate import HunyuanImage3Generate

# final_layer turns the decoder's output into the velocity: NaN weights give NaN latents at step 1.
# The VAE decoder's last conv: the latents stay finite, the image does not.
DAMAGES = {"latents after step 1": "final_layer.linear.weight", "image": "vae.decoder.conv_out.weight"}


@pytest.fixture(scope="module", params=list(DAMAGES))
def damaged(request, tmp_path_factory: pytest.TempPathFactory, base_checkpoint: Path) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("damaged") / "HunyuanImage-3-damaged"
    return damaged_copy(base_checkpoint, folder, DAMAGES[request.param]), request.param


def test_the_damage_keeps_every_shard_size(damaged: tuple[Path, str], base_checkpoint: Path) -> None:
    path, _ = damaged
    sizes = {f.name: f.stat().st_size for f in base_checkpoint.glob("*.safetensors")}
    assert sizes == {f.name: f.stat().st_size for f in path.glob("*.safetensors")}
    assert any(f.read_bytes() != (base_checkpoint / f.name).read_bytes() for f in path.glob("*.safetensors"))


def test_cli_stops_with_one_line_naming_the_checkpoint(damaged: tuple[Path, str], tmp_path: Path, capsys,
                                                       cache, one_thread) -> None:
    path, what = damaged
    out = tmp_path / "x.png"
    rc = cli.main(["generate", "--model", str(path), "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: The model produced NaN/inf ") and f"NaN/inf {what} with" in err
    assert str(path) in err and "damaged download" in err and "wrong quantization" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_node_raises_the_same_error(damaged: tuple[Path, str], cache, one_thread) -> None:
    path, what = damaged
    with pytest.raises(CheckpointError, match=f"NaN/inf {what} with the checkpoint {path}"):
        HunyuanImage3Generate().generate(ModelHandle(LoadSpec(str(path))), prompt="a fox", seed=0, steps=2,
                                         guidance_scale=5.0, resolution="1024x1024", width=1024, height=1024)


def test_a_good_checkpoint_passes_the_checks(base_checkpoint: Path, tmp_path: Path, cache, one_thread) -> None:
    out = tmp_path / "x.png"
    assert cli.main(["generate", "--model", str(base_checkpoint), "--steps", "2", "--out", str(out)]) == 0
    assert out.is_file()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_reads_every_output_shape(value: float) -> None:
    bad = torch.zeros(2, 3)
    bad[1, 2] = value
    for out in (bad, (bad,), {"prev_sample": bad}, [bad, None]):
        assert first_tensor(out) is bad
        with pytest.raises(NonFiniteOutput, match="latents after step 3"):
            check_finite(out, "latents", 3)
    check_finite(torch.zeros(2, 3), "latents", 3)
    check_finite(torch.zeros(2, dtype=torch.long), "latents")  # integer outputs are not images

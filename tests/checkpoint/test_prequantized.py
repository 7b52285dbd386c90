"""Pre-quantized checkpoints (hunyuan_loader/checkpoint/prequantized.py): write one (CLI and library),
load it through our loaders and plain transformers with the outputs of a fresh quantization,
and refuse broken ones with a message naming the module."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
from model_compare import differences, logits

from hunyuan_image3.hunyuan_loader.checkpoint.layout import read_layout
from hunyuan_image3.hunyuan_loader.checkpoint.prequantized import default_copy_path, save_prequantized
from hunyuan_image3.hunyuan_loader.checkpoint.reader import TensorReader
from hunyuan_image3.hunyuan_loader.cli.main import main as cli_main
from hunyuan_image3.hunyuan_loader.core.errors import CheckpointError, InputError
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.load.pipeline import load_model, save_quantized_copy

FORMATS = [("int8", "bnb"), ("nf4", "w8a16"), ("int8", "w8a16")]
CUDA = torch.cuda.is_available()


def _spec(path: Path, quant: str, fmt: str, **kw) -> LoadSpec:
    return LoadSpec(str(path), quant=quant, int8_format=fmt, **kw)


def _plain(path: Path, qconfig=None, device_map="cpu"):
    from transformers import AutoModelForCausalLM

    kwargs = {"quantization_config": qconfig} if qconfig is not None else {}
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=torch.bfloat16,
                                                device_map=device_map, **kwargs).eval()


def _fresh_qconfig(checkpoint: Path, quant: str, fmt: str):
    from hunyuan_image3.hunyuan_loader.formats.builtin import quantization_config
    from hunyuan_image3.hunyuan_loader.formats.quantization import checkpoint_tensor_names, skip_modules_for

    skips = skip_modules_for(checkpoint_tensor_names(checkpoint))
    if quant == "int8" and fmt == "w8a16":
        from hunyuan_image3.hunyuan_loader.formats.w8a16_transformers import (
            quantization_config as w8a16_config,
        )

        return w8a16_config(skips)
    return quantization_config(quant, skips)


@pytest.mark.parametrize(("quant", "fmt"), FORMATS)
def test_round_trip_loads_as_the_fresh_quantization(base_checkpoint: Path, tmp_path: Path, quant: str, fmt: str,
                                                    one_thread) -> None:
    """Fresh load -> save -> our loader on the copy: the same model (every tensor, bnb state,
    dtypes) and logits, without re-quantizing; plain from_pretrained of the copy equals plain
    from_pretrained quantizing the BF16 checkpoint. The copy carries code, tokenizer, generation_config."""
    fresh = load_model(_spec(base_checkpoint, quant, fmt))
    copy = save_quantized_copy(fresh, tmp_path / f"HunyuanImage-3-{quant.upper()}")
    names = {p.name for p in copy.iterdir()}
    source = {p.name for p in base_checkpoint.iterdir() if p.suffix != ".safetensors"}
    assert source <= names, source - names  # *.py, tokenizer, generation_config.json, index, config
    cfg = json.loads((copy / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] in ("bitsandbytes", "hy3_w8a16")
    assert cfg["auto_map"] == json.loads((base_checkpoint / "config.json").read_text())["auto_map"]
    shards = sorted(copy.glob("*.safetensors"))
    n_layers = cfg["num_hidden_layers"]
    assert len(shards) == n_layers + 1  # one per block + the rest
    disk = sum(p.stat().st_size for p in shards)
    assert disk < sum(p.stat().st_size for p in base_checkpoint.glob("*.safetensors"))  # tiny model: VAE etc. dominate

    ours = load_model(_spec(copy, quant, fmt))
    assert differences(fresh.model, ours.model) == []
    assert torch.equal(logits(fresh.model), logits(ours.model))

    where = {"": 0} if CUDA else "cpu"  # plain transformers quantizes where it loads, as ours did
    plain_copy = _plain(copy, device_map=where)
    plain_fresh = _plain(base_checkpoint, _fresh_qconfig(base_checkpoint, quant, fmt), device_map=where)
    assert differences(plain_copy, plain_fresh) == []
    assert torch.equal(logits(plain_copy), logits(plain_fresh))


def test_prequantized_load_reads_no_more_than_the_copy(base_checkpoint: Path, tmp_path: Path, monkeypatch,
                                                       one_thread) -> None:
    """A pre-quantized load reads the quantized files (smaller than the BF16 ones) and quantizes nothing."""
    copy = save_quantized_copy(load_model(_spec(base_checkpoint, "nf4", "w8a16")), tmp_path / "nf4")
    read: list[int] = []
    orig = TensorReader._read_run
    monkeypatch.setattr(TensorReader, "_read_run",
                        lambda self, es, raws: (read.extend(e.nbytes for e in es), orig(self, es, raws)))
    import bitsandbytes.functional as bf

    quantized: list[int] = []
    q4 = bf.quantize_4bit
    monkeypatch.setattr(bf, "quantize_4bit", lambda *a, **k: (quantized.append(1), q4(*a, **k))[1])
    load_model(_spec(copy, "nf4", "w8a16"))
    assert quantized == []
    assert sum(read) == sum(e.nbytes for e in read_layout(sorted(copy.glob("*.safetensors"))).values())


def test_cli_quantize_writes_a_copy_our_loader_loads(base_checkpoint: Path, tmp_path: Path, capsys,
                                                     one_thread) -> None:
    out = tmp_path / "HunyuanImage-3-NF4"
    assert cli_main(["quantize", "--model", str(base_checkpoint), "--quant", "nf4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "NF4 loader" in text and "read" in text
    ours = load_model(_spec(out, "nf4", "w8a16"))
    fresh = load_model(_spec(base_checkpoint, "nf4", "w8a16"))
    assert torch.equal(logits(ours.model), logits(fresh.model))
    # refused: an existing folder, and a pre-quantized source
    assert cli_main(["quantize", "--model", str(base_checkpoint), "--quant", "nf4", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["quantize", "--model", str(out), "--quant", "nf4", "--out", str(tmp_path / "x")]) == 2
    assert "already pre-quantized" in capsys.readouterr().err


def _bad_copy(base_checkpoint: Path, dest: Path) -> Path:
    """An INT8 copy whose router (mlp.gate.wg) is quantized: the skip list without its router keys (mlp.gate, mlp.gate.wg),
    quantized by plain transformers, written by our writer."""
    from transformers import BitsAndBytesConfig

    from hunyuan_image3.hunyuan_loader.formats.quantization import checkpoint_tensor_names, skip_modules_for

    skips = [k for k in skip_modules_for(checkpoint_tensor_names(base_checkpoint)) if not k.startswith("mlp.gate")]
    model = _plain(base_checkpoint, BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skips))
    assert type(model.model.layers[0].mlp.gate.wg).__name__ == "Linear8bitLt"
    return save_prequantized(model, base_checkpoint, dest)


def test_a_copy_with_a_quantized_router_is_refused(cache, base_checkpoint: Path, tmp_path: Path) -> None:
    bad = _bad_copy(base_checkpoint, tmp_path / "bad-int8")
    with pytest.raises(CheckpointError, match=r"must stay in full precision.*mlp\.gate\.wg"):
        cache.load(_spec(bad, "int8", "bnb"))
    assert cache.loaded is None
    # the files quantize the router while the config claims to keep it: refused, naming it
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["llm_int8_skip_modules"] += ["mlp.gate", "mlp.gate.wg"]  # 4.57 and 5.x keys
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"holds quantized weights .* first: model\.layers\.0\.mlp\.gate\.wg"):
        cache.load(_spec(bad, "int8", "bnb"))
    assert cache.loaded is None


def test_wrong_loader_and_foreign_formats_are_refused(base_checkpoint: Path, tmp_path: Path) -> None:
    copy = save_quantized_copy(load_model(_spec(base_checkpoint, "int8", "bnb")), tmp_path / "int8")
    with pytest.raises(CheckpointError, match="pre-quantized INT8 checkpoint, but the NF4 loader"):
        load_model(_spec(copy, "nf4", "w8a16"))
    with pytest.raises(CheckpointError, match="pre-quantized INT8 checkpoint, but the BF16 loader"):
        load_model(_spec(copy, "bf16", "w8a16"))
    other = tmp_path / "gptq"
    shutil.copytree(copy, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantized with 'gptq'"):
        load_model(_spec(other, "int8", "bnb"))


def test_saving_refuses_an_existing_folder_and_a_bf16_model(base_checkpoint: Path, tmp_path: Path) -> None:
    bf16 = load_model(_spec(base_checkpoint, "bf16", "w8a16"))
    with pytest.raises(InputError, match="not quantized"):
        save_quantized_copy(bf16, tmp_path / "x")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    nf4 = load_model(_spec(base_checkpoint, "nf4", "w8a16"))
    with pytest.raises(InputError, match="already exists"):
        save_quantized_copy(nf4, tmp_path / "taken")
    assert default_copy_path(base_checkpoint, "nf4") == base_checkpoint.parent / f"{base_checkpoint.name}-NF4"
    assert not list(tmp_path.glob(".*partial*"))


# -- CUDA ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(("quant", "fmt"), FORMATS)
@pytest.mark.parametrize("offload", ["disabled", "smart"])
def test_gpu_round_trip_identical_to_fresh_gpu_quantization(base_checkpoint: Path, tmp_path: Path, quant: str,
                                                            fmt: str, offload: str, monkeypatch) -> None:
    """Quantized on the GPU (resident or streamed), saved, loaded back resident and half-streamed:
    logits identical to the fresh GPU quantization every time; plain from_pretrained(cuda) of the
    copy equals plain from_pretrained(cuda) quantizing the BF16 checkpoint."""
    n = json.loads((base_checkpoint / "config.json").read_text())["num_hidden_layers"]
    monkeypatch.setenv("HUNYUAN_MIN_STREAMED_BLOCKS", str(n // 2))
    half = {"offload": "budget", "vram_budget_gb": 1000.0, "headroom_gb": 0.0}
    fresh = load_model(_spec(base_checkpoint, quant, fmt, **(half if offload == "smart" else {})))
    assert bool(fresh.residency.plan.streamed) == (offload == "smart")
    copy = save_quantized_copy(fresh, tmp_path / f"copy-{quant}-{fmt}-{offload}")
    ref = logits(fresh.model)
    del fresh
    gc.collect()
    torch.cuda.empty_cache()
    for extra in ({}, half):
        loaded = load_model(_spec(copy, quant, fmt, **extra))
        assert bool(loaded.residency.plan.streamed) == bool(extra)
        assert torch.equal(logits(loaded.model), ref)
        del loaded
        gc.collect()
    plain_copy = _plain(copy, device_map={"": 0})
    plain_fresh = _plain(base_checkpoint, _fresh_qconfig(base_checkpoint, quant, fmt), device_map={"": 0})
    assert torch.equal(logits(plain_copy), logits(plain_fresh))


def test_loader_option_writes_the_copy_once_next_to_the_model(cache, base_checkpoint: Path, tmp_path: Path,
                                                              monkeypatch) -> None:
    """The NF4 loader's save_quantized_copy: <name>-NF4 appears next to the model folder after the
    load, is not rewritten by the next run, and loads with the NF4 loader to the same logits."""
    from hunyuan_image3.nodes.loaders import HunyuanImage3LoaderNF4

    root = tmp_path / "models"
    shutil.copytree(base_checkpoint, root / base_checkpoint.name)
    monkeypatch.setenv("HUNYUAN_MODELS_DIR", str(root))
    node = HunyuanImage3LoaderNF4()
    assert node.FUNCTION == "load_and_save"
    assert "save_quantized_copy" in node.INPUT_TYPES()["optional"]
    (handle,) = getattr(node, node.FUNCTION)(model_name=base_checkpoint.name, offload_mode="disabled",
                                             save_quantized_copy=True)
    copy = root / f"{base_checkpoint.name}-NF4"
    assert (copy / "config.json").is_file() and list(copy.glob("*.safetensors"))
    ref = logits(cache.get(handle).model)
    stamp = (copy / "config.json").stat().st_mtime_ns
    getattr(node, node.FUNCTION)(model_name=base_checkpoint.name, offload_mode="disabled", save_quantized_copy=True)
    assert (copy / "config.json").stat().st_mtime_ns == stamp  # not written again
    (handle2,) = node.load(copy.name, "disabled")
    assert torch.equal(logits(cache.get(handle2).model), ref)

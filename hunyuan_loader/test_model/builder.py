"""Build the tiny HunyuanImage-3.0 test checkpoint (remote code, sharded safetensors, tokenizer)."""

from __future__ import annotations

import importlib
import json
import logging
import re
import shutil
import sys
import types
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "remote_code"
TEMPLATES = ("configuration", "modeling", "tokenization", "image_processor")
NUM_SHARDS = 4

# The text stage's generation_config of the Instruct checkpoints (sampling, sequence template, defaults).
_INSTRUCT_TEXT = {
    "do_sample": True, "temperature": 0.6, "top_k": 1024, "top_p": 0.95, "repetition_penalty": 1.0,
    "max_length": 12800, "sequence_template": "instruct", "use_system_prompt": "en_unified", "drop_think": False,
    "bot_task": "image",
}

_INSTRUCT_FILES = {
    "configuration": "configuration_hunyuan_image_3",
    "modeling": "modeling_hunyuan_image_3",
    "tokenization": "tokenization_hunyuan_image_3",
    "image_processor": "image_processor",
}

VARIANTS: dict[str, dict[str, Any]] = {
    "base": {
        "files": {"configuration": "configuration_hunyuan", "modeling": "hunyuan", "tokenization": "tokenizer_wrapper",
                  "image_processor": "image_processor"},
        "config": {"model_version": "HunyuanImage-3.0", "cfg_distilled": False, "use_meanflow": False},
        "generation": {"diff_infer_steps": 50, "diff_guidance_scale": 5.0, "flow_shift": 3.0},
    },
    "instruct": {
        "files": _INSTRUCT_FILES,
        "config": {"model_version": "HunyuanImage-3.0-Instruct", "cfg_distilled": False, "use_meanflow": False,
                   "max_position_embeddings": 22800},  # real: 22,800 positions, generation max_length 12,800
        "generation": {"diff_infer_steps": 50, "diff_guidance_scale": 5.0, "flow_shift": 3.0, **_INSTRUCT_TEXT},
    },
    "distil": {
        "files": _INSTRUCT_FILES,
        "config": {"model_version": "HunyuanImage-3.0-Instruct-Distil", "cfg_distilled": True, "use_meanflow": True,
                   "max_position_embeddings": 22800},
        "generation": {"diff_infer_steps": 8, "diff_guidance_scale": 2.5, "flow_shift": 3.0, **_INSTRUCT_TEXT},
    },
}


def remote_code_source(template: str, files: dict[str, str]) -> str:
    """Template text with intra-folder imports renamed to the variant's file names."""
    text = (TEMPLATE_DIR / f"{template}.py").read_text(encoding="utf-8")
    for name, target in files.items():
        text = re.sub(rf"^from \.{name} import", f"from .{target} import", text, flags=re.MULTILINE)
    return text


def _import_written(dest: Path, files: dict[str, str]) -> tuple[types.ModuleType, types.ModuleType, str]:
    """Import the written remote code as a private throw-away package."""
    pkg = f"_hy3_test_build_{uuid.uuid4().hex[:12]}"
    module = types.ModuleType(pkg)
    module.__path__ = [str(dest)]  # type: ignore[attr-defined]
    sys.modules[pkg] = module
    modeling = importlib.import_module(f"{pkg}.{files['modeling']}")
    tokenization = importlib.import_module(f"{pkg}.{files['tokenization']}")
    return modeling, tokenization, pkg


def _drop_package(pkg: str) -> None:
    for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
        del sys.modules[name]


def _write_shards(state: dict[str, Any], dest: Path) -> None:
    from safetensors.torch import save_file

    keys = list(state)
    sizes = [state[k].numel() * state[k].element_size() for k in keys]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(NUM_SHARDS)]
    acc = 0
    for key, size in zip(keys, sizes):
        idx = min(NUM_SHARDS - 1, acc * NUM_SHARDS // max(total, 1))
        groups[idx].append(key)
        acc += size
    groups = [g for g in groups if g]
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k].contiguous() for k in group}, str(dest / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _prepare_dest(dest: Path, overwrite: bool) -> None:
    if dest.exists() and any(dest.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dest} is not empty (pass overwrite=True to replace it)")
        ours = {"config.json", "model.safetensors.index.json"} | {
            f"{name}.py" for spec in VARIANTS.values() for name in spec["files"].values()
        }
        if not any((dest / name).exists() for name in ours):
            raise FileExistsError(f"refusing to overwrite {dest}: it does not look like a checkpoint")
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if "." in dest.name:
        logger.warning("checkpoint folder name %r contains a dot; the real remote code refuses that", dest.name)


def make_test_model(
    dest: str | Path,
    variant: str = "base",
    *,
    seed: int = 0,
    overwrite: bool = False,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny HunyuanImage-3.0-shaped checkpoint of ``variant`` into ``dest``; return its path."""
    import torch

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    spec = VARIANTS[variant]
    files: dict[str, str] = spec["files"]
    dest = Path(dest).expanduser().resolve()
    _prepare_dest(dest, overwrite)
    for template in TEMPLATES:
        (dest / f"{files[template]}.py").write_text(remote_code_source(template, files), encoding="utf-8")

    modeling, tokenization, pkg = _import_written(dest, files)
    try:
        cfg_kwargs = dict(spec["config"])
        cfg_kwargs.update(config_overrides or {})
        config = modeling.HunyuanImage3Config(**cfg_kwargs)
        processor = modeling.HunyuanImage3ImageProcessor(config)
        tokenizer = tokenization.HunyuanImage3Tokenizer.build(num_ratio_tokens=len(processor.group))
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        if config.vocab_size < len(tokenizer):
            config.vocab_size = len(tokenizer)
        config.architectures = ["HunyuanImage3ForCausalMM"]
        config.auto_map = {
            "AutoConfig": f"{files['configuration']}.HunyuanImage3Config",
            "AutoModel": f"{files['modeling']}.HunyuanImage3Model",
            "AutoModelForCausalLM": f"{files['modeling']}.HunyuanImage3ForCausalMM",
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = modeling.HunyuanImage3ForCausalMM(config)
        state = {}
        for name, tensor in model.state_dict().items():
            fp32 = name.endswith(".mlp.gate.wg.weight")  # the router is created and saved in float32
            state[name] = tensor.detach().to(torch.float32 if fp32 else torch.bfloat16)
        _write_shards(state, dest)
        config.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
    finally:
        _drop_package(pkg)

    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["torch_dtype"] = "bfloat16"
    cfg["_no_split_modules"] = ["HunyuanImage3DecoderLayer"]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
    gen = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        **spec["generation"],
    }
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    logger.info("wrote %s test checkpoint to %s", variant, dest)
    return dest


def load_remote_code(variant: str = "base") -> types.ModuleType:
    """Import the test model's modeling code (written to a temp folder) without building weights.

    Gives benchmarks and tests the module classes (``HunyuanMoE``, ``HunyuanImage3Config``, ...).
    """
    import atexit
    import shutil
    import tempfile

    files = VARIANTS[variant]["files"]
    folder = Path(tempfile.mkdtemp(prefix="hy3_remote_code_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the modules stay imported; the files go at exit
    for template in TEMPLATES:
        (folder / f"{files[template]}.py").write_text(remote_code_source(template, files), encoding="utf-8")
    modeling, _, _ = _import_written(folder, files)
    return modeling


def wrap_moe_block(block: Any, config: Any) -> Any:
    """A minimal model around one MoE block: ``.config`` and ``layers.0.mlp``, the structure
    ``moe_dispatch.install_moe_dispatch`` walks (benches and per-layer tests)."""
    import torch

    model = torch.nn.Module()
    model.config = config
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].mlp = block
    return model

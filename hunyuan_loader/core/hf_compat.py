"""The transformers internals the pack uses, for transformers 4.57.x and 5.x: every version branch
lives here, so the rest of the pack asks one question ("build the empty model", "quantize this
tensor") and gets the same answer on both.

What changed in 5.0 that concerns us: from_pretrained builds the model under ``torch.device("meta")``
(buffers included) and fills it through ``core_model_loading`` (quantizers hand out conversion ops,
``get_quantize_ops`` / ``get_load_operations``, instead of ``create_quantized_param``); non-quantized
tensors keep the dtype the model created (a float32 router stays float32) instead of the
pre-quantization dtype; the missing-key helpers and ``get_hf_quantizer`` / ``_get_dtype`` changed
signatures. Importing this module imports nothing heavy: transformers is imported inside functions.
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any

import torch


@lru_cache(maxsize=1)
def transformers_major() -> int:
    """The installed transformers' major version (read from its metadata, without importing it)."""
    return int(metadata.version("transformers").split(".")[0])


def is_v5() -> bool:
    return transformers_major() >= 5


# -- the empty model (load/blocks.py builds it as from_pretrained does) ---------------------------------
@dataclass
class EmptyModel:
    model: Any
    config: Any
    hf_quantizer: Any
    dtype: torch.dtype
    device_map: dict
    keep_in_fp32: list[str]  # module names whose float tensors load as float32


def empty_model(model_class: Any, config: Any, model_kwargs: dict, path: str) -> EmptyModel:
    """``model_class(config)`` on the meta device with the quantizer's module replacement, step for
    step as PreTrainedModel.from_pretrained does it for our keyword arguments (``model_kwargs``:
    dtype, device_map, quantization_config, attn_implementation, ...; consumed)."""
    from transformers.utils.generic import ContextManagers

    config = copy.deepcopy(config)
    model_kwargs.pop("trust_remote_code", None)
    model_kwargs.pop("low_cpu_mem_usage", None)
    if "attn_implementation" in model_kwargs:
        config._attn_implementation = model_kwargs.pop("attn_implementation")
    dtype = model_kwargs.pop("dtype")
    device_map = {"": model_kwargs.pop("device_map")[""]}
    qconf = model_kwargs.pop("quantization_config", None)
    if is_v5():
        return _empty_model_v5(model_class, config, model_kwargs, path, dtype, device_map, qconf, ContextManagers)
    return _empty_model_v4(model_class, config, model_kwargs, path, dtype, device_map, qconf, ContextManagers)


def _empty_model_v4(model_class, config, model_kwargs, path, dtype, device_map, qconf, ContextManagers):
    # transformers 4.57 modeling_utils.PreTrainedModel.from_pretrained
    from transformers import PreTrainedModel
    from transformers.modeling_utils import _get_dtype
    from transformers.quantizers.auto import get_hf_quantizer

    hf_quantizer, config, dtype, device_map = get_hf_quantizer(config, qconf, dtype, False, False, device_map,
                                                               True, {})
    config, dtype, dtype_orig = _get_dtype(model_class, dtype, None, config, None, None, True)
    try:
        config.name_or_path = path
        init_contexts = model_class.get_init_context(hf_quantizer is not None, False)
        config = copy.deepcopy(config)
        with ContextManagers(init_contexts):
            model = model_class(config, **model_kwargs)
        model.tie_weights()
        config = model.config
        keep: list[str] = []
        if model._keep_in_fp32_modules is not None and (
            dtype == torch.float16 or getattr(hf_quantizer, "use_keep_in_fp32_modules", False)
        ):
            keep.extend(model._keep_in_fp32_modules)
        if model._keep_in_fp32_modules_strict is not None and dtype in (torch.float16, torch.bfloat16):
            keep.extend(model._keep_in_fp32_modules_strict)
        if hf_quantizer is not None:
            with _quick_bnb_replace(hf_quantizer):
                hf_quantizer.preprocess_model(model=model, device_map=device_map,
                                              keep_in_fp32_modules=model._keep_in_fp32_modules, config=config,
                                              use_kernels=False)
            original = dtype if dtype is not None else torch.get_default_dtype()
            config._pre_quantization_dtype = original
            for sub in model.modules():
                if sub is not model and isinstance(sub, PreTrainedModel):
                    sub.config._pre_quantization_dtype = original
    finally:
        if dtype_orig is not None:
            torch.set_default_dtype(dtype_orig)
    return EmptyModel(model, config, hf_quantizer, dtype, device_map, keep)


def _empty_model_v5(model_class, config, model_kwargs, path, dtype, device_map, qconf, ContextManagers):
    # transformers 5.x modeling_utils.PreTrainedModel.from_pretrained (get_hf_quantizer, _get_dtype,
    # get_init_context, the model under its init contexts, preprocess_model, _get_dtype_plan)
    from transformers.modeling_utils import _get_dtype
    from transformers.quantizers.auto import get_hf_quantizer

    try:
        from transformers.monkey_patching import patch_output_recorders
    except ImportError:  # not in every 5.x
        def patch_output_recorders(model: Any) -> None:
            return None

    hf_quantizer, config, device_map = get_hf_quantizer(config, qconf, device_map, True, {})
    config, dtype = _get_dtype(dtype, None, config, None, None, True, hf_quantizer)
    config.name_or_path = path
    init_contexts = model_class.get_init_context(dtype, hf_quantizer is not None, False, None, config)
    config = copy.deepcopy(config)
    with ContextManagers(init_contexts):
        model = model_class(config, **model_kwargs)
        patch_output_recorders(model)
        if hf_quantizer is not None:
            with _quick_bnb_replace(hf_quantizer):
                hf_quantizer.preprocess_model(model=model, dtype=dtype, device_map=device_map, checkpoint_files=None)
    keep = [name for name, d in model._get_dtype_plan(dtype).items() if d == torch.float32]
    return EmptyModel(model, model.config, hf_quantizer, dtype, device_map, keep)


@contextlib.contextmanager
def _quick_bnb_replace(hf_quantizer: Any):
    """transformers' bitsandbytes replacement without two per-module costs that change nothing.

    ``replace_with_bnb_linear`` (4.57) builds every bnb Linear under ``init_empty_weights`` but
    outside ``no_init_weights``, so nn.Linear's ``reset_parameters`` runs kaiming_uniform_ on a meta
    tensor (~20 us, computes nothing), and for 4-bit it asks ``inspect.signature(bnb.nn.Linear4bit)``
    once per module (~16 us, the same answer every time): ~0.03 s of the NF4 skeleton of 5 real layers
    (650 Linears) on a 2-core CPU. bnb's Linear layers hold no buffers, so nothing real escapes the
    skipped init; other quantizers (W8A16) are left as they are."""
    if not type(hf_quantizer).__module__.startswith("transformers.quantizers.quantizer_bnb"):
        yield
        return
    import functools

    import transformers.integrations.bitsandbytes as bnb_integration

    no_init_weights: Any
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:
        try:  # transformers 5.x
            from transformers.initialization import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext

    signature = getattr(bnb_integration, "signature", None)  # a module global in transformers 4.57
    if signature is not None:
        bnb_integration.signature = functools.lru_cache(maxsize=None)(signature)
    try:
        with no_init_weights():
            yield
    finally:
        if signature is not None:
            bnb_integration.signature = signature


def keep_in_fp32_regex(names: list[str]) -> re.Pattern | None:
    """The pattern from_pretrained matches tensor names against for ``_keep_in_fp32_modules``."""
    return re.compile("|".join(rf"((^|\.){m}($|\.))" for m in names)) if names else None


# -- missing and unexpected keys ------------------------------------------------------------------------
def serialized_suffixes(hf_quantizer: Any) -> tuple[str, ...]:
    """The extra tensor names a pre-quantized checkpoint stores beside a quantized ``weight``
    (5.x ``HfQuantizer.serialized_names``; 4.57 ``bnb_keys``), e.g. ``weight.absmax``, ``SCB``."""
    if hf_quantizer is None or not hf_quantizer.pre_quantized:
        return ()
    names = getattr(hf_quantizer, "serialized_names", None) or {}
    found = {n for group in names.values() for n in group if n != "weight"}
    found |= {k.lstrip(".") for k in getattr(hf_quantizer, "bnb_keys", ())}
    return tuple(sorted(found, key=len, reverse=True))


def split_serialized(name: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    """(module name, serialized suffix) for a pre-quantized metadata tensor, else None."""
    for s in suffixes:
        if name.endswith("." + s):
            return name[: -len(s) - 1], s
    return None


def missing_and_unexpected(model: Any, keys: list[str], hf_quantizer: Any) -> tuple[list[str], list[str]]:
    """Model tensors the checkpoint lacks, and checkpoint tensors the model does not use, as
    from_pretrained decides them (4.57: ``_find_missing_and_unexpected_keys``; 5.x: the model's
    state_dict against the checkpoint, a pre-quantized module's serialized tensors belonging to it)."""
    if not is_v5():
        from transformers.modeling_utils import _find_missing_and_unexpected_keys

        missing, unexpected = _find_missing_and_unexpected_keys(model, keys, keys, False, hf_quantizer)
        return list(missing), list(unexpected)
    expected = list(model.state_dict().keys())
    have, want = set(keys), set(expected)
    suffixes = serialized_suffixes(hf_quantizer)
    missing = [k for k in expected if k not in have]
    unexpected = []
    for k in keys:
        if k in want:
            continue
        split = split_serialized(k, suffixes)
        if split is not None and split[0] + ".weight" in want:
            continue
        unexpected.append(k)
    update = getattr(hf_quantizer, "update_missing_keys", None)  # 4.57's hook, which the pack's W8A16 keeps
    if update is not None:
        missing = list(update(model, missing, ""))
    for patterns, names in ((model._keys_to_ignore_on_load_missing, missing),
                            (model._keys_to_ignore_on_load_unexpected, unexpected)):
        if patterns:
            names[:] = [k for k in names if not any(re.search(p, k) for p in patterns)]
    return missing, unexpected


def prepare_missing(model: Any, missing: list[str], dtype: torch.dtype, hf_quantizer: Any) -> None:
    """Missing tensors put on the CPU and initialised by the model's ``_init_weights``, every loaded
    tensor marked initialised (so nothing else is re-initialised), as from_pretrained does."""
    if not is_v5():
        model._move_missing_keys_from_meta_to_cpu(missing, dtype, hf_quantizer)
        model._initialize_missing_keys(missing, hf_quantizer is not None)
        return
    gone = set(missing)
    for key in model.state_dict():
        if key not in gone:
            try:
                model.get_parameter_or_buffer(key)._is_hf_initialized = True
            except AttributeError:
                pass
    if gone:
        model._move_missing_keys_from_meta_to_device(gone, {"": "cpu"}, None, hf_quantizer)
    else:  # non-persistent buffers still come off the meta device
        model._move_missing_keys_from_meta_to_device(set(), {"": "cpu"}, None, hf_quantizer)
    model._initialize_missing_keys(hf_quantizer is not None)


# -- the dtype a loaded tensor gets ---------------------------------------------------------------------
def load_dtype(model: Any, name: str, checkpoint_dtype: torch.dtype, created: torch.dtype | None,
               keep_fp32: re.Pattern | None, hf_quantizer: Any, dtype: torch.dtype,
               quantized: bool) -> torch.dtype | None:
    """What from_pretrained casts a checkpoint tensor to (None: left as stored). ``created``: the
    dtype of the model's tensor of that name (None: the model has none); ``quantized``: whether the
    quantizer turns it into a quantized parameter.

    4.57 (``_infer_parameter_dtype``): float tensors (not float8_e4m3fn) go to float32 under the
    keep-in-fp32 pattern, else to the pre-quantization dtype under a quantizer, else to the created
    dtype. 5.x (``convert_and_load_state_dict_in_model``): float32 under the dtype plan, else the load
    dtype, except that a tensor the model created in another dtype keeps that one unless it is
    quantized on load; a pre-quantized checkpoint's quantized tensors stay as stored."""
    if created is None:
        return None
    if not checkpoint_dtype.is_floating_point or checkpoint_dtype == getattr(torch, "float8_e4m3fn", None):
        return None
    if keep_fp32 is not None and keep_fp32.search(name):
        return torch.float32
    if not is_v5():
        if hf_quantizer is not None:
            return model.config._pre_quantization_dtype
        return created
    if hf_quantizer is not None and hf_quantizer.pre_quantized and quantized:
        return None
    if created != dtype and not quantized:
        return created
    return dtype


# -- putting a quantized tensor in ----------------------------------------------------------------------
def quantize_into(model: Any, hf_quantizer: Any, name: str, value: torch.Tensor, target: Any) -> None:
    """Quantize one full-precision checkpoint tensor into the model's (replaced) module on ``target``
    (a device index or device), as from_pretrained does on the fly."""
    if not is_v5():
        hf_quantizer.create_quantized_param(model, value, name, target)
        return
    device = torch.device("cuda", target) if isinstance(target, int) else torch.device(target)
    if value.device != device:
        value = value.to(device)
    out = hf_quantizer.get_quantize_ops().convert({name: [value]}, model=model, full_layer_name=name,
                                                  source_patterns=[name], target_patterns=[name])
    for key, param in out.items():
        set_param(model, key, param[0] if isinstance(param, list) else param)


def deserialize_into(model: Any, hf_quantizer: Any, module_name: str, tensors: dict[str, torch.Tensor],
                     target: Any) -> None:
    """5.x: a pre-quantized module's stored tensors (``weight`` and its serialized metadata, keyed
    by their names relative to the module) rebuilt into its quantized weight on ``target``, as the
    quantizer's deserialize op does in from_pretrained."""
    device = torch.device("cuda", target) if isinstance(target, int) else torch.device(target)
    tensors = {k: (v.to(device) if v.device != device else v) for k, v in tensors.items()}
    op = hf_quantizer.get_load_operations().get("deserialize")
    if op is None or len(tensors) == 1:
        for key, t in tensors.items():
            set_param(model, f"{module_name}.{key}", t)
        return
    out = op(hf_quantizer).convert(dict(tensors), model=model, full_layer_name=f"{module_name}.weight")
    for key, param in out.items():
        set_param(model, f"{module_name}.{key}", param[0] if isinstance(param, list) else param)


def deserialize_gathered(model: Any, hf_quantizer: Any, gathered: dict[str, dict[str, torch.Tensor]],
                         target: Any) -> None:
    """5.x: every pre-quantized module whose stored tensors were gathered (``gathered``: module name ->
    its tensors, emptied here) rebuilt on ``target`` (``deserialize_into``); nothing is gathered on 4.57."""
    while gathered:
        module_name, tensors = gathered.popitem()
        deserialize_into(model, hf_quantizer, module_name, tensors, target)


def needs_quantization(model: Any, hf_quantizer: Any, name: str) -> bool:
    """The quantizer's ``param_needs_quantization`` for a checkpoint tensor name; on 5.x a pre-quantized
    checkpoint's metadata tensors (``x.weight.absmax``) are asked about through their module's weight."""
    if hf_quantizer is None:
        return False
    if is_v5() and hf_quantizer.pre_quantized:
        split = split_serialized(name, serialized_suffixes(hf_quantizer))
        if split is not None:
            name = split[0] + ".weight"
    return bool(hf_quantizer.param_needs_quantization(model, name))


def gathers_prequantized(hf_quantizer: Any) -> bool:
    """Whether a pre-quantized module's stored tensors are kept until all have arrived (4.57's 4-bit
    quantizer keeps them itself; on 5.x the pack gathers them for ``deserialize_into``)."""
    return hf_quantizer is not None and (is_v5() or hasattr(hf_quantizer, "bnb_keys"))


def module_and_key(name: str, hf_quantizer: Any) -> tuple[str, str]:
    """(module, key relative to it) of a pre-quantized checkpoint tensor: ``x.weight.absmax`` ->
    (``x``, ``weight.absmax``)."""
    split = split_serialized(name, serialized_suffixes(hf_quantizer))
    if split is not None:
        return split
    module, _, key = name.rpartition(".")
    return module, key


def check_unknown_tensor(model: Any, name: str, checkpoint_dtype: torch.dtype, keep_fp32: re.Pattern | None,
                         hf_quantizer: Any) -> None:
    """4.57: transformers' own answer for a checkpoint tensor the model lacks (None, or it raises);
    5.x casts nothing for it."""
    if is_v5():
        return
    from transformers.modeling_utils import _infer_parameter_dtype

    empty = torch.empty(0, dtype=checkpoint_dtype, device="meta")
    _infer_parameter_dtype(model, name, empty, keep_fp32, hf_quantizer)


def set_param(model: Any, name: str, value: torch.Tensor) -> None:
    """Put ``value`` into the model as parameter (or buffer) ``name``, marked initialised."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._buffers:
        module._buffers[attr] = value
        return
    if not isinstance(value, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=False)
    value._is_hf_initialized = True
    module._parameters[attr] = value


def quantize_op(fn: Any) -> Any:
    """5.x: a ``ConversionOps`` whose ``convert`` calls ``fn(model, name, tensor) -> {name: tensor}`` for
    each full-precision tensor it is handed (what ``HfQuantizer.get_quantize_ops`` returns)."""
    from transformers.core_model_loading import ConversionOps

    class _Quantize(ConversionOps):
        def convert(self, input_dict: dict[str, Any], source_patterns: Any = None, target_patterns: Any = None,
                    model: Any = None, **kwargs: Any) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            for name, value in input_dict.items():
                out.update(fn(model, name, value[0] if isinstance(value, list) else value))
            return out

    return _Quantize()


# -- caches -------------------------------------------------------------------------------------------
def lazy_init_takes_values() -> bool:
    """Whether transformers' StaticLayer.lazy_initialization wants ``(key_states, value_states)`` (5.x)
    rather than ``(key_states)`` (4.57)."""
    import inspect

    from transformers.cache_utils import StaticLayer

    return "value_states" in inspect.signature(StaticLayer.lazy_initialization).parameters


def cache_kwarg_renamed() -> bool:
    """Whether transformers names the KV cache ``cache`` first (5.x ``ALL_CACHE_NAMES``) rather than
    ``past_key_values`` (4.57)."""
    from transformers.generation import utils

    names = getattr(utils, "ALL_CACHE_NAMES", ["past_key_values"])
    return bool(names) and names[0] == "cache"


def image_processors_return_lists() -> bool:
    """Whether an image processor called without ``return_tensors`` returns lists (5.x) rather than
    tensors (4.57's fast processors)."""
    return is_v5()


# -- finishing ------------------------------------------------------------------------------------------
def postprocess(hf_quantizer: Any, model: Any, config: Any) -> None:
    """The quantizer's post-processing after the weights (4.57 passes the config as well)."""
    if is_v5():
        hf_quantizer.postprocess_model(model)
    else:
        hf_quantizer.postprocess_model(model, config=config)

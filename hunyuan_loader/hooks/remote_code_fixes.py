"""Work-arounds for the official remote code, applied to a loaded model without editing its files.

Each is a named entry of the model's hook registry (registry.py): static_cache_init, cache_kwarg_name,
vit_return_tensors, mask_alignment, vision_input_alignment, cpu_input_casts."""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any

import torch

from ..core import hf_compat
from .registry import ClassMethodPatch, ModuleHooks, registry

log = logging.getLogger(__name__)


class _PreHooks(ModuleHooks):
    """One keyword pre-hook ``fn`` on each of ``modules`` (a registry entry)."""

    def __init__(self, modules: list[torch.nn.Module], fn: Any) -> None:
        super().__init__()
        self.modules, self.fn = modules, fn

    def hooks(self) -> list[tuple[torch.nn.Module, str, Any]]:
        return [(m, "pre_kwargs", self.fn) for m in self.modules]


def _align_attention_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor):
        return None
    ref = kwargs.get("inputs_embeds")
    if not isinstance(ref, torch.Tensor):
        ref = kwargs.get("input_ids")
    if not isinstance(ref, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
        ref = args[0]
    if not isinstance(ref, torch.Tensor) or ref.device == mask.device:
        return None
    kwargs["attention_mask"] = mask.to(ref.device, non_blocking=True)
    return args, kwargs


def install_mask_alignment(model: Any) -> bool:
    """Move a CPU-built attention mask to the device of the decoder's input.

    The base code builds its text-stage mask on the CPU (official hunyuan.py:2396,
    ``_prepare_attention_mask_for_generation``) and relies on accelerate's device-alignment
    hooks, which only a ``device_map="auto"`` load installs; on a single-device CUDA load the
    attention then fails ("attn_bias is on cpu", hunyuan.py:1285) for resolution "auto" and the
    think/recaption tasks. A keyword pre-hook on the decoder (``model.model``) does what those
    hooks do for this one tensor. Idempotent; returns True when installed now.
    """
    decoder = getattr(model, "model", None)
    if not isinstance(decoder, torch.nn.Module):
        return False
    return registry(model).install("mask_alignment", _PreHooks([decoder], _align_attention_mask))


def _cast_float_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return None

    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        return value

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def install_cpu_input_casts(model: Any) -> int:
    """On a CPU, cast the float inputs of the image modules to their weights' dtype.

    The official pipeline runs the diffusion forward and the VAE under CUDA autocast
    (hunyuan_image_3_pipeline.py:856; the model's vae_encode/decode autocast with
    device_type="cuda"), so float32 latents meet bf16 convolution and GroupNorm weights only
    on CUDA. On a CPU those autocasts are no-ops and the first conv or norm fails ("Input type
    (float) and bias type (c10::BFloat16) should be the same", H:794 / M:810; "mixed dtype
    (CPU)" in the VAE). Keyword pre-hooks on patch_embed, final_layer and the VAE's encoder and
    decoder cast what CUDA autocast would. Idempotent; returns the number of modules hooked.
    """
    vae = getattr(model, "vae", None)
    targets = [getattr(model, "patch_embed", None), getattr(model, "final_layer", None),
               getattr(vae, "encoder", None), getattr(vae, "decoder", None)]
    modules = [m for m in targets if isinstance(m, torch.nn.Module)]
    if not modules or not registry(model).install("cpu_input_casts", _PreHooks(modules, _cast_float_inputs)):
        return 0
    return len(modules)



def _move_tensor_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    param = next(module.parameters(), None)
    if param is None:
        return None
    device = param.device

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.device != device:
            return value.to(device, non_blocking=True)
        return value

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def install_vision_input_alignment(model: Any) -> bool:
    """Move every tensor input of the vision encoder (Instruct's SigLIP2) to its device.

    The Instruct code packs the encoder's ``spatial_shapes`` and ``attention_mask`` into a dict
    (modeling_hunyuan_image_3.py:2538-2553) and sends it through its ``to_device`` helper (:2831), which
    returns a dict unmoved (:117-124): the mask stays on the CPU and the eager attention fails on a GPU at
    ``attn_weights + attention_mask`` (siglip2.py:210). The official README loads with ``device_map="auto"``,
    whose accelerate hooks move every input to its module's device; the pack places the modules itself, so
    this keyword pre-hook on ``model.vision_model`` does what those hooks do. Idempotent; True when installed now.
    """
    vision = getattr(model, "vision_model", None)
    if not isinstance(vision, torch.nn.Module):
        return False
    return registry(model).install("vision_input_alignment", _PreHooks([vision], _move_tensor_inputs))


def _update_initialising_both(update: Any) -> Any:
    def patched(self: Any, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                cache_kwargs: Any = None) -> Any:
        layers = getattr(self, "layers", None)
        if layers is not None and not hasattr(self, "key_cache") and layers[layer_idx].keys is None:
            layers[layer_idx].lazy_initialization(key_states, value_states)  # what the official line means
        return update(self, key_states, value_states, layer_idx, cache_kwargs)

    return patched


def install_static_cache_init(model: Any) -> bool:
    """Initialise the official KV cache's layers with the arguments transformers 5.x asks for.

    The official ``HunyuanStaticCache.update`` (hunyuan.py:926, modeling_hunyuan_image_3.py:933) calls
    ``self.layers[i].lazy_initialization(key_states)``: transformers 5.x's StaticLayer takes
    ``(key_states, value_states)`` (cache_utils.py), so the first attention of every generation
    raises a TypeError there. The patched ``update`` initialises the layer with both tensors first,
    so the official line is not reached; everything else of it runs as shipped. Installed only where
    the installed transformers needs it (4.57's takes one tensor) and on a model whose module defines
    the class (the official code and the test checkpoint). Idempotent; True when installed now."""
    module = sys.modules.get(type(model).__module__)
    cls = getattr(module, "HunyuanStaticCache", None)
    if not isinstance(cls, type) or "update" not in cls.__dict__ or not hf_compat.lazy_init_takes_values():
        return False
    patch = ClassMethodPatch("static_cache_init", cls, "update", _update_initialising_both)
    return registry(model).install("static_cache_init", patch)


def _kwargs_keeping_past_key_values(update: Any) -> Any:
    def patched(self: Any, outputs: Any, model_kwargs: dict, *args: Any, **kwargs: Any) -> dict:
        updated = update(self, outputs, model_kwargs, *args, **kwargs)
        if "cache" in updated and "past_key_values" not in updated:
            updated["past_key_values"] = updated.pop("cache")  # the name the official forward reads
        if "use_cache" in model_kwargs and "use_cache" not in updated:  # 5.x's _sample reads it every token
            updated["use_cache"] = model_kwargs["use_cache"]
        return updated

    return patched


def _inputs_taking_cache(prepare: Any) -> Any:
    def patched(self: Any, input_ids: Any, *args: Any, cache: Any = None, **kwargs: Any) -> dict:
        if cache is not None and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = cache
        return prepare(self, input_ids, *args, **kwargs)

    # generate() accepts the keywords this signature names (_validate_model_kwargs): the official ones
    # (tokenizer_output, ...) and ``cache``
    sig = inspect.signature(prepare)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params.append(inspect.Parameter("cache", inspect.Parameter.KEYWORD_ONLY, default=None))
    params += [p for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    patched.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return patched


class _MethodPatches:
    """Several ClassMethodPatch of one entry as one Hook."""

    torch_hooks = False

    def __init__(self, patches: list[ClassMethodPatch]) -> None:
        self.patches = patches

    def attach(self) -> None:
        for p in self.patches:
            p.attach()

    def detach(self) -> None:
        for p in reversed(self.patches):
            p.detach()


def install_cache_kwarg_name(model: Any) -> bool:
    """Hand the KV cache to the official code under the name it reads, ``past_key_values``.

    transformers 5.x renamed it ``cache``: model outputs carry ``cache`` and ``ALL_CACHE_NAMES`` lists it
    first, and ``generate`` renames a ``past_key_values`` keyword to ``cache``. The official code reads
    ``past_key_values`` only:
    - ``_update_model_kwargs_for_generation`` (hunyuan.py:2452-2461, modeling_hunyuan_image_3.py:2933-2942)
      stores the step's cache under the first of ``ALL_CACHE_NAMES`` the output holds, ``cache`` on 5.x, so
      the second diffusion step ran without the cache and its attention failed ("The size of tensor a
      (257) must match the size of tensor b (267)");
    - the same method keeps only its own keys (hunyuan.py:2447-2450), dropping ``use_cache``, which 5.x's
      ``_sample`` reads after every token (KeyError: 'use_cache' in the think / recaption text stage);
    - ``_generate`` passes ``past_key_values=cache`` to ``generate`` (hunyuan.py:2355, 2559), which 5.x
      refuses before the text stage ("model_kwargs are not used by the model: ['cache']") because
      ``prepare_inputs_for_generation`` (hunyuan.py:2403) has no such parameter.
    The patched methods rename the entry back, keep ``use_cache`` and take ``cache`` as ``past_key_values``. Installed only
    where transformers lists "cache" first, on a model class that defines the methods. Idempotent; True
    when installed now."""
    names = ("_update_model_kwargs_for_generation", "prepare_inputs_for_generation")
    makes = {names[0]: _kwargs_keeping_past_key_values, names[1]: _inputs_taking_cache}
    patches = []
    for name in names:
        cls = next((c for c in type(model).__mro__ if name in c.__dict__ and c.__module__ == type(model).__module__),
                   None)
        if cls is not None:
            patches.append(ClassMethodPatch("cache_kwarg_name", cls, name, makes[name]))
    if not patches or not hf_compat.cache_kwarg_renamed():
        return False
    return registry(model).install("cache_kwarg_name", _MethodPatches(patches))


class _AttributeSet:
    """A Hook that sets one attribute of an object of the model (no torch hook); detach restores it."""

    torch_hooks = False

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj, self.name, self.value = obj, name, value
        self.saved: list[Any] = []

    def attach(self) -> None:
        if not self.saved:
            self.saved.append(getattr(self.obj, self.name, None))
            setattr(self.obj, self.name, self.value)

    def detach(self) -> None:
        if self.saved:
            setattr(self.obj, self.name, self.saved.pop())


def install_vit_return_tensors(model: Any) -> bool:
    """Make the Instruct ViT image processor return tensors, as it did on transformers 4.57.

    The official ``vit_process_image`` calls its Siglip2 processor without ``return_tensors`` and then
    ``inputs["pixel_values"].squeeze(0)`` (Instruct image_processor.py:434-435). On 5.x the processor returns
    lists by default, so every reference image (edit, fusion) fails with "'list' object has no attribute
    'squeeze'". Setting the processor's default ``return_tensors = "pt"`` gives the 4.57 result. Installed
    only on 5.x and on a model with that processor. Idempotent; True when installed now."""
    info = getattr(getattr(model, "image_processor", None), "vit_info", None)
    processor = getattr(info, "processor", None)
    if processor is None or not hf_compat.image_processors_return_lists():
        return False
    if getattr(processor, "return_tensors", None) is not None:
        return False
    return registry(model).install("vit_return_tensors", _AttributeSet(processor, "return_tensors", "pt"))

"""static_cache_init and cache_kwarg_name: the official HunyuanStaticCache's one-tensor ``lazy_initialization`` call works on
the installed transformers (5.x asks for keys and values), through a load-time patch of the class."""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch
from transformers import PretrainedConfig
from transformers.cache_utils import StaticCache

from hunyuan_image3.hunyuan_loader.core import hf_compat
from hunyuan_image3.hunyuan_loader.hooks.registry import hook_names, remove_all_hooks
from hunyuan_image3.hunyuan_loader.hooks.remote_code_fixes import (
    install_cache_kwarg_name,
    install_static_cache_init,
)


def _official_like_module() -> types.ModuleType:
    """A module shaped like the official code: a StaticCache subclass whose update initialises a layer
    the way hunyuan.py:924-928 does (``lazy_initialization(key_states)``), and a model class."""
    mod = types.ModuleType("_hy3_official_cache_like")

    class HunyuanStaticCache(StaticCache):
        def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
            if self.layers[layer_idx].keys is None:
                self.layers[layer_idx].lazy_initialization(key_states)
            k_out, v_out = self.layers[layer_idx].keys, self.layers[layer_idx].values
            position = cache_kwargs.get("cache_position")
            k_out.index_copy_(2, position, key_states)
            v_out.index_copy_(2, position, value_states)
            return k_out, v_out

    class Model(torch.nn.Module):
        pass

    HunyuanStaticCache.__module__ = Model.__module__ = mod.__name__
    mod.HunyuanStaticCache, mod.Model = HunyuanStaticCache, Model
    sys.modules[mod.__name__] = mod
    return mod


def _one_update(mod: types.ModuleType) -> torch.Tensor:
    config = PretrainedConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, hidden_size=8)
    cache = mod.HunyuanStaticCache(config=config, batch_size=1, max_cache_len=4, dtype=torch.float32,
                                   max_batch_size=1)
    k = torch.arange(8, dtype=torch.float32).reshape(1, 2, 1, 4)
    keys, values = cache.update(k, k + 100, 0, {"cache_position": torch.tensor([1])})
    return values[0, :, 1]


def test_the_official_update_runs_once_the_fix_is_installed() -> None:
    mod = _official_like_module()
    model = mod.Model()
    shipped = mod.HunyuanStaticCache.__dict__["update"]
    try:
        if hf_compat.lazy_init_takes_values():  # 5.x: the shipped line fails, the fix is installed
            with pytest.raises(TypeError, match="value_states"):
                _one_update(mod)
            assert install_static_cache_init(model) is True
            assert hook_names(model) == ["static_cache_init"]
            assert not install_static_cache_init(model)  # idempotent
        else:  # 4.57: nothing to fix, nothing installed
            assert install_static_cache_init(model) is False
        assert torch.equal(_one_update(mod), torch.arange(8, dtype=torch.float32).reshape(2, 4) + 100)
        remove_all_hooks(model)
        assert mod.HunyuanStaticCache.__dict__["update"] is shipped  # the class is given back
    finally:
        remove_all_hooks(model)
        sys.modules.pop(mod.__name__, None)


def test_a_model_without_the_official_cache_gets_nothing() -> None:
    model = torch.nn.Linear(2, 2)
    assert install_static_cache_init(model) is False
    assert hook_names(model) == []


def _official_like_update_module() -> types.ModuleType:
    """A model class whose _update_model_kwargs_for_generation stores the cache under the first name of
    ALL_CACHE_NAMES the output holds, as hunyuan.py:2452-2461 does."""
    from transformers.generation.utils import ALL_CACHE_NAMES
    from transformers.modeling_outputs import CausalLMOutputWithPast

    mod = types.ModuleType("_hy3_official_kwargs_like")

    class Model(torch.nn.Module):
        def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                                num_new_tokens=1):
            updated = {"mode": model_kwargs["mode"]}
            for name in ALL_CACHE_NAMES:
                if name in outputs:
                    updated[name] = getattr(outputs, name)
                    break
            return updated

        def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
            return {"input_ids": input_ids, "past_key_values": past_key_values}  # as hunyuan.py:2403-2436

    Model.__module__ = mod.__name__
    mod.Model, mod.Output = Model, CausalLMOutputWithPast
    sys.modules[mod.__name__] = mod
    return mod


def test_the_cache_goes_back_to_the_forward_as_past_key_values() -> None:
    mod = _official_like_update_module()
    model = mod.Model()
    cache = object()
    try:
        out = mod.Output(logits=torch.zeros(1), past_key_values=cache)
        before = model._update_model_kwargs_for_generation(out, {"mode": "gen_image"})
        if hf_compat.cache_kwarg_renamed():  # 5.x: the shipped method hands it over as "cache"
            assert "past_key_values" not in before
            assert install_cache_kwarg_name(model) is True
        else:
            assert before["past_key_values"] is cache
            assert install_cache_kwarg_name(model) is False
        after = model._update_model_kwargs_for_generation(out, {"mode": "gen_image", "use_cache": True})
        assert after["past_key_values"] is cache and "cache" not in after
        if hf_compat.cache_kwarg_renamed():  # 5.x's _sample reads model_kwargs["use_cache"] every token
            assert after["use_cache"] is True
        if hf_compat.cache_kwarg_renamed():  # 5.x generate hands the cache over as ``cache``
            assert model.prepare_inputs_for_generation(torch.zeros(1, 2), cache=cache)["past_key_values"] is cache
            # generate() validates its keywords against this signature: the official ones stay, ``cache`` joins
            params = inspect.signature(model.prepare_inputs_for_generation).parameters
            assert {"past_key_values", "attention_mask", "cache", "kwargs"} <= set(params)
        assert model.prepare_inputs_for_generation(torch.zeros(1, 2), past_key_values=cache)["past_key_values"] is cache
        remove_all_hooks(model)
        assert model._update_model_kwargs_for_generation(out, {"mode": "gen_image"}).keys() == before.keys()
        assert "cache" not in inspect.signature(mod.Model.prepare_inputs_for_generation).parameters
    finally:
        remove_all_hooks(model)
        sys.modules.pop(mod.__name__, None)


def test_two_models_of_one_code_share_the_patch() -> None:
    """A reload (or a second checkpoint of the same code) hooks the same class: wrapped once, given back
    when the last model lets go."""
    mod = _official_like_update_module()
    first, second = mod.Model(), mod.Model()
    shipped = mod.Model.__dict__["prepare_inputs_for_generation"]
    try:
        if not hf_compat.cache_kwarg_renamed():
            assert install_cache_kwarg_name(first) is False
            return
        assert install_cache_kwarg_name(first) and install_cache_kwarg_name(second)
        params = list(inspect.signature(second.prepare_inputs_for_generation).parameters)
        assert params.count("cache") == 1
        remove_all_hooks(first)
        assert "cache" in inspect.signature(second.prepare_inputs_for_generation).parameters  # still patched
        remove_all_hooks(second)
        assert mod.Model.__dict__["prepare_inputs_for_generation"] is shipped
    finally:
        remove_all_hooks(first)
        remove_all_hooks(second)
        sys.modules.pop(mod.__name__, None)


def test_the_vit_processor_returns_tensors() -> None:
    from types import SimpleNamespace

    from hunyuan_image3.hunyuan_loader.hooks.remote_code_fixes import install_vit_return_tensors

    processor = SimpleNamespace(return_tensors=None)
    model = torch.nn.Linear(1, 1)
    model.image_processor = SimpleNamespace(vit_info=SimpleNamespace(processor=processor))
    try:
        if hf_compat.image_processors_return_lists():
            assert install_vit_return_tensors(model) is True
            assert processor.return_tensors == "pt"
            remove_all_hooks(model)
            assert processor.return_tensors is None
        else:
            assert install_vit_return_tensors(model) is False
    finally:
        remove_all_hooks(model)

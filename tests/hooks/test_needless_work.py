"""rope_cache and cache_end_once: the official CachedRoPE hits its cache and the text stage's KV cache
reads its end once per forward, with the same numbers as the shipped code.

The classes below are shaped like the official ones: ``CachedRoPE`` as
Instruct modeling_hunyuan_image_3.py:973-1022 (the miss test compares ``seq_len`` / ``rope_image_info``,
which it never stores), ``HunyuanStaticCache.update`` as M:933-970 (``.item()`` of the last position in
every layer in ``dynamic`` mode). The last tests run them on the test checkpoint's Instruct think path."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest
import torch

from hunyuan_image3.hunyuan_loader.hooks.needless_work import install_cache_end_once, install_rope_cache
from hunyuan_image3.hunyuan_loader.hooks.registry import hook_names, registry, remove_all_hooks


def _official_like_module() -> types.ModuleType:
    mod = types.ModuleType("_hy3_needless_work_like")
    mod.builds = 0

    def build_table(seq_len: int, n_elem: int, image_infos: list | None, device: torch.device) -> tuple:
        mod.builds += 1
        pos = torch.arange(seq_len, device=device, dtype=torch.float32)
        rows = []
        for info in image_infos or [None]:
            shift = float(sum(s.start * h * w for s, (h, w) in info)) if info else 0.0
            rows.append((pos + shift)[:, None] / (10000 ** (torch.arange(n_elem, device=device) / n_elem)))
        table = torch.stack(rows)
        return torch.cos(table), torch.sin(table)

    class CachedRoPE:
        def __init__(self, n_elem: int) -> None:
            self.n_elem = n_elem
            self.cos_cache = self.sin_cache = None
            self.seq_len = None
            self.rope_image_info = None

        def __call__(self, seq_len, device, rope_image_info=None, position_ids=None):
            if (self.seq_len != seq_len) or (rope_image_info is not None and self.rope_image_info != rope_image_info):
                self.cos_cache, self.sin_cache = build_table(seq_len, self.n_elem, rope_image_info, device)
            if position_ids is None:
                return self.cos_cache, self.sin_cache
            index = position_ids.unsqueeze(-1).expand(-1, -1, self.cos_cache.size(-1))
            return torch.gather(self.cos_cache, 1, index), torch.gather(self.sin_cache, 1, index)

    class HunyuanStaticCache:
        def __init__(self, layers: int, length: int, dynamic: bool, rows: int = 1) -> None:
            self.dynamic = dynamic
            self.keys = [torch.zeros(rows, 2, length, 4) for _ in range(layers)]
            self.values = [torch.zeros(rows, 2, length, 4) for _ in range(layers)]

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
            cache_position = cache_kwargs.get("cache_position")
            k_out, v_out = self.keys[layer_idx], self.values[layer_idx]
            if cache_position.dim() == 1:
                k_out.index_copy_(2, cache_position, key_states)
                v_out.index_copy_(2, cache_position, value_states)
                if self.dynamic:
                    end = cache_position[-1].item() + 1
                    k_out, v_out = k_out[:, :, :end], v_out[:, :, :end]
            else:
                for i in range(cache_position.shape[0]):
                    k_out[i].index_copy_(1, cache_position[i], key_states[i])
                    v_out[i].index_copy_(1, cache_position[i], value_states[i])
                if self.dynamic:
                    assert len(cache_position) == 1
                    end = cache_position[0, -1].item() + 1
                    k_out, v_out = k_out[:, :, :end], v_out[:, :, :end]
            return k_out, v_out

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cached_rope = CachedRoPE(8)

    for cls in (CachedRoPE, HunyuanStaticCache, Model):
        cls.__module__ = mod.__name__
    mod.CachedRoPE, mod.HunyuanStaticCache, mod.Model = CachedRoPE, HunyuanStaticCache, Model
    return mod


@pytest.fixture
def mod() -> Iterator[types.ModuleType]:
    module = _official_like_module()
    sys.modules[module.__name__] = module
    try:
        yield module
    finally:
        sys.modules.pop(module.__name__, None)


def _infos(start: int) -> list:
    return [[(slice(start, start + 4), (2, 2))], [(slice(start + 1, start + 5), (2, 2))]]


def _rope_calls(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A generation's calls: one image layout for three forwards, a second layout, then the first again
    with other positions, and a call without position ids (the whole table)."""
    out = []
    for step, (infos, seq) in enumerate([(_infos(3), 64)] * 3 + [(_infos(5), 64), (_infos(3), 64), (_infos(3), 32)]):
        positions = torch.arange(step, step + 6).expand(2, -1)
        out.append(model.cached_rope(seq, "cpu", rope_image_info=infos, position_ids=positions))
    out.append(model.cached_rope(32, "cpu", rope_image_info=_infos(3)))
    return out


def test_rope_cache_builds_once_per_layout_with_the_same_tables(mod: types.ModuleType) -> None:
    shipped = _rope_calls(mod.Model())
    assert mod.builds == 7  # the official object misses on every call
    model = mod.Model()
    official = model.cached_rope
    mod.builds = 0
    assert install_rope_cache(model) is True
    assert not install_rope_cache(model)  # idempotent
    assert hook_names(model) == ["rope_cache"]
    cached = _rope_calls(model)
    assert mod.builds == 4  # layouts: first, second, first again, a shorter table (reused by the last call)
    for a, b in zip(shipped, cached, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert official.seq_len is None and official.rope_image_info is None  # left as the shipped code leaves it
    remove_all_hooks(model)
    assert model.cached_rope is official
    mod.builds = 0
    _rope_calls(model)
    assert mod.builds == 7


def test_rope_cache_rebuilds_for_another_device_mode_or_after_an_error(mod: types.ModuleType) -> None:
    model = mod.Model()
    install_rope_cache(model)
    positions = torch.arange(4)[None]
    model.cached_rope(16, "cpu", rope_image_info=[None], position_ids=positions)
    with torch.inference_mode():
        model.cached_rope(16, "cpu", rope_image_info=[None], position_ids=positions)
    assert mod.builds == 2  # an inference tensor is never handed to autograd-enabled code
    with pytest.raises(RuntimeError):
        model.cached_rope(16, "cpu", rope_image_info=[None], position_ids=torch.arange(40)[None])  # out of range
    assert mod.builds == 3 and model.cached_rope.key is None  # a failed call leaves no key
    model.cached_rope(16, "cpu", rope_image_info=[None], position_ids=positions)
    assert mod.builds == 4  # so the next call builds again...
    model.cached_rope(16, "cpu", rope_image_info=[None], position_ids=positions)
    assert mod.builds == 4 and model.cached_rope.key is not None  # ...and the one after hits


def test_rope_cache_is_for_the_official_class_only() -> None:
    model = torch.nn.Linear(2, 2)
    assert install_rope_cache(model) is False
    assert hook_names(model) == []


def _count_items(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    count = [0]
    item = torch.Tensor.item

    def counting(self: torch.Tensor) -> object:
        count[0] += 1
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting)
    return count


def _text_forwards(cache: object, layers: int, *, rows: int = 1, two_dim: bool = False) -> list[torch.Tensor]:
    """A prefill of 3 positions and two one-token forwards; every layer of a forward gets the same
    position tensor (Instruct M:1333: ``cache_kwargs = {"cache_position": position_ids}``)."""
    outs = []
    for positions in (torch.arange(3), torch.tensor([3]), torch.tensor([4])):
        if two_dim:
            positions = positions[None].expand(rows, -1)
        n = positions.shape[-1]
        for layer in range(layers):
            key = torch.full((rows, 2, n, 4), float(10 * layer + positions.reshape(-1)[-1]))
            outs.extend(cache.update(key, -key, layer, {"cache_position": positions}))
    return outs


@pytest.mark.parametrize("two_dim", [False, True])
@pytest.mark.parametrize("inference", [False, True], ids=["no_grad", "inference_mode"])
def test_cache_end_is_read_once_per_forward_with_the_same_slices(
    mod: types.ModuleType, monkeypatch: pytest.MonkeyPatch, two_dim: bool, inference: bool
) -> None:
    """Inference tensors (how the pack generates) have no version counter: the end is read again at
    each forward's first layer."""
    count = _count_items(monkeypatch)
    model = mod.Model()
    original = mod.HunyuanStaticCache.__dict__["update"]
    with torch.inference_mode(inference):
        shipped = _text_forwards(mod.HunyuanStaticCache(4, 8, dynamic=True), 4, two_dim=two_dim)
        assert count[0] == 12  # 4 layers x 3 forwards
        try:
            assert install_cache_end_once(model) is True
            count[0] = 0
            patched = _text_forwards(mod.HunyuanStaticCache(4, 8, dynamic=True), 4, two_dim=two_dim)
            assert count[0] == 3  # once per forward
            assert len(patched) == len(shipped)
            for a, b in zip(shipped, patched, strict=True):
                assert a.shape == b.shape and torch.equal(a, b)
            count[0] = 0
            image_stage = _text_forwards(mod.HunyuanStaticCache(4, 8, dynamic=False), 4, two_dim=two_dim)
            assert count[0] == 0 and all(o.shape[2] == 8 for o in image_stage)  # not dynamic: as shipped
        finally:
            remove_all_hooks(model)
    assert mod.HunyuanStaticCache.__dict__["update"] is original


def test_cache_end_rereads_a_position_changed_in_place(mod: types.ModuleType) -> None:
    model = mod.Model()
    install_cache_end_once(model)
    try:
        cache = mod.HunyuanStaticCache(2, 8, dynamic=True)
        positions = torch.tensor([2])
        k = torch.ones(1, 2, 1, 4)
        assert cache.update(k, k, 0, {"cache_position": positions})[0].shape[2] == 3
        positions += 3
        assert cache.update(k, k, 1, {"cache_position": positions})[0].shape[2] == 6
    finally:
        remove_all_hooks(model)


def test_cache_end_keeps_the_official_check_of_several_rows(mod: types.ModuleType) -> None:
    model = mod.Model()
    install_cache_end_once(model)
    try:
        with pytest.raises(AssertionError):  # M:965: dynamic mode takes one row
            _text_forwards(mod.HunyuanStaticCache(1, 8, dynamic=True, rows=2), 1, rows=2, two_dim=True)
    finally:
        remove_all_hooks(model)


def test_two_models_and_another_entry_on_one_method_compose_in_the_order(mod: types.ModuleType) -> None:
    """cache_end_once shares HunyuanStaticCache.update with static_cache_init (transformers 5.x): the
    patches compose in HOOK_ORDER, whatever order they come and go in, and the shipped method comes back."""
    from hunyuan_image3.hunyuan_loader.hooks.registry import ClassMethodPatch

    calls: list[str] = []

    def outer(inner):
        def patched(self, *args, **kwargs):
            calls.append("static_cache_init")
            return inner(self, *args, **kwargs)
        return patched

    shipped = mod.HunyuanStaticCache.__dict__["update"]
    first, second = mod.Model(), mod.Model()
    install_cache_end_once(first)
    registry(second).install("static_cache_init", ClassMethodPatch("static_cache_init", mod.HunyuanStaticCache,
                                                                   "update", outer))
    install_cache_end_once(second)
    try:
        cache = mod.HunyuanStaticCache(1, 8, dynamic=True)
        k = torch.ones(1, 2, 1, 4)
        assert cache.update(k, k, 0, {"cache_position": torch.tensor([1])})[0].shape[2] == 2
        assert calls == ["static_cache_init"]
        remove_all_hooks(first)  # second still holds both entries
        assert mod.HunyuanStaticCache.__dict__["update"] is not shipped
        registry(second).remove("static_cache_init")
        cache.update(k, k, 0, {"cache_position": torch.tensor([2])})
        assert calls == ["static_cache_init"]  # that wrapper is gone, cache_end_once stays
        assert cache.__dict__["_end_memo"][2] == 3
    finally:
        remove_all_hooks(first)
        remove_all_hooks(second)
    assert mod.HunyuanStaticCache.__dict__["update"] is shipped


def test_last_logits_hands_lm_head_the_last_position_only() -> None:
    from hunyuan_image3.hunyuan_loader.hooks.needless_work import last_logits

    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(4, 6, bias=False)
    hidden = torch.randn(2, 5, 4)
    full = model.lm_head(hidden)
    entry = last_logits(model)
    with registry(model).active("last_logits", entry):
        assert hook_names(model) == ["last_logits"]
        out = model.lm_head(hidden)
        # the same row, up to the rounding of a GEMM over 2 rows instead of 10
        assert out.shape == (2, 1, 6) and torch.allclose(out[:, -1], full[:, -1], rtol=1e-5, atol=1e-6)
        assert torch.equal(model.lm_head(hidden[:, -1:]), out)  # one position: as it is
    assert model.lm_head(hidden).shape == (2, 5, 6) and hook_names(model) == []
    assert last_logits(torch.nn.Linear(2, 2)) is None


def test_the_text_stage_reads_the_same_logits_from_one_position(cache, instruct_checkpoint, one_thread,
                                                                monkeypatch) -> None:
    """Think text and image with the entry equal those without it; the prompt's forward put one position
    through lm_head instead of all of them."""
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
    from hunyuan_image3.hunyuan_loader.generation import generate
    from hunyuan_image3.hunyuan_loader.hooks import standard
    from hunyuan_image3.hunyuan_loader.request import GenerationRequest

    loaded = cache.get(cache.load(LoadSpec(str(instruct_checkpoint))))
    positions: list[int] = []
    spy = loaded.model.lm_head.register_forward_hook(lambda _m, _a, out: positions.append(out.shape[1]))
    req = GenerationRequest("a red fox", seed=3, steps=2, resolution="1024x1024", bot_task="think", max_new_tokens=6)
    try:
        with_entry = generate(loaded, req)
        seen_with, positions[:] = list(positions), []
        monkeypatch.setattr(standard, "last_logits", lambda model: None)
        without = generate(loaded, req)
    finally:
        spy.remove()
    assert with_entry.cot_text == without.cot_text and with_entry.text_tokens == without.text_tokens
    assert torch.equal(with_entry.image, without.image)
    assert max(positions) > 1 and set(seen_with) == {1}  # the prompt: every position without, one with


def test_on_the_instruct_think_path_the_entries_change_no_output_and_read_less(instruct_checkpoint, one_thread,
                                                                               monkeypatch, tmp_path) -> None:
    """The test checkpoint's Instruct text stage decodes as the official one does (its own HunyuanStaticCache
    and CachedRoPE: tests/model/test_model_interface.py pins them), so a load installs both entries (and
    static_cache_init where transformers is 5.x). Think text and image with them equal those without them;
    the cache's end is read once per text forward instead of once per layer, and the RoPE table is built
    once for the whole text stage instead of once per forward.

    A copy of the checkpoint in its own folder: its code is a module of its own (the loader names it by
    path), so no other test's model shares the classes the entries patch (a class patch stays while any
    model of that code holds it)."""
    import shutil

    from hunyuan_image3.hunyuan_loader.core import hf_compat
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
    from hunyuan_image3.hunyuan_loader.generation import generate
    from hunyuan_image3.hunyuan_loader.load.pipeline import load_model
    from hunyuan_image3.hunyuan_loader.request import GenerationRequest

    folder = shutil.copytree(instruct_checkpoint, tmp_path / instruct_checkpoint.name)
    loaded = load_model(LoadSpec(str(folder)))
    model = loaded.model
    names = hook_names(model)
    assert {"cache_end_once", "rope_cache"} <= set(names)
    assert ("static_cache_init" in names) == hf_compat.lazy_init_takes_values()
    code = sys.modules[type(model).__module__]
    table_len = model.config.max_position_embeddings
    forwards, tables = [0], [0]
    rope = code._rope

    def counting_rope(positions, *args):
        tables[0] += positions.shape[-1] == table_len  # the text stage's table (the image stage: its positions)
        return rope(positions, *args)

    monkeypatch.setattr(code, "_rope", counting_rope)
    spy = model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    items = _count_items(monkeypatch)
    req = GenerationRequest("a red fox", seed=3, steps=2, resolution="1024x1024", bot_task="think", max_new_tokens=6)

    def run() -> tuple:
        forwards[0] = tables[0] = items[0] = 0
        torch.manual_seed(0)
        out = generate(loaded, req)
        return out, forwards[0], tables[0], items[0]

    try:
        installed, n_on, tables_on, items_on = run()
        assert registry(model).remove("cache_end_once") and registry(model).remove("rope_cache")
        shipped, n_off, tables_off, items_off = run()
    finally:
        spy.remove()
        remove_all_hooks(model)  # the class patches off with the only model of this code
    assert installed.cot_text == shipped.cot_text and installed.text_tokens == shipped.text_tokens == 6
    assert torch.equal(installed.image, shipped.image)
    layers = len(model.model.layers)
    assert n_on == n_off == 6 and layers > 1  # the prompt's forward, then one per token
    assert items_off - items_on == (layers - 1) * n_on  # every layer read the end; now the first one
    assert tables_off == n_off and tables_on == 1


def test_rope_cache_keeps_no_unloaded_model_alive(mod: types.ModuleType) -> None:
    """The registry is kept beside the model, weakly keyed by it: an entry that held the model strongly
    kept every unloaded Instruct model (and its weights) alive."""
    import gc
    import weakref

    model = mod.Model()
    assert install_rope_cache(model) is True
    model.cached_rope(16, "cpu", rope_image_info=[None], position_ids=torch.arange(4)[None])
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None

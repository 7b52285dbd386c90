"""In-process check: our entry in ComfyUI's REAL comfy.model_management (run with ComfyUI's Python).

    cd $COMFYUI_DIR && $COMFYUI_PYTHON /path/to/pack/tests/e2e/comfy_memory_check.py MODEL_DIR

run_comfyui_e2e.py runs it as one of its checks. It imports ComfyUI's model_management (--cpu)
and the pack the way ComfyUI does (a module named after a folder with dashes), loads the test
checkpoint into our cache and proves:
  1. our entry is in current_loaded_models with the right sizes;
  2. a partial free_memory() on a (simulated) CUDA device calls cache.free_gpu(bytes) and
     leaves the model loaded, through ComfyUI's own free_memory code;
  2b. make_room_on_gpu(bytes) (called by our loaders and Generate) unloads ComfyUI's own
     models through free_memory(keep_loaded=[our entry]) and leaves ours alone;
  3. free_memory(1e30) (= unload_all_models, /free) drops the model; the entry stays listed,
     reports 0 bytes, and a later load is tracked again.
Prints one line per step, "OK" at the end; exits 1 on failure.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    model_dir = Path(sys.argv[1]).resolve()
    sys.argv = ["main.py", "--cpu"]  # comfy.cli_args parses sys.argv at import
    sys.path.insert(0, os.getcwd())
    import comfy.options
    import torch

    comfy.options.enable_args_parsing()  # as main.py does, so --cpu applies
    import comfy.model_management as mm

    name = "ComfyUI-HunyuanImage3"
    spec = importlib.util.spec_from_file_location(
        name, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    spec.loader.exec_module(pack)
    memory = sys.modules[f"{name}.nodes.comfy_memory"]
    cache = sys.modules[f"{name}.hunyuan_loader.cache"].get_cache()
    LoadSpec = sys.modules[f"{name}.hunyuan_loader.load.pipeline"].LoadSpec

    entry = memory.comfy_memory_entry()
    assert entry is not None and any(e is entry for e in mm.current_loaded_models), "entry not registered"
    print(f"registered: {len(mm.current_loaded_models)} entry, device {entry.device}")

    handle = cache.load(LoadSpec(str(model_dir)))
    total = cache.total_bytes()
    assert total > 0 and entry.model_memory() == total and entry.model_loaded_memory() == total, "sizes"
    print(f"loaded: model_memory {entry.model_memory()} B, loaded {entry.model_loaded_memory()} B")

    # 2. partial request on a simulated GPU, through ComfyUI's real free_memory()
    patcher, cuda = entry.model, torch.device("cuda", 0)
    calls = []
    saved = (entry.device, patcher.load_device, mm.get_free_memory, mm.soft_empty_cache)
    saved_cache = (cache.gpu_bytes, cache.free_gpu, cache.total_bytes)
    try:
        entry.device = patcher.load_device = cuda
        gpu = {"bytes": 10 << 30, "free": 1 << 30}
        cache.gpu_bytes = lambda: gpu["bytes"]
        cache.total_bytes = lambda: 20 << 30

        def fake_free_gpu(n: int) -> int:
            calls.append(n)
            gpu["bytes"] -= n
            gpu["free"] += n
            return n

        cache.free_gpu = fake_free_gpu
        mm.get_free_memory = lambda dev=None, torch_free_too=False: (
            (gpu["free"], gpu["free"]) if torch_free_too else gpu["free"]
        )
        mm.soft_empty_cache = lambda *a, **k: None
        unloaded = mm.free_memory(3 << 30, cuda)
        assert calls == [2 << 30], f"free_gpu calls {calls}"
        print(
            f"partial: free_memory(3 GiB) on {cuda} with 1 GiB free -> cache.free_gpu({calls[0]}); model kept"
        )
        calls.clear()
        mm.free_memory(40 << 30, cuda)  # more than our whole model: still a park, never a drop
        assert calls and cache.loaded is not None, (
            f"large finite request: calls {calls}, loaded {cache.loaded}"
        )
        assert cache.loaded is not None and unloaded == [], "partial request must not drop the model"
        assert any(e is entry for e in mm.current_loaded_models), "entry popped"
        print(f"large: free_memory(40 GiB) -> cache.free_gpu({calls[0]}) (park), model kept")

        # 2b. the other direction: before our load/run, ComfyUI's own models yield, ours stays
        import weakref

        import comfy.model_patcher

        other_patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(8, 8), load_device=cuda,
                                                         offload_device=torch.device("cpu"))
        other = mm.LoadedModel(other_patcher)
        other.real_model = weakref.ref(other_patcher.model)
        other.model_finalizer = weakref.finalize(other_patcher.model, lambda: None)
        mm.current_loaded_models.insert(0, other)
        calls.clear()
        gpu["free"] = 1 << 30
        saved_device = mm.get_torch_device
        mm.get_torch_device = lambda: cuda
        try:
            gone = memory.make_room_on_gpu(5 << 30)
        finally:
            mm.get_torch_device = saved_device
        assert gone == 1 and not any(e is other for e in mm.current_loaded_models), "ComfyUI's model stayed"
        assert calls == [] and any(e is entry for e in mm.current_loaded_models), "our model was asked to yield"
        print("make_room_on_gpu(5 GiB): ComfyUI's own model unloaded, ours kept (keep_loaded)")
    finally:
        entry.device, patcher.load_device, mm.get_free_memory, mm.soft_empty_cache = saved
        cache.gpu_bytes, cache.free_gpu, cache.total_bytes = saved_cache

    # 3. everything (unload_all_models) drops the model; entry stays, reports 0
    mm.unload_all_models()
    assert cache.loaded is None, "unload_all_models did not drop our model"
    assert any(e is entry for e in mm.current_loaded_models) and entry.model_memory() == 0
    print("unload_all_models: model dropped, entry kept with 0 bytes")
    cache.get(handle)  # the handle reloads it
    assert cache.loaded is not None and entry.model_memory() == total
    mm.unload_all_models()
    assert cache.loaded is None
    print(f"reload via handle tracked again, dropped again; unload log {patcher.unloads}")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

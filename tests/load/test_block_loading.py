"""Block-order loading (hunyuan_loader/load/blocks.py): same model as from_pretrained,
materialisation order, bounded memory, the plan-before-read refusal, progress and cancel."""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from model_compare import differences, logits

from hunyuan_image3.hunyuan_loader.checkpoint.layout import block_of, load_units, read_layout
from hunyuan_image3.hunyuan_loader.checkpoint.reader import TensorReader
from hunyuan_image3.hunyuan_loader.checkpoint.validate import validate_checkpoint
from hunyuan_image3.hunyuan_loader.core import hf_compat
from hunyuan_image3.hunyuan_loader.core.errors import GenerationCancelled, NotEnoughRAMError
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.load import blocks as block_loader
from hunyuan_image3.hunyuan_loader.load.pipeline import load_model
from hunyuan_image3.memory.unload import tracked_models

ROOT = Path(__file__).resolve().parents[2]
FORMATS = [("bf16", "w8a16"), ("int8", "bnb"), ("nf4", "w8a16"), ("int8", "w8a16")]
CUDA = torch.device("cuda", 0) if torch.cuda.is_available() else None



def _qconfig(spec):
    """(the quantization_config a load builds its skeleton with, whether the checkpoint is pre-quantized)."""
    from hunyuan_image3.hunyuan_loader.checkpoint.inspection import inspect_for_load

    found = inspect_for_load(spec.path, spec.quant, spec.int8_format)
    return found.quantization_config, found.pre_quantized

def _spec(path: Path, quant: str, fmt: str = "w8a16", **kw) -> LoadSpec:
    return LoadSpec(str(path), quant=quant, int8_format=fmt, **kw)


@pytest.mark.skipif(CUDA is not None, reason="on CUDA the earlier path quantizes on the CPU; the GPU test compares")
@pytest.mark.parametrize(("quant", "fmt"), FORMATS)
def test_block_order_load_is_the_model_from_pretrained_gives(base_checkpoint: Path, quant: str, fmt: str,
                                                             one_thread) -> None:
    """Same modules, classes, dtypes (float32 routers under int8/nf4 in both), values, bnb state,
    requires_grad, config, generation_config and quantizer attributes; same logits."""
    ours = load_model(_spec(base_checkpoint, quant, fmt))
    ref = load_model(_spec(base_checkpoint, quant, fmt), engine="from_pretrained")
    assert differences(ours.model, ref.model) == []
    assert not ours.model.training
    if quant != "bf16":
        assert ours.model.model.layers[0].mlp.gate.wg.weight.dtype == torch.float32
    assert torch.equal(logits(ours.model), logits(ref.model))


def test_units_come_in_block_order(base_checkpoint: Path, monkeypatch, one_thread) -> None:
    """Non-block parts first, then block 0, 1, 2, ... and every tensor of a block together."""
    seen: list[str] = []
    fill = block_loader._fill

    def record(sk, entry, value, device):
        seen.append(entry.name)
        return fill(sk, entry, value, device)

    monkeypatch.setattr(block_loader, "_fill", record)
    load_model(_spec(base_checkpoint, "nf4"))
    order = [block_of(n) for n in seen]
    first_block = next(i for i, b in enumerate(order) if b is not None)
    assert all(b is None for b in order[:first_block]), "a non-block tensor came after a block's"
    blocks = order[first_block:]
    assert all(b is not None for b in blocks)
    assert blocks == sorted(blocks), "blocks were not materialised in order"
    n_layers = json.loads((base_checkpoint / "config.json").read_text())["num_hidden_layers"]
    assert sorted(set(blocks)) == list(range(n_layers))


def test_reader_keeps_at_most_a_window_ahead(base_checkpoint: Path) -> None:
    """A slow consumer: the reader never holds more than the window (plus one tensor) unreleased."""
    layout = read_layout(validate_checkpoint(base_checkpoint).shard_files)
    entries = [e for u in load_units(layout) for e in u.entries]
    window = 64 * 1024
    biggest = max(e.nbytes for e in entries)
    peak = 0
    with TensorReader(entries, window=window) as reader:
        for entry in entries:
            item = reader.next()
            assert item.entry is entry
            time.sleep(0.001)
            peak = max(peak, reader._in_flight)
            assert item.tensor.dtype == entry.dtype and tuple(item.tensor.shape) == entry.shape
    assert peak <= window + biggest + 256, (peak, window, biggest)
    # the bytes are the checkpoint's own
    from safetensors import safe_open

    entry = max(entries, key=lambda e: e.nbytes)
    with TensorReader([entry]) as reader, safe_open(str(entry.file), framework="pt") as fh:
        assert torch.equal(reader.next().tensor, fh.get_tensor(entry.name))


_RSS_SCRIPT = r"""
import os, sys, json, torch
sys.path.insert(0, {root!r})
from hunyuan_loader.standalone import load_pack
load_pack()
torch.set_num_threads(1)
from hunyuan_image3.hunyuan_loader.load import blocks as block_loader
from hunyuan_image3.hunyuan_loader.checkpoint.validate import loadable_path, validate_checkpoint
from hunyuan_image3.hunyuan_loader.checkpoint.layout import load_units, read_layout
from hunyuan_image3.hunyuan_loader.formats.quantization import skip_modules_for
from hunyuan_image3.hunyuan_loader.formats.builtin import quantization_config
block_loader.CPU_READ_AHEAD = {window}

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

info = validate_checkpoint({path!r})
layout = read_layout(info.shard_files)
qc = quantization_config("nf4", skip_modules_for(list(layout)))
dev = torch.device("cpu")
sk = block_loader.build_skeleton(loadable_path(info), layout, "nf4", qc, dev)
units = load_units(layout, sk.to_load)
placed = sum(block_loader.unit_bytes(sk, units))
# warm up bnb's CPU kernels on one small tensor so their one-time allocations are not counted
import bitsandbytes as bnb
bnb.nn.Params4bit(torch.randn(64, 64, dtype=torch.bfloat16), quant_type="nf4").to("cpu")
open("/proc/self/clear_refs", "w").write("5")
base = hwm()
block_loader.materialise(sk, block_loader.LoadJob(units, dev))
print(json.dumps(dict(peak_added=hwm() - base, placed=placed, disk=sum(u.nbytes for u in units),
                      biggest_unit=max(u.nbytes for u in units))))
"""


def _peak_rss(path: Path, window: int) -> dict:
    code = _RSS_SCRIPT.format(root=str(ROOT), path=str(path), window=window)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def medium_checkpoint(tmp_path_factory) -> Path:
    """~200 MB of bf16 experts: large against allocator noise, small enough for CI."""
    from fixtures_model import build

    return build(tmp_path_factory, "base", hidden_size=512, num_experts=16, moe_intermediate_size=512,
                 intermediate_size=256, num_hidden_layers=8)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_rss_of_a_quantizing_load_is_the_placed_model_plus_the_read_ahead(medium_checkpoint: Path) -> None:
    """NF4 on the CPU: bf16 tensors pass through a bounded read-ahead ring and are quantized one
    by one, so peak RSS is the nf4 model + the ring + what the allocator holds back within a block
    (trimmed after each), not the bf16 checkpoint. (Fails with a read-ahead of 1 GB: ~300 MB.)"""
    window = 4 << 20
    r = _peak_rss(medium_checkpoint, window)
    bound = r["placed"] + window + 2 * r["biggest_unit"] + (48 << 20)
    assert r["peak_added"] <= bound, r
    assert r["placed"] < 0.45 * r["disk"], r  # nf4 really is smaller than what was read


def test_plan_is_refused_before_any_read_when_ram_is_short(cache, base_checkpoint: Path, monkeypatch) -> None:
    """HUNYUAN_RAM_LIMIT_GB below the plan's RAM side: a clear error with needed vs available and
    the choices; not one tensor byte read; nothing loaded."""
    reads: list[str] = []
    orig = TensorReader._read_run

    def counting(self, entries, raws):
        reads.extend(e.name for e in entries)
        return orig(self, entries, raws)

    monkeypatch.setattr(TensorReader, "_read_run", counting)
    monkeypatch.setenv("HUNYUAN_RAM_LIMIT_GB", "0.5")
    gc.collect()
    before = len(tracked_models())
    with pytest.raises(NotEnoughRAMError) as err:
        cache.load(_spec(base_checkpoint, "bf16"))
    text = str(err.value)
    assert "needs" in text and "0.5 GiB is available" in text and "NF4" in text and "Nothing was read" in text
    assert reads == []
    assert cache.loaded is None
    gc.collect()
    assert len(tracked_models()) == before
    monkeypatch.setenv("HUNYUAN_RAM_LIMIT_GB", "64")
    assert cache.load(_spec(base_checkpoint, "bf16")) is not None and reads  # the same load with enough RAM


def test_progress_reports_bytes_read_of_total(base_checkpoint: Path, one_thread) -> None:
    calls: list[tuple[int, int]] = []
    load_model(_spec(base_checkpoint, "bf16"), progress=lambda done, total: calls.append((done, total)))
    layout = read_layout(validate_checkpoint(base_checkpoint).shard_files)
    total = sum(e.nbytes for e in layout.values())
    assert calls and all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == total
    assert len(calls) <= 110  # throttled to ~1% steps


def test_cancel_between_blocks_leaves_nothing_alive(cache, base_checkpoint: Path, monkeypatch) -> None:
    """The cancel check runs between units; the partial model is freed, even its object."""
    refs: list[weakref.ref] = []
    build = block_loader.build_skeleton

    def spy(*args, **kwargs):
        sk = build(*args, **kwargs)
        refs.append(weakref.ref(sk.model))
        return sk

    monkeypatch.setattr(block_loader, "build_skeleton", spy)
    checks = []

    def cancel() -> None:
        checks.append(1)
        if len(checks) == 3:  # after the non-block parts and block 0
            raise GenerationCancelled("cancelled by the user")

    with pytest.raises(GenerationCancelled):
        cache.load(_spec(base_checkpoint, "int8", "bnb"), cancel=cancel)
    assert len(checks) == 3 and cache.loaded is None
    gc.collect()
    assert refs and refs[0]() is None, "the cancelled model is still alive"
    handle = cache.load(_spec(base_checkpoint, "int8", "bnb"))  # the next load works
    assert cache.get(handle).model is not None


# -- CUDA ----------------------------------------------------------------------------------------
HALF_STREAMED = {"offload": "budget", "vram_budget_gb": 1000.0, "headroom_gb": 0.0}


def _stream_half(monkeypatch, checkpoint: Path) -> None:
    """Budget loads stream half of the blocks (a 4-block model would otherwise never stream)."""
    n = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
    monkeypatch.setenv("HUNYUAN_MIN_STREAMED_BLOCKS", str(n // 2))


@pytest.mark.gpu
@pytest.mark.parametrize(("quant", "fmt"), FORMATS)
def test_gpu_load_is_the_model_from_pretrained_gives(base_checkpoint: Path, quant: str, fmt: str) -> None:
    """offload disabled on CUDA: same model as from_pretrained(device_map={"": 0}) (+ float32
    routers), quantized on the GPU."""
    from transformers import AutoModelForCausalLM

    from hunyuan_image3.hunyuan_loader.checkpoint.validate import loadable_path
    from hunyuan_image3.hunyuan_loader.formats.quantization import restore_float32_routers

    spec = _spec(base_checkpoint, quant, fmt)
    ours = load_model(spec)
    info = validate_checkpoint(base_checkpoint)
    qconfig, _ = _qconfig(spec)
    kwargs = {"quantization_config": qconfig} if qconfig is not None else {}
    ref = AutoModelForCausalLM.from_pretrained(str(loadable_path(info)), trust_remote_code=True,
                                               dtype=torch.bfloat16, attn_implementation="sdpa", moe_impl="eager",
                                               low_cpu_mem_usage=True, device_map={"": 0}, **kwargs).eval()
    if qconfig is not None:
        restore_float32_routers(ref, info.path)
    assert differences(ours.model, ref, values=True) == []
    assert torch.equal(logits(ours.model), logits(ref))


@pytest.mark.gpu
@pytest.mark.parametrize(("quant", "fmt"), FORMATS)
def test_gpu_half_streamed_load_matches_resident(base_checkpoint: Path, quant: str, fmt: str, monkeypatch) -> None:
    """Blocks that stream are quantized on the GPU too: streamed and resident loads give
    bit-identical logits, and the streamed blocks sit in pinned RAM, not on the GPU."""
    resident = load_model(_spec(base_checkpoint, quant, fmt))
    ref = logits(resident.model)
    del resident
    gc.collect()
    torch.cuda.empty_cache()
    _stream_half(monkeypatch, base_checkpoint)
    smart = load_model(_spec(base_checkpoint, quant, fmt, **HALF_STREAMED))
    plan = smart.residency.plan
    assert 0 < len(plan.streamed) < len(plan.placements), plan.describe()
    from hunyuan_image3.memory.residency import weight_tensors

    for i in plan.streamed:
        tensors = weight_tensors(smart.model.model.layers[i])
        assert all(w.tensor.device.type == "cpu" and w.tensor.is_pinned() for w in tensors)
    assert torch.equal(logits(smart.model), ref)
    # soft unload and back
    smart.residency.park()
    smart.residency.restore()
    assert torch.equal(logits(smart.model), ref)


@pytest.mark.gpu
def test_gpu_smart_load_peak_rss_is_the_ram_side_plus_one_block(base_checkpoint: Path, monkeypatch) -> None:
    """Peak RSS of a half-streamed bf16 load <= the streamed (pinned) bytes + the read ring + slack,
    and peak VRAM <= the plan's GPU bytes + one block."""
    _stream_half(monkeypatch, base_checkpoint)
    torch.empty(1, device="cuda")  # the CUDA context is not part of the load
    torch.empty(1, pin_memory=True)
    torch.cuda.synchronize()
    base_alloc = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")

    def hwm() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
        return 0

    before = hwm()
    loaded = load_model(_spec(base_checkpoint, "bf16", "w8a16", **HALF_STREAMED))
    added = hwm() - before
    plan = loaded.residency.plan
    block = max(plan.block_bytes)
    layout = read_layout(validate_checkpoint(base_checkpoint).shard_files)
    ring = max(256 << 20, max(e.nbytes for e in layout.values()))
    assert added <= plan.streamed_bytes + ring + block + (256 << 20), (added, plan.describe())
    assert torch.cuda.max_memory_allocated() - base_alloc <= plan.gpu_weight_bytes + block + (16 << 20)


def test_prepare_run_is_one_call_node_cache_policy_residency(cache, base_checkpoint: Path) -> None:
    """cache.prepare_run: room for the weights to come back, the model reloaded if dropped, the
    policy's run placement entered and left; the size may be a function of the live model."""
    handle = cache.load(_spec(base_checkpoint, "bf16"))
    cache.unload("drop")
    asked: list[int] = []
    notes: list[str] = []
    sizes: list[object] = []

    def size(loaded):
        sizes.append(loaded)
        return (1024, 1024)

    with cache.prepare_run(handle, size, notes, make_room=asked.append) as loaded:
        assert loaded is cache.loaded and loaded.model is not None
    assert sizes == [loaded]
    assert asked and asked[0] > 0  # a reload: its GPU bytes were asked for before it started
    before = len(asked)
    with cache.prepare_run(handle, (1024, 1024), notes, make_room=asked.append):
        pass
    assert asked[before] == 0  # loaded and resident: nothing to bring back (on a GPU the run's room follows)


def _all_entries(path: Path):
    layout = read_layout(validate_checkpoint(path).shard_files)
    return [e for u in load_units(layout) for e in u.entries]


@pytest.mark.parametrize("ring", [0, 1 << 20, 96 << 10])
def test_coalesced_reads_deliver_each_tensors_own_bytes(base_checkpoint: Path, ring: int) -> None:
    """Back-to-back tensors come in one preadv each run (far fewer reads than tensors), each
    delivered with exactly its own bytes, also through a small ring that wraps and cuts runs."""
    from safetensors import safe_open

    entries = _all_entries(base_checkpoint)
    total = sum(e.nbytes for e in entries)
    ring = max(ring, max(e.nbytes for e in entries)) if ring else 0
    got = {}
    # no ring: a window that holds everything, so runs are cut only by gaps and files
    with TensorReader(entries, to_ring=lambda e: True, ring_bytes=ring, pin=False, window=ring or total) as reader:
        for entry in entries:
            item = reader.next()
            assert item.entry is entry
            got[entry.name] = item.tensor.clone()
            item.release()
        assert reader.bytes_read == total
        if not ring:  # with a small ring, where runs are cut depends on how fast the consumer frees room
            assert reader.reads < len(entries) / 3, (reader.reads, len(entries))
    for file in {e.file for e in entries}:
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                assert torch.equal(got[name], fh.get_tensor(name)), name


def test_a_run_stops_at_a_gap_or_another_file(tmp_path: Path) -> None:
    """Only tensors that lie back to back in one file share a read; a gap (a tensor left out)
    or a new file starts a new one; the bytes stay right."""
    from safetensors.torch import save_file

    a = {f"t{i}": torch.full((i + 1,), i, dtype=torch.int32) for i in range(6)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file({"u": torch.arange(5, dtype=torch.int64)}, str(tmp_path / "b.safetensors"))
    layout = read_layout([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    order = sorted((e for n, e in layout.items() if n != "t3"), key=lambda e: (str(e.file), e.start))
    runs: list[list[str]] = []
    orig = TensorReader._read_run

    def record(self, es, raws):
        runs.append([e.name for e in es])
        return orig(self, es, raws)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TensorReader, "_read_run", record)
        with TensorReader(order) as reader:
            values = {reader.next().entry.name: None for _ in order}
            assert len(values) == len(order)
    assert len(runs) == 3 and sum(runs, []) == [e.name for e in order], runs
    with TensorReader(order) as reader:
        for e in order:
            t = reader.next().tensor
            assert torch.equal(t, a[e.name] if e.name in a else torch.arange(5, dtype=torch.int64))


@pytest.mark.skipif(hf_compat.is_v5(), reason="4.57's per-tensor _infer_parameter_dtype is gone in 5.x; there "
                    "test_block_order_load_is_the_model_from_pretrained_gives compares every dtype with from_pretrained")
@pytest.mark.parametrize(("quant", "fmt"), FORMATS)
def test_cast_dtype_is_what_transformers_infers(base_checkpoint: Path, quant: str, fmt: str) -> None:
    """The skeleton's dtype table gives, for every checkpoint tensor, the cast transformers'
    _infer_parameter_dtype gives (it walks the module tree per tensor; we look it up)."""
    from transformers.modeling_utils import _infer_parameter_dtype

    from hunyuan_image3.hunyuan_loader.checkpoint.validate import loadable_path

    info = validate_checkpoint(base_checkpoint)
    layout = read_layout(info.shard_files)
    spec = _spec(base_checkpoint, quant, fmt)
    qconfig, _ = _qconfig(spec)
    sk = block_loader.build_skeleton(loadable_path(info), layout, quant, qconfig, torch.device("cpu"))
    for name in sk.to_load:
        e = layout[name]
        empty = torch.empty(0, dtype=e.dtype, device="meta")
        _, want = _infer_parameter_dtype(sk.model, name, empty, sk.keep_in_fp32_regex, sk.hf_quantizer)
        assert block_loader._infer_dtype(sk, name, e.dtype) == want, name


@pytest.mark.parametrize(("quant", "fmt"), [("nf4", "w8a16"), ("int8", "bnb")])
def test_submodule_index_answers_as_the_walk_and_leaves_no_trace(base_checkpoint: Path, quant: str, fmt: str,
                                                               one_thread) -> None:
    """While weights are filled, model.get_submodule is a dict lookup: the same module for every
    path, the same error for a wrong one; the quantizer's per-name answers are cached as asked;
    afterwards the model has no instance attribute left."""
    from hunyuan_image3.hunyuan_loader.checkpoint.validate import loadable_path

    info = validate_checkpoint(base_checkpoint)
    layout = read_layout(info.shard_files)
    qconfig, _ = _qconfig(_spec(base_checkpoint, quant, fmt))
    sk = block_loader.build_skeleton(loadable_path(info), layout, quant, qconfig, torch.device("cpu"))
    model = sk.model
    paths = [name for name, _ in model.named_modules(remove_duplicate=False)]
    with block_loader.submodule_index(model):
        assert "get_submodule" in model.__dict__
        assert all(model.get_submodule(p) is torch.nn.Module.get_submodule(model, p) for p in paths)
        with pytest.raises(AttributeError, match="no attribute `nope`"):
            model.get_submodule("model.nope")
        for name in sk.to_load:
            assert sk.needs_quantization(name) == sk.hf_quantizer.param_needs_quantization(model, name), name
    assert "get_submodule" not in model.__dict__
    assert any(sk._needs_quant.values()) and not all(sk._needs_quant.values())
    loaded = load_model(_spec(base_checkpoint, quant, fmt))
    assert "get_submodule" not in loaded.model.__dict__


def test_load_reports_where_its_time_went(base_checkpoint: Path, one_thread, caplog) -> None:
    """load_model fills LoadStats: every phase from skeleton to MoE dispatch, adding up to the
    load time, the bytes read, coalesced reads, and one info line."""
    import logging

    with caplog.at_level(logging.INFO, logger="hunyuan_image3.hunyuan_loader.load.pipeline"):
        loaded = load_model(_spec(base_checkpoint, "nf4"))
    st = loaded.load_stats
    for phase in ("validate", "skeleton", "checks", "plan", "read+place", "finish", "adopt", "tokenizer",
                  "moe dispatch", "other"):
        assert phase in st.phases, (phase, st.phases)
    assert all(v >= 0 for v in st.phases.values())
    assert abs(sum(st.phases.values()) - loaded.load_seconds) < 0.05 * loaded.load_seconds + 0.01
    assert st.phases["skeleton"] > 0 and st.phases["read+place"] > 0
    total = sum(p.stat().st_size for p in base_checkpoint.glob("*.safetensors"))
    assert 0 < st.bytes_read <= total and st.bytes_read == st.bytes_total
    assert 0 < st.reads < st.tensors
    assert st.read_seconds > 0 and st.read_gbps > 0
    assert any("load phases:" in r.getMessage() and "read+place" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("enough", [True, False])
def test_a_ring_made_ahead_is_used_when_large_enough(base_checkpoint: Path, enough: bool, one_thread) -> None:
    """materialise takes the ring made on a helper thread (RingAhead) if it holds the staging bytes,
    else makes its own; the model is the same either way and the ring made ahead is closed."""
    from hunyuan_image3.hunyuan_loader.checkpoint.reader import RingAhead
    from hunyuan_image3.hunyuan_loader.checkpoint.validate import loadable_path

    info = validate_checkpoint(base_checkpoint)
    layout = read_layout(info.shard_files)
    qconfig, _ = _qconfig(_spec(base_checkpoint, "nf4"))
    cpu = torch.device("cpu")
    sk = block_loader.build_skeleton(loadable_path(info), layout, "nf4", qconfig, cpu)
    units = load_units(layout, sk.to_load)
    staging = block_loader.staging_bytes(sk, units, cpu)
    assert staging > 0  # nf4 from bf16 on the CPU passes the bf16 weights through a ring
    ring = RingAhead(staging if enough else staging // 2, pin=False)
    st = block_loader.LoadStats()
    block_loader.materialise(sk, block_loader.LoadJob(units, cpu, ring_bytes=staging, ring=ring, stats=st))
    assert st.ring_ahead is enough and st.ring_seconds > 0
    assert ring.wait() == 0  # taken or freed
    ref = load_model(_spec(base_checkpoint, "nf4"))
    assert torch.equal(logits(block_loader.finish(sk)), logits(ref.model))


def test_transformers_answers_each_tensor_once_when_the_skeleton_is_built(base_checkpoint: Path, one_thread,
                                                                        monkeypatch) -> None:
    """Whether the quantizer replaces a tensor and the dtype it is cast to are asked when the skeleton is
    built, for every tensor the model loads; the plan, the reader and the filling look the answers up
    (transformers asked again afterwards fails here), and the model is the one load_model gives."""
    from hunyuan_image3.hunyuan_loader.checkpoint.validate import loadable_path

    info = validate_checkpoint(base_checkpoint)
    layout = read_layout(info.shard_files)
    qconfig, _ = _qconfig(_spec(base_checkpoint, "nf4"))
    cpu = torch.device("cpu")
    sk = block_loader.build_skeleton(loadable_path(info), layout, "nf4", qconfig, cpu)
    assert set(sk._needs_quant) == set(sk.casts) == set(sk.to_load)
    assert any(sk._needs_quant.values()) and not all(sk._needs_quant.values())

    def asked(*args, **kwargs):
        raise AssertionError("transformers was asked about a tensor after the skeleton was built")

    with monkeypatch.context() as patch:
        for name in ("needs_quantization", "load_dtype", "check_unknown_tensor"):
            patch.setattr(hf_compat, name, asked)
        units = load_units(layout, sk.to_load)
        assert sum(block_loader.unit_bytes(sk, units)) > 0
        staging = block_loader.staging_bytes(sk, units, cpu)
        block_loader.materialise(sk, block_loader.LoadJob(units, cpu, ring_bytes=staging))
    ref = load_model(_spec(base_checkpoint, "nf4"))
    assert torch.equal(logits(block_loader.finish(sk)), logits(ref.model))


@pytest.mark.gpu
def test_gpu_load_makes_its_ring_while_the_skeleton_is_built(base_checkpoint: Path) -> None:
    st = load_model(_spec(base_checkpoint, "nf4", multi_gpu="off")).load_stats
    assert st.ring_ahead and st.ring_seconds > 0, st.describe()
    assert 0 < st.reads < st.tensors


def test_reader_keeps_the_kernel_reading_ahead_and_restarts_the_window_after_a_jump(tmp_path: Path) -> None:
    """posix_fadvise(WILLNEED) windows: one READ_AHEAD past each read, extended only once half of it is used,
    a new window where a read jumps back in the file."""
    import os

    from hunyuan_image3.hunyuan_loader.checkpoint import reader as tr

    f = tmp_path / "data.bin"
    f.write_bytes(b"\0" * 4096)
    reader = TensorReader([], window=1 << 20)
    fd = os.open(f, os.O_RDONLY)
    try:
        ahead = tr.READ_AHEAD
        reader._advise(fd, 1000)
        assert reader._advised[fd] == (1000, 1000 + ahead)
        reader._advise(fd, 2000)  # still more than half a window ahead: no new call
        assert reader._advised[fd] == (1000, 1000 + ahead)
        reader._advise(fd, 1000 + ahead // 2 + 1)
        assert reader._advised[fd] == (1000, 1000 + ahead // 2 + 1 + ahead)
        reader._advise(fd, 10)  # a jump back: a new window from there
        assert reader._advised[fd] == (10, 10 + ahead)
    finally:
        os.close(fd)
        reader.close()



# -- reading while the skeleton is built (loads that quantize nothing) ------------------------------
def _reads_during_skeleton(monkeypatch) -> tuple[list[str], list[bool]]:
    """(tensor names read, one flag per skeleton build: whether a read had begun before it returned).
    The skeleton waits up to 10 s for a first read, so the flag does not depend on thread timing."""
    reads: list[str] = []
    seen: list[bool] = []
    orig_read, build = TensorReader._read_run, block_loader.build_skeleton

    def counting(self, entries, raws):
        reads.extend(e.name for e in entries)
        return orig_read(self, entries, raws)

    def spy(*args, **kwargs):
        sk = build(*args, **kwargs)
        deadline = time.monotonic() + 10
        while not reads and time.monotonic() < deadline:
            time.sleep(0.005)
        seen.append(bool(reads))
        return sk

    monkeypatch.setattr(TensorReader, "_read_run", counting)
    monkeypatch.setattr(block_loader, "build_skeleton", spy)
    return reads, seen


@pytest.mark.parametrize(("quant", "fmt", "pre"), [("bf16", "w8a16", False), ("nf4", "w8a16", True),
                                                   ("int8", "w8a16", True), ("nf4", "w8a16", False)])
def test_a_load_that_quantizes_nothing_reads_while_the_skeleton_is_built(
        base_checkpoint: Path, tmp_path: Path, monkeypatch, quant: str, fmt: str, pre: bool, one_thread) -> None:
    """bf16 and pre-quantized loads: planned from the headers, then the reader starts and reads while
    the skeleton is built; the model is the same as the skeleton-first order gives. A load that
    quantizes (nf4 from BF16) needs the skeleton for its sizes: nothing is read before it is built."""
    from hunyuan_image3.hunyuan_loader.load.pipeline import save_quantized_copy

    path, fresh = base_checkpoint, None
    if pre:
        fresh = load_model(_spec(base_checkpoint, quant, fmt))
        path = save_quantized_copy(fresh, tmp_path / f"{quant}-pre")
    reads, seen = _reads_during_skeleton(monkeypatch)
    ours = load_model(_spec(path, quant, fmt))
    quantizes = quant != "bf16" and not pre
    assert seen == [not quantizes] and ours.load_stats.read_early is (not quantizes), ours.load_stats.describe()
    assert sorted(reads) == sorted(read_layout(validate_checkpoint(path).shard_files))  # each tensor once
    monkeypatch.undo()
    if fresh is None:  # the skeleton-first order of from_pretrained
        ref = load_model(_spec(path, quant, fmt), engine="from_pretrained")
        assert differences(ours.model, ref.model) == []
    else:  # the load the copy was written from
        ref = fresh
    assert torch.equal(logits(ours.model), logits(ref.model))


def test_the_header_plan_refuses_before_the_skeleton_and_any_read(base_checkpoint: Path, monkeypatch) -> None:
    """A bf16 load whose plan the machine cannot hold is refused from the headers: no skeleton built
    (the model's code never runs), no byte read, no reader thread left."""
    import threading

    reads, seen = _reads_during_skeleton(monkeypatch)
    monkeypatch.setenv("HUNYUAN_RAM_LIMIT_GB", "0.01")
    with pytest.raises(NotEnoughRAMError, match="Nothing was read"):
        load_model(_spec(base_checkpoint, "bf16"))
    assert reads == [] and seen == []
    assert not [t for t in threading.enumerate() if t.name == "hunyuan-tensor-reader"]


def test_a_skeleton_that_fails_while_reading_leaves_no_reader(base_checkpoint: Path, monkeypatch) -> None:
    """The model's code raises while the reader runs ahead: the error reaches the caller, the reader
    thread has stopped and its tensors are freed; the next load works."""
    import threading

    build, start = block_loader.build_skeleton, block_loader.start_reader
    readers: list[TensorReader] = []
    started: list[bool] = []

    def recording(*args, **kwargs):
        readers.append(start(*args, **kwargs))
        return readers[-1]

    def failing(*args, **kwargs):
        # the reader was started and not closed (its thread may already have read the few-MB checkpoint)
        started.append(len(readers) == 1 and not readers[0]._stop)
        raise RuntimeError("the model's code failed")

    monkeypatch.setattr(block_loader, "start_reader", recording)
    monkeypatch.setattr(block_loader, "build_skeleton", failing)
    with pytest.raises(RuntimeError, match="the model's code failed"):
        load_model(_spec(base_checkpoint, "bf16"))
    assert started == [True]
    assert readers[0]._stop and not readers[0]._thread.is_alive()  # closed, its thread joined
    assert not [t for t in threading.enumerate() if t.name == "hunyuan-tensor-reader"]
    monkeypatch.setattr(block_loader, "build_skeleton", build)
    assert load_model(_spec(base_checkpoint, "bf16")).model is not None


def test_a_checkpoint_tensor_the_model_does_not_use_falls_back_to_the_skeleton_order(
        base_checkpoint: Path, tmp_path: Path, one_thread) -> None:
    """An extra tensor in the checkpoint (transformers leaves it out): the reader started from the
    headers reads other tensors than the model loads, so it is closed and the load reads in the
    skeleton's order; same model as without the extra tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "extra"
    shutil.copytree(base_checkpoint, copy)
    shard = sorted(copy.glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    tensors["model.not_a_module.weight"] = torch.ones(4, 4, dtype=torch.bfloat16)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = copy / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"]["model.not_a_module.weight"] = shard.name
        index.write_text(json.dumps(data))
    ours = load_model(_spec(copy, "bf16"))
    assert not ours.load_stats.read_early, ours.load_stats.describe()
    assert torch.equal(logits(ours.model), logits(load_model(_spec(base_checkpoint, "bf16")).model))


@pytest.mark.gpu
def test_gpu_pre_quantized_load_reads_while_the_skeleton_is_built(base_checkpoint: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    from hunyuan_image3.hunyuan_loader.load.pipeline import save_quantized_copy

    fresh = load_model(_spec(base_checkpoint, "nf4", multi_gpu="off"))
    path = save_quantized_copy(fresh, tmp_path / "nf4-pre")
    reads, seen = _reads_during_skeleton(monkeypatch)
    ours = load_model(_spec(path, "nf4", multi_gpu="off"))
    st = ours.load_stats
    assert seen == [True] and st.read_early and st.ring_ahead, st.describe()
    assert torch.equal(logits(ours.model), logits(fresh.model))


@pytest.mark.parametrize(("quant", "pre"), [("bf16", False), ("nf4", True), ("int8", True)])
def test_header_sizes_bound_the_placed_sizes(base_checkpoint: Path, tmp_path: Path, quant: str, pre: bool,
                                             one_thread) -> None:
    """The plan from the headers (loads that quantize nothing) can only refuse what the exact plan
    would: every tensor's header size is at least its placed size. This holds for the official code:
    it declares no ``_keep_in_fp32_modules`` (none in hunyuan_image_3/*.py, base @1d011c8 and Instruct
    @1ea1526), and its router is created float32 (hunyuan.py:1039 ``self.wg = nn.Linear(...,
    dtype=torch.float32)``, at ``mlp.gate.wg``: hunyuan.py:1088), which header_nbytes counts as float32."""
    from hunyuan_image3.hunyuan_loader.checkpoint.validate import loadable_path
    from hunyuan_image3.hunyuan_loader.load.pipeline import save_quantized_copy

    path = base_checkpoint
    if pre:
        path = save_quantized_copy(load_model(_spec(base_checkpoint, quant)), tmp_path / f"{quant}-pre")
    info = validate_checkpoint(path)
    layout = read_layout(info.shard_files)
    qconfig, pre_quantized = _qconfig(_spec(path, quant))
    assert qconfig is None and pre_quantized is pre  # the early path's loads
    sk = block_loader.build_skeleton(loadable_path(info), layout, quant, qconfig, torch.device("cpu"))
    assert not sk.model._keep_in_fp32_modules  # None on 4.57, an empty set on 5.x
    short = [(e.name, block_loader.header_nbytes(e), block_loader.placed_nbytes(sk, e)) for e in layout.values()
             if block_loader.header_nbytes(e) < block_loader.placed_nbytes(sk, e)]
    assert short == []
    # a router stored narrower than the float32 it is placed as is counted as float32
    router = next(e for e in layout.values() if e.name.endswith(".mlp.gate.wg.weight"))
    narrow = dataclasses.replace(router, dtype=torch.bfloat16, nbytes=router.nbytes // router.dtype.itemsize * 2)
    assert block_loader.header_nbytes(narrow) >= router.nbytes // router.dtype.itemsize * 4

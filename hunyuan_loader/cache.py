"""HunyuanModelCache: the one owner of loaded weights in the process.

Nodes pass a light ModelHandle; `get_cache().get(handle)` returns the live model,
reloading it if something dropped it and bringing it back if it was soft-unloaded.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..memory import stats
from ..memory.unload import UnloadReport, collect_garbage, nuke_orphans
from .core import settings
from .core.spec import LoadedModel, LoadSpec
from .generation import CancelFn, GenerationRequest, GenerationResult, ProgressFn, generate
from .load.pipeline import load_model
from .preview.stream import PreviewFn

log = logging.getLogger(__name__)

_load_counter = itertools.count(1)


@dataclass(frozen=True)
class ModelHandle:
    """What flows between nodes (type HUNYUAN_IMAGE3): a spec, never a tensor."""

    spec: LoadSpec
    load_id: int = 0

    def __repr__(self) -> str:
        return f"HunyuanImage3({self.spec.describe()})"


class HunyuanModelCache:
    """Holds at most one loaded model; loading another spec replaces it cleanly."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.loaded: LoadedModel | None = None
        self.load_count = 0  # how many loads from disk this process did
        self._load_id = 0

    # -- loading -----------------------------------------------------------------
    def load(
        self,
        spec: LoadSpec,
        *,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], None] | None = None,
    ) -> ModelHandle:
        """Load ``spec`` unless it is already cached; return its handle.

        ``progress(bytes_read, bytes_total)`` follows the read; ``cancel()`` is checked between
        blocks (it raises to stop, and nothing stays loaded)."""
        with self._lock:
            if self.loaded is not None and self.loaded.spec == spec:
                return ModelHandle(spec, self._load_id)
            if self.loaded is not None:
                log.info("replacing %s with %s", self.loaded.spec.describe(), spec.describe())
                self._drop()
            self.loaded = load_model(spec, progress=progress, cancel=cancel)
            self.load_count += 1
            self._load_id = next(_load_counter)
            return ModelHandle(spec, self._load_id)

    def handle(self, spec: LoadSpec) -> ModelHandle:
        """What a loader node returns: ``spec`` checked at once (load/check.py: folder, config.json,
        variant, weight format, the plan against this machine's memory), nothing loaded. The weights
        load when ``get`` first needs them (Generate, after its own checks). A spec this cache holds
        loaded already is not checked again."""
        from .load.check import check_load

        with self._lock:
            if self.loaded is not None and self.loaded.spec == spec:
                return ModelHandle(spec, self._load_id)
        check_load(spec)
        return ModelHandle(spec)

    def get(
        self,
        handle: ModelHandle,
        *,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], None] | None = None,
    ) -> LoadedModel:
        """The live model for a handle: loaded if it is not (``progress`` / ``cancel`` as in ``load``),
        restored if soft-unloaded."""
        with self._lock:
            if self.loaded is None or self.loaded.spec != handle.spec:
                self.load(handle.spec, progress=progress, cancel=cancel)
            assert self.loaded is not None
            residency = self.loaded.residency
            if residency is not None and residency.state == "parked":
                residency.restore()
            return self.loaded

    @contextlib.contextmanager
    def prepare_run(
        self,
        handle: ModelHandle,
        size: tuple[int, int] | Callable[[LoadedModel], tuple[int, int]],
        notes: list[str],
        *,
        make_room: Callable[[int], object] | None = None,
        extra_margin: bool = False,
        extra_tokens: int = 0,
    ) -> Iterator[LoadedModel]:
        """Everything one Generate needs before it runs, in one call: room for the weights to come
        back (``make_room``: ComfyUI's own models yield first), the model live (reloaded /
        restored), then the offload policy's run placement (room for the activations, extra
        blocks streamed for this run, restored afterwards). ``size`` is (width, height) or a
        function of the live model (its snapped size)."""
        from .load.per_run import run_placement

        loaded = self.bring_back(handle, make_room)
        target = size(loaded) if callable(size) else size
        with run_placement(loaded, target, notes, extra_margin=extra_margin, make_room=make_room,
                           extra_tokens=extra_tokens):
            yield loaded

    def bring_back(
        self,
        handle: ModelHandle,
        make_room: Callable[[int], object] | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], None] | None = None,
    ) -> LoadedModel:
        """The live model for ``handle`` (loaded / restored from RAM), after ``make_room(bytes)``
        let ComfyUI's own models give back the VRAM its weights need."""
        with self._lock:
            if make_room is not None:
                make_room(self.bytes_to_bring_back(handle))
            return self.get(handle, progress=progress, cancel=cancel)

    def generate(
        self,
        handle: ModelHandle,
        req: GenerationRequest,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
        make_room: Callable[[int], object] | None = None,
        load_progress: Callable[[int, int], None] | None = None,
        preview: PreviewFn | None = None,
    ) -> GenerationResult:
        """The one call a Generate node makes, after its checks: the model loaded if it is not yet
        (``load_progress(bytes read, bytes total)``, ``cancel`` between blocks) or brought back
        (``make_room(bytes)`` lets ComfyUI's own models yield first), then ``generation.generate``, where
        the offload policy places each attempt (node -> cache -> generation -> policy -> residency).
        ``preview``: see ``generation.generate``."""
        loads = self.load_count
        loaded = self.bring_back(handle, make_room, progress=load_progress, cancel=cancel)
        load_note = [f"loaded in {loaded.load_seconds:.1f} s before this run"] \
            if self.load_count != loads else []
        result = generate(loaded, req, progress, cancel, preview=preview,
                          preview_every=settings.get(settings.PREVIEW_EVERY), make_room=make_room)
        result.notes[:0] = load_note
        return result

    def save_quantized_copy(
        self, handle: ModelHandle, dest: Path, progress: Callable[[int, int], None] | None = None
    ) -> Path | None:
        """Write the cached int8/nf4 model as a pre-quantized checkpoint at ``dest`` (the loaders'
        save option, right after loading). None when there is nothing to do: ``dest`` exists
        already, the model is bf16, or its checkpoint is pre-quantized itself."""
        from .checkpoint.prequantized import save_prequantized
        from .formats.builtin import for_load

        with self._lock:
            loaded = self.get(handle)
            if not for_load(loaded.spec.quant, loaded.spec.int8_format).quantized \
                    or loaded.info.config.get("quantization_config"):
                return None
            if Path(dest).exists():
                log.info("quantized copy %s exists already: not written again", dest)
                return None
            return save_prequantized(loaded.model, loaded.info.path, Path(dest), progress=progress)

    # -- memory ------------------------------------------------------------------
    def gpu_bytes(self) -> int:
        """Bytes of weights the cached model holds on the GPU now."""
        with self._lock:
            if self.loaded is None or self.loaded.residency is None:
                return 0
            return int(self.loaded.residency.gpu_bytes())

    def total_bytes(self) -> int:
        """Bytes of all weights of the cached model."""
        with self._lock:
            return 0 if self.loaded is None else int(self.loaded.info.weight_bytes)

    def bytes_to_bring_back(self, handle: ModelHandle) -> int:
        """GPU bytes that `get(handle)` will need: a reload or a restore from RAM (0 if resident)."""
        from .checkpoint.validate import validate_checkpoint
        from .load.placement import load_gpu_bytes

        with self._lock:
            loaded = self.loaded
            if loaded is not None and loaded.spec == handle.spec:
                residency = loaded.residency
                if residency is not None and residency.state == "parked" and residency.plan is not None:
                    return int(residency.plan.gpu_weight_bytes)
                return 0
        try:
            info = validate_checkpoint(handle.spec.path)
        except Exception:  # the load itself will report the problem
            return 0
        return load_gpu_bytes(handle.spec, info.weight_bytes,
                              pre_quantized=bool(info.config.get("quantization_config")))

    def free_gpu(self, bytes_to_free: int) -> int:
        """Give VRAM back (for ComfyUI's own models): park the model off the GPU. Returns bytes freed."""
        with self._lock:
            before = self.gpu_bytes()
            if before == 0 or bytes_to_free <= 0:
                return 0
            self.unload("park")
            return before - self.gpu_bytes()

    def unload(self, mode: str = "drop") -> str:
        """'drop': forget the model and free its memory; 'park': soft unload to CPU RAM."""
        with self._lock:
            if self.loaded is None:
                return "No HunyuanImage-3 model is loaded."
            name = self.loaded.spec.describe()
            if mode == "park":
                if self.loaded.residency is None:
                    if self.loaded.device.type == "cuda":  # offload mode "accelerate": its hooks own the weights
                        return (
                            f"Soft Unload is not available for {name}: accelerate's offload hooks keep its "
                            "weights where they are. Use Force Unload to free the GPU, or load with offload "
                            "mode smart, which soft-unloads to RAM and comes back in seconds."
                        )
                    return f"{name} is already in CPU RAM (no GPU in use)."
                from ..memory.residency import InsufficientRAMError

                try:
                    report = self.loaded.residency.park()
                except InsufficientRAMError as exc:  # nothing moved: say so, keep the model usable
                    log.warning("soft unload skipped: %s", exc)
                    return f"Soft Unload skipped for {name}: {exc}"
                collect_garbage(1)
                return (
                    f"Soft-unloaded {name}: {report.moved_bytes / stats.GIB:.2f} GiB parked in CPU RAM in "
                    f"{report.seconds:.1f} s ({report.freed_bytes / stats.GIB:.2f} GiB of VRAM freed); "
                    "it comes back on the next Generate."
                )
            self._drop()
            collect_garbage()
            return f"Dropped {name}."

    def force_unload(self, nuke_orphaned_tensors: bool = False) -> UnloadReport:
        """Drop the cache, optionally hunt orphaned HunyuanImage-3 tensors, free everything."""
        from ..memory.devices import allocated_by_device, describe_allocated_change

        with self._lock:
            before = stats.snapshot()
            per_device = allocated_by_device()  # issue 13 hook: every GPU, not only the current one
            dropped = self.loaded.spec.describe() if self.loaded is not None else "nothing cached"
            self._drop()
            frames = orphan_bytes = 0
            if nuke_orphaned_tensors:
                frames, orphan_bytes = nuke_orphans(live=())
            collect_garbage()
            report = UnloadReport(before, stats.snapshot(), dropped, frames, orphan_bytes)
            if len(per_device) > 1:
                report.notes += ["Per GPU: " + "; ".join(describe_allocated_change(per_device, allocated_by_device()))]
            return report

    def _drop(self) -> None:
        loaded, self.loaded = self.loaded, None
        if loaded is None:
            return
        if loaded.residency is not None:
            loaded.residency.close()
        loaded.model = None
        loaded.residency = None
        del loaded
        from .kernels.w8a16_dequant import clear_tables

        clear_tables()  # the grouped MoE's offset tables of this model's experts (small GPU tensors)


_cache = HunyuanModelCache()


def get_cache() -> HunyuanModelCache:
    """The process-wide model cache."""
    return _cache

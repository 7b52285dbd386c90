"""One ResidencyManager per loaded model: apply plans, stream, park (soft unload), restore."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .. import stats
from .packed import HostBuffer, Layout, PackedBlock
from .planner import Placement, ResidencyPlan, plan_placement
from .protocol import ParkReport, ResidencyState
from .ram import GIB, check_ram
from .streaming import BlockStreamer, StreamingUnavailableError
from .weights import WeightTensor, move_weight_tensors, weight_tensors, weights_bytes

log = logging.getLogger(__name__)


class ResidencyManager:
    """Owns where a model's weights live: GPU, streamed from pinned RAM, or parked in RAM.

    ``blocks`` are the decoder blocks (``model.model.layers``); everything else in
    ``model`` is "other" and is always resident while not parked.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        *,
        prefetch_slots: int = 2,
        ram_margin_bytes: int = GIB,
        allow_cpu_streaming: bool = False,
    ) -> None:
        self._setup(model, blocks, device, prefetch_slots, ram_margin_bytes, allow_cpu_streaming)
        self._walk = None  # it references every weight tensor: a move or a strip must be able to free them

    def _setup(self, model: nn.Module, blocks: Sequence[nn.Module], device: torch.device | str, prefetch_slots: int,
               ram_margin_bytes: int, allow_cpu_streaming: bool) -> None:
        """The construction; leaves its walk of the weight tensors in ``self._walk`` (see adopt)."""
        self.model = model
        self.blocks = list(blocks)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.prefetch_slots = prefetch_slots
        self.ram_margin_bytes = ram_margin_bytes
        self.allow_cpu_streaming = allow_cpu_streaming  # tests: run the streamer synchronously on CPU
        in_blocks = {id(m) for b in self.blocks for m in b.modules()}
        self._other = [m for m in model.modules() if id(m) not in in_blocks]
        self._walk: tuple[list[list[WeightTensor]], list[WeightTensor]] | None = self._walk_weights()
        block_tensors, other_tensors = self._walk
        self.block_bytes = [Layout.of(t).total for t in block_tensors]
        self.other_bytes = weights_bytes(other_tensors)
        self._packed: dict[int, PackedBlock] = {}
        self._other_packed: PackedBlock | None = None
        self._streamer: BlockStreamer | None = None
        # set by whoever orders the model's hooks (hunyuan_loader's hook registry): told of each
        # streamer made (True; it attaches its hooks) and closed (False); None: the streamer attaches itself
        self.on_streamer: Callable[[BlockStreamer, bool], None] | None = None
        self._parked = False
        self.plan: ResidencyPlan | None = None
        self._release_thread: threading.Thread | None = None
        self.last_release_s = 0.0
        if all(self._on_device(t) for t in block_tensors) and self._on_device(other_tensors):
            self.plan = ResidencyPlan.uniform(
                Placement.GPU, self.block_bytes, self.other_bytes, prefetch_slots=prefetch_slots
            )

    @classmethod
    def adopt(
        cls,
        model: nn.Module,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        packed: Mapping[int, PackedBlock],
        plan_for: Callable[[ResidencyManager], ResidencyPlan],
        *,
        prefetch_slots: int = 2,
        ram_margin_bytes: int = GIB,
        allow_cpu_streaming: bool = False,
    ) -> ResidencyManager:
        """A manager for a model a loader has just placed (resident blocks and the rest on the
        device, streamed ones already ``packed`` in their pinned buffers), with the plan
        ``plan_for(manager)`` applied: the same as ``ResidencyManager(...)``, ``adopt_packed``,
        ``apply``, but the walk over every weight tensor that sizes the blocks also serves
        ``apply`` (nothing can change the model in between): one walk instead of three (a walk
        takes ~16 ms per 4,000 NF4 tensors on a 2-core CPU; the real model has ~26,000)."""
        mgr = cls.__new__(cls)
        try:
            mgr._setup(model, blocks, device, prefetch_slots, ram_margin_bytes, allow_cpu_streaming)
            mgr.adopt_packed(packed)
            mgr.apply(plan_for(mgr))
        finally:
            mgr._walk = None
        return mgr

    def _walk_weights(self) -> tuple[list[list[WeightTensor]], list[WeightTensor]]:
        """Every block's weight tensors, and the other modules'."""
        return [weight_tensors(b) for b in self.blocks], weight_tensors(self._other)

    def _tensors(self, block: int | None) -> list[WeightTensor]:
        """Weight tensors of a block (None: the other modules): the construction's walk inside
        ``adopt``, else a fresh one."""
        if self._walk is not None:
            return self._walk[1] if block is None else self._walk[0][block]
        return weight_tensors(self._other) if block is None else weight_tensors(self.blocks[block])

    # -- queries -----------------------------------------------------------------------------
    def _on_device(self, tensors) -> bool:
        return all(w.tensor.device == self.device for w in tensors)

    @property
    def state(self) -> ResidencyState:
        if self._parked:
            return ResidencyState.PARKED
        return ResidencyState.STREAMING if self._streamer is not None else ResidencyState.RESIDENT

    def gpu_bytes(self) -> int:
        """Weight bytes this model holds on the compute device now (slots included)."""
        if self._parked or self.plan is None:
            return 0
        return self.plan.gpu_weight_bytes

    def gpu_bytes_by_device(self) -> dict[str, int]:
        return {str(self.device): self.gpu_bytes()}

    def describe(self) -> str:
        return self.plan.describe() if self.plan is not None else f"no plan applied on {self.device}"

    def extra_needed(self, need: int, notes: list[str] | None = None) -> tuple[int, int]:
        """For one run: the usable VRAM (``memory.stats.usable_vram``: the current GPU, within
        HUNYUAN_VRAM_LIMIT_GB) and the activation bytes ``need`` short of it."""
        available = stats.usable_vram()
        return available, max(0, int(need) - available)

    def plan_for_budget(self, budget_bytes: int, headroom_bytes: int, *, min_streamed: int = 0) -> ResidencyPlan:
        return plan_placement(
            self.block_bytes, self.other_bytes, budget_bytes, headroom_bytes,
            prefetch_slots=self.prefetch_slots, min_streamed=min_streamed,
        )

    @property
    def streamer(self) -> BlockStreamer | None:
        return self._streamer

    # -- transitions -------------------------------------------------------------------------
    def adopt_packed(self, packed: Mapping[int, PackedBlock]) -> None:
        """Take blocks that a loader already packed into their pinned buffers (block-order
        loading streams them straight there); the next ``apply`` streams them as they are."""
        for i, pb in packed.items():
            if not 0 <= i < len(self.blocks):
                raise ValueError(f"packed block {i} is not one of the {len(self.blocks)} blocks")
            self._packed[i] = pb

    def _check_streaming(self, plan: ResidencyPlan) -> None:
        if plan.streamed and self.device.type != "cuda" and not self.allow_cpu_streaming:
            raise StreamingUnavailableError(
                f"the plan streams {len(plan.streamed)} blocks but weight streaming needs a CUDA GPU "
                f"(device is {self.device}, torch.cuda.is_available()={torch.cuda.is_available()}); "
                "on this machine every block stays resident on the CPU"
            )

    @property
    def managers(self) -> list[ResidencyManager]:
        """The managers of this residency (one here; several for a split over devices)."""
        return [self]

    def _start_streamer(self, plan: ResidencyPlan) -> None:
        """A streamer for ``plan``'s streamed blocks (they are packed), its hooks attached."""
        notify = self.on_streamer
        self._streamer = BlockStreamer(self.blocks, {i: self._packed[i] for i in plan.streamed}, self.device,
                                       plan.n_slots, attach=notify is None)
        if notify is not None:
            notify(self._streamer, True)

    def _close_streamer(self) -> None:
        if self._streamer is not None:
            if self.on_streamer is not None:
                self.on_streamer(self._streamer, False)
            self._streamer.close()
            self._streamer = None

    def apply(self, plan: ResidencyPlan, *, available_ram_bytes: int | None = None) -> None:
        """Move blocks so that ``plan`` holds; non-block modules go to the device."""
        if len(plan.placements) != len(self.blocks):
            raise ValueError(f"plan has {len(plan.placements)} blocks, model has {len(self.blocks)}")
        if any(p is Placement.CPU for p in plan.placements):
            raise ValueError("use park() to put blocks in CPU RAM")
        self._check_streaming(plan)
        to_pack = [i for i in plan.streamed if i not in self._packed]
        self.wait_released()
        check_ram(
            sum(self.block_bytes[i] for i in to_pack), "stream blocks from pinned CPU RAM",
            available_bytes=available_ram_bytes, margin_bytes=self.ram_margin_bytes,
        )
        t0 = time.perf_counter()
        self._close_streamer()
        pin = self.device.type == "cuda"
        freed: list[HostBuffer] = []
        leaving_gpu = [i for i in to_pack if self._on_device(self._tensors(i))]
        for i in leaving_gpu:  # free VRAM before anything comes in
            self._packed[i] = PackedBlock(self._tensors(i), pin=pin)
        if self._other_packed is not None:
            freed.append(self._other_packed.unpack_to(self.device, non_blocking=True))
            self._other_packed = None
        else:
            move_weight_tensors(self._tensors(None), self.device)
        for i in plan.resident:
            pb = self._packed.pop(i, None)
            if pb is not None:
                freed.append(pb.unpack_to(self.device, non_blocking=True))
            else:
                move_weight_tensors(self._tensors(i), self.device)
        for i in to_pack:
            if i not in self._packed:  # from CPU (e.g. mmap'd safetensors): straight into pinned RAM
                self._packed[i] = PackedBlock(self._tensors(i), pin=pin)
        if plan.streamed:
            self._start_streamer(plan)
        self.plan = plan
        self._parked = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._release_later(freed)
        log.info("residency: %s (%.2f s)", plan.describe(), time.perf_counter() - t0)

    def _release_later(self, buffers: list[HostBuffer]) -> None:
        """Unpin and free host buffers off the critical path (cudaHostUnregister takes time)."""
        if not buffers:
            return

        def run() -> None:
            t0 = time.perf_counter()
            buffers.clear()
            self.last_release_s = time.perf_counter() - t0

        self.wait_released()
        self._release_thread = threading.Thread(target=run, name="residency-unpin", daemon=True)
        self._release_thread.start()

    def wait_released(self) -> None:
        """Wait until host buffers dropped by the last apply/restore are unpinned and freed."""
        if self._release_thread is not None:
            self._release_thread.join()
            self._release_thread = None

    def park(self, *, pin: bool = True, available_ram_bytes: int | None = None) -> ParkReport:
        """Soft unload: every weight to CPU RAM (pinned where possible), GPU freed and verified.

        Checks free RAM first; if the weights do not fit, raises InsufficientRAMError and
        moves nothing.
        """
        if self._parked:
            return ParkReport(0, 0, 0.0)
        self.wait_released()
        resident = [i for i in range(len(self.blocks)) if i not in self._packed]
        need = sum(self.block_bytes[i] for i in resident) + self.other_bytes
        check_ram(need, "park the model in CPU RAM", available_bytes=available_ram_bytes,
                  margin_bytes=self.ram_margin_bytes)
        cuda = self.device.type == "cuda"
        t0 = time.perf_counter()
        if cuda:
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
        self._close_streamer()
        pin = pin and torch.cuda.is_available()
        done: list[int] = []
        try:
            for i in resident:
                self._packed[i] = PackedBlock(weight_tensors(self.blocks[i]), pin=pin)
                done.append(i)
            self._other_packed = PackedBlock(weight_tensors(self._other), pin=pin)
        except BaseException:
            log.error("park failed; moving %d blocks back to %s", len(done), self.device)
            for i in done:
                self._packed.pop(i).unpack_to(self.device)  # its host buffer is dropped here
            if self.plan is not None and self.plan.streamed:
                self._start_streamer(self.plan)
            raise
        self._parked = True
        freed = 0
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            after = torch.cuda.memory_allocated(self.device)
            freed = before - after
            left = [w for w in weight_tensors(self.model) if w.tensor.device.type == "cuda"]
            if left:
                raise RuntimeError(f"park left {len(left)} weight tensors on the GPU ({weights_bytes(left)} bytes)")
            expected = self.plan.gpu_weight_bytes if self.plan is not None else need
            if freed < 0.9 * expected:
                log.warning(
                    "park freed only %.2f GiB of %.2f GiB expected (%.2f GiB still allocated): "
                    "something else holds GPU tensors", freed / GIB, expected / GIB, after / GIB,
                )
        report = ParkReport(need, freed, time.perf_counter() - t0)
        log.info("parked %.2f GiB in %.2f s (GPU freed %.2f GiB)", need / GIB, report.seconds, freed / GIB)
        return report

    def restore(self, *, available_ram_bytes: int | None = None) -> float:
        """Bring the model back to the last plan (from pinned RAM); returns seconds."""
        plan = self.plan or ResidencyPlan.uniform(
            Placement.GPU, self.block_bytes, self.other_bytes, prefetch_slots=self.prefetch_slots
        )
        t0 = time.perf_counter()
        self.apply(plan, available_ram_bytes=available_ram_bytes)
        return time.perf_counter() - t0

    @contextlib.contextmanager
    def stream_extra(self, bytes_needed: int) -> Iterator[ResidencyPlan]:
        """Stream just enough more blocks to free ``bytes_needed`` for one run, then restore."""
        prev = self.plan
        if prev is None or self._parked:
            raise RuntimeError("stream_extra needs an applied plan (call apply/restore first)")
        budget = prev.budget_bytes if prev.budget_bytes is not None else prev.gpu_bytes
        new = plan_placement(
            self.block_bytes, self.other_bytes, budget, prev.headroom_bytes + int(bytes_needed),
            prefetch_slots=self.prefetch_slots, min_streamed=len(prev.streamed),
        )
        if new.placements == prev.placements:
            yield prev
            return
        self.apply(new)
        try:
            yield new
        finally:
            if self._streamer is not None:
                self._streamer.reset()
            self.apply(prev)

    def close(self) -> None:
        """Remove hooks, free the slots and page-unlock the CPU copies (data stays valid)."""
        self._close_streamer()
        self.wait_released()
        for pb in [*self._packed.values(), *([self._other_packed] if self._other_packed else [])]:
            if pb.host is not None:
                pb.host.unpin()


def place_loaded_model(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    device: torch.device | str,
    *,
    budget_bytes: int | None = None,
    headroom_bytes: int = 0,
    plan: ResidencyPlan | None = None,
    prefetch_slots: int = 2,
    available_ram_bytes: int | None = None,
    **manager_kwargs,
) -> ResidencyManager:
    """After transformers loaded a model on the CPU (mmap'd safetensors), place it.

    Non-block modules and resident blocks go to ``device``; streamed blocks are copied
    from the mmap'd tensors straight into their pinned block buffer (the mmap reference
    is dropped). Free RAM is checked first. Without a budget every block is resident.
    """
    mgr = ResidencyManager(model, blocks, device, prefetch_slots=prefetch_slots, **manager_kwargs)
    if plan is None:
        if budget_bytes is None:
            plan = ResidencyPlan.uniform(Placement.GPU, mgr.block_bytes, mgr.other_bytes,
                                         prefetch_slots=prefetch_slots)
        else:
            plan = mgr.plan_for_budget(budget_bytes, headroom_bytes)
    mgr.apply(plan, available_ram_bytes=available_ram_bytes)
    return mgr

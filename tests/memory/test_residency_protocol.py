"""One residency interface (memory/residency/protocol.py) for one device, a split over several and
CFG-parallel replicas: every kind defines every member itself, and the offload policy's run step
asks none of them which kind it is (no hasattr: ``extra_needed`` on all)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from residency_models import inputs, make_model

from hunyuan_image3.hunyuan_loader.hooks.cfg_parallel import CfgParallelResidency
from hunyuan_image3.hunyuan_loader.hooks.split_exec import SplitResidency
from hunyuan_image3.memory import devices as dv
from hunyuan_image3.memory import stats
from hunyuan_image3.memory.residency import Residency, ResidencyManager
from hunyuan_image3.memory.residency.multi import MultiDeviceResidency

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = sorted(n for n in {*Residency.__annotations__, *vars(Residency)}
                 if not n.startswith("_") and n not in {"register"})


def _defines(cls: type, name: str) -> bool:
    """Whether ``cls`` (or a base below the protocol) has ``name`` as a class member or sets it in
    an ``__init__`` / ``_setup``."""
    for klass in cls.__mro__:
        if klass in (object, Residency):
            continue
        if name in vars(klass):
            return True
        for fn in ("__init__", "_setup"):
            body = vars(klass).get(fn)
            if body is not None and re.search(rf"self\.{name}\s*(:[^=]*)?=", inspect.getsource(body)):
                return True
    return False


def test_the_protocol_names_what_the_callers_use() -> None:
    assert {"device", "plan", "state", "managers", "block_bytes", "other_bytes", "prefetch_slots", "gpu_bytes",
            "gpu_bytes_by_device", "describe", "extra_needed", "stream_extra", "apply", "park", "restore",
            "wait_released", "close"} <= set(MEMBERS)


@pytest.mark.parametrize("cls", [ResidencyManager, MultiDeviceResidency, SplitResidency, CfgParallelResidency])
def test_every_residency_kind_implements_every_member(cls: type) -> None:
    missing = [n for n in MEMBERS if not _defines(cls, n)]
    assert not missing, f"{cls.__name__} lacks {missing}"


def test_one_device_and_a_split_are_residencies_and_answer_extra_needed(monkeypatch) -> None:
    model = make_model("bf16", n=4)
    one = ResidencyManager(model, model.model.layers, "cpu")
    assert isinstance(one, Residency)
    monkeypatch.setattr(stats, "usable_vram", lambda: 100)  # what the one-device policy measured before
    assert one.extra_needed(150) == (100, 50)
    assert one.extra_needed(60) == (100, 0)
    assert one.gpu_bytes_by_device() == {"cpu": one.gpu_bytes()}
    assert one.managers == [one]
    one.close()

    blocks = list(model.model.layers)
    split = dv.plan_split([1] * 4, 0, ["cpu", "cpu"], [10**9, 10**9], 0)
    res = MultiDeviceResidency(model, blocks, split)
    assert isinstance(res, Residency)
    res.usable_by_device = lambda: [10**12, 7]
    assert res.extra_needed(10) == (7, 3)
    res.close()


def test_run_placement_asks_no_residency_what_it_is() -> None:
    source = (ROOT / "hunyuan_loader" / "load" / "per_run.py").read_text()
    assert "hasattr(" not in source and "isinstance(" not in source
    assert "manager.extra_needed(" in source


def test_a_split_model_still_runs_the_same() -> None:
    """The split residency built by the adopt step: same output as the model on one device."""
    model = make_model("bf16", n=4)
    with torch.no_grad():
        ref = model(inputs())
    split = dv.plan_split([1] * 4, 0, ["cpu", "cpu"], [10**9, 10**9], 0)
    res = SplitResidency(model, list(model.model.layers), split)
    res.apply_split()
    assert isinstance(res, Residency) and res.execution is not None
    with torch.no_grad():
        assert torch.equal(model(inputs()), ref)
    res.close()

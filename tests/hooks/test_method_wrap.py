"""MethodWrap (hooks/registry.py): one method wrapped on one instance, restored exactly on detach."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from hunyuan_image3.hunyuan_loader.hooks.registry import MethodWrap, registry


class Scheduler:
    def step(self, x: int) -> int:
        return x + 1


class Log(MethodWrap):
    """Records each call under its tag, then calls the method it wraps."""

    def __init__(self, target: Any, name: str, tag: str, calls: list[str]) -> None:
        super().__init__(target, name)
        self.tag, self.calls = tag, calls

    def wrap(self, original):
        def logged(*args, **kwargs):
            self.calls.append(self.tag)
            return original(*args, **kwargs)

        return logged


def _state(obj: Any) -> dict[str, Any]:
    return dict(vars(obj))


def test_detach_leaves_nothing_when_the_instance_had_no_attribute():
    sched, other, calls = Scheduler(), Scheduler(), []
    before = _state(sched)
    wrap = Log(sched, "step", "a", calls)
    wrap.attach()
    assert "step" in vars(sched) and wrap.attached
    assert sched.step(1) == 2 and other.step(1) == 2 and calls == ["a"]  # the other instance is untouched
    wrap.detach()
    assert _state(sched) == before and not wrap.attached
    assert sched.step.__func__ is Scheduler.step  # the class's method shows through again
    sched.step(1)
    assert calls == ["a"]


def test_detach_restores_the_instance_attribute_that_was_there():
    sched, calls = Scheduler(), []

    def own(x: int) -> int:
        return x * 10

    sched.step = own
    wrap = Log(sched, "step", "a", calls)
    wrap.attach()
    assert sched.step(2) == 20 and calls == ["a"]
    wrap.detach()
    assert vars(sched)["step"] is own


def test_attaching_twice_is_refused_and_changes_nothing():
    sched = Scheduler()
    wrap = Log(sched, "step", "a", [])
    wrap.attach()
    current = vars(sched)["step"]
    with pytest.raises(RuntimeError, match="already wrapped"):
        wrap.attach()
    assert vars(sched)["step"] is current
    wrap.detach()
    wrap.detach()  # a second detach is a no-op
    assert "step" not in vars(sched)
    wrap.attach()  # and it may be attached again after a detach
    wrap.detach()
    assert "step" not in vars(sched)


@pytest.mark.parametrize("order", ["last_first", "first_first"])
def test_nested_wraps_come_off_cleanly_in_either_order(order):
    sched, calls = Scheduler(), []
    inner, outer = Log(sched, "step", "inner", calls), Log(sched, "step", "outer", calls)
    inner.attach()
    outer.attach()
    assert sched.step(0) == 1 and calls == ["outer", "inner"]
    first, second = (outer, inner) if order == "last_first" else (inner, outer)
    first.detach()
    calls.clear()
    sched.step(0)
    assert calls == ["outer" if first is inner else "inner"]  # the detached one stopped acting at once
    second.detach()
    assert "step" not in vars(sched)


def test_a_detached_wrap_under_another_is_skipped_down_to_the_original_attribute():
    sched, calls = Scheduler(), []

    def own(x: int) -> int:
        return -x

    sched.step = own
    a, b, c = (Log(sched, "step", tag, calls) for tag in "abc")
    for w in (a, b, c):
        w.attach()
    b.detach()
    a.detach()
    c.detach()
    assert vars(sched)["step"] is own


def test_a_module_forward_wrap_gives_the_official_forward_back():
    layer = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    expected = layer(x)
    calls: list[str] = []
    wrap = Log(layer, "forward", "f", calls)
    wrap.attach()
    assert torch.equal(layer(x), expected) and calls == ["f"]
    wrap.detach()
    assert "forward" not in vars(layer) and torch.equal(layer(x), expected) and calls == ["f"]


def test_registry_remove_all_of_the_per_call_step_wraps_leaves_nothing():
    """generation installs diffusion_preview, then diffusion_progress around it; remove_all takes them off
    in reverse HOOK_ORDER (the preview, the inner one, first)."""

    class Model:
        pass

    model, sched, calls = Model(), Scheduler(), []
    reg = registry(model)
    reg.install("diffusion_preview", Log(sched, "step", "preview", calls))
    reg.install("diffusion_progress", Log(sched, "step", "progress", calls))
    sched.step(0)
    assert calls == ["progress", "preview"]
    reg.remove_all()
    assert reg.names() == [] and "step" not in vars(sched)

"""HunyuanImage-3.0 resolution groups, per variant, and the size the model will really render.

The model's own image processor is the judge at run time (``rendered_size``): every size
snaps to a bucket of its resolution group, chosen by the nearest height/width ratio
(``argmin |r - h/w|``; official tokenizer_wrapper.py ResolutionGroup.get_target_size). Before
a model is loaded (input checks, the node's list) the same groups are computed here:
- base: 33 buckets, from the square by base_size // 16 until 2x / 0.5x, align 1
  (official base image_processor.py:53, tokenizer_wrapper.py:107-143);
- Instruct / Instruct-Distil: those 33 plus four extras appended in index order
  (1024x768, 1280x720, 768x1024, 720x1280 as HxW; align 16; Instruct image_processor.py:236).
``tests/model/test_model_interface.py`` checks these against the test checkpoint's image processor.
"""

from __future__ import annotations

from typing import Any

EXTRA_BUCKETS_HW: tuple[tuple[int, int], ...] = ((1024, 768), (1280, 720), (768, 1024), (720, 1280))


def _walk(base: int, step: int, align: int) -> list[tuple[int, int]]:
    lo, hi = base // 2, base * 2
    out = [(base, base)]
    for grow_height in (True, False):
        h = w = base
        while not ((h >= hi and w <= lo) if grow_height else (h <= lo and w >= hi)):
            if grow_height:
                h, w = min(h + step, hi), max(w - step, lo)
            else:
                h, w = max(h - step, lo), min(w + step, hi)
            out.append((h // align * align, w // align * align))
    out.sort(key=lambda hw: hw[0] / hw[1])  # stable, by height/width
    return out


def resolution_buckets(variant: str = "base", base_size: int = 1024) -> list[tuple[int, int]]:
    """(width, height) buckets in the model's ratio-index order (``<img_ratio_i>`` is item i)."""
    instruct = variant != "base"
    hw = _walk(base_size, base_size // 16, 16 if instruct else 1)
    if instruct:
        for extra in EXTRA_BUCKETS_HW:
            if all(extra[0] / extra[1] != h / w for h, w in hw):
                hw.append(extra)
    return [(w, h) for h, w in hw]


def snap_to_bucket(width: float, height: float, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket the model renders for width x height: nearest h/w, the first one wins a tie."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    target = float(height) / float(width)
    diffs = [abs(h / w - target) for w, h in buckets]
    return buckets[diffs.index(min(diffs))]


def ratio_index(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index i of the ``<img_ratio_i>`` token for the bucket nearest to width x height."""
    return buckets.index(snap_to_bucket(width, height, buckets))


def model_buckets(model: Any) -> list[tuple[int, int]]:
    """(width, height) buckets of a loaded model, from its own image processor."""
    proc = model.image_processor
    group = getattr(proc, "vae_reso_group", None) or proc.reso_group  # Instruct / base
    return [(int(res.w), int(res.h)) for res in group]


def rendered_size(model: Any, width: int, height: int) -> tuple[int, int]:
    """(width, height) the model will render for a width x height request, as its own image
    processor computes it (Instruct ``build_gen_image_info``, base ``build_image_info``)."""
    proc = model.image_processor
    build = getattr(proc, "build_gen_image_info", None) or proc.build_image_info
    info = build(f"{int(height)}x{int(width)}")  # image_size is HxW
    return int(info.image_width), int(info.image_height)

"""HunyuanImage-3.0 resolution group, computed without loading the model.

The test checkpoint's remote code carries its own copy of this math (it cannot import
the pack); ``tests/test_test_model.py`` checks that both agree.
"""

from __future__ import annotations

import math

EXTRA_BUCKETS: tuple[tuple[int, int], ...] = ((1024, 768), (1280, 720), (768, 1024), (720, 1280))


def resolution_buckets(
    base: int = 1024, step: int = 64, align: int = 16, min_px: int = 512, max_px: int = 2048
) -> list[tuple[int, int]]:
    """(width, height) buckets sorted by width/height.

    From the square, one side grows by ``step`` while the other shrinks (each clamped to
    min_px..max_px) until both limits are reached, in both orientations: 33 ratios for
    the defaults, plus the four extras (scaled to ``base``).
    """
    found = {(base, base)}
    for grow_h in (True, False):
        w = h = base
        while (h < max_px or w > min_px) if grow_h else (w < max_px or h > min_px):
            if grow_h:
                h, w = min(h + step, max_px), max(w - step, min_px)
            else:
                h, w = max(h - step, min_px), min(w + step, max_px)
            found.add((w // align * align, h // align * align))
    for ew, eh in EXTRA_BUCKETS:
        found.add((ew * base // 1024 // align * align, eh * base // 1024 // align * align))
    return sorted(found, key=lambda wh: (wh[0] / wh[1], wh[0]))


def snap_to_bucket(
    width: float, height: float, buckets: list[tuple[int, int]] | None = None
) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (log distance; the first one wins a tie)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    buckets = buckets or resolution_buckets()
    target = math.log(float(width) / float(height))
    return min(buckets, key=lambda wh: abs(math.log(wh[0] / wh[1]) - target))


def ratio_index(width: int, height: int, buckets: list[tuple[int, int]] | None = None) -> int:
    """Index i of the ``<img_ratio_i>`` token for the bucket nearest to width x height."""
    buckets = buckets or resolution_buckets()
    return buckets.index(snap_to_bucket(width, height, buckets))

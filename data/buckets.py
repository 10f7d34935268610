"""Aspect-ratio buckets (SDXL-style): a fixed list of image sizes of about the same area.

Each image goes to the bucket whose aspect ratio is closest to its own, is resized to cover it and cropped,
so wide and tall images are trained on whole instead of losing their sides to a square crop. Batches hold
samples of one bucket only (``data.stream`` keeps one buffer per bucket).
"""

from __future__ import annotations

import math

# Widest aspect ratio (width / height) of the list; the narrowest is its inverse, as in SDXL's 0.5..2.
MAX_ASPECT = 2.0


def make_buckets(image_size: int, step: int = 32) -> list[tuple[int, int]]:
    """Bucket sizes ``(h, w)``: multiples of ``step``, area about ``image_size**2``, aspect 1:2 .. 2:1.

    Widths go in steps of ``step`` from the square one up to the multiple of ``step`` nearest to
    ``image_size * sqrt(MAX_ASPECT)`` (the width of a 2:1 bucket of that area); each gets the height that
    brings the area closest to ``image_size**2``, and every bucket is mirrored (``(h, w)`` and ``(w, h)``).
    Sorted by aspect ratio w/h, tallest first. E.g. ``make_buckets(1024, 64)`` spans 1472x704 ..
    704x1472 in 15 buckets, all within 4% of 1024**2 pixels.
    """
    if step < 1:
        raise ValueError(f"bucket_step must be >= 1, got {step}")
    if image_size < step:
        raise ValueError(f"image_size ({image_size}) must be >= bucket_step ({step}) to make buckets")
    area = image_size * image_size
    first = max(1, round(image_size / step))
    last = max(first, round(image_size * math.sqrt(MAX_ASPECT) / step))
    buckets: set[tuple[int, int]] = set()
    for width in range(first * step, (last + 1) * step, step):
        height = max(step, round(area / width / step) * step)
        buckets.update({(height, width), (width, height)})
    return sorted(buckets, key=lambda hw: (hw[1] / hw[0], hw[0]))


def nearest_bucket(buckets: list[tuple[int, int]], height: int, width: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``width / height`` (compared on a log scale, so that
    2:1 and 1:2 are equally far from 1:1); ties go to the first bucket in the list."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    aspect = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))

"""Procedural toy dataset for the quickstart: coloured shapes on a dark background.

Every sample is drawn from its own RNG seeded by ``(seed, index)``, so the data is fully determined by the
parameters (not by the shard layout or the order of writing) and can be made offline on any machine.

The shards are ordinary WebDataset tars (``shapes-000000.tar`` ...) holding, per sample, ``<key>.png``,
``<key>.txt`` (caption) and ``<key>.cls`` (class index as text), plus a ``manifest.json`` written last.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

try:  # POSIX only; without it concurrent callers merely duplicate work (writes stay atomic).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FORMAT = "nuance-toy-v1"
MANIFEST_NAME = "manifest.json"
SHARD_PREFIX = "shapes-"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (40, 80, 225),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
CLASS_NAMES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]

# A fixed integer mtime makes the tars byte-identical across runs (a float mtime would also add a
# 1 KiB PAX header per member).
_TAR_MTIME = 0
_SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled for anti-aliased edges
_SHARD_RE = re.compile(rf"^{re.escape(SHARD_PREFIX)}\d{{6}}\.tar$")


def _shape_mask(shape: str, image_size: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """Anti-aliased coverage mask in [0, 1] (H, W) of ``shape`` inscribed in ``box`` (x0, y0, x1, y1)."""
    big = image_size * _SUPERSAMPLE
    x0, y0, x1, y1 = (v * _SUPERSAMPLE for v in box)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask = mask.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(mask, dtype=np.float32) / 255.0


def draw_sample(rng: np.random.Generator, image_size: int) -> tuple[Image.Image, str, int]:
    """Draw one random coloured shape; returns ``(RGB image, caption, class label)``.

    The shape spans 35-75% of the image, its fill colour is jittered slightly, and the background is a
    dark grey with mild Gaussian noise.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 to draw recognisable shapes, got {image_size}")
    label = int(rng.integers(len(CLASS_NAMES)))
    colour_name, shape = CLASS_NAMES[label].split(" ")

    side = rng.uniform(0.35, 0.75) * image_size
    x0 = rng.uniform(0, image_size - side)
    y0 = rng.uniform(0, image_size - side)
    alpha = _shape_mask(shape, image_size, (x0, y0, x0 + side, y0 + side))[..., None]

    fill = np.asarray(COLOURS[colour_name], dtype=np.float32) + rng.uniform(-15, 15, size=3)
    background = rng.uniform(25, 60) + rng.normal(0.0, 4.0, size=(image_size, image_size, 3))
    pixels = background * (1.0 - alpha) + fill * alpha
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))  # HxWx3 uint8 -> RGB
    return image, f"a {colour_name} {shape}", label


def _png_bytes(image: Image.Image) -> bytes:
    """Encode ``image`` as PNG (deterministic for identical pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _shard_layout(num_samples: int, samples_per_shard: int) -> dict[str, range]:
    """Map each shard filename to the range of global sample indices it holds."""
    return {
        f"{SHARD_PREFIX}{i:06d}.tar": range(start, min(start + samples_per_shard, num_samples))
        for i, start in enumerate(range(0, num_samples, samples_per_shard))
    }


def _expected_manifest(num_samples: int, image_size: int, samples_per_shard: int, seed: int) -> dict:
    """The manifest that a completed call with these parameters writes."""
    layout = _shard_layout(num_samples, samples_per_shard)
    return {
        "format": FORMAT,
        "num_samples": num_samples,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "seed": seed,
        "shards": {name: len(indices) for name, indices in layout.items()},
        "class_names": list(CLASS_NAMES),
    }


def _existing_manifest_matches(dest: Path, expected: dict) -> bool:
    """True if ``dest`` already holds a complete dataset with exactly the ``expected`` manifest."""
    try:
        current = json.loads((dest / MANIFEST_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return current == expected and all((dest / name).is_file() for name in expected["shards"])


def _atomic_write(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path``, then rename it into place.

    Readers (and concurrent writers) only ever see either no file or a complete one.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the data is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_shard(path: Path, indices: range, image_size: int, seed: int) -> None:
    """Write the samples ``indices`` to the tar shard ``path`` (atomically)."""

    def write(f) -> None:
        with wds.TarWriter(f, mtime=_TAR_MTIME, encoder=False) as sink:
            for index in indices:
                image, caption, label = draw_sample(np.random.default_rng([seed, index]), image_size)
                sink.write(
                    {
                        "__key__": f"{index:06d}",
                        "png": _png_bytes(image),
                        "txt": caption.encode(),
                        "cls": str(label).encode(),
                    }
                )

    _atomic_write(path, write)


@contextlib.contextmanager
def _directory_lock(dest: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``dest`` so concurrent callers on one machine write the data only once."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(dest / ".toy.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _check_args(num_samples: int, image_size: int, samples_per_shard: int, seed: int) -> None:
    """Raise ValueError for arguments that cannot describe a toy dataset."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def write_toy_shards(
    dest: str | Path,
    num_samples: int = 2048,
    image_size: int = 32,
    samples_per_shard: int = 256,
    seed: int = 0,
) -> list[str]:
    """Write the toy dataset as WebDataset shards under ``dest``; returns the shard paths in order.

    Idempotent: if ``dest/manifest.json`` already describes these parameters nothing is rewritten. Safe
    for concurrent callers on one machine: they serialise on a lock file, every shard is written to a
    temp name and renamed into place, and the manifest (the "complete" marker) is written last.
    """
    _check_args(num_samples, image_size, samples_per_shard, seed)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    expected = _expected_manifest(num_samples, image_size, samples_per_shard, seed)
    paths = [str(dest / name) for name in expected["shards"]]
    if _existing_manifest_matches(dest, expected):  # fast path without taking the lock
        return paths

    with _directory_lock(dest):
        if _existing_manifest_matches(dest, expected):  # another caller finished while we waited
            return paths
        # Drop the old "complete" marker first so a crash below never leaves a stale manifest.
        with contextlib.suppress(FileNotFoundError):
            (dest / MANIFEST_NAME).unlink()
        for name, indices in _shard_layout(num_samples, samples_per_shard).items():
            _write_shard(dest / name, indices, image_size, seed)
        # Shards of an earlier, larger dataset would otherwise be picked up by a directory spec.
        for stale in dest.iterdir():
            if _SHARD_RE.match(stale.name) and stale.name not in expected["shards"]:
                stale.unlink()
        manifest = json.dumps(expected, indent=2).encode() + b"\n"
        _atomic_write(dest / MANIFEST_NAME, lambda f: f.write(manifest))
    return paths

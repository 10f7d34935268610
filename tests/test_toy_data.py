"""Tests for the procedural toy dataset (data/toy.py)."""

from __future__ import annotations

import io
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nuance.data.toy import CLASS_NAMES, COLOURS, SHAPES, draw_sample, write_toy_shards
from tests.tar_helpers import tar_samples


def _mtimes(dest: Path) -> dict[str, int]:
    """Modification times (ns) of every file in ``dest``."""
    return {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}


def test_class_names_and_colours():
    assert len(CLASS_NAMES) == len(COLOURS) * len(SHAPES) == 12
    assert {"red", "green", "blue", "yellow"} <= set(COLOURS)
    assert "red circle" in CLASS_NAMES
    red, blue = np.array(COLOURS["red"]), np.array(COLOURS["blue"])
    assert red[0] - red[2] > 100 and blue[2] - blue[0] > 100


def test_draw_sample_is_deterministic_and_consistent():
    image, caption, label = draw_sample(np.random.default_rng(7), 32)
    again = draw_sample(np.random.default_rng(7), 32)
    assert image.size == (32, 32) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(again[0])) and (caption, label) == again[1:]
    assert caption == f"a {CLASS_NAMES[label]}"


def test_red_images_are_redder_than_blue_ones():
    red_minus_blue: dict[str, list[float]] = {"red": [], "blue": []}
    rng = np.random.default_rng(0)
    while min(len(v) for v in red_minus_blue.values()) < 10:
        image, _, label = draw_sample(rng, 32)
        colour = CLASS_NAMES[label].split()[0]
        if colour in red_minus_blue:
            pixels = np.asarray(image, dtype=np.float32)
            red_minus_blue[colour].append(float(pixels[..., 0].mean() - pixels[..., 2].mean()))
    # Whole-image means: even the smallest red shape beats every blue one; on average by far.
    assert min(red_minus_blue["red"]) > 0 > max(red_minus_blue["blue"])
    assert np.mean(red_minus_blue["red"]) - np.mean(red_minus_blue["blue"]) > 50


def test_shards_match_manifest(tmp_path):
    paths = write_toy_shards(tmp_path, num_samples=40, image_size=16, samples_per_shard=16, seed=3)
    assert [Path(p).name for p in paths] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "nuance-toy-v1"
    assert (manifest["num_samples"], manifest["image_size"], manifest["seed"]) == (40, 16, 3)
    assert manifest["class_names"] == CLASS_NAMES
    assert manifest["shards"] == {"shapes-000000.tar": 16, "shapes-000001.tar": 16, "shapes-000002.tar": 8}

    keys = []
    for path in paths:
        samples = tar_samples(path)
        assert len(samples) == manifest["shards"][Path(path).name]
        for key, fields in samples.items():
            assert set(fields) == {"png", "txt", "cls"}
            label = int(fields["cls"])
            assert fields["txt"].decode() == f"a {CLASS_NAMES[label]}"
            assert Image.open(io.BytesIO(fields["png"])).size == (16, 16)
            keys.append(key)
    assert keys == [f"{i:06d}" for i in range(40)]


def test_second_call_rewrites_nothing(tmp_path):
    first = write_toy_shards(tmp_path, num_samples=24, image_size=16, samples_per_shard=8)
    before = _mtimes(tmp_path)
    assert write_toy_shards(tmp_path, num_samples=24, image_size=16, samples_per_shard=8) == first
    assert _mtimes(tmp_path) == before


def test_other_parameters_rewrite_and_drop_stale_shards(tmp_path):
    write_toy_shards(tmp_path, num_samples=24, image_size=16, samples_per_shard=8)
    paths = write_toy_shards(tmp_path, num_samples=16, image_size=16, samples_per_shard=8, seed=1)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [Path(p).name for p in paths]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert (manifest["num_samples"], manifest["seed"]) == (16, 1)


def test_output_is_byte_identical_across_runs(tmp_path):
    a = write_toy_shards(tmp_path / "a", num_samples=8, image_size=16, samples_per_shard=4)
    b = write_toy_shards(tmp_path / "b", num_samples=8, image_size=16, samples_per_shard=4)
    assert [Path(p).read_bytes() for p in a] == [Path(p).read_bytes() for p in b]
    assert all(not name.startswith(".shapes") for name in _mtimes(tmp_path / "a"))  # no temp files left


def _write_small(dest: str) -> list[str]:
    """Top-level so it can run in a worker process."""
    return write_toy_shards(dest, num_samples=32, image_size=16, samples_per_shard=8)


def test_concurrent_callers(tmp_path):
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=3, mp_context=context) as pool:
        results = list(pool.map(_write_small, [str(tmp_path)] * 3))
    assert results[0] == results[1] == results[2]
    assert sum(len(tar_samples(p)) for p in results[0]) == 32
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        [Path(p).name for p in results[0]] + ["manifest.json"]
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"num_samples": 0}, {"image_size": 4}, {"samples_per_shard": 0}, {"seed": -1}],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        write_toy_shards(tmp_path, **kwargs)

"""Tests for `nuance data shard` (data/sharding.py) and the manifest helpers (data/manifest.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from nuance.data import sharding
from nuance.data.manifest import (
    LATENTS_FORMAT,
    SHARDS_FORMAT,
    build_manifest,
    check_latents_match,
    count_shard_samples,
    encoder_identity,
    read_manifest,
    validate_manifest,
)
from nuance.data.sharding import plan_shards, shard_dataset
from tests.tar_helpers import tar_samples


def _image_bytes(seed: int, size: tuple[int, int] = (24, 20), fmt: str = "PNG") -> bytes:
    """A random RGB image of ``size`` (w, h) encoded as ``fmt``; distinct per seed."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _all_samples(dest: Path) -> dict[str, dict[str, bytes]]:
    """Samples of every shard in ``dest``, checking the manifest's counts on the way."""
    manifest = read_manifest(str(dest))
    everything: dict[str, dict[str, bytes]] = {}
    for name, count in manifest["shards"].items():
        samples = tar_samples(dest / name)
        assert len(samples) == count, name
        assert not set(samples) & set(everything), "keys repeat across shards"
        everything.update(samples)
    assert manifest["num_samples"] == len(everything)
    assert sorted(p.name for p in dest.glob("*.tar")) == sorted(manifest["shards"])
    return everything


def _image_of(sample: dict[str, bytes]) -> bytes:
    """The image member of a sample."""
    (ext,) = [e for e in sample if e in sharding.STREAM_EXTENSIONS]
    return sample[ext]


def _mtimes(dest: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}


@pytest.fixture
def captioned(tmp_path) -> tuple[Path, dict[str, tuple[bytes, str]]]:
    """A folder of 11 images (png + jpg, nested one level) with sidecar captions; {rel: (bytes, caption)}."""
    root = tmp_path / "captioned"
    expected = {}
    for i in range(11):
        rel = f"part{i % 2}/img{i:02d}.{'png' if i % 3 else 'jpg'}"
        data = _image_bytes(i, fmt="PNG" if i % 3 else "JPEG")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        (root / rel).with_suffix(".txt").write_text(f"  caption number {i}\n")
        expected[rel] = (data, f"caption number {i}")
    return root, expected


def test_stream_extensions_match_the_trainers_decoder():
    from nuance.data.decode import IMAGE_EXTENSIONS

    assert sharding.STREAM_EXTENSIONS == IMAGE_EXTENSIONS


def test_sidecar_folder(captioned, tmp_path):
    root, expected = captioned
    dest = tmp_path / "out"
    result = shard_dataset(str(root), str(dest), samples_per_shard=3, workers=2, progress=False)
    manifest = read_manifest(str(dest))
    assert manifest["format"] == SHARDS_FORMAT
    assert list(manifest["shards"].values()) == [3, 3, 3, 2]
    assert list(manifest["shards"]) == [f"shard-{i:06d}.tar" for i in range(4)]
    assert result.num_samples == 11 and result.bad_samples == 0 and "class_names" not in manifest

    samples = _all_samples(dest)
    by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
    assert set(by_source) == set(expected)  # every image exactly once (keys are unique)
    for rel, (data, caption) in expected.items():
        sample = by_source[rel]
        assert _image_of(sample) == data  # original bytes, untouched
        assert sample["txt"].decode() == caption
        assert "cls" not in sample
        meta = json.loads(sample["json"])
        assert (meta["width"], meta["height"]) == (24, 20)
    # Deterministic order: sorted by path, keys numbered in that order.
    sources = [json.loads(samples[k]["json"])["source"] for k in sorted(samples)]
    assert sources == sorted(expected)


def test_class_folders(tmp_path):
    root = tmp_path / "classes"
    for seed, (name, n) in enumerate((("zebra", 2), ("ant", 3), ("moose", 1))):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(_image_bytes(10 * seed + i))
    (root / "ant" / "1.txt").write_text("an ant on a leaf")  # a sidecar wins over the folder name
    dest = tmp_path / "out"
    shard_dataset(str(root), str(dest), samples_per_shard=4, progress=False)
    manifest = read_manifest(str(dest))
    assert manifest["class_names"] == ["ant", "moose", "zebra"]
    got = sorted(
        (json.loads(s["json"])["source"], int(s["cls"]), s["txt"].decode())
        for s in _all_samples(dest).values()
    )
    assert got == [
        ("ant/0.png", 0, "ant"),
        ("ant/1.png", 0, "an ant on a leaf"),
        ("ant/2.png", 0, "ant"),
        ("moose/0.png", 1, "moose"),
        ("zebra/0.png", 2, "zebra"),
        ("zebra/1.png", 2, "zebra"),
    ]


def _write_listing(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` as .jsonl / .csv / .parquet according to the suffix of ``path``."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_listing(tmp_path, suffix):
    images = tmp_path / "imgs"
    images.mkdir()
    rows = []
    for i in range(7):
        (images / f"{i}.png").write_bytes(_image_bytes(100 + i))
        # Relative to the listing for even rows, absolute for odd ones; listed in reverse order.
        path = f"imgs/{i}.png" if i % 2 == 0 else str(images / f"{i}.png")
        rows.append({"path": path, "caption": f"picture, {i}", "label": i % 3, "extra": "ignored"})
    listing = tmp_path / f"list{suffix}"
    _write_listing(listing, rows[::-1])
    dest = tmp_path / "out"
    shard_dataset(str(listing), str(dest), samples_per_shard=2, progress=False)
    assert list(read_manifest(str(dest))["shards"].values()) == [2, 2, 2, 1]
    samples = _all_samples(dest)
    got = {}
    for s in samples.values():
        i = int(Path(json.loads(s["json"])["source"]).stem)
        assert _image_of(s) == (images / f"{i}.png").read_bytes()
        got[i] = (s["txt"].decode(), int(s["cls"]))
    assert got == {i: (f"picture, {i}", i % 3) for i in range(7)}
    first = samples[min(samples)]
    assert json.loads(first["json"])["source"].endswith("0.png")  # sorted by path


def test_listing_without_labels_and_empty_caption(tmp_path):
    (tmp_path / "a.png").write_bytes(_image_bytes(1))
    listing = tmp_path / "list.csv"
    listing.write_text('path,caption\na.png,""\n')
    shard_dataset(str(listing), str(tmp_path / "out"), progress=False)
    (sample,) = _all_samples(tmp_path / "out").values()
    assert sample["txt"] == b"" and "cls" not in sample


def test_max_shard_mb(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    sizes = []
    for i in range(20):  # noise PNGs of 40-90 kB: incompressible, so the sizes are what the tar holds
        side = 120 + 10 * (i % 6)
        data = _image_bytes(i, size=(side, side))
        (root / f"{i:02d}.png").write_bytes(data)
        (root / f"{i:02d}.txt").write_text("x")
        sizes.append(len(data))
    dest = tmp_path / "out"
    target_mb = 0.25
    shard_dataset(str(root), str(dest), max_shard_mb=target_mb, progress=False)
    manifest = read_manifest(str(dest))
    assert sum(manifest["shards"].values()) == 20 and len(manifest["shards"]) > 3
    shard_sizes = [os.path.getsize(dest / name) for name in manifest["shards"]]
    assert max(shard_sizes) <= target_mb * 1e6
    # Greedy cuts: every shard but the last is more than full minus one image.
    assert all(size > target_mb * 1e6 - max(sizes) - 20_000 for size in shard_sizes[:-1])


def test_plan_shards():
    assert plan_shards([1] * 5, samples_per_shard=2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert plan_shards([1] * 3) == [range(0, 3)]  # default: 1000 a shard
    big = 600_000
    assert plan_shards([big, big, 10, 10, 3 * big], max_shard_mb=1) == [
        range(0, 1),
        range(1, 4),
        range(4, 5),  # larger than the target: a shard of its own
    ]
    with pytest.raises(ValueError, match="not both"):
        plan_shards([1], samples_per_shard=1, max_shard_mb=1)
    with pytest.raises(ValueError, match="max_shard_mb"):
        plan_shards([1], max_shard_mb=0)


def test_image_size_downscales_and_keeps_original_size(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "wide.jpg").write_bytes(_image_bytes(0, size=(96, 48), fmt="JPEG"))
    (root / "small.png").write_bytes(_image_bytes(1, size=(20, 12)))
    (root / "pic.bmp").write_bytes(_image_bytes(2, size=(40, 40), fmt="BMP"))  # not streamable: -> png
    for stem in ("wide", "small", "pic"):
        (root / f"{stem}.txt").write_text(stem)
    dest = tmp_path / "out"
    shard_dataset(str(root), str(dest), image_size=24, progress=False)
    assert read_manifest(str(dest))["image_size"] == 24
    for sample in _all_samples(dest).values():
        meta = json.loads(sample["json"])
        ext = {"wide": "jpg", "small": "png", "pic": "png"}[sample["txt"].decode()]
        with Image.open(io.BytesIO(sample[ext])) as image:
            stored = image.size
        original = {"wide": (96, 48), "small": (20, 12), "pic": (40, 40)}[sample["txt"].decode()]
        assert (meta["width"], meta["height"]) == original
        assert stored == {"wide": (48, 24), "small": (20, 12), "pic": (24, 24)}[sample["txt"].decode()]


def test_rerun_skips_complete_shards_and_fills_gaps(captioned, tmp_path):
    root, _ = captioned
    dest = tmp_path / "out"
    shard_dataset(str(root), str(dest), samples_per_shard=4, progress=False)
    before = _mtimes(dest)
    content = {p.name: p.read_bytes() for p in dest.glob("*.tar")}

    again = shard_dataset(str(root), str(dest), samples_per_shard=4, progress=False)
    assert again.written == [] and _mtimes(dest) == before  # nothing rewritten, not even the manifest

    (dest / "shard-000001.tar").unlink()
    again = shard_dataset(str(root), str(dest), samples_per_shard=4, progress=False)
    assert again.written == ["shard-000001.tar"]
    after = _mtimes(dest)
    for name in ("shard-000000.tar", "shard-000002.tar"):
        assert after[name] == before[name]
    assert {p.name: p.read_bytes() for p in dest.glob("*.tar")} == content  # byte-identical rewrite
    _all_samples(dest)


def test_interrupted_run_resumes(captioned, tmp_path, monkeypatch):
    root, _ = captioned
    dest = tmp_path / "out"
    real = sharding.write_shard

    def flaky(url, *args):
        if url.endswith("shard-000002.tar"):
            raise OSError("disk on fire")
        return real(url, *args)

    monkeypatch.setattr(sharding, "write_shard", flaky)
    with pytest.raises(OSError, match="disk on fire"):
        shard_dataset(str(root), str(dest), samples_per_shard=3, workers=1, progress=False)
    assert not (dest / "manifest.json").exists()
    partial = json.loads((dest / "manifest.partial.json").read_text())
    assert partial["complete"] is False and "shard-000000.tar" in partial["shards"]
    assert not list(dest.glob(".*.tmp"))  # no temp file left behind
    done_before = {n: (dest / n).stat().st_mtime_ns for n in partial["shards"]}

    monkeypatch.setattr(sharding, "write_shard", real)
    result = shard_dataset(str(root), str(dest), samples_per_shard=3, workers=1, progress=False)
    assert "shard-000002.tar" in result.written and not set(done_before) & set(result.written)
    assert all((dest / n).stat().st_mtime_ns == t for n, t in done_before.items())
    assert len(_all_samples(dest)) == 11


def test_shard_finished_but_unrecorded_is_counted(captioned, tmp_path):
    root, _ = captioned
    dest = tmp_path / "out"
    shard_dataset(str(root), str(dest), samples_per_shard=5, progress=False)
    (dest / "manifest.json").unlink()
    (dest / "manifest.partial.json").unlink()  # as if the run died before recording anything
    result = shard_dataset(str(root), str(dest), samples_per_shard=5, progress=False)
    assert result.written == [] and result.shards == {
        f"shard-{i:06d}.tar": n for i, n in enumerate((5, 5, 1))
    }
    assert count_shard_samples(str(dest / "shard-000000.tar")) == 5


def test_other_settings_are_refused(captioned, tmp_path):
    root, _ = captioned
    dest = tmp_path / "out"
    shard_dataset(str(root), str(dest), samples_per_shard=4, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        shard_dataset(str(root), str(dest), samples_per_shard=5, progress=False)


def test_bad_images_are_skipped_and_counted(captioned, tmp_path):
    root, _ = captioned
    (root / "part0" / "broken.png").write_bytes(b"definitely not a png")
    (root / "part0" / "broken.txt").write_text("broken")
    result = shard_dataset(str(root), str(tmp_path / "out"), samples_per_shard=4, progress=False)
    assert result.bad_samples == 1 and result.bad_examples == ["part0/broken.png"]
    assert read_manifest(str(tmp_path / "out"))["bad_samples"] == 1
    assert len(_all_samples(tmp_path / "out")) == 11


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        shard_dataset(str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        shard_dataset(str(tmp_path / "empty"), str(tmp_path / "out"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.png").write_bytes(_image_bytes(0))
    (mixed / "a.txt").write_text("a")
    (mixed / "b.png").write_bytes(_image_bytes(1))
    with pytest.raises(ValueError, match=r"1 of 2 images .* no caption file \(e\.g\. b\.png\)"):
        shard_dataset(str(mixed), str(tmp_path / "out"))
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"file": "a.png", "text": "a"}) + "\n")
    with pytest.raises(
        ValueError, match=r"lacks column\(s\) \['path', 'caption'\]; it has \['file', 'text'\]"
    ):
        shard_dataset(str(listing), str(tmp_path / "out"))
    listing.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        shard_dataset(str(listing), str(tmp_path / "out"))
    listing.write_text(json.dumps({"path": "missing.png", "caption": "a"}) + "\n")
    with pytest.raises(ValueError, match="not found"):
        shard_dataset(str(listing), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="samples_per_shard"):
        shard_dataset(str(mixed), str(tmp_path / "out"), samples_per_shard=0)


def test_cli_shard(nuance_cli, captioned, tmp_path):
    root, _ = captioned
    dest = tmp_path / "out"
    cmd = [*nuance_cli, "data", "shard", str(root), str(dest), "--samples-per-shard", "6", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "11 samples in 2 shards" in done.stdout
    assert list(read_manifest(str(dest))["shards"].values()) == [6, 5]

    missing = subprocess.run([*nuance_cli, "data", "shard", str(tmp_path / "nope"), str(dest)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"nuance: error: src: {tmp_path / 'nope'} does not exist"]


def test_shards_feed_the_training_stream(captioned, tmp_path):
    from nuance.data.stream import expand_urls, iter_tar_samples

    root, expected = captioned
    dest = tmp_path / "out"
    shard_dataset(str(root), str(dest), samples_per_shard=4, progress=False)
    urls = expand_urls(str(dest))
    assert [os.path.basename(u) for u in urls] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sum(1 for url in urls for _ in iter_tar_samples(url)) == len(expected)


# ------------------------------------------------------------------------------------------- manifest


def test_manifest_validation():
    manifest = build_manifest(SHARDS_FORMAT, {"a.tar": 2, "b.tar": 3})
    assert manifest["num_samples"] == 5
    with pytest.raises(ValueError, match="unknown format"):
        validate_manifest({**manifest, "format": "nope"})
    with pytest.raises(ValueError, match="num_samples"):
        validate_manifest({**manifest, "num_samples": 4})
    with pytest.raises(ValueError, match="sample count"):
        validate_manifest({**manifest, "shards": {"a.tar": -1}, "num_samples": -1})
    with pytest.raises(ValueError, match="latents manifest lacks"):
        build_manifest(LATENTS_FORMAT, {"a.tar": 1})


def test_encoder_identity_and_check(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_diffusers_version": "0.1", "latent_channels": 4}))
    ident = encoder_identity(str(folder))
    assert ident["path"] == str(folder)
    # Library versions and saved-by fields do not change the identity; the architecture does.
    assert ident == encoder_identity(str(folder), {"_diffusers_version": "9.9", "latent_channels": 4})
    assert ident != encoder_identity(str(folder), {"latent_channels": 16})
    minilm = encoder_identity("minilm")
    assert minilm["path"] == "minilm" and len(minilm["config_sha256"]) == 64
    with pytest.raises(ValueError, match="no config.json"):
        encoder_identity(str(tmp_path))

    latents = {"format": LATENTS_FORMAT, "vae": ident, "text_encoder": minilm}
    check_latents_match(latents, ident, minilm)
    check_latents_match(latents, ident, None)  # no text encoder in the recipe: not checked
    other = {"path": "/models/other-vae", "config_sha256": "f" * 64}
    with pytest.raises(
        ValueError, match=f"latents were made with vae {folder} .* the recipe uses /models/other-vae"
    ):
        check_latents_match(latents, other, minilm)
    with pytest.raises(ValueError, match="text_encoder minilm"):
        check_latents_match(latents, ident, {"path": "minilm", "config_sha256": "0" * 64})
    with pytest.raises(ValueError, match="expected format"):
        check_latents_match({"format": SHARDS_FORMAT}, ident, minilm)

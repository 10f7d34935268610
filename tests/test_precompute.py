"""Tests for `nuance data precompute` (data/, trainers/ and orchestration/precompute.py): a local 2-CPU
Ray, a tiny VAE, MiniLM."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nuance.data.manifest import LATENTS_FORMAT, check_latents_match, encoder_identity, read_manifest
from nuance.data.precompute import input_shards
from nuance.data.sharding import shard_dataset
from nuance.orchestration.precompute import PrecomputeError, plan_resources, precompute_latents
from tests.tar_helpers import tar_samples

pytestmark = pytest.mark.slow

IMAGE_SIZE = 16
NUM_IMAGES = 9
TEXT_KEYS = ("text.npy", "mask.npy", "pooled.npy")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs for this module (an already running one is reused and left running)."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = os.environ.pop("RAY_ADDRESS", None)  # never join a real cluster from the tests
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        if address is not None:
            os.environ["RAY_ADDRESS"] = address


def _tiny_vae(folder: Path, **overrides) -> str:
    """Save a tiny random AutoencoderKL (downsampling 2, 4 latent channels) in ``folder``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        scaling_factor=0.5,
    )
    AutoencoderKL(**{**config, **overrides}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> str:
    return _tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


def _png(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    """2 image shards (5 + 5 samples) made by data.sharding; one image is truncated (undecodable)."""
    root = tmp_path_factory.mktemp("images")
    for i in range(NUM_IMAGES):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(exist_ok=True)
        (folder / f"{i}.png").write_bytes(_png(i, (20 + 2 * i, 18)))
    # A PNG whose header is fine (so sharding keeps it) but whose pixel data is cut off.
    (root / "dogs" / "truncated.png").write_bytes(_png(99, (24, 24))[:200])
    dest = root.parent / "shards"
    shard_dataset(str(root), str(dest), samples_per_shard=5, progress=False)
    assert list(read_manifest(str(dest))["shards"].values()) == [5, 5]
    return dest


@pytest.fixture(scope="module")
def latents(ray_local, vae, image_shards, tmp_path_factory):
    """(dest, first result) of one precompute run, shared by the checks below."""
    dest = tmp_path_factory.mktemp("latents") / "out"
    result = precompute_latents(
        str(image_shards),
        str(dest),
        vae=vae,
        batch_size=3,
        image_size=IMAGE_SIZE,
        max_length=12,
        progress=False,
    )
    return dest, result


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# Ordered so that the module fixtures' start-up costs (VAE, Ray, first run) land on different tests.


def test_input_errors(image_shards, vae, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        input_shards(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar shards"):
        input_shards(str(tmp_path / "empty"))
    shards, url, _ = input_shards(str(image_shards))
    assert list(shards) == ["shard-000000.tar", "shard-000001.tar"] and url.endswith("manifest.json")
    with pytest.raises(ValueError, match="image_size must be a multiple"):
        precompute_latents(str(image_shards), str(tmp_path / "o"), vae=vae, image_size=15, progress=False)
    with pytest.raises(ValueError, match="give --image-size"):
        precompute_latents(str(image_shards), str(tmp_path / "o"), vae=vae, progress=False)
    with pytest.raises(ValueError, match="store must be one of"):
        precompute_latents(str(image_shards), str(tmp_path / "o"), vae=vae, store="mode", image_size=16)


def test_cli_precompute_errors(nuance_cli, image_shards, tmp_path):
    cmd = [*nuance_cli, "data", "precompute", str(image_shards), str(tmp_path / "o"), "--image-size", "16"]
    done = subprocess.run([*cmd, "--vae", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    expected = f"nuance: error: vae: '{tmp_path}' has no config.json (expected a local model folder)"
    assert done.stderr.strip().splitlines() == [expected]


def test_store_sample(ray_local, vae, image_shards, tmp_path):
    dest = tmp_path / "out"
    result = precompute_latents(
        str(image_shards),
        str(dest),
        vae=vae,
        store="sample",
        batch_size=4,
        image_size=IMAGE_SIZE,
        progress=False,
    )
    assert result.encoded == ["shard-000000.tar", "shard-000001.tar"]
    manifest = read_manifest(str(dest))
    assert manifest["store"] == "sample" and manifest["num_samples"] == NUM_IMAGES
    for sample in tar_samples(dest / "shard-000000.tar").values():
        assert {"latent.npy", *TEXT_KEYS} <= set(sample) and "latent_mean.npy" not in sample
        latent = _npy(sample["latent.npy"])
        assert latent.shape == (4, 8, 8) and latent.dtype == np.float16


def test_failed_shard_is_reported_and_the_rest_kept(ray_local, vae, image_shards, tmp_path):
    """An unreadable shard fails alone: the others are written and recorded for the next run."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "shard-000000.tar").write_bytes(b"\0garbage" * 100)  # not a tar
    (src / "shard-000001.tar").write_bytes((image_shards / "shard-000001.tar").read_bytes())
    dest = tmp_path / "out"
    with pytest.raises(PrecomputeError, match=r"1 of 2 shard\(s\) failed, e\.g\. shard-000000\.tar"):
        precompute_latents(str(src), str(dest), vae=vae, batch_size=4, image_size=IMAGE_SIZE, progress=False)
    assert not (dest / "manifest.json").exists() and not (dest / "shard-000000.tar").exists()
    partial = json.loads((dest / "manifest.partial.json").read_text())
    assert partial["shards"] == {"shard-000001.tar": 4} and partial["complete"] is False
    assert len(tar_samples(dest / "shard-000001.tar")) == 4


def test_latent_shards(latents, image_shards, vae):
    dest, result = latents
    manifest = read_manifest(str(dest))
    assert manifest["format"] == LATENTS_FORMAT
    assert list(manifest["shards"]) == ["shard-000000.tar", "shard-000001.tar"]
    assert manifest["num_samples"] == NUM_IMAGES and manifest["bad_samples"] == 1 == result.bad_samples
    assert manifest["latent_shape"] == [4, IMAGE_SIZE // 2, IMAGE_SIZE // 2]
    assert manifest["latent_dtype"] == "float16" and manifest["store"] == "mean_logvar"
    assert manifest["text_shape"] == [12, 384] and manifest["image_size"] == IMAGE_SIZE
    assert manifest["vae"] == encoder_identity(vae)
    assert {k: manifest["text_encoder"][k] for k in ("path", "config_sha256")} == encoder_identity("minilm")
    assert manifest["source"] == str(image_shards / "manifest.json")
    assert manifest["class_names"] == ["cats", "dogs"]

    for name, count in manifest["shards"].items():
        inputs, outputs = tar_samples(image_shards / name), tar_samples(dest / name)
        assert len(outputs) == count
        assert set(outputs) <= set(inputs)  # same keys, minus the undecodable image
        for key, out in outputs.items():
            assert set(out) == {"latent_mean.npy", "latent_logvar.npy", *TEXT_KEYS, "txt", "cls", "json"}
            assert out["txt"] == inputs[key]["txt"] and out["cls"] == inputs[key]["cls"]
            mean, logvar = _npy(out["latent_mean.npy"]), _npy(out["latent_logvar.npy"])
            assert mean.shape == logvar.shape == (4, 8, 8) and mean.dtype == logvar.dtype == np.float16
            text, mask, pooled = _npy(out["text.npy"]), _npy(out["mask.npy"]), _npy(out["pooled.npy"])
            assert text.shape == (12, 384) and text.dtype == np.float16
            assert mask.shape == (12,) and mask.dtype == np.uint8 and 2 < mask.sum() < 12
            assert pooled.shape == (384,) and pooled.dtype == np.float16
            meta = json.loads(out["json"])
            source_meta = json.loads(inputs[key]["json"])
            assert meta["original_size"] == [source_meta["height"], source_meta["width"]]
            assert meta["source"] == source_meta["source"] and len(meta["crop"]) == 2


def test_latents_are_in_the_trainers_space(latents, image_shards, vae):
    """latent_mean = (posterior mean - shift) * scale, as trainers.models.encoders.VAE.encode scales."""
    from nuance.data.decode import decode_image
    from nuance.trainers.models.encoders import VAE

    dest, _ = latents
    model = VAE(vae)
    out = next(iter(tar_samples(dest / "shard-000000.tar").items()))
    key, sample = out
    source = tar_samples(image_shards / "shard-000000.tar")[key]
    pixels, _, _ = decode_image(source["png"], (IMAGE_SIZE, IMAGE_SIZE))
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    dist = model.vae.encode(x).latent_dist
    expected_mean = (dist.mean - model.shift_factor) * model.scaling_factor
    stored_mean = torch.from_numpy(_npy(sample["latent_mean.npy"]).astype(np.float32))
    torch.testing.assert_close(stored_mean, expected_mean[0], atol=2e-3, rtol=2e-3)
    stored_logvar = torch.from_numpy(_npy(sample["latent_logvar.npy"]).astype(np.float32))
    expected_logvar = dist.logvar[0] + 2 * np.log(model.scaling_factor)
    torch.testing.assert_close(stored_logvar, expected_logvar, atol=1e-2, rtol=1e-3)
    # Decoding the stored mean through the trainer's VAE wrapper gives an image of the input's size.
    decoded = model.decode(stored_mean[None])
    assert decoded.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(decoded).all()


def test_latent_samples_decode_for_the_trainer(latents):
    """The trainer's decoder (data.decode) reads the latent samples with the manifest's shapes."""
    from nuance.data.decode import DecodeSpec, decode_sample

    dest, _ = latents
    manifest = read_manifest(str(dest))
    spec = DecodeSpec(
        image_size=IMAGE_SIZE,
        buckets=None,
        random_crop=False,
        random_flip=False,
        latent_shape=tuple(manifest["latent_shape"]),
        latent_dtype=manifest["latent_dtype"],
        require_caption=True,
    )
    for key, sample in tar_samples(dest / "shard-000000.tar").items():
        group, fields = decode_sample({"__key__": key, **sample}, spec, np.random.default_rng(0))
        assert group.startswith("latent:4x8x8")
        assert fields["encoder_hidden_states"].shape == tuple(manifest["text_shape"])
        assert fields["pooled"].shape == (384,) and fields["caption"] in ("cats", "dogs")
        assert fields["original_size"] == tuple(json.loads(sample["json"])["original_size"])


def test_rerun_skips_done_shards(latents, image_shards, vae):
    dest, _ = latents
    kwargs = dict(vae=vae, batch_size=3, image_size=IMAGE_SIZE, max_length=12, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    again = precompute_latents(str(image_shards), str(dest), **kwargs)
    assert again.encoded == [] and {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before

    (dest / "shard-000001.tar").unlink()
    again = precompute_latents(str(image_shards), str(dest), **kwargs)
    assert again.encoded == ["shard-000001.tar"]
    assert (dest / "shard-000000.tar").stat().st_mtime_ns == before["shard-000000.tar"]
    # Sorted paths: cats/1,3,5,7 dogs/0 | dogs/2,4,6,8 + the truncated one, which is skipped.
    assert read_manifest(str(dest))["shards"] == {"shard-000000.tar": 5, "shard-000001.tar": 4}

    with pytest.raises(ValueError, match="other settings"):
        precompute_latents(str(image_shards), str(dest), **{**kwargs, "max_length": 16})


def test_check_latents_match_refuses_another_vae(latents, vae, tmp_path):
    dest, _ = latents
    manifest = read_manifest(str(dest))
    check_latents_match(manifest, encoder_identity(vae), encoder_identity("minilm"))
    other = _tiny_vae(tmp_path / "other-vae", scaling_factor=0.25)
    with pytest.raises(ValueError, match=f"latents were made with vae {vae} .* the recipe uses {other}"):
        check_latents_match(manifest, encoder_identity(other), encoder_identity("minilm"))


def test_plan_resources():
    assert plan_resources([{"CPU": 2.0}], None, None) == (1, 0.0, 1.0)  # CPU only: one actor
    assert plan_resources([{"CPU": 16.0, "GPU": 1.0}], None, None) == (1, 1.0, 15.0)
    assert plan_resources([{"CPU": 128.0, "GPU": 8.0}], None, None) == (8, 1.0, 15.0)
    # A CPU-only head node: GPU actors take at most what a GPU node has.
    nodes = [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert plan_resources(nodes, None, None) == (2, 1.0, 8.0)
    assert plan_resources([{"CPU": 16.0, "GPU": 1.0}], None, 0.5) == (2, 0.5, 7.0)
    with pytest.raises(ValueError, match="gpus_per_worker=2 but no Ray node"):
        plan_resources([{"CPU": 16.0, "GPU": 1.0}], None, 2)

"""Data at scale, end to end: training streams shards from the S3 server; a shard -> precompute ->
train-on-latents pipeline; a stream that outlives an S3 server restart."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from nuance.data.builder import ensure_toy_dataset
from nuance.data.config import DataConfig
from nuance.data.s3server import SeaweedServer, random_credentials
from nuance.data.stream import ShardStream
from nuance.orchestration.recipe import RecipeError, load_recipe, preflight
from tests.conftest import tiny_vae

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "nuance.orchestration.cli"]


def recipe_for(tmp_path, toy_cache, name: str, *overrides: str):
    recipe, _ = load_recipe(
        "quickstart",
        [
            f"name={name}",
            f"cluster.storage_path={tmp_path / 'runs'}",
            f"data.cache_dir={toy_cache}",
            "train.log_every=1",
            "sample.steps=2",
            "sample.num_per_condition=1",
            "data.batch_size=8",
            "data.log_keys=true",
            "sample.eval_per_condition=0",  # data tests; sample quality is tested in test_train_e2e
            *overrides,
        ],
    )
    return recipe


def run_keys(run_dir: Path) -> list[str]:
    keys = []
    for path in sorted((run_dir / "keys").glob("rank*.jsonl")):
        keys += [k for line in path.read_text().splitlines() for k in json.loads(line)["keys"]]
    return keys


def test_quickstart_streams_from_s3(tmp_path, toy_cache, s3_server, s3_bucket, ray_cluster):
    from nuance.orchestration.launch import train

    shards = ensure_toy_dataset(DataConfig(cache_dir=str(toy_cache)))
    copy = subprocess.run(
        [*CLI, "storage", "cp", str(Path(shards[0]).parent), f"{s3_bucket}toy/"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert copy.returncode == 0, copy.stderr
    recipe = recipe_for(tmp_path, toy_cache, "s3", f"data.source={s3_bucket}toy/", "train.max_steps=4")
    result = train(recipe)
    assert result.error is None
    keys = run_keys(tmp_path / "runs" / "s3")
    assert len(keys) == 2 * 4 * 8 and len(set(keys)) == len(keys)  # 2 ranks x 4 steps x batch 8, no repeats
    last = [json.loads(x) for x in (tmp_path / "runs" / "s3" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 4 and last["data/bad_fraction"] == 0.0
    config = (tmp_path / "runs" / "s3" / "step_00000004" / "recipe.yaml").read_text()
    secret = s3_server.env()["AWS_SECRET_ACCESS_KEY"]
    assert secret not in config and s3_server.access_key not in config  # credentials never enter the recipe


def test_shard_precompute_then_train_on_latents(tmp_path, toy_cache, ray_cluster):
    import numpy as np

    from nuance.data.toy import draw_sample
    from nuance.orchestration.launch import train

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(96):
        image, caption, _ = draw_sample(rng, 32)
        image.save(images / f"{i:04d}.png")
        (images / f"{i:04d}.txt").write_text(caption)
    shard = subprocess.run(
        [
            *CLI,
            "data",
            "shard",
            str(images),
            str(tmp_path / "shards"),
            "--samples-per-shard",
            "24",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shard.returncode == 0, shard.stderr
    vae = tiny_vae(tmp_path / "vae")
    pre = subprocess.run(
        [
            *CLI,
            "data",
            "precompute",
            str(tmp_path / "shards"),
            str(tmp_path / "latents"),
            "--vae",
            str(vae),
            "--text-encoder",
            "minilm",
            "--max-length",
            "8",
            "--workers",
            "1",
            "--image-size",
            "32",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pre.returncode == 0, pre.stdout[-2000:] + pre.stderr[-2000:]
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["num_samples"] == 96 and manifest["latent_shape"] == [4, 16, 16]

    recipe = recipe_for(
        tmp_path,
        toy_cache,
        "latents",
        f"data.source={tmp_path / 'latents'}",
        f"vae={vae}",
        "data.image_size=32",  # the size the latents were made at
        "train.max_steps=3",
        "text_encoder.max_length=8",
    )
    assert train(recipe).error is None
    keys = run_keys(tmp_path / "runs" / "latents")
    assert len(keys) == 2 * 3 * 8 and len(set(keys)) == len(keys)

    other = tiny_vae(tmp_path / "other-vae")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    from nuance.orchestration.launch import train as train_again

    latents = f"data.source={tmp_path / 'latents'}"
    wrong = recipe_for(tmp_path, toy_cache, "wrong", latents, f"vae={other}", "data.image_size=32")
    preflight(wrong)
    with pytest.raises((ValueError, RecipeError), match="vae"):
        train_again(wrong)


def test_stream_waits_through_s3_restart(tmp_path, toy_cache, s3_server):
    """The S3 server restarts mid-stream: the stream retries and continues; every sample still once."""
    from nuance.data import storage

    shards = ensure_toy_dataset(DataConfig(cache_dir=str(toy_cache), toy_samples=2048))
    access, secret = random_credentials()
    server = SeaweedServer(tmp_path / "weed", access, secret, bucket="restart").start()
    try:
        from tests.s3_fixtures import apply_env, server_env

        saved = apply_env(server_env(server))
        try:
            # 8 shards: the first 4 are read or opened ahead (and fetched) before the server stops
            for path in shards[:8]:
                storage.put_file(path, f"s3://restart/toy/{Path(path).name}")
            stream = ShardStream(
                "s3://restart/toy/", rank=0, world_size=1, batch_size=32, image_size=32, seed=0
            )
            batches = iter(stream)
            keys = [k for _ in range(4) for k in next(batches)["key"]]
            retries_before = storage.retry_count()
            server.stop()  # the next shard opens hit a dead server ...
            restart = threading.Timer(2.0, server.start)  # ... that comes back 2 s later
            restart.start()
            keys += [k for _ in range(28) for k in next(batches)["key"]]
            restart.join()
            assert storage.retry_count() > retries_before  # it did wait and retry
        finally:
            apply_env(saved)
    finally:
        server.stop()
    assert len(keys) == 8 * 128 and len(set(keys)) == len(keys)  # 8 shards x 128 samples, each once
    assert torch.tensor(stream.bad_fraction) == 0


def test_checkpoints_on_s3_resume_and_sample(tmp_path, toy_cache, s3_server, s3_bucket, ray_cluster):
    from nuance.orchestration.launch import train

    storage_path = f"{s3_bucket}runs"
    first = recipe_for(
        tmp_path,
        toy_cache,
        "remote",
        f"cluster.storage_path={storage_path}",
        "train.max_steps=2",
        "optim.decay_steps=4",
        "model.name=dit_debug",
        "model.num_classes=12",
        "sample.classes=[0]",
    )
    assert train(first).error is None
    second = recipe_for(
        tmp_path,
        toy_cache,
        "remote",
        f"cluster.storage_path={storage_path}",
        "train.max_steps=4",
        "optim.decay_steps=4",
        "model.name=dit_debug",
        "model.num_classes=12",
        "sample.classes=[0]",
    )
    result = train(second)
    assert result.error is None
    from nuance.data import storage

    assert storage.exists(f"{storage_path}/remote/step_00000002/meta.json")
    assert storage.exists(f"{storage_path}/remote/step_00000004/deepspeed/latest")
    meta = json.loads(storage.read_bytes(f"{storage_path}/remote/step_00000004/meta.json"))
    assert meta["step"] == 4
    run_dir = Path("~/.cache/nuance/runs/remote").expanduser()
    workers = [json.loads(x) for x in (run_dir / "workers" / "rank00000.jsonl").read_text().splitlines()]
    assert workers[-1]["resume_from"], "the second submission should resume from the S3 checkpoint"
    out = tmp_path / "png"
    proc = subprocess.run(
        [
            *CLI,
            "sample",
            f"{storage_path}/remote/step_00000004",
            "--class",
            "3",
            "--num",
            "1",
            "--steps",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(out.glob("*.png"))) == 1

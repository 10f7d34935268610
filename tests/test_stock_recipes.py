"""The shipped recipes for stock models run against stock-layout pipeline folders: SDXL LoRA and
adversarial distillation, SD3.5-Large fine-tuning (ZeRO-3), Flux LoRA.

Each recipe names one pipeline folder for the backbone, the VAE and the text stack; here that folder is a
tiny random-weight one of tests/stock_pipelines.py, and each recipe trains 2 steps under Ray Train (1 CPU
worker), then exports a pipeline that stock diffusers loads (LoRAs through `load_lora_weights`).
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from nuance.orchestration.recipe import load_recipe
from tests.stock_pipelines import IMAGE_SIZE, make_pipeline_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sdxl_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-world")
    return make_pipeline_folder("sdxl", root / "sdxl"), image_shards(root)


def image_shards(root):
    """Two shards of 8 random 24 px PNGs captioned "a red cat"."""
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    for shard in range(2):
        with tarfile.open(root / "data" / f"part-{shard:06d}.tar", "w") as tar:
            for i in range(8):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buffer, format="PNG")
                for ext, data in (("png", buffer.getvalue()), ("txt", b"a red cat")):
                    info = tarfile.TarInfo(f"{shard}-{i:04d}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    return root / "data"


def tiny_run(recipe_name: str, folder, data, storage, *overrides: str):
    recipe, _ = load_recipe(
        recipe_name,
        [
            f"vae={folder}",
            f"text_encoder.path={folder}",
            f"data.source={data}",
            f"data.image_size={IMAGE_SIZE}",
            "data.bucketing=false",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.shuffle_buffer=4",
            "model.gradient_checkpointing=false",
            "engine.precision=fp32",
            "engine.micro_batches=1",
            "train.max_steps=2",
            "train.ckpt_every=2",
            "train.log_every=1",
            "sample.every=0",
            "sample.steps=2",
            "sample.num_per_condition=1",
            "cluster.use_gpu=false",
            "cluster.num_workers=1",
            "cluster.cpus_per_worker=1",
            f"cluster.storage_path={storage}",
            "tracking.mode=disabled",
            *overrides,
        ],
    )
    return recipe


def test_lora_sdxl_recipe_trains_and_exports_a_stock_pipeline(sdxl_world, tmp_path, ray_cluster):
    from nuance.orchestration.launch import train
    from nuance.trainers.inference import export_diffusers

    folder, data = sdxl_world
    recipe = tiny_run("lora_sdxl", folder, data, tmp_path, f"model.pretrained={folder}")
    result = train(recipe)
    assert result.error is None, result.error
    ckpt = tmp_path / recipe.name / "step_00000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["kind"] == "lora"
    # The harness records the trained architecture: the folder's U-Net, not the (2.6B) unet_sdxl preset's.
    assert meta["architecture"]["family"] == "unet"
    assert meta["architecture"]["config"]["block_out_channels"] == [16, 32]
    out = export_diffusers(ckpt, tmp_path / "export")
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    pipe.load_lora_weights(out / "lora")
    images = pipe(
        "a red cat", num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="np"
    ).images
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()


def test_adversarial_sdxl_recipe_distills_from_the_stock_folder(sdxl_world, tmp_path, ray_cluster):
    from nuance.orchestration.launch import train
    from nuance.trainers.inference import export_diffusers

    folder, data = sdxl_world
    recipe = tiny_run("distill/adversarial_unet_sdxl", folder, data, tmp_path, f"distill.teacher={folder}")
    result = train(recipe)
    assert result.error is None, result.error
    ckpt = tmp_path / recipe.name / "step_00000002"
    out = export_diffusers(ckpt, tmp_path / "export")
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    base = StableDiffusionXLPipeline.from_pretrained(folder)
    moved = [not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), base.unet.parameters())]
    assert any(moved)  # the student trained away from the teacher it started from
    images = pipe(
        "a red cat", num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="np"
    ).images
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()


@pytest.mark.parametrize(
    ("recipe_name", "kind"), [("lora_flux", "flux"), ("sd35_large", "sd3")], ids=["lora_flux", "sd35_large"]
)
def test_flux_lora_and_sd35_recipes_train_and_export(recipe_name, kind, tmp_path, ray_cluster):
    from nuance.orchestration.launch import train
    from nuance.trainers.inference import export_diffusers

    folder = make_pipeline_folder(kind, tmp_path / kind)
    data = image_shards(tmp_path)
    extra = ["model.name=flux_debug"] if kind == "flux" else ["model.name=mmdit_debug"]
    recipe = tiny_run(
        recipe_name,
        folder,
        data,
        tmp_path,
        f"model.pretrained={folder}",
        "text_encoder.t5_max_length=16",
        *extra,
    )
    result = train(recipe)
    assert result.error is None, result.error
    ckpt = tmp_path / recipe.name / "step_00000002"
    out = export_diffusers(ckpt, tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}[kind]
    if recipe.kind == "lora":
        pipe.load_lora_weights(out / "lora")
    images = pipe(
        "a red cat",
        num_inference_steps=2,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        max_sequence_length=16,
        output_type="np",
    ).images
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()

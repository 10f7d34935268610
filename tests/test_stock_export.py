"""Checkpoints of models started from stock pipeline folders: sample / export rebuild the trained
architecture (not the preset's), and `nuance export` writes a pipeline the stock class loads and samples.

Checkpoints are written in-process by the real `checkpoint.save` with the torch engine (no Ray, no
DeepSpeed): the backbone is built from the tiny SDXL / SD3 / Flux folders of tests/stock_pipelines.py and
its weights moved off the folder's (standing in for training), so the export must carry the new weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from nuance.trainers import checkpoint
from nuance.trainers.components import build_components
from nuance.trainers.config import RunConfig, config_from_dict, config_to_yaml
from nuance.trainers.inference import (
    checkpoint_images,
    export_diffusers,
    load_checkpoint_model,
    sample_from_checkpoint,
)
from nuance.trainers.models.backbone import Backbone
from nuance.trainers.models.mmdit import pack_latents
from nuance.trainers.models.text_stacks import TextStack
from nuance.trainers.torch_engine import TorchEngine
from tests.stock_pipelines import IMAGE_SIZE, make_pipeline_folder

PRESET = {"sdxl": "unet_sdxl_debug", "sd3": "mmdit_debug", "flux": "flux_debug"}
PIPELINE = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock-export")
    return {kind: make_pipeline_folder(kind, root / kind, seed=1) for kind in PRESET}


def recipe_for(kind: str, folder: Path, pretrained: Path | None = None) -> RunConfig:
    objective = (
        {"kind": "eps", "schedule": "scaled_linear"} if kind == "sdxl" else {"kind": "flow", "shift": 3.0}
    )
    return config_from_dict(
        RunConfig,
        {
            "model": {"name": PRESET[kind], "pretrained": str(pretrained or folder)},
            "vae": str(folder),
            "text_encoder": {"path": str(folder), "t5_max_length": 16},
            "objective": objective,
            "data": {"image_size": IMAGE_SIZE},
            "engine": {"backend": "ddp", "zero_stage": 0},
            # SDXL: DDIM, deterministic (the exported scheduler is the recipe's sampler's)
            "sample": {
                "steps": 2,
                "prompts": ["a red cat"],
                "num_per_condition": 1,
                "sampler": "ddim" if kind == "sdxl" else "default",
            },
        },
    )


def write_checkpoint(recipe: RunConfig, directory: Path) -> dict[str, torch.Tensor]:
    """A checkpoint of the recipe's backbone with moved weights; returns those weights."""
    comps = build_components(recipe)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in comps.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    engine = TorchEngine(
        comps.backbone, recipe.engine, recipe.optim, micro_batch=1, world_size=1, total_steps=1
    )
    meta = {
        "step": 1,
        "world_size": 1,
        "zero_stage": 0,
        "engine": engine.backend,
        "run_id": "test",
        "kind": str(recipe.kind),
        "architecture": comps.backbone.architecture,  # what trainers.loops.harness records
    }
    checkpoint.save(
        directory,
        engine=engine,
        ema=None,
        data_state={},
        meta=meta,
        recipe_yaml=config_to_yaml(recipe),
        rank=0,
    )
    return {k: v.clone() for k, v in comps.backbone.net.state_dict().items()}


def test_checkpoint_rebuilds_the_pretrained_architecture_not_the_presets(folders, tmp_path):
    """model.pretrained's U-Net (16/32 channels) differs from the preset (32/64): sample and export must
    rebuild the trained one, even once the pretrained folder is gone (another machine)."""
    pretrained = tmp_path / "unet-only"
    shutil.copytree(folders["sdxl"] / "unet", pretrained)
    recipe = recipe_for("sdxl", folders["sdxl"], pretrained)
    trained = write_checkpoint(recipe, tmp_path / "ckpt")
    shutil.rmtree(pretrained)
    _, comps = load_checkpoint_model(tmp_path / "ckpt")
    assert tuple(comps.backbone.net.config.block_out_channels) == (16, 32)
    loaded = comps.backbone.net.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    paths = sample_from_checkpoint(
        tmp_path / "ckpt", prompts=[], classes=[], num_per_condition=1, out=tmp_path / "s"
    )
    assert len(paths) == 1 and paths[0].is_file()


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux"])
def test_export_is_the_stock_pipeline_and_samples(folders, tmp_path, kind):
    recipe = recipe_for(kind, folders[kind])
    trained = write_checkpoint(recipe, tmp_path / "ckpt")
    out = export_diffusers(tmp_path / "ckpt", tmp_path / "export")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE[kind]
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == PIPELINE[kind]
    net = pipe.unet if kind == "sdxl" else pipe.transformer
    exported = net.state_dict()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    # The text stack travels whole: the export encodes prompts as the source folder does.
    ours, theirs = TextStack(str(out), t5_max_length=16), TextStack(str(folders[kind]), t5_max_length=16)
    for a, b in zip(ours(["a red cat"]), theirs(["a red cat"])):
        assert torch.equal(a, b)
    if kind == "sdxl":
        assert pipe.config.force_zeros_for_empty_prompt is False  # CFG's null = the empty caption, as trained
    # Parity: from the same initial noise the stock pipeline samples what nuance samples (SDXL: DDIM + CFG
    # with the empty caption as null condition; SD3: flow Euler + CFG; Flux: its guidance input at 1.0).
    guidance = 1.0 if kind == "flux" else 3.0
    recipe, comps = load_checkpoint_model(tmp_path / "ckpt")
    ours, _ = checkpoint_images(
        recipe, comps, ["a red cat"], [], 1, 2, guidance, str(recipe.sample.sampler), 0, torch.device("cpu")
    )
    noise = torch.randn((1, *comps.latent_shape), generator=torch.Generator().manual_seed(0))
    extra = {} if kind == "sdxl" else {"max_sequence_length": 16}  # the recipe's t5_max_length
    if kind == "flux":
        # FluxPipeline walks linspace(1, 1/N, N) (then shifted) unless given sigmas; nuance walks the
        # scheduler's own set_timesteps(N) grid: hand the pipeline that grid, unshifted.
        pipe.scheduler.set_timesteps(2)
        shifted, shift = pipe.scheduler.sigmas[:-1], pipe.scheduler.config.shift
        extra["sigmas"] = (shifted / (shift - (shift - 1) * shifted)).tolist()
    with torch.no_grad():
        theirs = pipe(
            "a red cat",
            latents=pack_latents(noise) if kind == "flux" else noise,
            num_inference_steps=2,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            guidance_scale=guidance,
            output_type="pt",
            **extra,
        ).images
    assert theirs.shape == ours.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert ours.std() > 0.01  # an image, not a constant


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux"])
def test_lora_loads_with_the_stock_load_lora_weights(folders, tmp_path, kind):
    """Adapters nuance trains on a pipeline folder's U-Net / transformer load into the stock pipeline with
    its own `load_lora_weights` and change its backbone exactly as they change nuance's."""
    from nuance.trainers.config import LoraConfig
    from nuance.trainers.lora import apply_lora, save_lora

    recipe = recipe_for(kind, folders[kind])
    comps = build_components(recipe)
    apply_lora(comps.backbone, LoraConfig(rank=2, alpha=4.0))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in comps.backbone.net.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    save_lora(comps.backbone, tmp_path / "lora")
    latent = comps.latent_shape
    x, t = torch.randn(2, *latent), torch.tensor([50.0, 600.0])
    cond = comps.conditioner.from_captions(["a red cat", "a dog"])
    with torch.no_grad():
        ours = comps.backbone.eval()(x, t, **cond)
        pipe = DiffusionPipeline.from_pretrained(folders[kind])
        stock = Backbone(pipe.unet if kind == "sdxl" else pipe.transformer, comps.backbone.family)
        before = stock(x, t, **cond)
        pipe.load_lora_weights(tmp_path / "lora")
        after = stock(x, t, **cond)
    assert (before - ours).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(after, ours, atol=1e-5, rtol=1e-5)

"""Generate images from a trained backbone: conditions -> sampler (with CFG) -> decode -> PNG grid."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nuance.trainers.conditioning import Conditioner
from nuance.trainers.config import guidance_scale
from nuance.trainers.diffusion import classifier_free_guidance


@torch.no_grad()
def generate(
    model: Callable,  # model(x_t, t_model, **cond) -> prediction (a Backbone or a DeepSpeed engine)
    objective,
    conditioner: Conditioner,
    autoencoder: torch.nn.Module,
    *,
    prompts: list[str],
    classes: list[int],
    num_per_condition: int,
    latent_shape: tuple[int, int, int],
    steps: int,
    cfg: float | None,
    sampler: str = "default",
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, list[str]]:
    """Images in [0, 1], (N, 3, H, W), N = conditions x num_per_condition, and one title per image.
    `cfg` None: the objective's default guidance scale (`config.DEFAULT_CFG_FOR`)."""
    cond, titles = conditioner.for_sampling(prompts, classes)
    cond = {k: v.repeat_interleave(num_per_condition, 0).to(device) for k, v in cond.items()}
    titles = [t for t in titles for _ in range(num_per_condition)]
    batch = len(titles)
    null = {k: v.to(device) for k, v in conditioner.null(batch).items()}
    model_fn = classifier_free_guidance(model, cond, null, guidance_scale(objective.prediction, cfg))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((batch, *latent_shape), generator=generator).to(device)
    name = objective.default_sampler if sampler == "default" else sampler
    latents = objective.sample(model_fn, noise, steps, sampler=name, generator=generator)
    images = autoencoder.decode(latents.float())
    return ((images.clamp(-1, 1) + 1) / 2).cpu(), titles


def save_grid(images: torch.Tensor, path: str | Path, ncol: int) -> Path:
    """Tile images (N, 3, H, W) in [0, 1] into one PNG, `ncol` per row."""
    n, _, h, w = images.shape
    nrow = -(-n // ncol)
    grid = torch.zeros(3, nrow * h, ncol * w)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_images(images: torch.Tensor, directory: str | Path, stem: str) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        paths.append(directory / f"{stem}_{i:03d}.png")
        Image.fromarray(array).save(paths[-1])
    return paths

"""Build the pieces of a diffusion model from a recipe: autoencoder, text encoder, conditioner,
backbone and objective. Shared by every training loop and by sampling / export."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nuance.trainers.conditioning import Conditioner
from nuance.trainers.config import ObjectiveConfig, RunConfig
from nuance.trainers.diffusion import build_objective
from nuance.trainers.models.backbone import Backbone, build_backbone
from nuance.trainers.models.encoders import CaptionEncoder, PixelSpace, build_autoencoder
from nuance.trainers.models.presets import preset_conditioning
from nuance.trainers.models.text_stacks import build_text_encoder
from nuance.trainers.zero_init import is_partitioned, partitioned_init, partitions_at_init


@dataclass
class Components:
    autoencoder: torch.nn.Module
    text_encoder: CaptionEncoder | None
    conditioner: Conditioner
    backbone: Backbone
    objective: object

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.conditioner.image_size // self.autoencoder.downsample
        return (self.autoencoder.latent_channels, size, size)


def objective_from_config(cfg: ObjectiveConfig):
    return build_objective(
        cfg.kind,
        schedule=cfg.schedule,
        num_timesteps=cfg.num_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        zero_terminal_snr=cfg.zero_terminal_snr,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        shift=cfg.shift,
    )


def build_components(
    recipe: RunConfig,
    device: torch.device | str = "cpu",
    *,
    world_size: int | None = None,
    rank: int = 0,
    architecture: dict | None = None,
) -> Components:
    """Autoencoder, text encoder, conditioner, backbone and objective of the recipe. `world_size` (set by
    training workers only): when the engine will be DeepSpeed ZeRO-3 over that many ranks, the backbone
    is built partitioned (trainers.zero_init), so no rank ever holds all of it, and must not be moved
    (`.to`) afterwards. Sampling and export (no `world_size`) build whole models, of the `architecture` a
    checkpoint records (`Backbone.architecture`) when given."""
    device = torch.device(device)
    autoencoder = build_autoencoder(recipe.vae, device)
    text_encoder = None
    if preset_conditioning(recipe.model.name) == "text":
        text_encoder = build_text_encoder(recipe.text_encoder, device)
    image_size = recipe.data.image_size
    if image_size % autoencoder.downsample:
        raise ValueError(
            f"data.image_size={image_size} is not divisible by the VAE's downsampling "
            f"factor {autoencoder.downsample}"
        )
    partition = None
    cuda = device.type == "cuda"
    if world_size and partitions_at_init(recipe.engine, world_size=world_size, cuda=cuda):
        sizes = {"micro_batch": recipe.data.batch_size, "world_size": world_size, "device": device}
        partition = partitioned_init(recipe.engine, recipe.optim, **sizes)
    backbone = build_backbone(
        recipe.model,
        in_channels=autoencoder.latent_channels,
        sample_size=image_size // autoencoder.downsample,
        cond_dim=text_encoder.hidden_size if text_encoder else None,
        pooled_dim=text_encoder.pooled_size if text_encoder else None,
        partition=partition,
        rank=rank,
        architecture=architecture,
    )
    conditioner = Conditioner(
        backbone.conditioning,
        text_encoder=text_encoder,
        num_classes=backbone.num_classes,
        image_size=image_size,
        uses_time_ids=backbone.uses_time_ids,
        uses_pooled=backbone.uses_pooled,
    )
    return Components(
        autoencoder, text_encoder, conditioner, backbone, objective_from_config(recipe.objective)
    )


def training_components(recipe: RunConfig, rank: int, world_size: int, device: torch.device) -> Components:
    """`build_components` for a training worker: the backbone on `device`, or partitioned there (ZeRO-3)."""
    comps = build_components(recipe, device, world_size=world_size, rank=rank)
    if not is_partitioned(comps.backbone):
        comps.backbone.to(device)
    return comps


__all__ = ["Components", "PixelSpace", "build_components", "objective_from_config", "training_components"]

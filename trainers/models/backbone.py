"""Backbones: diffusers DiT / PixArt / U-Net / MMDiT (SD3) / Flux behind one `forward(x_t, t, **cond)`.

The adapter is the `nn.Module` handed to DeepSpeed. DeepSpeed's bf16/fp16 modes cast the whole
module, so every input the adapter builds is cast to the weight dtype here, and the output is
returned in fp32 so the loss is always computed in full precision.
"""

from __future__ import annotations

import contextlib
import json

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from nuance.data.model_folders import model_folder
from nuance.trainers.config import ModelConfig
from nuance.trainers.models.mmdit import (
    FLUX_GUIDANCE,
    JOINT_FAMILIES,
    check_joint,
    flux_forward,
    joint_preset_kwargs,
    mmdit_forward,
)
from nuance.trainers.models.presets import CONDITIONING, PRESETS
from nuance.trainers.zero_init import load_partitioned

NET_CLASSES = {
    "dit": DiTTransformer2DModel,
    "pixart": PixArtTransformer2DModel,
    "unet": UNet2DConditionModel,
    "mmdit": SD3Transformer2DModel,
    "flux": FluxTransformer2DModel,
}
SUBFOLDER = {
    "dit": "transformer",
    "pixart": "transformer",
    "unet": "unet",
    "mmdit": "transformer",
    "flux": "transformer",
}


class Backbone(nn.Module):
    """`forward(x_t, t_model, class_labels | encoder_hidden_states[, mask, pooled, time_ids])`."""

    def __init__(self, net: nn.Module, family: str):
        super().__init__()
        self.net = net
        self.family = family
        self.conditioning = CONDITIONING[family]
        self.guidance = FLUX_GUIDANCE  # Flux with guidance_embeds: the fixed guidance value it is given

    @property
    def architecture(self) -> dict:
        """What rebuilds this network without its weights: the family and the diffusers model's own config
        (`build_backbone(..., architecture=)`); checkpoints carry it in meta.json."""
        return {"family": self.family, "config": json.loads(self.net.to_json_string())}

    @property
    def in_channels(self) -> int:
        """Channels of the latents `forward` takes (Flux's net takes 4x that, 2x2-packed)."""
        channels = self.net.config.in_channels
        return channels // 4 if self.family == "flux" else channels

    @property
    def num_classes(self) -> int | None:
        return self.net.config.num_embeds_ada_norm if self.family == "dit" else None

    @property
    def uses_time_ids(self) -> bool:
        return self.family == "unet" and self.net.config.addition_embed_type == "text_time"

    @property
    def uses_pooled(self) -> bool:
        """Takes the pooled text embedding: MMDiT / Flux, and SDXL-style U-Nets (with their time ids)."""
        return self.family in JOINT_FAMILIES or self.uses_time_ids

    def forward(
        self,
        x: torch.Tensor,  # (B, C, H, W) noisy latents
        t: torch.Tensor,  # (B,) model time (diffusers convention: [0, 1000))
        class_labels: torch.Tensor | None = None,  # (B,) long; num_classes = null class
        encoder_hidden_states: torch.Tensor | None = None,  # (B, T, D)
        encoder_attention_mask: torch.Tensor | None = None,  # (B, T) 1 = token, 0 = pad
        pooled: torch.Tensor | None = None,  # (B, D) pooled text embedding (SDXL, MMDiT, Flux)
        time_ids: torch.Tensor | None = None,  # (B, 6) SDXL size/crop conditioning
    ) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype
        x = x.to(dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.to(dtype)
        if self.family == "dit":
            out = self.net(x, timestep=t, class_labels=class_labels).sample
        elif self.family == "mmdit":
            out = mmdit_forward(self.net, x, t, encoder_hidden_states, pooled.to(dtype))
        elif self.family == "flux":
            out = flux_forward(self.net, x, t, encoder_hidden_states, pooled.to(dtype), self.guidance)
        elif self.family == "pixart":
            out = self.net(
                x,
                encoder_hidden_states=encoder_hidden_states,
                timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                encoder_attention_mask=encoder_attention_mask,
            ).sample
        else:
            added = None
            if self.uses_time_ids:
                added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
            out = self.net(
                x,
                t,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                added_cond_kwargs=added,
            ).sample
        # Checkpoints trained with learned variance (DiT, PixArt) predict 2C channels: keep the mean.
        return out[:, : x.shape[1]].float()


def _preset_kwargs(
    name: str,
    in_channels: int,
    sample_size: int,
    cond_dim: int | None,
    num_classes: int | None,
    pooled_dim: int | None = None,
) -> tuple[str, dict]:
    kwargs = dict(PRESETS[name])
    family = kwargs.pop("family")
    if family in JOINT_FAMILIES:
        return family, joint_preset_kwargs(
            name, family, kwargs, in_channels, sample_size, cond_dim, pooled_dim
        )
    kwargs.update(in_channels=in_channels, out_channels=in_channels, sample_size=sample_size)
    if family == "dit":
        kwargs["num_embeds_ada_norm"] = num_classes or kwargs["num_embeds_ada_norm"]
    elif family == "pixart":
        width = kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
        kwargs.update(cross_attention_dim=width, caption_channels=cond_dim, use_additional_conditions=False)
    else:
        kwargs["cross_attention_dim"] = cond_dim
        if kwargs.get("addition_embed_type") == "text_time":
            pooled = cond_dim if pooled_dim is None else pooled_dim
            kwargs["projection_class_embeddings_input_dim"] = pooled + 6 * kwargs["addition_time_embed_dim"]
    return family, kwargs


def build_backbone(
    cfg: ModelConfig,
    *,
    in_channels: int,
    sample_size: int,
    cond_dim: int | None = None,
    torch_dtype: torch.dtype | None = None,
    pooled_dim: int | None = None,
    partition: contextlib.AbstractContextManager | None = None,
    rank: int = 0,
    architecture: dict | None = None,
) -> Backbone:
    """A backbone from a preset (random init) or from `cfg.pretrained` (a local diffusers folder).

    `cond_dim` is the text encoder's token width, `pooled_dim` its pooled width (default `cond_dim`;
    MMDiT / Flux check both against joint_attention_dim / pooled_projection_dim). `partition`: a
    ZeRO-3 `zero.Init` context (trainers.zero_init) to build the network in; pretrained weights are then
    copied into the partitions one tensor at a time (rank 0 reads). `architecture` (a checkpoint's
    `Backbone.architecture`): build exactly that network, random-init, ignoring preset and `pretrained`."""
    if architecture is not None:
        return _finish(
            NET_CLASSES[architecture["family"]].from_config(architecture["config"]),
            architecture["family"],
            cfg,
        )
    family = PRESETS[cfg.name]["family"]
    # A stock pipeline folder (model_index.json) gives its unet/ or transformer/.
    folder = model_folder(cfg.pretrained, SUBFOLDER[family]) if cfg.pretrained else None
    if folder and partition is not None:
        with partition:
            net = NET_CLASSES[family].from_config(NET_CLASSES[family].load_config(folder))
        _check_built(net, family, cfg, in_channels, sample_size, cond_dim, pooled_dim)
        load_partitioned(net, folder, rank=rank)
    elif folder:
        net = NET_CLASSES[family].from_pretrained(folder, torch_dtype=torch_dtype)
        _check_built(net, family, cfg, in_channels, sample_size, cond_dim, pooled_dim)
    else:
        family, kwargs = _preset_kwargs(
            cfg.name, in_channels, sample_size, cond_dim, cfg.num_classes, pooled_dim
        )
        with partition or contextlib.nullcontext():
            net = NET_CLASSES[family](**kwargs)
    return _finish(net, family, cfg)


# Families whose training backward fails inside torch's cuDNN attention kernels (measured on an H100,
# torch 2.11 + cuDNN 9: Flux-dev LoRA over a bf16 base; pytorch/pytorch#134001 and #190321 report the
# same `mha_graph.execute` failure, with the same workaround).
CUDNN_ATTENTION_FAULTS = ("flux",)


def configure_attention(cfg: ModelConfig, family: str) -> bool:
    """Allow or forbid torch's cuDNN SDPA kernels for this process (`model.cudnn_attention`); returns
    whether they are allowed. A process-wide switch, not a context around the forward: gradient
    checkpointing recomputes the attention in backward, outside any forward-time context."""
    if cfg.cudnn_attention == "auto":
        if family not in CUDNN_ATTENTION_FAULTS:
            return torch.backends.cuda.cudnn_sdp_enabled()
        allowed = False
    else:
        allowed = cfg.cudnn_attention == "on"
    torch.backends.cuda.enable_cudnn_sdp(allowed)
    return allowed


def _finish(net: nn.Module, family: str, cfg: ModelConfig) -> Backbone:
    configure_attention(cfg, family)
    # Condition dropout for classifier-free guidance is done once, by the conditioner; diffusers'
    # DiT would otherwise drop labels a second time inside the label embedding.
    for module in net.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    if cfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    return Backbone(net, family)


def _check_built(net, family, cfg, in_channels, sample_size, cond_dim, pooled_dim) -> None:
    """A `model.pretrained` network against the run's sizes (one-line errors naming the key)."""
    if family in JOINT_FAMILIES:
        source = f"model.pretrained={cfg.pretrained}"
        check_joint(net.config, family, source, in_channels, sample_size, cond_dim, pooled_dim)
    else:
        _check_pretrained(net, family, cfg, in_channels, cond_dim, pooled_dim)


def _check_pretrained(
    net: nn.Module,
    family: str,
    cfg: ModelConfig,
    in_channels: int,
    cond_dim: int | None,
    pooled_dim: int | None = None,
) -> None:
    conf = net.config
    if conf.in_channels != in_channels:
        raise ValueError(
            f"model.pretrained={cfg.pretrained} takes {conf.in_channels} input channels but "
            f"the data gives {in_channels} (check 'vae')"
        )
    want = conf.get("caption_channels") if family == "pixart" else conf.get("cross_attention_dim")
    if family != "dit" and cond_dim is not None and want != cond_dim:
        raise ValueError(
            f"model.pretrained={cfg.pretrained} expects text embeddings of width {want} but "
            f"the recipe's text encoder (text_encoder.path) gives {cond_dim}: use the encoder it was "
            "trained with"
        )
    if family == "unet" and conf.get("addition_embed_type") == "text_time" and pooled_dim is not None:
        # SDXL's added embedding takes the pooled text vector and the six size / crop ids.
        pooled = conf.projection_class_embeddings_input_dim - 6 * conf.addition_time_embed_dim
        have = pooled_dim
        if pooled != have:
            raise ValueError(
                f"model.pretrained={cfg.pretrained} expects a pooled text embedding of width {pooled} but "
                f"the recipe's text encoder (text_encoder.path) gives {have}: use the pipeline folder's "
                "text stack (text_encoder.path = the SDXL folder)"
            )

"""MMDiT (SD3 / SD3.5) and Flux backbones: run-dependent preset sizes, checks, and the calls into
diffusers' `SD3Transformer2DModel` / `FluxTransformer2DModel` exactly as the stock pipelines make them.

Both families take the text tokens (`joint_attention_dim` wide) and a pooled text vector
(`pooled_projection_dim` wide) and attend over text and image tokens jointly. Neither masks padded text
tokens (the stock SD3 / Flux pipelines pass none), so the attention mask the conditioner provides is
not used.

Flux works on 2x2-packed latents: (B, C, H, W) -> (B, (H/2)(W/2), 4C) tokens with RoPE ids
(0, row, column) per image token and zeros per text token (`FluxPipeline._pack_latents`,
`_prepare_latent_image_ids`); its in_channels is 4 x the latent channels. Its timestep is
t_model / 1000 (the model multiplies by 1000 again, so its time embedding sees t_model as every other
family does), and guidance-distilled checkpoints (`guidance_embeds`, FLUX.1-dev) get a fixed guidance
value (`FLUX_GUIDANCE`) in the units of the pipeline's `guidance_scale`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

JOINT_FAMILIES = ("mmdit", "flux")
FLUX_GUIDANCE = 1.0
FLUX_TIME_SCALE = 1000.0  # FluxPipeline passes timestep / 1000; the model scales it back by 1000


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/2)(W/2), 4C), as `FluxPipeline._pack_latents`."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, (H/2)(W/2), 4C) -> (B, C, H, W), as `FluxPipeline._unpack_latents`."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """((height)(width), 3) RoPE ids (0, row, column) of the packed tokens (`_prepare_latent_image_ids`)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def mmdit_forward(
    net: nn.Module, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor
) -> torch.Tensor:
    """SD3Transformer2DModel on (B, C, H, W) latents; t is the model time (sigma x 1000)."""
    return net(hidden_states=x, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=t).sample


def flux_forward(
    net: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    hidden: torch.Tensor,
    pooled: torch.Tensor,
    guidance: float = FLUX_GUIDANCE,
) -> torch.Tensor:
    """FluxTransformer2DModel on (B, C, H, W) latents: pack, call as FluxPipeline does, unpack."""
    b, _, h, w = x.shape
    g = None
    if net.config.guidance_embeds:
        g = torch.full((b,), float(guidance), device=x.device, dtype=torch.float32)
    out = net(
        hidden_states=pack_latents(x),
        encoder_hidden_states=hidden,
        pooled_projections=pooled,
        timestep=t / FLUX_TIME_SCALE,
        img_ids=latent_image_ids(h // 2, w // 2, x.device, x.dtype),
        txt_ids=torch.zeros(hidden.shape[1], 3, device=x.device, dtype=x.dtype),
        guidance=g,
    ).sample
    return unpack_latents(out, h, w)


def joint_preset_kwargs(
    name: str,
    family: str,
    kwargs: dict,
    in_channels: int,
    sample_size: int,
    cond_dim: int | None,
    pooled_dim: int | None,
) -> dict:
    """Constructor kwargs of an mmdit / flux preset for this run; text widths the preset leaves open
    (the debug presets) follow the text encoder, those it names are checked against it."""
    if cond_dim is None and "joint_attention_dim" not in kwargs:
        raise ValueError(
            f"model.name={name}: the {family} family is text-conditional and needs a text encoder"
        )
    kwargs.setdefault("joint_attention_dim", cond_dim)
    kwargs.setdefault("pooled_projection_dim", pooled_dim if pooled_dim is not None else cond_dim)
    if family == "mmdit":
        kwargs.update(in_channels=in_channels, out_channels=in_channels, sample_size=sample_size)
        # The context projection feeds the joint attention: its width is the model width.
        kwargs.setdefault(
            "caption_projection_dim", kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
        )
    else:
        kwargs["in_channels"] = 4 * in_channels
    check_joint(kwargs, family, f"model.name={name}", in_channels, sample_size, cond_dim, pooled_dim)
    return kwargs


def check_joint(
    conf: Mapping,
    family: str,
    source: str,
    in_channels: int,
    sample_size: int,
    cond_dim: int | None,
    pooled_dim: int | None,
) -> None:
    """One-line errors naming the key when a model config does not fit the run's data or text encoder.
    `conf` is a preset's kwargs or a loaded model's config."""
    want_in = 4 * in_channels if family == "flux" else in_channels
    if conf["in_channels"] != want_in:
        packed = " (Flux: 4 x the latent channels, 2x2-packed)" if family == "flux" else ""
        raise ValueError(
            f"{source} takes in_channels={conf['in_channels']} but the data gives {want_in}{packed} "
            "(check 'vae')"
        )
    if sample_size % 2:
        raise ValueError(
            f"data.image_size gives latents of {sample_size} px, but {family} models take 2x2 patches: "
            "use an image size whose latent size is even"
        )
    max_size = conf.get("pos_embed_max_size") if family == "mmdit" else None
    if max_size and sample_size // conf["patch_size"] > max_size:
        raise ValueError(
            f"data.image_size gives {sample_size // conf['patch_size']} patches per side, more than "
            f"{source}'s pos_embed_max_size={max_size}"
        )
    pooled_dim = cond_dim if pooled_dim is None else pooled_dim
    for key, have in (("joint_attention_dim", cond_dim), ("pooled_projection_dim", pooled_dim)):
        if have is not None and conf[key] != have:
            raise ValueError(
                f"{source} expects text embeddings with {key}={conf[key]} but the recipe's text encoder "
                f"(text_encoder.path) gives {have}: use the text encoder(s) the model was made for"
            )

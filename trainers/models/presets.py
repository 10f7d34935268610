"""Named model presets: one line of architecture per size, like DiT's `DiT_models` table.

Pure data (no diffusers import) so recipe validation stays cheap. `family` picks the diffusers
class; the rest are that class's constructor arguments. Sizes that depend on the run (latent
channels, sample size, text-embedding width) are filled in by `trainers.models.backbone`; a preset that
names a text width (joint_attention_dim, pooled_projection_dim) keeps it and needs a text encoder of
that width.
"""

from __future__ import annotations

_DIT = {"family": "dit", "patch_size": 2, "norm_type": "ada_norm_zero", "num_embeds_ada_norm": 1000}
_PIXART = {"family": "pixart", "patch_size": 2, "norm_type": "ada_norm_single"}
_SD_BLOCKS = {
    "family": "unet",
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
}

_MMDIT = {"family": "mmdit", "patch_size": 2}
_FLUX = {"family": "flux", "patch_size": 1}

PRESETS: dict[str, dict] = {
    # Class-conditional DiT (Peebles & Xie 2023), diffusers DiTTransformer2DModel.
    "dit_debug": {**_DIT, "num_attention_heads": 2, "attention_head_dim": 32, "num_layers": 2},
    "dit_s2": {**_DIT, "num_attention_heads": 6, "attention_head_dim": 64, "num_layers": 12},
    "dit_b2": {**_DIT, "num_attention_heads": 12, "attention_head_dim": 64, "num_layers": 12},
    "dit_l2": {**_DIT, "num_attention_heads": 16, "attention_head_dim": 64, "num_layers": 24},
    "dit_xl2": {**_DIT, "num_attention_heads": 16, "attention_head_dim": 72, "num_layers": 28},
    # Text-conditional DiT with cross-attention (PixArt-alpha), diffusers PixArtTransformer2DModel.
    "pixart_debug": {**_PIXART, "num_attention_heads": 2, "attention_head_dim": 32, "num_layers": 2},
    "pixart_b2": {**_PIXART, "num_attention_heads": 12, "attention_head_dim": 64, "num_layers": 12},
    "pixart_xl2": {**_PIXART, "num_attention_heads": 16, "attention_head_dim": 72, "num_layers": 28},
    # Stable-Diffusion-style U-Nets, diffusers UNet2DConditionModel. cross_attention_dim follows the
    # text encoder in use (native: SD1.x 768, SD2 1024, SDXL 2048).
    "unet_debug": {
        "family": "unet",
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
    # Tiny U-Net with SDXL's micro-conditioning path (pooled text + size/crop ids), for tests.
    "unet_sdxl_debug": {
        "family": "unet",
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 16,
    },
    "unet_sd15": {**_SD_BLOCKS, "attention_head_dim": 8},
    "unet_sd2": {**_SD_BLOCKS, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
    "unet_sdxl": {
        "family": "unet",
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
        # SDXL micro-conditioning (original size, crop, target size), Podell et al. 2023 sec. 2.2.
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
    },
    # MMDiT (SD3 / SD3.5, Esser et al. 2024), diffusers SD3Transformer2DModel. Real configs as in the
    # released transformer/config.json: 16-channel latents, T5-XXL (4096) tokens, CLIP-L+G pooled (2048).
    "mmdit_debug": {
        **_MMDIT,
        "num_attention_heads": 2,
        "attention_head_dim": 32,
        "num_layers": 2,
        "pos_embed_max_size": 32,
    },
    "sd3_medium": {
        **_MMDIT,
        "num_layers": 24,
        "num_attention_heads": 24,
        "attention_head_dim": 64,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192,
    },
    "sd35_large": {
        **_MMDIT,
        "num_layers": 38,
        "num_attention_heads": 38,
        "attention_head_dim": 64,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 2432,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192,
        "qk_norm": "rms_norm",
    },
    # Flux (Black Forest Labs), diffusers FluxTransformer2DModel: double-stream (MMDiT) then single-stream
    # blocks, RoPE over (text, row, column) axes, on 2x2-packed latents (in_channels = 4 x latent channels).
    "flux_debug": {
        **_FLUX,
        "num_layers": 1,
        "num_single_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 32,
        "axes_dims_rope": (4, 14, 14),
        "guidance_embeds": True,
    },
    "flux_dev": {
        **_FLUX,
        "num_layers": 19,
        "num_single_layers": 38,
        "num_attention_heads": 24,
        "attention_head_dim": 128,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    },
}

CONDITIONING = {"dit": "class", "pixart": "text", "unet": "text", "mmdit": "text", "flux": "text"}
# Families trained only with rectified flow (objective.kind=flow): their released weights are flow models.
FLOW_ONLY_FAMILIES = ("mmdit", "flux")


def preset_family(name: str) -> str:
    return PRESETS[name]["family"]


def preset_conditioning(name: str) -> str:
    """'class' (label embedding) or 'text' (cross-attention over encoder hidden states)."""
    return CONDITIONING[preset_family(name)]

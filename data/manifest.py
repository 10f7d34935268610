"""``manifest.json`` of a shard folder: which shards it holds, how many samples each, and how they were made.

Two formats share one layout::

    {"format": "nuance-shards-v1" | "nuance-latents-v1",
     "shards": {"shard-000000.tar": 1000, ...},     # name -> sample count, in order
     "num_samples": 12345,
     ...}                                            # format-specific fields

Latent folders (``nuance data precompute``) also record ``latent_shape``, ``latent_dtype``, the identities
of the ``vae`` and ``text_encoder`` that made them (``encoder_identity``) and the ``source`` manifest, so
the trainer can refuse latents made with other encoders (``check_latents_match``).

``manifest.json`` is written last and only when every shard is there, so its presence means "complete".
While a folder is being written, ``manifest.partial.json`` (same layout, ``"complete": false``) records the
shards finished so far and the settings that made them; a re-run skips those shards and refuses to mix
shards made with other settings. Every read and write goes through ``data.storage`` (local or s3://).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from nuance.data import storage
from nuance.data.model_folders import MINILM, is_pipeline_folder, model_folder, pipeline_configs

SHARDS_FORMAT = "nuance-shards-v1"
LATENTS_FORMAT = "nuance-latents-v1"
FORMATS = (SHARDS_FORMAT, LATENTS_FORMAT)
MANIFEST_NAME = "manifest.json"
PARTIAL_NAME = "manifest.partial.json"

# Fields a latents manifest must carry on top of the common ones.
LATENT_FIELDS = ("latent_shape", "latent_dtype", "vae", "text_encoder", "source")
# Config keys that describe who saved a model (library versions, origin path), not what the model is;
# leaving them out keeps an identity stable across library upgrades and copies of the folder.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "diffusers_version"})


def join_url(folder: str, name: str) -> str:
    """``folder/name`` for local paths and URLs alike (URLs always use '/')."""
    folder = os.fspath(folder)
    if "://" in folder:
        return posixpath.join(folder.rstrip("/") + "/", name)
    return os.path.join(folder, name)


def manifest_url(folder: str, partial: bool = False) -> str:
    """Where the (partial) manifest of the shard folder ``folder`` lives."""
    return join_url(folder, PARTIAL_NAME if partial else MANIFEST_NAME)


def _check_shard_counts(shards: Any, where: str) -> None:
    """Raise ValueError unless ``shards`` maps shard file names to non-negative sample counts."""
    if not isinstance(shards, Mapping):
        raise ValueError(
            f"{where}: 'shards' must map shard names to sample counts, got {type(shards).__name__}"
        )
    for name, count in shards.items():
        if not isinstance(name, str) or not name.endswith(".tar") or "/" in name:
            raise ValueError(f"{where}: shard name {name!r} must be a plain '*.tar' file name")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{where}: sample count of {name} must be an int >= 0, got {count!r}")


def validate_manifest(manifest: Mapping[str, Any], where: str = "manifest") -> None:
    """Raise ValueError (prefixed by ``where``) if ``manifest`` is not a well-formed manifest."""
    if not isinstance(manifest, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    fmt = manifest.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"{where}: unknown format {fmt!r}; expected one of {FORMATS}")
    _check_shard_counts(manifest.get("shards"), where)
    if manifest.get("num_samples") != sum(manifest["shards"].values()):
        raise ValueError(
            f"{where}: num_samples {manifest.get('num_samples')!r} != sum of shard counts "
            f"{sum(manifest['shards'].values())}"
        )
    if fmt == LATENTS_FORMAT and manifest.get("complete", True):  # a partial manifest records progress only
        missing = [key for key in LATENT_FIELDS if key not in manifest]
        if missing:
            raise ValueError(f"{where}: latents manifest lacks {missing}")


def build_manifest(fmt: str, shards: Mapping[str, int], **fields: Any) -> dict[str, Any]:
    """A complete manifest of format ``fmt`` for ``shards`` (name -> count) + format-specific ``fields``."""
    manifest = {"format": fmt, "shards": dict(shards), "num_samples": sum(shards.values()), **fields}
    validate_manifest(manifest, where=f"new {fmt} manifest")
    return manifest


def read_manifest_if_any(folder: str, partial: bool = False) -> dict[str, Any] | None:
    """The (partial) manifest of ``folder``, or None when the folder has none."""
    url = manifest_url(folder, partial)
    if not storage.exists(url):
        return None
    try:
        manifest = json.loads(storage.read_bytes(url))
    except json.JSONDecodeError as err:
        raise ValueError(f"{url} is not valid JSON: {err}") from err
    validate_manifest(manifest, where=url)
    return manifest


def read_manifest(folder: str) -> dict[str, Any]:
    """The complete manifest of the shard folder ``folder`` (or of the ``manifest.json`` path itself)."""
    folder = os.fspath(folder)
    if folder.endswith(".json"):
        folder = posixpath.dirname(folder) if "://" in folder else os.path.dirname(folder)
    manifest = read_manifest_if_any(folder)
    if manifest is None:
        partial = (
            " (only a partial one: the folder is still being written)"
            if storage.exists(manifest_url(folder, partial=True))
            else ""
        )
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {folder}{partial}")
    return manifest


def write_manifest(folder: str, manifest: Mapping[str, Any], partial: bool = False) -> str:
    """Atomically write ``manifest`` as ``folder``'s manifest (or partial manifest); returns its URL."""
    url = manifest_url(folder, partial)
    validate_manifest(manifest, where=url)
    storage.atomic_write_bytes(url, json.dumps(manifest, indent=2).encode() + b"\n")
    return url


def existing_names(folder: str) -> set[str]:
    """File names directly inside ``folder`` (empty when the folder does not exist yet)."""
    return {posixpath.basename(url) for url in storage.list_urls(folder)}


def finished_shards(folder: str, fingerprint: str) -> dict[str, int]:
    """Shards (name -> count) that an earlier run with the same ``fingerprint`` recorded in ``folder``.

    Reads the complete manifest if there is one, else the partial one. Raises ValueError when either was
    written with another fingerprint (other source or settings): mixing their shards would silently give
    a dataset that matches neither run.
    """
    final, partial = read_manifest_if_any(folder), read_manifest_if_any(folder, partial=True)
    for manifest, name in ((final, MANIFEST_NAME), (partial, PARTIAL_NAME)):
        if manifest is not None and manifest.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{folder} already holds shards made from another source or with other settings "
                f"(its {name} differs); write to a new folder or empty this one"
            )
    recorded = final if final is not None else partial
    return dict(recorded["shards"]) if recorded is not None else {}


class PartialManifest:
    """``manifest.partial.json`` of a folder being written: its fingerprint + the shards finished so far.

    Rewritten at most every ``every_s`` seconds (a folder of 10k shards on S3 should not cost 10k PUTs of
    a growing file); a shard finished but not yet recorded when a run dies is recounted on the next run.
    """

    def __init__(
        self, folder: str, fmt: str, fingerprint: str, done: Mapping[str, int], every_s: float = 10.0
    ):
        self.folder, self.fmt, self.fingerprint, self.every_s = folder, fmt, fingerprint, every_s
        self.shards: dict[str, int] = dict(done)
        self._last_write = float("-inf")
        self._dirty = True

    def record(self, name: str, count: int) -> None:
        """Note that shard ``name`` is complete with ``count`` samples; flushes when due."""
        self.shards[name] = count
        self._dirty = True
        self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        """Write the partial manifest now (``force``) or if ``every_s`` has passed since the last write."""
        now = time.monotonic()
        if not self._dirty or (not force and now - self._last_write < self.every_s):
            return
        manifest = {
            "format": self.fmt,
            "complete": False,
            "fingerprint": self.fingerprint,
            "shards": dict(sorted(self.shards.items())),
            "num_samples": sum(self.shards.values()),
        }
        write_manifest(self.folder, manifest, partial=True)
        self._last_write, self._dirty = now, False


def shard_sample_counts(urls: Sequence[str]) -> dict[str, int]:
    """The sample count of each shard in ``urls`` that the ``manifest.json`` beside it records (one read
    per folder). Folders without a readable manifest add nothing: their counts are unknown."""
    by_folder: dict[str, list[tuple[str, str]]] = {}
    for url in urls:
        folder, name = (posixpath if "://" in url else os.path).split(url)
        by_folder.setdefault(folder, []).append((url, name))
    counts: dict[str, int] = {}
    for folder, members in by_folder.items():
        try:
            manifest = read_manifest_if_any(folder)
        except (OSError, ValueError):  # unreadable or invalid: counts unknown, as without a manifest
            continue
        shards = manifest["shards"] if manifest else {}
        counts.update((url, shards[name]) for url, name in members if name in shards)
    return counts


def count_shard_samples(url: str) -> int:
    """Number of samples (distinct keys) in the tar shard ``url``.

    Used for a shard that was finished but not yet recorded when a run stopped. Members of a sample are
    consecutive in WebDataset tars, so counting key changes is enough.
    """
    count, last_key = 0, None
    with storage.open_url(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            parts = split_member_name(member.name) if member.isfile() else None
            if parts is not None and parts[0] != last_key:
                count, last_key = count + 1, parts[0]
    return count


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset ``(key, extension)`` of a tar member: the key runs to the first dot of the basename.

    None for names without an extension (not part of any sample).
    """
    directory, base = posixpath.split(name)
    if "." not in base.lstrip("."):
        return None
    stem, ext = base.split(".", 1)
    return posixpath.join(directory, stem), ext.lower()


def canonical_config_sha256(config: Mapping[str, Any]) -> str:
    """SHA-256 of a model config as canonical JSON, ignoring keys that only describe who saved it."""
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _model_folder(path_or_name: str) -> tuple[str, str]:
    """(folder to read, path to record) for a model given as 'minilm' or a local folder."""
    if path_or_name == MINILM:
        return model_folder(MINILM), MINILM  # record the name: the packaged path differs between machines
    folder = os.path.abspath(model_folder(path_or_name))
    return folder, folder


def encoder_identity(path_or_name: str, config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{"path", "config_sha256"}`` identifying a frozen encoder (VAE or text encoder).

    ``path_or_name`` is a local model folder or ``'minilm'`` (the packaged MiniLM). The hash is taken over
    ``config`` when given, else over the folder's ``config.json`` -- give ``config`` only for models that
    have no folder: a loaded model's config holds filled-in defaults, so it hashes differently from the
    file. Two folders with equal configs but different weights share an identity (weights are not hashed:
    that would mean reading gigabytes).
    """
    if not isinstance(path_or_name, str) or not path_or_name:
        raise ValueError(f"path_or_name must be a model folder or 'minilm', got {path_or_name!r}")
    folder, recorded = _model_folder(path_or_name)
    if config is None and is_pipeline_folder(folder):  # a stock pipeline folder: all of its parts' configs
        config = pipeline_configs(folder)
    if config is None:
        config_file = os.path.join(folder, "config.json")
        if not os.path.isfile(config_file):
            raise ValueError(f"path_or_name: '{path_or_name}' has no config.json (expected a model folder)")
        with open(config_file) as f:
            config = json.load(f)
    return {"path": recorded, "config_sha256": canonical_config_sha256(config)}


def _mismatch(role: str, made: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    """Why the ``role`` encoder of the latents differs from the recipe's, or None when it matches."""
    if made.get("config_sha256") == wanted.get("config_sha256"):
        return None
    made_sha, wanted_sha = str(made.get("config_sha256"))[:12], str(wanted.get("config_sha256"))[:12]
    if made.get("path") == wanted.get("path"):
        return (
            f"latents were made with {role} {made.get('path')} (config {made_sha}), "
            f"the recipe uses the same path but its config now differs ({wanted_sha})"
        )
    return (
        f"latents were made with {role} {made.get('path')} (config {made_sha}), "
        f"the recipe uses {wanted.get('path')} (config {wanted_sha})"
    )


def check_latents_match(
    manifest: Mapping[str, Any],
    vae_identity: Mapping[str, Any] | None,
    text_identity: Mapping[str, Any] | None,
) -> None:
    """Raise ValueError unless the latents of ``manifest`` were made with these encoders.

    Identities come from ``encoder_identity``; they match on ``config_sha256`` (paths may differ between
    machines). Pass None for an encoder the recipe does not use (e.g. no text encoder for a
    class-conditional model) to skip its check.
    """
    if manifest.get("format") != LATENTS_FORMAT:
        raise ValueError(f"manifest: expected format {LATENTS_FORMAT!r}, got {manifest.get('format')!r}")
    for role, wanted in (("vae", vae_identity), ("text_encoder", text_identity)):
        if wanted is None:
            continue
        made = manifest.get(role)
        if not isinstance(made, Mapping):
            raise ValueError(f"manifest: latents manifest records no {role} identity")
        reason = _mismatch(role, made, wanted)
        if reason is not None:
            raise ValueError(reason)

"""Pack an image folder or a listing (.jsonl / .csv / .parquet) into WebDataset tar shards.

Sources:

- an image folder where every image has a caption in a sidecar ``.txt`` with the same stem
  (``cat.jpg`` + ``cat.txt``), searched recursively;
- an image folder of class sub-folders (``SRC/<class>/<image>``): label = index of the folder among the
  sorted class folders, caption = the sidecar ``.txt`` if there is one, else the folder name;
- a listing file with columns ``path`` (relative to the listing or absolute) and ``caption``, optionally
  ``label`` (int).

Samples are sorted by path, then cut into shards ``shard-000000.tar`` ... by a plan made up front from the
file sizes, so the same source always gives the same shards. Each sample holds the original image bytes
under its extension (re-encoded only when ``image_size`` asks for a downscale or the format is one the
trainer's stream cannot decode), ``txt``, ``cls`` (when labelled) and ``json`` (original width/height and
source path). ``manifest.json`` (``nuance-shards-v1``) is written last.

Re-running is cheap and safe: every shard appears atomically (temp file + rename locally, one PUT on S3);
finished shards are recorded in ``manifest.partial.json`` and skipped; a destination holding shards from
another source or other settings is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nuance.data import storage
from nuance.data.manifest import (
    SHARDS_FORMAT,
    PartialManifest,
    build_manifest,
    count_shard_samples,
    existing_names,
    finished_shards,
    join_url,
    manifest_url,
    read_manifest_if_any,
    write_manifest,
)

T = TypeVar("T")

SHARD_PREFIX = "shard-"
DEFAULT_SAMPLES_PER_SHARD = 1000
# What the trainer decodes (data.decode.IMAGE_EXTENSIONS; not imported: that would pull in torch).
STREAM_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# Also read from folders; stored re-encoded as PNG since the stream does not decode them.
CONVERTED_EXTENSIONS = ("bmp", "gif", "tif", "tiff")
LISTING_SUFFIXES = (".jsonl", ".csv", ".parquet")
# Integer mtime: deterministic tars, and no 1 KiB PAX header per member (a float mtime adds one).
TAR_MTIME = 0
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads an archive to a multiple of this
_JSON_ESTIMATE = 96  # bytes of a sample's json member, for planning only
_MB = 1_000_000


@dataclass(frozen=True)
class SourceSample:
    """One image to pack: where it is, its caption and label, and its file size (for planning)."""

    path: str
    """Absolute local path of the image file."""
    source: str
    """The path as the source names it (relative to the folder or as written in the listing)."""
    caption: str
    label: int | None
    size: int


@dataclass
class Source:
    """A scanned source: samples sorted by path, plus the class names of a class-folder source."""

    root: str
    samples: list[SourceSample]
    class_names: list[str] | None = None


@dataclass
class ShardStats:
    """What writing one shard did."""

    name: str
    count: int
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)


@dataclass
class ShardingResult:
    """Summary of ``shard_dataset``: final shard counts, what was written / skipped, bad images."""

    dest: str
    manifest_url: str
    shards: dict[str, int]
    written: list[str]
    skipped: list[str]
    bad_samples: int
    bad_examples: list[str]

    @property
    def num_samples(self) -> int:
        """Samples in the finished dataset."""
        return sum(self.shards.values())


# ------------------------------------------------------------------------------------------- sources


def _image_ext(name: str) -> str | None:
    """Lower-case extension of an image file name we can read, else None."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return ext if ext in STREAM_EXTENSIONS + CONVERTED_EXTENSIONS else None


def _read_caption(path: str) -> str:
    """Caption text of a sidecar file (UTF-8, surrounding whitespace stripped)."""
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _walk_images(root: str) -> list[str]:
    """Relative paths (with '/') of all readable images under ``root``, sorted; hidden entries skipped."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = os.path.relpath(directory, root)
        for name in files:
            if not name.startswith(".") and _image_ext(name):
                found.append(name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/"))
    return sorted(found)


def _sidecar(root: str, rel: str) -> str:
    """Path of the caption file belonging to image ``rel`` (same folder, same stem, ``.txt``)."""
    return os.path.join(root, rel.rsplit(".", 1)[0] + ".txt")


def scan_image_folder(root: str) -> Source:
    """Samples of an image folder: sidecar captions everywhere, else class sub-folders (see module doc)."""
    root = os.path.abspath(os.path.expanduser(root))
    images = _walk_images(root)
    if not images:
        exts = "/".join(STREAM_EXTENSIONS + CONVERTED_EXTENSIONS)
        raise ValueError(f"src: no images ({exts}) found under {root}")
    has_caption = {rel: os.path.isfile(_sidecar(root, rel)) for rel in images}
    # Every image captioned: a captioned folder (sub-folders are just chunks, not classes).
    if all(has_caption.values()):
        return Source(
            root, [_folder_sample(root, rel, _read_caption(_sidecar(root, rel)), None) for rel in images]
        )
    if all(rel.count("/") == 1 for rel in images):
        class_names = sorted({rel.split("/", 1)[0] for rel in images})
        index = {name: i for i, name in enumerate(class_names)}
        samples = []
        for rel in images:
            folder = rel.split("/", 1)[0]
            caption = _read_caption(_sidecar(root, rel)) if has_caption[rel] else folder
            samples.append(_folder_sample(root, rel, caption, index[folder]))
        return Source(root, samples, class_names)
    missing = [rel for rel, ok in has_caption.items() if not ok]
    raise ValueError(
        f"src: {len(missing)} of {len(images)} images under {root} have no caption file (e.g. {missing[0]}); "
        "give every image a .txt with the same stem, or put the images in class sub-folders SRC/<class>/"
    )


def _folder_sample(root: str, rel: str, caption: str, label: int | None) -> SourceSample:
    """A SourceSample for image ``rel`` of folder ``root``."""
    path = os.path.join(root, rel)
    return SourceSample(path, rel, caption, label, os.path.getsize(path))


def _listing_rows(path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows) of a .jsonl / .csv / .parquet listing."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"src: {path} line {line_no} is not JSON: {err}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"src: {path} line {line_no} is not a JSON object")
                rows.append(row)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        return columns, rows
    if suffix == ".csv":
        import pandas as pd

        # Everything as text, and no NaN for empty cells: an empty caption stays "".
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        return list(frame.columns), frame.to_dict("records")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return list(table.column_names), table.to_pylist()
    raise ValueError(f"src: listing {path} must end in one of {LISTING_SUFFIXES}")


def _parse_label(value: Any, where: str) -> int | None:
    """A row's label as int; None when empty / missing."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float):
        if value != value:  # NaN: a missing value in a numeric column
            return None
        if not value.is_integer():
            raise ValueError(f"src: {where}: label {value!r} is not an integer")
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"src: {where}: label {value!r} is not an integer") from None


def read_listing(path: str) -> Source:
    """Samples of a listing file (columns ``path``, ``caption``, optional ``label``), sorted by path."""
    path = os.path.abspath(os.path.expanduser(path))
    columns, rows = _listing_rows(path)
    if not rows:
        raise ValueError(f"src: listing {path} has no rows")
    missing = [c for c in ("path", "caption") if c not in columns]
    if missing:
        raise ValueError(
            f"src: listing {path} lacks column(s) {missing}; it has {columns} "
            "(needed: 'path', 'caption'; optional: 'label')"
        )
    base = os.path.dirname(path)
    samples, not_found = [], []
    for i, row in enumerate(rows):
        where = f"{os.path.basename(path)} row {i + 1}"
        rel = str(row["path"] or "").strip()
        if not rel:
            raise ValueError(f"src: {where}: empty path")
        image = os.path.join(base, os.path.expanduser(rel))  # an absolute rel replaces base
        if not os.path.isfile(image):
            not_found.append(rel)
            continue
        caption = "" if row["caption"] is None else str(row["caption"]).strip()
        label = _parse_label(row.get("label"), where)
        samples.append(SourceSample(os.path.abspath(image), rel, caption, label, os.path.getsize(image)))
    if not_found:
        raise ValueError(
            f"src: {len(not_found)} image(s) of listing {path} not found (e.g. {not_found[0]!r})"
        )
    samples.sort(key=lambda s: s.path)  # stable: duplicate paths keep their listing order
    return Source(path, samples)


def scan_source(src: str) -> Source:
    """Scan ``src``: an image folder or a listing file. Raises ValueError for a missing or empty source."""
    src = os.path.expanduser(os.fspath(src))
    if storage.local_path(src) is None:
        raise ValueError(
            f"src: {src} must be a local folder or listing file (remote sources are not supported)"
        )
    if os.path.isdir(src):
        return scan_image_folder(src)
    if not os.path.exists(src):
        raise ValueError(f"src: {src} does not exist")
    if os.path.splitext(src)[1].lower() not in LISTING_SUFFIXES:
        raise ValueError(f"src: {src} is neither a folder nor a listing ({'/'.join(LISTING_SUFFIXES)})")
    return read_listing(src)


# -------------------------------------------------------------------------------------------- planning


def _tar_member_bytes(size: int) -> int:
    """Bytes one member of ``size`` bytes takes in a tar: header block + data padded to blocks."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def estimated_sample_bytes(sample: SourceSample) -> int:
    """Bytes ``sample`` will take in a shard (exact for copied images, an upper bound when downscaled)."""
    members = [sample.size, len(sample.caption.encode()), _JSON_ESTIMATE + len(sample.source.encode())]
    if sample.label is not None:
        members.append(len(str(sample.label)))
    return sum(_tar_member_bytes(n) for n in members)


def _check_positive(name: str, value: float | None) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is None or > 0."""
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def plan_shards(
    sample_bytes: Sequence[int], samples_per_shard: int | None = None, max_shard_mb: float | None = None
) -> list[range]:
    """Cut samples (given their estimated bytes) into consecutive shards; returns index ranges.

    Either ``samples_per_shard`` samples each, or greedily as many as fit ``max_shard_mb`` megabytes
    (10^6 bytes; a single larger sample gets a shard of its own).
    """
    if samples_per_shard is not None and max_shard_mb is not None:
        raise ValueError("give either samples_per_shard or max_shard_mb, not both")
    _check_positive("samples_per_shard", samples_per_shard)
    _check_positive("max_shard_mb", max_shard_mb)
    n = len(sample_bytes)
    if max_shard_mb is None:
        step = samples_per_shard or DEFAULT_SAMPLES_PER_SHARD
        return [range(start, min(start + step, n)) for start in range(0, n, step)]
    budget = max_shard_mb * _MB - _TAR_RECORD  # room for the end-of-archive blocks and record padding
    ranges, start, used = [], 0, 0
    for i, size in enumerate(sample_bytes):
        if i > start and used + size > budget:
            ranges.append(range(start, i))
            start, used = i, 0
        used += size
    if n:
        ranges.append(range(start, n))
    return ranges


def shard_name(index: int) -> str:
    """File name of the ``index``-th shard."""
    return f"{SHARD_PREFIX}{index:06d}.tar"


def plan_fingerprint(source: Source, ranges: Sequence[range], image_size: int | None) -> str:
    """SHA-256 identifying what the shards will hold: every sample, the cuts, the resize setting."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"image_size": image_size, "cuts": [r.stop for r in ranges]}).encode())
    for s in source.samples:
        digest.update(json.dumps([s.source, s.size, s.caption, s.label]).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- writing


def write_tar_atomically(url: str, fill: Callable[[Any], T]) -> T:
    """Write a tar shard at ``url`` with ``fill(tar_writer)``; readers never see a partial shard.

    The tar goes to a temp file first: next to the target locally (then ``os.replace``), in the system
    temp dir for remote URLs (then one upload, which S3 makes visible atomically).
    """
    import webdataset as wds

    local = storage.local_path(url)
    if local is not None:
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        # Hidden name not ending in .tar, so a directory spec never picks up a half-written shard.
        directory, name = os.path.split(os.path.abspath(local))
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666: honour the umask
    else:
        fd, tmp = tempfile.mkstemp(prefix="nuance-shard-", suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as f:
            with wds.TarWriter(f, mtime=TAR_MTIME, encoder=False) as sink:
                result = fill(sink)
            f.flush()
            os.fsync(f.fileno())
        if local is not None:
            os.replace(tmp, local)
        else:
            storage.put_file(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return result


def _encode_image(image: Any, ext: str) -> bytes:
    """Encode a PIL image in the format of ``ext`` (JPEG/WebP at quality 95, PNG lossless)."""
    buffer = io.BytesIO()
    if ext in ("jpg", "jpeg"):
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    elif ext == "webp":
        image.save(buffer, format="WEBP", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def prepare_image(data: bytes, ext: str, image_size: int | None) -> tuple[bytes, str, dict[str, int]]:
    """(bytes, extension, size info) to store for one image.

    The original bytes are kept unless the shorter side exceeds ``image_size`` (then it is downscaled so
    the shorter side is ``image_size``; never upscaled) or the format is not one the stream decodes
    (then it becomes PNG). Raises PIL / OS errors for files that are not images.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        info = {"width": width, "height": height}
        shrink = image_size is not None and min(width, height) > image_size
        if not shrink and ext in STREAM_EXTENSIONS:
            return data, ext, info
        out_ext = ext if ext in STREAM_EXTENSIONS else "png"
        if image.mode not in ("RGB", "RGBA", "L", "LA"):  # e.g. palette / CMYK: resize and save need these
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if shrink:
            scale = image_size / min(width, height)
            size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
            info.update(stored_width=size[0], stored_height=size[1])
        return _encode_image(image, out_ext), out_ext, info


def _sample_key(index: int) -> str:
    """WebDataset key of the ``index``-th sample of the dataset (no dots: they split key from extension)."""
    return f"{index:09d}"


def write_shard(
    url: str, samples: Sequence[SourceSample], first_index: int, image_size: int | None
) -> ShardStats:
    """Write ``samples`` (dataset indices from ``first_index``) as shard ``url``; bad images are skipped."""
    from PIL import Image

    stats = ShardStats(name=os.path.basename(url.rstrip("/")), count=0)

    def fill(sink: Any) -> None:
        for offset, sample in enumerate(samples):
            with open(sample.path, "rb") as f:
                data = f.read()
            try:
                data, ext, info = prepare_image(data, _image_ext(sample.path) or "png", image_size)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                stats.bad += 1  # not an image (or truncated / corrupt): skip it, report it
                if len(stats.bad_examples) < 5:
                    stats.bad_examples.append(sample.source)
                continue
            record = {
                "__key__": _sample_key(first_index + offset),
                ext: data,
                "txt": sample.caption.encode("utf-8"),
                "json": json.dumps({**info, "source": sample.source}).encode("utf-8"),
            }
            if sample.label is not None:
                record["cls"] = str(sample.label).encode()
            sink.write(record)
            stats.count += 1

    write_tar_atomically(url, fill)
    return stats


# ---------------------------------------------------------------------------------------- the command


def _check_args(
    samples_per_shard: int | None, max_shard_mb: float | None, image_size: int | None, workers: int
):
    """Raise ValueError naming the first argument that cannot work."""
    if samples_per_shard is not None and max_shard_mb is not None:
        raise ValueError("give either samples_per_shard or max_shard_mb, not both")
    if samples_per_shard is not None and (
        isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int)
    ):
        raise ValueError(f"samples_per_shard must be an int, got {samples_per_shard!r}")
    _check_positive("samples_per_shard", samples_per_shard)
    _check_positive("max_shard_mb", max_shard_mb)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")


def _shard_manifest(
    shards: dict[str, int], source: Source, fingerprint: str, image_size: int | None
) -> dict[str, Any]:
    """The complete manifest of a sharded source (images that could not be read = planned - written)."""
    bad = len(source.samples) - sum(shards.values())
    fields: dict[str, Any] = {"source": source.root, "fingerprint": fingerprint, "bad_samples": bad}
    if image_size is not None:
        fields["image_size"] = image_size  # shorter side, at most (images are never upscaled)
    if source.class_names is not None:
        fields["class_names"] = source.class_names
    return build_manifest(SHARDS_FORMAT, shards, **fields)


def _write_pending(
    dest: str,
    source: Source,
    plan: dict[str, range],
    pending: list[str],
    image_size: int | None,
    workers: int,
    partial: PartialManifest,
    initial: int,
    progress: bool,
) -> list[str]:
    """Write the ``pending`` shards on ``workers`` threads, recording each in ``partial``; returns up to
    five example paths of unreadable images."""
    from tqdm import tqdm

    bad_examples: list[str] = []
    bar = tqdm(total=len(source.samples), initial=initial, unit="img", desc="shard", disable=not progress)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(
                write_shard,
                join_url(dest, name),
                source.samples[plan[name].start : plan[name].stop],
                plan[name].start,
                image_size,
            )
            for name in pending
        ]
        try:
            for future in as_completed(futures):
                stats = future.result()
                partial.record(stats.name, stats.count)
                bad_examples.extend(stats.bad_examples)
                bar.update(len(plan[stats.name]))
        finally:
            # On failure or Ctrl-C: stop queued shards, keep what finished for the next run.
            for future in futures:
                future.cancel()
            partial.flush()
    return bad_examples[:5]


def shard_dataset(
    src: str,
    dest: str,
    *,
    samples_per_shard: int | None = None,
    max_shard_mb: float | None = None,
    image_size: int | None = None,
    workers: int = 4,
    progress: bool = True,
) -> ShardingResult:
    """Pack the images of ``src`` (folder or listing) into WebDataset shards under ``dest`` (path or s3://).

    Shards hold ``samples_per_shard`` samples each (default 1000) or about ``max_shard_mb`` MB; ``image_size``
    optionally downscales images so their shorter side is at most that. ``workers`` shards are written in
    parallel (threads: the work is I/O and PIL, which releases the GIL). Resumable and idempotent (see
    the module doc); ``manifest.json`` is written last.
    """
    _check_args(samples_per_shard, max_shard_mb, image_size, workers)
    dest = os.fspath(dest)
    source = scan_source(src)
    ranges = plan_shards([estimated_sample_bytes(s) for s in source.samples], samples_per_shard, max_shard_mb)
    plan = {shard_name(i): r for i, r in enumerate(ranges)}
    fingerprint = plan_fingerprint(source, ranges, image_size)

    storage.makedirs(dest)
    recorded = finished_shards(dest, fingerprint)
    present = existing_names(dest)
    complete = read_manifest_if_any(dest)
    if complete is not None and all(name in present for name in plan):
        url, bad = manifest_url(dest), int(complete.get("bad_samples", 0))
        return ShardingResult(dest, url, dict(complete["shards"]), [], list(plan), bad, [])

    done = {name: recorded[name] for name in plan if name in recorded and name in present}
    for name in plan:  # finished by a run that stopped before recording it
        if name in present and name not in done:
            done[name] = count_shard_samples(join_url(dest, name))
    pending = [name for name in plan if name not in done]
    partial = PartialManifest(dest, SHARDS_FORMAT, fingerprint, done)
    partial.flush()

    initial = sum(len(plan[name]) for name in done)
    bad_examples = _write_pending(
        dest, source, plan, pending, image_size, workers, partial, initial, progress
    )

    shards = {name: partial.shards[name] for name in plan}
    manifest = _shard_manifest(shards, source, fingerprint, image_size)
    url = write_manifest(dest, manifest)
    skipped = [name for name in plan if name not in pending]
    return ShardingResult(dest, url, shards, pending, skipped, manifest["bad_samples"], bad_examples)

"""Tests for the streaming shard pipeline (data/stream.py)."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import nuance.data.stream
from nuance.data.buckets import make_buckets, nearest_bucket
from nuance.data.stream import ShardStream, expand_urls, open_url, rank_shards
from nuance.data.toy import CLASS_NAMES, write_toy_shards

NUM_SAMPLES, PER_SHARD, SIZE = 64, 8, 16  # 8 shards; 2 ranks x 2 workers x 2 shards x 8 samples
BATCHES_PER_EPOCH = NUM_SAMPLES // 2 // 4  # per rank, world_size=2, batch_size=4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_toy_shards(
        tmp_path_factory.mktemp("toy"), num_samples=NUM_SAMPLES, image_size=SIZE, samples_per_shard=PER_SHARD
    )


def _stream(urls, **overrides) -> ShardStream:
    """A stream with the test defaults, overridable per test."""
    kwargs = dict(rank=0, world_size=2, batch_size=4, image_size=SIZE, seed=5, num_workers=2)
    kwargs.update(overrides)
    return ShardStream(urls, **kwargs)


def _take(iterator, n: int) -> list[dict]:
    return list(itertools.islice(iterator, n))


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["caption"] == y["caption"]
        assert torch.equal(x["class_label"], y["class_label"]) and torch.equal(x["pixels"], y["pixels"])


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def _stored_pixels(shard_paths: list[str]) -> dict[str, np.ndarray]:
    """Key -> stored PNG as uint8 HWC, read straight from the tars."""
    out = {}
    for path in shard_paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read()))
                    out[member.name.split(".")[0]] = np.asarray(image.convert("RGB"))
    return out


def _write_tar(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path), mtime=0, encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _epoch_batches(stream: ShardStream, iterator) -> list[dict]:
    """The rest of the current epoch's batches (the first batch of the next epoch is read and dropped)."""
    epoch, out = stream.epoch, []
    for batch in iterator:
        if stream.epoch != epoch:
            return out
        out.append(batch)
    raise AssertionError("unreachable: the stream is infinite")


# --- URL expansion -------------------------------------------------------------------------------------


def test_expand_brace_directory_list_and_file_url(shards):
    directory = str(Path(shards[0]).parent)
    assert expand_urls(directory + "/shapes-{000000..000007}.tar") == shards
    assert expand_urls(directory) == shards
    assert expand_urls(Path(directory)) == shards
    assert expand_urls(shards[::-1]) == shards[::-1]
    assert expand_urls("file://" + directory) == ["file://" + p for p in shards]
    assert expand_urls("file://" + directory + "/shapes-{000000..000001}.tar") == [
        "file://" + p for p in shards[:2]
    ]
    assert expand_urls("s3://bucket/shard-{0..2}.tar") == [f"s3://bucket/shard-{i}.tar" for i in range(3)]


@pytest.mark.parametrize("spec", ["", [], ["", " "]])
def test_empty_spec_is_rejected(spec):
    with pytest.raises(ValueError, match="matched no shards"):
        expand_urls(spec)


def test_empty_directory_and_missing_shard_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=f"shard spec '{tmp_path}' matched no shards"):
        expand_urls(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        expand_urls(str(tmp_path / "shard-{0..1}.tar"))
    with pytest.raises(ValueError, match="string or a list"):
        expand_urls(3)


def test_open_url_local_and_file_url(shards):
    with open_url(shards[0]) as a, open_url("file://" + shards[0]) as b:
        assert a.read() == b.read() == Path(shards[0]).read_bytes()


def _tar_with_every_kind_of_member(tar_format: int, compression: str) -> bytes:
    """A tar (as tarfile writes it) of a directory, a symlink, long and non-ASCII names, empty and
    multi-block files."""
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    with tarfile.open(fileobj=buffer, mode=f"w|{compression}", format=tar_format) as tar:
        for name, kind, size in [
            ("dir/", tarfile.DIRTYPE, 0),
            ("link", tarfile.SYMTYPE, 0),
            ("a.txt", tarfile.REGTYPE, 5),
            ("deep/" * 30 + "long.npy", tarfile.REGTYPE, 1000),
            ("unicodé/ñ.bin", tarfile.REGTYPE, 513),
            ("empty.cls", tarfile.REGTYPE, 0),
            ("big.npy", tarfile.REGTYPE, 70_000),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = kind, size, "target" if kind == tarfile.SYMTYPE else ""
            tar.addfile(info, io.BytesIO(rng.bytes(size)) if kind == tarfile.REGTYPE else None)
    return buffer.getvalue()


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_reads_what_tarfile_reads(tar_format, compression):
    from nuance.data.tarstream import TarReader

    data = _tar_with_every_kind_of_member(tar_format, compression)
    expected = _tarfile_members(data)
    reader = TarReader(io.BytesIO(data))
    assert [(name, reader.read()) for name in reader] == expected
    assert list(TarReader(io.BytesIO(data))) == [name for name, _ in expected]  # data not read: skipped


def test_tar_reader_rejects_damaged_archives():
    from nuance.data.tarstream import TarReader

    data = _tar_with_every_kind_of_member(tarfile.PAX_FORMAT, "")
    flipped = bytearray(data)  # blocks: dir/, link, a.txt headers, a.txt data, next header
    flipped[2 * 512 + 10] ^= 0x20  # in the name of a.txt: the header's checksum no longer matches
    cut_in_header, cut_in_data = data[: 4 * 512 + 100], data[: len(data) - 9000]
    for damaged in (bytes(flipped), cut_in_header, cut_in_data, data[:-10240], b"not a tar" * 100, b""):
        with pytest.raises(tarfile.ReadError):
            reader = TarReader(io.BytesIO(damaged))
            for _ in reader:
                reader.read()


def test_remote_fsspec_urls_stream_like_local_ones(shards):
    fs = fsspec.filesystem("memory")
    for path in shards[:2]:
        fs.pipe(f"/nuance-test/{Path(path).name}", Path(path).read_bytes())
    remote = expand_urls("memory://nuance-test/shapes-{000000..000001}.tar")
    a = _take(iter(_stream(remote, world_size=1, num_workers=0)), 4)
    _assert_same_batches(a, _take(iter(_stream(shards[:2], world_size=1, num_workers=0)), 4))


def _upload(shards: list[str], prefix: str) -> list[str]:
    """Copy local shards (and their folder's manifest.json) under the S3 ``prefix``; returns their URLs."""
    from nuance.data import storage

    storage.put_file(Path(shards[0]).parent / "manifest.json", f"{prefix}manifest.json")
    for path in shards:
        storage.put_file(path, f"{prefix}{Path(path).name}")
    return [f"{prefix}{Path(path).name}" for path in shards]


def test_s3_shards_are_opened_while_the_one_before_is_read(shards, any_s3_bucket, monkeypatch):
    """Each S3 shard after the first is opened (and fetching) before the previous one is closed; the
    batches are those of the local shards. A missing shard stops the stream, naming it, or (skip) counts
    its samples; on SeaweedFS and on moto (AWS-like)."""
    from nuance.data import retries, storage

    remote = _upload(shards[:3], f"{any_s3_bucket}ahead/")
    events = []
    for name in ("start", "close"):
        method = getattr(storage.ResilientReader, name)

        def record(self, _method=method, _name=name):
            if not self.closed and (_name == "close" or self._ahead is None):  # a reader's first start
                events.append((_name, self.url))
            return _method(self)

        monkeypatch.setattr(storage.ResilientReader, name, record)
    stream = _stream(remote, world_size=1, num_workers=0, mode="epoch")
    local = _stream(shards[:3], world_size=1, num_workers=0, mode="epoch")
    _assert_same_batches(_epoch_batches(stream, iter(stream)), _epoch_batches(local, iter(local)))
    order = [url for event, url in events if event == "start"][:3]  # then the next epoch's first batch
    assert sorted(order) == sorted(remote)  # each opened once in the epoch
    for before, after in itertools.pairwise(order):
        assert events.index(("start", after)) < events.index(("close", before))

    monkeypatch.setenv(retries.RETRY_SECONDS_ENV, "0.2")  # how long a missing shard is waited for
    missing = f"{any_s3_bucket}ahead/{Path(shards[3]).name}"  # never uploaded; the manifest lists it
    urls = [remote[0], missing, remote[1]]
    with pytest.raises(nuance.data.stream.ShardUnavailableError, match=f"shard {missing} is missing"):
        _take(iter(_stream(urls, world_size=1, num_workers=0)), 4)
    stream = _stream(urls, world_size=1, num_workers=0, on_missing_shard="skip")
    keys = _keys(_epoch_batches(stream, iter(stream)))
    assert len(keys) == 2 * PER_SHARD and set(stream.bad_counts) == {"missing_shard"}
    times = stream.bad_shards["missing_shard"]  # 2: the next epoch's first batch met it too
    assert 1 <= times <= 2 and stream.bad_counts["missing_shard"] == PER_SHARD * times


def test_s3_prefix_with_or_without_slash_and_forbidden_shards(shards, any_s3_bucket, monkeypatch):
    """``s3://bucket/prefix`` lists its shards like ``s3://bucket/prefix/`` (AWS has no directory objects),
    through the recipe's data config too; a 403 stops the stream naming the shard."""
    from nuance.data import retries
    from nuance.data.builder import build_stream, source_manifest
    from nuance.data.config import DataConfig

    remote = _upload(shards[:2], f"{any_s3_bucket}data/")
    assert expand_urls(f"{any_s3_bucket}data") == expand_urls(f"{any_s3_bucket}data/") == remote
    assert expand_urls(remote[0]) == [remote[0]]  # a shard is not listed
    cfg = DataConfig(source=f"{any_s3_bucket}data", image_size=SIZE, batch_size=4, num_workers=0)
    assert source_manifest(cfg)["shards"][Path(shards[0]).name] == PER_SHARD
    stream = build_stream(cfg, rank=0, world_size=1, seed=5)
    local = _stream(shards[:2], world_size=1, num_workers=0)
    assert _keys(_epoch_batches(stream, iter(stream))) == _keys(_epoch_batches(local, iter(local)))
    monkeypatch.setenv(retries.RETRY_SECONDS_ENV, "0.2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(nuance.data.stream.ShardUnavailableError, match=r"is forbidden \(.*PermissionError"):
        _take(iter(_stream(remote, world_size=1, num_workers=0)), 1)


def test_globs_and_remote_prefixes_list_their_tars(shards, monkeypatch):
    directory = str(Path(shards[0]).parent)
    assert expand_urls(directory + "/shapes-*.tar") == shards
    fs = fsspec.filesystem("memory")
    for path in shards[:3]:
        fs.pipe(f"/nuance-prefix/{Path(path).name}", Path(path).read_bytes())
    fs.pipe("/nuance-prefix/manifest.json", b"{}")  # a prefix lists its *.tar only
    names = [Path(p).name for p in shards[:3]]
    listed = expand_urls("memory://nuance-prefix/")  # through data.storage.list_urls when it is there
    assert [url.rsplit("/", 1)[1] for url in listed] == names
    monkeypatch.setattr(nuance.data.shards, "_storage", lambda: None)  # without data.storage: plain fsspec
    fallback = expand_urls("memory://nuance-prefix/")
    assert [url.rsplit("/", 1)[1] for url in fallback] == names
    assert [u.rsplit("/", 1)[1] for u in expand_urls("memory://nuance-prefix/*01.tar")] == names[1:2]
    with open_url(fallback[0]) as f:
        assert f.read() == Path(shards[0]).read_bytes()


# --- sharding, coverage, decoding --------------------------------------------------------------------


def test_rank_shards_partition_each_epoch(shards):
    for epoch in range(3):
        parts = [rank_shards(shards, seed=5, epoch=epoch, rank=r, world_size=3) for r in range(3)]
        assert sorted(sum(parts, [])) == shards
    assert rank_shards(shards, seed=5, epoch=0, rank=0, world_size=2) != rank_shards(
        shards, seed=5, epoch=1, rank=0, world_size=2
    )


def test_two_ranks_two_workers_cover_each_epoch_once(shards):
    streams = [_stream(shards, rank=r) for r in range(2)]
    iterators = [iter(s) for s in streams]
    for epoch in range(2):
        per_rank = [_keys(_take(it, BATCHES_PER_EPOCH)) for it in iterators]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == [f"{i:06d}" for i in range(NUM_SAMPLES)]
        for stream in streams:
            state = stream.state_dict()
            assert (state["epoch"], state["batches_in_epoch"]) == (epoch, BATCHES_PER_EPOCH)
            assert state["samples_seen"] == (epoch + 1) * NUM_SAMPLES // 2
    next(iterators[0])
    assert (streams[0].state_dict()["epoch"], streams[0].state_dict()["batches_in_epoch"]) == (2, 1)


def test_batch_contents_match_stored_images(shards):
    stored = _stored_pixels(shards)
    batch = next(iter(_stream(shards, num_workers=0, random_flip=False)))
    assert batch["pixels"].shape == (4, 3, SIZE, SIZE) and batch["pixels"].dtype == torch.float32
    assert batch["class_label"].dtype == torch.long and len(batch["caption"]) == len(batch["key"]) == 4
    for pixels, caption, label, key in zip(
        batch["pixels"], batch["caption"], batch["class_label"], batch["key"]
    ):
        expected = stored[key].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        assert np.allclose(pixels.numpy(), expected)
        assert caption == f"a {CLASS_NAMES[int(label)]}"


def test_random_flip_is_horizontal_and_seeded(shards):
    stored = _stored_pixels(shards)
    flipped = 0
    for batch in _take(iter(_stream(shards, num_workers=0)), BATCHES_PER_EPOCH):
        for pixels, key in zip(batch["pixels"], batch["key"]):
            plain = torch.from_numpy(stored[key].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)
            mirrored = plain.flip(-1)
            assert torch.allclose(pixels, plain) or torch.allclose(pixels, mirrored)
            flipped += not torch.allclose(pixels, plain)
    assert 0 < flipped < NUM_SAMPLES // 2


def test_resize_and_missing_fields(tmp_path):
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = 200  # the centre square survives the crop
    url = _write_tar(tmp_path / "odd.tar", [{"__key__": f"s{i}", "png": _png(wide)} for i in range(4)])
    stream = ShardStream(
        url, rank=0, world_size=1, batch_size=4, image_size=8, seed=0, random_flip=False, random_crop=False
    )
    batch = next(iter(stream))
    assert batch["pixels"].shape == (4, 3, 8, 8)
    assert batch["pixels"][:, :, 2:6, 1:7].min() > 0.5  # bright centre kept after resize + centre crop
    assert batch["caption"] == [""] * 4 and batch["class_label"].tolist() == [-1] * 4
    # SDXL micro-conditioning: size before resizing, crop offset in the resized 8x16 image, output size.
    assert batch["original_size"].tolist() == [[20, 40]] * 4 and batch["original_size"].dtype == torch.long
    assert batch["crop_coords"].tolist() == [[0, 4]] * 4 and batch["target_size"].tolist() == [[8, 8]] * 4


def test_crop_and_flip_are_exact_and_seeded_per_sample(tmp_path):
    # 16x32 images and image_size 16: no resize, so each output is the 16-wide window of the stored image
    # at crop_coords -- in the mirrored frame when the sample was flipped.
    rng = np.random.default_rng(0)
    images = {f"s{i:02d}": rng.integers(0, 256, (16, 32, 3), dtype=np.uint8) for i in range(16)}
    url = _write_tar(tmp_path / "wide.tar", [{"__key__": k, "png": _png(v)} for k, v in images.items()])

    def run(seed: int, **kwargs) -> list[dict]:
        stream = ShardStream(url, rank=0, world_size=1, batch_size=4, image_size=16, seed=seed, **kwargs)
        return _take(iter(stream), 4)

    batches, lefts, flipped = run(3), set(), 0
    for batch in batches:
        assert batch["target_size"].tolist() == [[16, 16]] * 4
        assert batch["original_size"].tolist() == [[16, 32]] * 4
        for pixels, key, (top, left) in zip(batch["pixels"], batch["key"], batch["crop_coords"].tolist()):
            stored = torch.from_numpy(images[key].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)
            plain, mirrored = stored[:, :, left : left + 16], stored.flip(-1)[:, :, left : left + 16]
            assert top == 0 and (torch.equal(pixels, plain) or torch.equal(pixels, mirrored))
            flipped += not torch.equal(pixels, plain)
            lefts.add(left)
    assert 0 < flipped < 16 and len(lefts) > 4
    _assert_same_batches(batches, run(3))
    by_key = [{k: p for b in run_ for k, p in zip(b["key"], b["pixels"])} for run_ in (batches, run(4))]
    assert any(not torch.equal(by_key[0][k], by_key[1][k]) for k in images)
    centred = run(3, random_crop=False, random_flip=False)
    assert all(b["crop_coords"].tolist() == [[0, 8]] * 4 for b in centred)


def test_augmentation_depends_on_the_sample_not_on_the_workers(shards):
    def pixels_by_key(num_workers: int) -> dict[str, torch.Tensor]:
        batches = _take(iter(_stream(shards, image_size=12, num_workers=num_workers)), BATCHES_PER_EPOCH)
        return {k: p for b in batches for k, p in zip(b["key"], b["pixels"])}

    a, b = pixels_by_key(0), pixels_by_key(2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_iterating_leaves_the_global_rngs_alone(shards):
    import random

    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    for num_workers in (0, 2):
        _take(iter(_stream(shards, num_workers=num_workers)), 3)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


# --- latent shards -----------------------------------------------------------------------------------


def _latent_sample(i: int, *, single: bool = False, text: bool = True, meta: bool = True, hw=(8, 8)) -> dict:
    rng = np.random.default_rng(i)
    mean = rng.standard_normal((4, *hw)).astype(np.float16)
    sample = {"__key__": f"l{i:04d}", "txt": f"caption {i}".encode(), "cls": str(i % 3).encode()}
    if single:
        sample["latent.npy"] = _npy(mean)
    else:
        sample["latent_mean.npy"] = _npy(mean)
        sample["latent_logvar.npy"] = _npy(np.full_like(mean, -2.0))
    if text:
        sample["text.npy"] = _npy(rng.standard_normal((7, 16)).astype(np.float16))
        sample["mask.npy"] = _npy((np.arange(7) < 3 + i % 4).astype(np.uint8))
        sample["pooled.npy"] = _npy(rng.standard_normal(16).astype(np.float16))
    if meta:
        sample["json"] = json.dumps({"original_size": [300 + i, 200], "crop": [i, 2]}).encode()
    return sample


def _write_latent_shards(tmp_path: Path, n: int = 16, per_shard: int = 8, **kwargs) -> list[str]:
    return [
        _write_tar(
            tmp_path / f"lat-{s}.tar", [_latent_sample(i, **kwargs) for i in range(s, min(n, s + per_shard))]
        )
        for s in range(0, n, per_shard)
    ]


def _latent_stream(urls, **overrides) -> ShardStream:
    kwargs = dict(rank=0, world_size=1, batch_size=4, image_size=64, seed=0, num_workers=2)
    return ShardStream(urls, **{**kwargs, **overrides})


def test_latent_batches_with_text_pooled_and_metadata(tmp_path):
    urls = _write_latent_shards(tmp_path)
    batches = _take(iter(_latent_stream(urls, latent_shape=(4, 8, 8))), 4)
    assert sorted(_keys(batches)) == [f"l{i:04d}" for i in range(16)]
    for batch in batches:
        assert "pixels" not in batch and "target_size" not in batch
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        assert shapes == {
            "latent_mean": ((4, 4, 8, 8), torch.float32),
            "latent_logvar": ((4, 4, 8, 8), torch.float32),
            "encoder_hidden_states": ((4, 7, 16), torch.float32),
            "encoder_attention_mask": ((4, 7), torch.long),
            "pooled": ((4, 16), torch.float32),
            "class_label": ((4,), torch.long),
            "original_size": ((4, 2), torch.long),
            "crop_coords": ((4, 2), torch.long),
        }
        for j, key in enumerate(batch["key"]):
            i = int(key[1:])
            expected = _latent_sample(i)
            mean = np.load(io.BytesIO(expected["latent_mean.npy"]))
            assert torch.equal(batch["latent_mean"][j], torch.from_numpy(mean.astype(np.float32)))
            assert (batch["latent_logvar"][j] == -2.0).all()
            text = np.load(io.BytesIO(expected["text.npy"])).astype(np.float32)
            assert torch.equal(batch["encoder_hidden_states"][j], torch.from_numpy(text))
            assert batch["encoder_attention_mask"][j].sum() == 3 + i % 4
            assert batch["caption"][j] == f"caption {i}" and batch["class_label"][j] == i % 3
            assert batch["original_size"][j].tolist() == [300 + i, 200] and batch["crop_coords"][
                j
            ].tolist() == [i, 2]


def test_single_latent_without_text_or_json(tmp_path):
    urls = _write_latent_shards(tmp_path, single=True, text=False, meta=False)
    batch = next(iter(_latent_stream(urls, num_workers=0)))
    assert set(batch) == {
        "latent_mean",
        "latent_logvar",
        "caption",
        "class_label",
        "key",
        "original_size",
        "crop_coords",
    }
    assert batch["latent_mean"].shape == (4, 4, 8, 8) and torch.equal(
        batch["latent_logvar"], torch.full((4, 4, 8, 8), -torch.inf)
    )  # an already-drawn sample: zero variance, so mean + exp(logvar / 2) * eps == mean
    assert batch["original_size"].tolist() == [[64, 64]] * 4 and batch["crop_coords"].tolist() == [[0, 0]] * 4


def test_latents_of_different_shapes_never_share_a_batch(tmp_path):
    samples = [_latent_sample(i, hw=(8, 8) if i % 3 else (8, 16)) for i in range(24)]
    urls = [_write_tar(tmp_path / f"mixed-{s}.tar", samples[s : s + 12]) for s in (0, 12)]
    batches = _take(iter(_latent_stream(urls, batch_size=4)), 6)  # 16 of (8, 8) + 8 of (8, 16)
    assert sorted(_keys(batches)) == [f"l{i:04d}" for i in range(24)]
    assert sorted(tuple(b["latent_mean"].shape[2:]) for b in batches) == [(8, 8)] * 4 + [(8, 16)] * 2


# --- aspect-ratio buckets ----------------------------------------------------------------------------


@pytest.mark.parametrize(("image_size", "step"), [(32, 8), (64, 16), (256, 32), (512, 64), (1024, 64)])
def test_buckets_keep_the_area_and_span_the_aspect_ratios(image_size, step):
    buckets = make_buckets(image_size, step)
    assert (image_size, image_size) in buckets and set(buckets) == {(w, h) for h, w in buckets}
    assert buckets == sorted(buckets, key=lambda hw: hw[1] / hw[0])
    for h, w in buckets:
        assert h % step == 0 and w % step == 0
        assert abs(h * w / image_size**2 - 1) < 0.15
        assert 0.45 <= w / h <= 2.2
    aspects = [w / h for h, w in buckets]
    assert min(aspects) <= 0.6 and max(aspects) >= 1.65


def test_nearest_bucket_follows_the_aspect_ratio():
    buckets = make_buckets(256, 32)
    assert nearest_bucket(buckets, 100, 100) == (256, 256)
    wide, tall = nearest_bucket(buckets, 100, 200), nearest_bucket(buckets, 200, 100)
    assert wide == buckets[-1] and tall == buckets[0] and wide == tall[::-1]
    assert nearest_bucket(buckets, 300, 400) == (224, 288)  # 4:3 -> 9:7, the closest in the list


def test_bucketing_batches_hold_one_bucket(tmp_path):
    sizes = [(20, 40), (40, 20), (30, 30), (24, 36)]  # (h, w): 2:1, 1:2, 1:1, 3:2
    samples = [
        {"__key__": f"b{i:03d}", "png": _png(np.full((*sizes[i % 4], 3), i, dtype=np.uint8)), "txt": b"x"}
        for i in range(32)
    ]
    urls = [_write_tar(tmp_path / f"bucket-{s}.tar", samples[s : s + 16]) for s in (0, 16)]
    stream = ShardStream(
        urls,
        rank=0,
        world_size=1,
        batch_size=4,
        image_size=32,
        seed=0,
        num_workers=2,
        bucketing=True,
        bucket_step=8,
    )
    assert stream.buckets == make_buckets(32, 8)
    batches = _take(iter(stream), 8)
    assert sorted(_keys(batches)) == [s["__key__"] for s in samples]
    expected = {(20, 40): (24, 48), (40, 20): (48, 24), (30, 30): (32, 32), (24, 36): (24, 40)}
    for batch in batches:
        targets = {tuple(t) for t in batch["target_size"].tolist()}
        assert len(targets) == 1 and tuple(batch["pixels"].shape[2:]) in targets
        for key, original in zip(batch["key"], batch["original_size"].tolist()):
            assert tuple(original) == sizes[int(key[1:]) % 4] and targets == {expected[tuple(original)]}


# --- determinism and resume -------------------------------------------------------------------------


def test_same_arguments_give_identical_batches(shards):
    n = BATCHES_PER_EPOCH + 3  # across an epoch boundary
    a, b = _take(iter(_stream(shards)), n), _take(iter(_stream(shards)), n)
    _assert_same_batches(a, b)
    assert _keys(_take(iter(_stream(shards, seed=6)), n)) != _keys(a)


@pytest.mark.parametrize(("num_workers", "k"), [(0, 3), (2, 3), (2, BATCHES_PER_EPOCH), (2, 6), (0, 11)])
def test_resume_continues_exactly(shards, num_workers, k):
    reference = _stream(shards, rank=1, num_workers=num_workers)
    iterator = iter(reference)
    _take(iterator, k)
    state = json.loads(json.dumps(reference.state_dict()))  # as the trainer's checkpoint stores it
    expected = _take(iterator, 5)  # k=6: crosses the epoch boundary after resuming

    resumed = _stream(shards, rank=1, num_workers=num_workers)
    resumed.load_state_dict(state)
    _assert_same_batches(_take(iter(resumed), 5), expected)
    assert resumed.state_dict() == reference.state_dict()
    assert resumed.samples_seen == (k + 5) * 4


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 2-core CI machines
@pytest.mark.parametrize(("before", "after", "k"), [(2, 1, 3), (2, 1, 5), (1, 3, 2), (1, 3, 5), (0, 2, 1)])
def test_resume_with_other_num_workers_sees_each_sample_once(shards, before, after, k):
    epoch_keys = _keys(_take(iter(_stream(shards, rank=1, num_workers=0)), BATCHES_PER_EPOCH))
    first = _stream(shards, rank=1, num_workers=before)
    head = _keys(_take(iter(first), k))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _stream(shards, rank=1, num_workers=after)
    with pytest.warns(UserWarning, match=f"num_workers: {before} -> {after}.*still comes once"):
        resumed.load_state_dict(state)
    iterator = iter(resumed)
    tail = _keys(_epoch_batches(resumed, iterator))
    assert len(head) + len(tail) == len(set(head + tail)) == len(epoch_keys)
    assert sorted(head + tail) == sorted(epoch_keys)
    assert resumed.epoch == 1 and resumed.samples_seen == (BATCHES_PER_EPOCH + 1) * 4


def test_resampled_mode_is_infinite_and_deterministic(shards):
    n = 3 * BATCHES_PER_EPOCH
    a = _take(iter(_stream(shards, mode="resampled")), n)
    assert len(a) == n
    _assert_same_batches(a, _take(iter(_stream(shards, mode="resampled")), n))
    keys = _keys(a)
    assert len(set(keys)) < len(keys)  # shards are drawn with replacement
    assert _keys(_take(iter(_stream(shards, mode="resampled", seed=6)), n)) != keys
    assert _keys(_take(iter(_stream(shards, mode="resampled", rank=1)), n)) != keys


def test_resampled_resume_continues_exactly(shards):
    reference = _stream(shards, mode="resampled")
    iterator = iter(reference)
    _take(iterator, 5)
    state = json.loads(json.dumps(reference.state_dict()))
    resumed = _stream(shards, mode="resampled")
    resumed.load_state_dict(state)
    _assert_same_batches(_take(iter(resumed), 6), _take(iterator, 6))


def test_state_records_handed_out_samples_as_ranges(shards):
    stream = _stream(shards, world_size=1, num_workers=2, shuffle_buffer=6)
    iterator = iter(stream)
    _take(iterator, 5)
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["format"] == "nuance-stream-v2" and state["mode"] == "epoch" and state["bad_counts"] == {}
    sources = state["position"]["sources"]
    assert sum(b - a for _, _, handed, _ in sources for a, b in handed) == 20
    assert sum(len(handed) for _, _, handed, _ in sources) <= 2 * (6 + 4)  # bounded by the buffers
    _take(iterator, NUM_SAMPLES // 4 - 5)  # the rest of the epoch
    position = stream.state_dict()["position"]
    assert position == {
        "sources": [[i, PER_SHARD, [[0, PER_SHARD]], []] for i in range(8)],
        "worker_items": [8, 8],
    }


def test_resume_does_not_reopen_fully_consumed_shards(tmp_path):
    paths = write_toy_shards(tmp_path, num_samples=NUM_SAMPLES, image_size=SIZE, samples_per_shard=PER_SHARD)
    stream = _stream(paths, world_size=1, shuffle_buffer=4)
    iterator = iter(stream)
    head = _keys(_take(iterator, 10))
    state = json.loads(json.dumps(stream.state_dict()))
    done = [paths[s] for s, size, handed, _ in state["position"]["sources"] if handed == [[0, size]]]
    assert len(done) >= 2
    for path in done:  # a resumed stream must not even open them (it would count them as corrupt)
        Path(path).write_bytes(b"overwritten")
    resumed = _stream(paths, world_size=1, shuffle_buffer=4)
    resumed.load_state_dict(state)
    tail = _keys(_epoch_batches(resumed, iter(resumed)))
    assert sorted(head + tail) == [f"{i:06d}" for i in range(NUM_SAMPLES)] and resumed.bad_counts == {}


def test_state_without_a_position_is_refused(shards):
    state = {"epoch": 0, "batches_in_epoch": 2, "samples_seen": 8, "seed": 5, "rank": 0, "world_size": 2}
    with pytest.raises(ValueError, match="position"):
        _stream(shards).load_state_dict(state)


def test_stream_pickles_small_before_and_after_iterating(shards):
    stream = _stream(shards)
    _take(iter(stream), 2)
    clone = pickle.loads(pickle.dumps(stream))
    assert len(pickle.dumps(stream)) < 4096 and clone.state_dict() == stream.state_dict()


def test_reiterating_continues_and_stales_old_iterator(shards):
    expected = _take(iter(_stream(shards, num_workers=0)), 6)
    stream = _stream(shards, num_workers=0)
    first = iter(stream)
    head = _take(first, 2)
    _assert_same_batches(head + _take(iter(stream), 4), expected)
    with pytest.raises(RuntimeError, match="stale"):
        next(first)


def test_changed_settings_warn_on_resume(shards):
    state = _stream(shards).state_dict()
    with pytest.warns(UserWarning, match="num_workers: 2 -> 0"):
        _stream(shards, num_workers=0).load_state_dict(state)
    with pytest.raises(ValueError, match="batches_in_epoch"):
        _stream(shards).load_state_dict({"epoch": 0})


# --- argument errors --------------------------------------------------------------------------------


def test_too_few_shards(shards):
    with pytest.raises(ValueError, match="need at least world_size shards"):
        _stream(shards[:1])
    with pytest.warns(UserWarning, match="will idle"):
        _stream(shards[:2], num_workers=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rank": 2}, "rank"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": -1}, "seed"),
        ({"shuffle_buffer": -1}, "shuffle_buffer"),
        ({"mode": "bogus"}, "mode"),
        ({"latent_shape": (4, 8)}, "latent_shape"),
        ({"latent_dtype": "int8"}, "latent_dtype"),
        ({"max_bad_fraction": 1.5}, "max_bad_fraction"),
        ({"on_missing_shard": "ignore"}, "on_missing_shard"),
        ({"min_samples_for_bad_check": -1}, "min_samples_for_bad_check"),
        ({"bucketing": True, "bucket_step": 0}, "bucket_step"),
        ({"bucketing": True, "bucket_step": 32}, "bucket_step"),
    ],
)
def test_bad_arguments(shards, overrides, message):
    with pytest.raises(ValueError, match=message):
        _stream(shards, **overrides)


def test_batch_larger_than_worker_data(shards):
    with pytest.raises(ValueError, match="produced no batch"):
        next(iter(_stream(shards, batch_size=64, num_workers=0)))

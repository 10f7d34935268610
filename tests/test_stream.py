"""Tests for the streaming shard pipeline (data/stream.py)."""

from __future__ import annotations

import io
import itertools
import pickle
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data.stream import ShardStream, expand_urls, open_url, rank_shards
from data.toy import CLASS_NAMES, write_toy_shards

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


def test_remote_fsspec_urls_stream_like_local_ones(shards):
    fs = fsspec.filesystem("memory")
    for path in shards[:2]:
        fs.pipe(f"/nuance-test/{Path(path).name}", Path(path).read_bytes())
    remote = expand_urls("memory://nuance-test/shapes-{000000..000001}.tar")
    a = _take(iter(_stream(remote, world_size=1, num_workers=0)), 4)
    _assert_same_batches(a, _take(iter(_stream(shards[:2], world_size=1, num_workers=0)), 4))


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
    batch = next(
        iter(ShardStream(url, rank=0, world_size=1, batch_size=4, image_size=8, seed=0, random_flip=False))
    )
    assert batch["pixels"].shape == (4, 3, 8, 8)
    assert batch["pixels"][:, :, 2:6, 1:7].min() > 0.5  # bright centre kept after resize + centre crop
    assert batch["caption"] == [""] * 4 and batch["class_label"].tolist() == [-1] * 4


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
    state = reference.state_dict()
    expected = _take(iterator, 5)  # k=6: crosses the epoch boundary after resuming

    resumed = _stream(shards, rank=1, num_workers=num_workers)
    resumed.load_state_dict(state)
    _assert_same_batches(_take(iter(resumed), 5), expected)
    assert resumed.state_dict() == reference.state_dict()
    assert resumed.samples_seen == (k + 5) * 4


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
    ],
)
def test_bad_arguments(shards, overrides, message):
    with pytest.raises(ValueError, match=message):
        _stream(shards, **overrides)


def test_batch_larger_than_worker_data(shards):
    with pytest.raises(ValueError, match="produced no batch"):
        next(iter(_stream(shards, batch_size=64, num_workers=0)))

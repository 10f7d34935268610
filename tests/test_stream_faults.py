"""Bad data in shards (data/stream.py, data/decode.py): skipped, counted per reason in samples, never
fatal; lost shards (missing, forbidden, unreachable) stop the stream unless on_missing_shard="skip"."""

from __future__ import annotations

import io
import itertools
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from nuance.data import retries
from nuance.data.manifest import SHARDS_FORMAT, build_manifest, write_manifest
from nuance.data.stream import BadDataError, ShardStream, ShardUnavailableError

GOOD_PER_SHARD, SHARDS = 12, 3


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), seed % 256, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _image(i: int) -> dict:
    return {"__key__": f"g{i:04d}", "png": _png(i), "txt": f"caption {i}".encode(), "cls": b"1"}


def _latent(i: int, shape=(4, 4, 4), dtype=np.float16) -> dict:
    return {"__key__": f"g{i:04d}", "latent.npy": _npy(np.zeros(shape, dtype)), "txt": b"a caption"}


def _write(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path), mtime=0, encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def _dataset(tmp_path: Path, make_good, bad: list[dict], every: int = 4) -> tuple[list[str], list[str]]:
    """SHARDS shards of good samples, with the ``bad`` ones spread between them, and their manifest.json;
    returns (urls, good keys).

    Every shard starts with ``every`` >= 4 good samples, so with batch_size 1 and shuffle_buffer 4 the first
    batch of an epoch carries no bad-sample report of that epoch: counts read right after an epoch (by
    ``_one_epoch``, which reads the next epoch's first batch) are that epoch's counts.
    """
    good = [make_good(i) for i in range(SHARDS * GOOD_PER_SHARD)]
    urls, bad_left, counts = [], list(bad), {}
    tmp_path.mkdir(parents=True, exist_ok=True)
    for s in range(SHARDS):
        samples = []
        for j, sample in enumerate(good[s * GOOD_PER_SHARD : (s + 1) * GOOD_PER_SHARD]):
            samples.append(sample)
            if j % every == every - 1 and bad_left:
                samples.append(bad_left.pop())
        urls.append(_write(tmp_path / f"shard-{s}.tar", samples))
        counts[f"shard-{s}.tar"] = len(samples)
    assert not bad_left, "too many bad samples for the layout"
    write_manifest(str(tmp_path), build_manifest(SHARDS_FORMAT, counts))
    return urls, [s["__key__"] for s in good]


def _stream(urls, **overrides) -> ShardStream:
    kwargs = dict(rank=0, world_size=1, batch_size=1, image_size=8, seed=0, num_workers=2, shuffle_buffer=4)
    kwargs.update(overrides)
    return ShardStream(urls, **kwargs)


def _one_epoch(stream: ShardStream, iterator=None) -> list[str]:
    """Keys of the rest of the current epoch (one batch of the next epoch is read and dropped)."""
    iterator = iter(stream) if iterator is None else iterator
    epoch, keys = stream.epoch, []
    for batch in iterator:
        if stream.epoch != epoch:
            return keys
        keys += batch["key"]
    raise AssertionError("unreachable: the stream is infinite")


def _truncate(url: str, fraction: float = 0.5) -> None:
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: int(len(data) * fraction)])


# One bad sample of each kind: (stream kwargs, how a good sample looks, the bad sample, its reason).
CASES = {
    "garbage_image": (
        {},
        _image,
        {"__key__": "bad", "png": b"not a png at all", "txt": b"x"},
        "undecodable_image",
    ),
    "missing_caption": (
        {"require_caption": True},
        _image,
        {"__key__": "bad", "png": _png(0)},
        "missing_caption",
    ),
    "empty_caption": (
        {"require_caption": True},
        _image,
        {"__key__": "bad", "png": _png(0), "txt": b" "},
        "missing_caption",
    ),
    "missing_image": (
        {},
        _image,
        {"__key__": "bad", "txt": b"a caption", "cls": b"3"},
        "missing_image_or_latent",
    ),
    "bad_label": ({}, _image, {"__key__": "bad", "png": _png(0), "cls": b"seven"}, "bad_metadata"),
    "wrong_latent_shape": (
        {"latent_shape": (4, 4, 4)},
        _latent,
        _latent(0, shape=(4, 8, 8)),
        "wrong_latent_shape",
    ),
    "wrong_latent_dtype": ({}, _latent, _latent(0, dtype=np.float32), "wrong_latent_dtype"),
    "garbage_npy": ({}, _latent, {"__key__": "bad", "latent.npy": b"\x93NUMPY garbage"}, "undecodable_array"),
    "half_a_latent_pair": (
        {},
        _latent,
        {"__key__": "bad", "latent_mean.npy": _npy(np.zeros((4, 4, 4), np.float16))},
        "missing_image_or_latent",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path, case, num_workers):
    kwargs, make_good, bad, reason = CASES[case]
    bad_samples = [{**bad, "__key__": f"bad{i}"} for i in range(4)]
    urls, good = _dataset(tmp_path, make_good, bad_samples)
    stream = _stream(urls, num_workers=num_workers, **kwargs)
    keys = _one_epoch(stream)
    assert sorted(keys) == good  # every good sample, once
    assert stream.bad_counts == {reason: 4}
    assert stream.bad_fraction == pytest.approx(4 / (len(good) + 4 + 1))  # +1: the next epoch's first batch


def test_missing_caption_is_fine_unless_required(tmp_path):
    urls, good = _dataset(tmp_path, _image, [{"__key__": f"nocap{i}", "png": _png(i)} for i in range(3)])
    stream = _stream(urls, batch_size=3)
    batches = list(itertools.islice(iter(stream), (len(good) + 3) // 3))
    captions = {k: c for b in batches for k, c in zip(b["key"], b["caption"])}
    assert [captions[f"nocap{i}"] for i in range(3)] == [""] * 3 and stream.bad_counts == {}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard_is_cut_short_and_counted(tmp_path, num_workers):
    urls, good = _dataset(tmp_path, _image, [])
    truncated = _write(tmp_path / "truncated.tar", [_image(1000 + i) for i in range(40)])
    _truncate(truncated)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    counts = {**json.loads((tmp_path / "manifest.json").read_text())["shards"], "truncated.tar": 40}
    write_manifest(str(tmp_path), build_manifest(SHARDS_FORMAT, {**counts, "garbage.tar": 10}))
    stream = _stream([*urls, truncated, str(garbage)], num_workers=num_workers)
    keys = _one_epoch(stream)
    from_truncated = [k for k in keys if k >= "g1000"]
    assert sorted(k for k in keys if k < "g1000") == good
    assert 0 < len(from_truncated) < 40 and len(set(keys)) == len(keys)
    # Counted once per epoch that reads them; by the time the next epoch's first batch arrives, that epoch
    # may already have reported them too. Counted in samples: what the manifest says they lacked.
    lost = {40 - len(from_truncated), 10}
    assert 2 <= stream.bad_shards["corrupt_shard"] <= 4 and set(stream.bad_counts) == {"corrupt_shard"}
    assert stream.bad_counts["corrupt_shard"] in {a + b for a in lost for b in lost | {0}} - {0}
    assert stream.bad_counts["corrupt_shard"] >= sum(lost)
    _one_epoch(stream)
    assert 4 <= stream.bad_shards["corrupt_shard"] <= 6 and stream.bad_counts["corrupt_shard"] >= 2 * sum(
        lost
    )


def test_corrupt_shard_without_a_manifest_counts_the_typical_shard_size(tmp_path):
    urls, good = _dataset(tmp_path, _image, [])
    (tmp_path / "manifest.json").unlink()
    _truncate(urls[1], 0.3)
    stream = _stream(urls, num_workers=0)
    iterator = iter(stream)
    delivered = GOOD_PER_SHARD - (len(good) - len(_one_epoch(stream, iterator)))
    _one_epoch(stream, iterator)
    times = stream.bad_shards["corrupt_shard"]  # once per epoch (+1 if the third epoch's first batch met it)
    assert 2 <= times <= 3 and 0 <= delivered < GOOD_PER_SHARD
    # Estimated from the shards read to their end (12 samples each) less what it delivered; 1 (at least)
    # while none is known yet, which only the first epoch's first shard can meet.
    lost = GOOD_PER_SHARD - delivered
    assert stream.bad_counts["corrupt_shard"] in {times * lost, (times - 1) * lost + 1}


def _lost_shard_stream(tmp_path, monkeypatch, budget: str = "0.3", **overrides):
    """A stream over the standard dataset whose second shard was deleted after expansion."""
    monkeypatch.setenv(retries.RETRY_SECONDS_ENV, budget)
    monkeypatch.setattr(retries, "_BACKOFF_FIRST_S", 0.02)
    urls, good = _dataset(tmp_path, _image, [])
    stream = _stream(urls, **overrides)
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).unlink()  # after expansion, before reading
    return stream, urls, good, data


@pytest.mark.parametrize("num_workers", [0, 2])
def test_missing_shard_stops_the_stream_naming_url_and_reason(tmp_path, monkeypatch, num_workers):
    stream, urls, _, _ = _lost_shard_stream(tmp_path, monkeypatch, num_workers=num_workers)
    with pytest.raises(ShardUnavailableError) as info:
        _one_epoch(stream)
    message = str(info.value)
    assert "\n" not in message and f"shard {urls[1]} is missing" in message
    assert "FileNotFoundError" in message and "data.on_missing_shard=skip" in message


def test_missing_shard_is_retried_within_the_budget(tmp_path, monkeypatch):
    stream, urls, good, data = _lost_shard_stream(tmp_path, monkeypatch, budget="20", num_workers=0)
    restore = threading.Timer(0.5, Path(urls[1]).write_bytes, args=(data,))  # e.g. still being uploaded
    before = retries.retry_count()
    restore.start()
    try:
        assert sorted(_one_epoch(stream)) == good and stream.bad_counts == {}
    finally:
        restore.cancel()
    assert retries.retry_count() > before


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_missing_shard_counts_its_samples_and_warns(tmp_path, monkeypatch, caplog, num_workers):
    stream, urls, good, _ = _lost_shard_stream(
        tmp_path, monkeypatch, num_workers=num_workers, on_missing_shard="skip"
    )
    with caplog.at_level(logging.WARNING, logger="nuance.data.stream"):
        keys = _one_epoch(stream)
    assert len(keys) == 2 * GOOD_PER_SHARD and set(keys) <= set(good)
    times = stream.bad_shards["missing_shard"]  # 2: the next epoch's first batch met it too
    assert 1 <= times <= 2 and stream.bad_counts == {"missing_shard": GOOD_PER_SHARD * times}
    warned = [r.getMessage() for r in caplog.records if r.name == "nuance.data.stream"]
    assert len(warned) == times and f"skipped shard {urls[1]} (missing" in warned[0]
    assert f"{GOOD_PER_SHARD} sample(s) counted as bad" in warned[0]


def test_max_bad_fraction_weighs_a_skipped_shard_by_its_samples(tmp_path, monkeypatch):
    # One lost shard of 12 samples among 36: a third of the data, far over 10% (it used to count as 1).
    stream, *_ = _lost_shard_stream(
        tmp_path, monkeypatch, on_missing_shard="skip", max_bad_fraction=0.1, min_samples_for_bad_check=20
    )
    with pytest.raises(BadDataError, match=r"missing_shard=12\b"):
        _one_epoch(stream)


def test_too_many_bad_samples_raise_bad_data_error(tmp_path):
    bad = [{"__key__": f"bad{i}", "png": b"garbage", "txt": b"x"} for i in range(9)]
    urls, good = _dataset(tmp_path, _image, bad, every=1)
    stream = _stream(urls, max_bad_fraction=0.1, min_samples_for_bad_check=20)
    with pytest.raises(BadDataError, match=r"undecodable_image=\d+.*data\.max_bad_fraction=0\.1") as info:
        _one_epoch(stream)
    assert isinstance(info.value, ValueError) and stream.samples_seen + sum(stream.bad_counts.values()) >= 20


def test_bad_fraction_below_the_limit_or_before_enough_samples_is_fine(tmp_path):
    bad = [{"__key__": f"bad{i}", "png": b"garbage", "txt": b"x"} for i in range(3)]
    urls, good = _dataset(tmp_path / "few", _image, bad, every=12)
    stream = _stream(urls, max_bad_fraction=0.1, min_samples_for_bad_check=20)
    assert sorted(_one_epoch(stream)) == good and 0 < stream.bad_fraction < 0.1
    # Many bad samples early on, but fewer samples read than min_samples_for_bad_check: no verdict yet.
    urls, _ = _dataset(tmp_path / "many", _image, bad * 3, every=4)
    early = _stream(urls, max_bad_fraction=0.01, min_samples_for_bad_check=10_000)
    assert len(_one_epoch(early)) == len(good) and early.bad_fraction > 0.01


@pytest.mark.parametrize(("before", "after"), [(2, 2), (2, 1), (0, 2)])
def test_bad_counts_survive_resume_without_double_counting(tmp_path, before, after):
    bad = [{"__key__": f"bad{i}", "png": b"garbage", "txt": b"x"} for i in range(6)]
    urls, good = _dataset(tmp_path, _image, bad, every=4)
    _truncate(urls[2], 0.75)
    reference = _stream(urls, num_workers=after)
    expected_keys = _one_epoch(reference)
    expected_counts = reference.bad_counts
    assert reference.bad_shards == {"corrupt_shard": 1} and expected_counts["undecodable_image"] >= 4
    assert expected_counts["corrupt_shard"] >= 1  # the samples the manifest says the shard lacked

    for k in (1, 10, 25):
        first = _stream(urls, num_workers=before)
        iterator = iter(first)
        head = [key for batch in itertools.islice(iterator, k) for key in batch["key"]]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = _stream(urls, num_workers=after)
        with pytest.warns(UserWarning) if before != after else _no_warning():
            resumed.load_state_dict(state)
        assert resumed.bad_counts == first.bad_counts and resumed.bad_fraction == first.bad_fraction
        tail = _one_epoch(resumed)
        assert sorted(head + tail) == sorted(expected_keys)
        assert resumed.bad_counts == expected_counts


class _no_warning:
    """Context manager asserting that no warning is raised inside it."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def test_unreachable_s3_shard_stops_the_stream_or_is_skipped(tmp_path, monkeypatch):
    """An S3 outage longer than the retry budget is no corrupt shard: it stops the run, naming the shard."""
    from tests.conftest import free_port

    monkeypatch.setenv(retries.RETRY_SECONDS_ENV, "0.3")
    monkeypatch.setattr(retries, "_BACKOFF_FIRST_S", 0.02)
    for name, value in [
        ("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}"),
        ("AWS_REGION", "us-east-1"),
    ]:
        monkeypatch.setenv(name, value)  # nothing listens there: connection refused
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    urls, good = _dataset(tmp_path, _image, [])
    down = "s3://nuance-test/down/shard-9.tar"
    with pytest.raises(ShardUnavailableError, match=f"shard {down} is unreachable .*RetriesExhausted"):
        _one_epoch(_stream([*urls, down], num_workers=0))
    stream = _stream([*urls, down], num_workers=0, on_missing_shard="skip")
    assert sorted(_one_epoch(stream)) == good and 1 <= stream.bad_shards["missing_shard"] <= 2

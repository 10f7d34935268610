"""Bad data in shards (data/stream.py, data/decode.py): skipped, counted per reason, never fatal."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from nuance.data.stream import BadDataError, ShardStream

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
    """SHARDS shards of good samples, with the ``bad`` ones spread between them; returns (urls, good keys).

    Every shard starts with ``every`` >= 4 good samples, so with batch_size 1 and shuffle_buffer 4 the first
    batch of an epoch carries no bad-sample report of that epoch: counts read right after an epoch (by
    ``_one_epoch``, which reads the next epoch's first batch) are that epoch's counts.
    """
    good = [make_good(i) for i in range(SHARDS * GOOD_PER_SHARD)]
    urls, bad_left = [], list(bad)
    tmp_path.mkdir(parents=True, exist_ok=True)
    for s in range(SHARDS):
        samples = []
        for j, sample in enumerate(good[s * GOOD_PER_SHARD : (s + 1) * GOOD_PER_SHARD]):
            samples.append(sample)
            if j % every == every - 1 and bad_left:
                samples.append(bad_left.pop())
        urls.append(_write(tmp_path / f"shard-{s}.tar", samples))
    assert not bad_left, "too many bad samples for the layout"
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
    stream = _stream([*urls, truncated, str(garbage)], num_workers=num_workers)
    keys = _one_epoch(stream)
    from_truncated = [k for k in keys if k >= "g1000"]
    assert sorted(k for k in keys if k < "g1000") == good
    assert 0 < len(from_truncated) < 40 and len(set(keys)) == len(keys)
    # Counted once per epoch that reads them; by the time the next epoch's first batch arrives, that epoch
    # may already have reported them too.
    assert 2 <= stream.bad_counts["corrupt_shard"] <= 4 and set(stream.bad_counts) == {"corrupt_shard"}
    _one_epoch(stream)
    assert 4 <= stream.bad_counts["corrupt_shard"] <= 6


def test_shard_that_vanished_counts_as_corrupt(tmp_path):
    urls, good = _dataset(tmp_path, _image, [])
    stream = _stream(urls)
    Path(urls[1]).unlink()  # after expansion, before reading
    keys = _one_epoch(stream)
    assert len(keys) == 2 * GOOD_PER_SHARD and set(keys) <= set(good)
    assert 1 <= stream.bad_counts["corrupt_shard"] <= 2 and set(stream.bad_counts) == {"corrupt_shard"}


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
    assert expected_counts["corrupt_shard"] == 1 and expected_counts["undecodable_image"] >= 4

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

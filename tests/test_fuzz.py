"""Fuzzing, seeded and in-process: mutated shards through the reader and decoder the stream uses
(data/tarstream.py, data/decode.py) and mutated recipe files through the recipe loader
(orchestration/recipe.py). A damaged shard is cut short or skipped and counted, a bad sample is skipped
and counted, a bad recipe fails with the one-line RecipeError the CLI prints: never another exception,
never a hang."""

from __future__ import annotations

import copy
import gzip
import io
import random
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from nuance.data.decode import BadSample, DecodeSpec, decode_sample, read_tar
from nuance.data.shards import _SHARD_ERRORS
from nuance.data.stream import ShardStream
from nuance.orchestration.recipe import RecipeError, load_recipe

NUM_SHARDS, NUM_RECIPES = 240, 240
SPEC = DecodeSpec(
    image_size=8,
    buckets=None,
    random_crop=True,
    random_flip=True,
    latent_shape=(4, 4, 4),
    latent_dtype="float16",
    require_caption=False,
)
# Slowest a single case may take: well above a normal one (milliseconds), far below a hang.
CASE_LIMIT_S = 5.0


# ------------------------------------------------------------------------------------- shards


def _png(seed: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), seed % 256, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _samples() -> list[dict[str, bytes]]:
    """Good samples of both formats (image and latent), some with long (pax / GNU) member names."""
    images = [
        {"png": _png(i), "txt": f"caption {i}".encode(), "cls": b"3", "json": b'{"original_size": [8, 8]}'}
        for i in range(3)
    ]
    latents = [
        {
            "latent_mean.npy": _npy(np.zeros((4, 4, 4), np.float16)),
            "latent_logvar.npy": _npy(np.zeros((4, 4, 4), np.float16)),
            "text.npy": _npy(np.ones((5, 6), np.float16)),
            "mask.npy": _npy(np.ones(5, np.int64)),
            "txt": b"a latent",
            "json": b'{"crop": [0, 0]}',
        }
        for _ in range(2)
    ]
    return [{"__key__": f"s{i:03d}", **s} for i, s in enumerate(images + latents)]


def _tar(samples: list[dict[str, bytes]], fmt: int = tarfile.GNU_FORMAT, long_names: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for sample in samples:
            key = sample["__key__"] if not long_names else "d" * 120 + "/" + sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _headers(data: bytes) -> list[int]:
    """Offsets of the member header blocks of a valid uncompressed archive (extension headers included)."""
    offsets, pos = [], 0
    while pos + 512 <= len(data) and data[pos : pos + 512] != bytes(512):
        offsets.append(pos)
        size = int(data[pos + 124 : pos + 136].split(b"\0")[0].strip() or b"0", 8)
        pos += 512 + size + (-size % 512)
    return offsets


def _with_header(data: bytes, offset: int, start: int, field: bytes) -> bytes:
    """``data`` with ``field`` written at ``offset + start`` and that header's checksum made valid again."""
    header = bytearray(data[offset : offset + 512])
    header[start : start + len(field)] = field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return data[:offset] + bytes(header) + data[offset + 512 :]


def _npy_claiming(shape: tuple[int, ...], dtype: str = "<f2", version: int = 1) -> bytes:
    """A well-formed .npy header for ``shape`` followed by a few bytes of data: a corrupt or hostile
    latent member that claims far more than it holds."""
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}"
    prefix = 10 if version == 1 else 12
    header += " " * (-(prefix + len(header) + 1) % 64) + "\n"
    size = len(header).to_bytes(2 if version == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([version, 0]) + size + header.encode("latin1") + bytes(8)


def _flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 24)):
        out[rng.randrange(len(out))] ^= rng.randint(1, 255)
    return bytes(out)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def _retype(rng: random.Random, data: bytes) -> bytes:
    """A member of another type: link, device, directory, FIFO, sparse, pax, GNU long name, unknown."""
    offset = rng.choice(_headers(data))
    return _with_header(data, offset, 156, rng.choice(b"0123456LKxgSAZ\0").to_bytes(1, "big"))


def _huge_header(rng: random.Random, data: bytes) -> bytes:
    """A size field far beyond the archive: octal, GNU base-256 (positive and negative) or garbage."""
    offset = rng.choice(_headers(data))
    field = rng.choice(
        [
            b"77777777777\0",
            b"\x80" + (2**80).to_bytes(11, "big"),
            b"\xff" * 12,
            b"\x80" + rng.randbytes(11),
            b"9999999999\0\0",
            b"-1\0\0\0\0\0\0\0\0\0\0",
        ]
    )
    return _with_header(data, offset, 124, field)


def _huge_pax(rng: random.Random, data: bytes) -> bytes:
    """A pax extension member in front, with a huge or malformed record."""
    record = rng.choice(
        [
            b"30 size=999999999999999999999\n",
            b"20 path=" + b"x" * 11 + b"\n",  # wrong record length
            b"99999999999999999999 path=x\n",
            b"12 path=\xff\xfe\n",
            b"0 size=1\n",
            b"15 GNU.sparse.map=0\n",
            b"1000012 path=" + b"y" * 1_000_000 + b"\n",
            b"notanumber path=x\n",
        ]
    )
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(record)
    header = info.tobuf(tarfile.USTAR_FORMAT)
    return header + record + bytes(-len(record) % 512) + data


def _wrong_members(rng: random.Random, _data: bytes) -> bytes:
    """Members holding the wrong kind of bytes: other members' data, garbage, bombs, odd arrays, JSON."""
    samples = _samples()
    pool = [v for s in samples for k, v in s.items() if k != "__key__"]
    odd = [
        b"",
        rng.randbytes(rng.randint(1, 300)),
        b"\x93NUMPY\x01\x00\x76\x00{'descr': '<f2', 'fortran_order': False, 'shape': (1000000000000,), }"
        + b" " * 40
        + b"\n",
        b"\x93NUMPY\x01\x00\x40\x00{'descr': '|O', 'fortran_order': False, 'shape': (1,), }       \n",
        b"\x93NUMPY\x03\x00" + b"\xff" * 8,
        _npy_claiming((2**40,)),
        _npy_claiming((2**20, 2**20, 2**20), "<f4", version=2),
        _npy_claiming((4, 4, 2**26)),
        _npy(np.zeros((4, 4, 4), np.float32)),
        _npy(np.zeros((4, 4, 4, 1), np.float16)),
        _npy(np.array(["a", "b"])),
        _npy(np.zeros((0,), np.float16)),
        b'{"original_size": [-1, 2]}',
        b'{"original_size": [1e300, "x"]}',
        b'{"crop": null}',
        b"[1, 2, 3]",
        b'{"height": 99999999999999999999999, "width": 2}',
        b"99999999999999999999999999999999",
        b"\xff\xfe\xfd",
        _png(1)[:40],
        _png(2).replace(b"IHDR\x00\x00\x00\x08\x00\x00\x00\x08", b"IHDR\x00\x01\x00\x00\x00\x01\x00\x00"),
    ]
    for sample in samples:
        for ext in [e for e in sample if e != "__key__"]:
            if rng.random() < 0.35:
                sample[ext] = rng.choice(pool + odd + odd)
        if rng.random() < 0.2:
            del sample[rng.choice([e for e in sample if e != "__key__"])]
    return _tar(samples, rng.choice([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))


def _gzip_then(mutate: Callable[[random.Random, bytes], bytes]):
    def mutated(rng: random.Random, data: bytes) -> bytes:
        return mutate(rng, gzip.compress(data, mtime=0))

    return mutated


MUTATIONS = {
    "flip": _flip,
    "truncate": _truncate,
    "retype": _retype,
    "huge_header": _huge_header,
    "huge_pax": _huge_pax,
    "wrong_members": _wrong_members,
    "gzip_flip": _gzip_then(_flip),
    "gzip_truncate": _gzip_then(_truncate),
}


def mutated_shards(seed: int = 0) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    bases = [
        _tar(_samples()),
        _tar(_samples(), tarfile.PAX_FORMAT, long_names=True),
        _tar(_samples(), tarfile.GNU_FORMAT, long_names=True),
    ]
    names = list(MUTATIONS)
    return [
        (name, MUTATIONS[name](rng, rng.choice(bases)))
        for name in (names[i % len(names)] for i in range(NUM_SHARDS))
    ]


def consume(data: bytes) -> tuple[int, int, bool]:
    """(good samples, bad samples, shard cut short) for one shard, handled as the stream's workers do:
    a read error ends the shard (counted as corrupt), BadSample skips a sample. Anything else escapes."""
    good = bad = 0
    try:
        for index, sample in enumerate(read_tar(io.BytesIO(data), "fuzz.tar")):
            try:
                decode_sample(sample, SPEC, [0, index])
                good += 1
            except BadSample:
                bad += 1
    except _SHARD_ERRORS:
        return good, bad, True
    return good, bad, False


def test_valid_shards_decode_fully():
    for data in (_tar(_samples()), _tar(_samples(), tarfile.PAX_FORMAT, long_names=True)):
        assert consume(data) == (5, 0, False)
        assert consume(gzip.compress(data, mtime=0)) == (5, 0, False)


def test_mutated_shards_are_skipped_or_counted_never_a_crash():
    outcomes = {"cut_short": 0, "bad_samples": 0, "clean": 0}
    for i, (mutation, data) in enumerate(mutated_shards()):
        start = time.perf_counter()
        try:
            good, bad, cut = consume(data)
        except Exception as err:  # noqa: BLE001 - the finding: name the case
            raise AssertionError(f"shard {i} ({mutation}): {type(err).__name__}: {err}") from err
        assert time.perf_counter() - start < CASE_LIMIT_S, f"shard {i} ({mutation}) took too long"
        assert 0 <= good + bad <= 5 or mutation == "huge_pax"
        outcomes["cut_short" if cut else "bad_samples" if bad else "clean"] += 1
    # The mutations do damage: most shards are cut short or have bad samples.
    assert outcomes["cut_short"] >= NUM_SHARDS // 3 and outcomes["bad_samples"] >= 10, outcomes


def test_a_size_field_beyond_the_file_costs_no_memory(tmp_path):
    """A corrupt header claiming a 256 MiB member in a small file: the reader fails after reading what
    the file holds, without a buffer of the claimed size (it allocated one before: gigabytes for the
    fuzzer's 8 GiB claims)."""
    import tracemalloc

    data = _tar(_samples())
    path = tmp_path / "claims.tar"
    path.write_bytes(_with_header(data, _headers(data)[1], 124, b"%011o\0" % 2**28))
    tracemalloc.start()
    try:
        with open(path, "rb") as f, pytest.raises(tarfile.ReadError, match="truncated"):
            for _ in read_tar(f, str(path)):
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_stream_counts_and_skips_mutated_shards(tmp_path):
    """The real stream over a folder of mutated shards and two good ones: one epoch ends, every good
    sample of the good shards arrives, and the damaged shards are counted."""
    good_keys = set()
    for k in range(2):
        samples = [{**s, "__key__": f"good{k}-{s['__key__']}"} for s in _samples()[:3]]
        good_keys |= {s["__key__"] for s in samples}
        (tmp_path / f"good-{k}.tar").write_bytes(_tar(samples))
    damaged = [(m, d) for m, d in mutated_shards(seed=1) if m in ("flip", "truncate", "huge_header")][:12]
    for i, (_, data) in enumerate(damaged):
        (tmp_path / f"mut-{i:02d}.tar").write_bytes(data)
    stream = ShardStream(
        str(tmp_path), rank=0, world_size=1, batch_size=1, image_size=8, seed=0, shuffle_buffer=0
    )
    keys, iterator = [], iter(stream)
    for batch in iterator:
        if stream.epoch != 0:
            break
        keys += batch["key"]
    assert good_keys <= set(keys)
    assert stream.bad_shards.get("corrupt_shard", 0) >= 3, stream.bad_shards
    assert sum(stream.bad_counts.values()) >= 3


# ------------------------------------------------------------------------------------- recipes

RECIPES = sorted(p for p in Path(__file__).resolve().parents[1].joinpath("recipes").rglob("*.yaml"))
ODD_VALUES = [
    None,
    True,
    -1,
    0,
    2**70,
    -(2**70),
    1e309,
    float("nan"),
    "",
    "x" * 5000,
    "${oops}",
    "${env:HOME}",
    "???",
    "\x00\x01",
    [],
    [1, [2, [3]]],
    {},
    {"nested": {"deeper": 1}},
    "s3://",
    "../../../etc/passwd",
    "1e3",
    "none",
]


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _mutate_tree(rng: random.Random, tree: dict) -> str:
    tree = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(tree))
        path = rng.choice(paths) if paths else ("name",)
        op = rng.randrange(5)
        if op == 0:
            _set(tree, path, rng.choice(ODD_VALUES))
        elif op == 1 and len(path) > 0:
            parent = tree
            for key in path[:-1]:
                parent = parent[key]
            parent.pop(path[-1], None)
        elif op == 2:
            _set(tree, (*path[:-1], path[-1] + rng.choice(["_", "s", "x"])), 1)
        elif op == 3:
            _set(tree, path, {"unexpected": rng.choice(ODD_VALUES)})
        else:
            _set(tree, path, str(rng.choice(ODD_VALUES)))
    return yaml.safe_dump(tree, allow_unicode=True)


def _mutate_text(rng: random.Random, text: str) -> str:
    op = rng.randrange(7)
    if op == 0:
        data = bytearray(text.encode())
        for _ in range(rng.randint(1, 10)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return data.decode("utf-8", "surrogateescape")
    if op == 1:
        return text[: rng.randrange(len(text))]
    if op == 2:
        lines = text.splitlines()
        i = rng.randrange(len(lines))
        lines[i] = (
            rng.choice(["\t", "  ", "- ", ": ", "[", "{", "&a ", "*a ", "!!python/object:os.system "])
            + lines[i]
        )
        return "\n".join(lines)
    if op == 3:
        return rng.choice(["", "[]", "- 1\n- 2", "42", "null", "~", "!!binary aGVsbG8=", "a: !!set {x}"])
    if op == 4:  # an alias bomb: nine levels of nine references
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
        return "\n".join(lines) + "\n" + text
    if op == 5:
        return text + "\n" + text.splitlines()[0]  # a duplicate key
    return text.replace(":", rng.choice(["=", " :", "::"]), 1)


def mutated_recipes(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [p.read_text() for p in RECIPES]
    out = []
    for i in range(NUM_RECIPES):
        text = rng.choice(texts)
        out.append(_mutate_tree(rng, yaml.safe_load(text)) if i % 2 else _mutate_text(rng, text))
    return out


def test_mutated_recipes_fail_with_one_line(tmp_path):
    failed = 0
    for i, text in enumerate(mutated_recipes()):
        path = tmp_path / f"r{i:03d}.yaml"
        path.write_text(text, errors="surrogateescape")
        start = time.perf_counter()
        try:
            load_recipe(str(path))
        except RecipeError as err:
            message = str(err)
            assert "\n" not in message and str(path) in message, f"recipe {i}: {message!r}"
            failed += 1
        except Exception as err:  # noqa: BLE001 - the finding: name the case
            raise AssertionError(f"recipe {i}: {type(err).__name__}: {err}\n{text[:2000]}") from err
        assert time.perf_counter() - start < CASE_LIMIT_S, f"recipe {i} took too long:\n{text[:500]}"
    assert failed >= NUM_RECIPES // 2, f"only {failed} mutated recipes were refused"


@pytest.mark.parametrize(
    "text", ["!!python/object/apply:os.system ['echo pwned']", "a: !!python/name:os.system"]
)
def test_recipes_never_construct_python_objects(tmp_path, text):
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError):
        load_recipe(str(path))

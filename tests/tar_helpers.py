"""Reading shards back in tests with the standard library's tarfile, independent of data/tarstream.py."""

from __future__ import annotations

import os
import tarfile


def tar_samples(path: str | os.PathLike) -> dict[str, dict[str, bytes]]:
    """All samples of a tar shard as {key: {ext: bytes}}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples

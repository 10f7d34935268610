"""Data-loading throughput: samples/s and MB/s of nuance's ShardStream, SeaweedFS S3 vs local disk.

Writes synthetic shards (latent shards like `nuance data precompute` makes: 4x32x32 fp16 latent mean +
logvar, 77x768 fp16 text embeddings, mask, pooled; and JPEG shards of 384x512 photos-sized noise
images cropped to 256), uploads them to a SeaweedFS server it starts on 127.0.0.1, then times
`ShardStream` (batch 64) over local disk and S3 for each --workers value. Per-worker rate =
samples/s / max(1, workers). Nothing is asserted: numbers go to stdout and --json.

    python benchmarks/data_throughput.py --json /tmp/data_throughput.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_shards(folder: Path, kind: str, num_shards: int, per_shard: int) -> list[Path]:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        path = folder / f"{kind}-{s:06d}.tar"
        with wds.TarWriter(str(path), mtime=0, encoder=False) as sink:
            for i in range(per_shard):
                sample = {"__key__": f"{s:04d}{i:05d}", "txt": b"a photo of something", "cls": b"3"}
                if kind == "latent":
                    sample["latent_mean.npy"] = npy(rng.standard_normal((4, 32, 32)).astype(np.float16))
                    sample["latent_logvar.npy"] = npy(np.full((4, 32, 32), -4, np.float16))
                    sample["text.npy"] = npy(rng.standard_normal((77, 768)).astype(np.float16))
                    sample["mask.npy"] = npy(np.ones(77, np.uint8))
                    sample["pooled.npy"] = npy(rng.standard_normal(768).astype(np.float16))
                else:
                    pixels = rng.integers(0, 255, (384, 512, 3), dtype=np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                    sample["jpg"] = buf.getvalue()
                sink.write(sample)
        paths.append(path)
    return paths


def time_stream(spec: str, kind: str, workers: int, batches: int) -> dict:
    from nuance.data.stream import ShardStream

    latent_shape = (4, 32, 32) if kind == "latent" else None
    stream = ShardStream(
        spec,
        rank=0,
        world_size=1,
        batch_size=64,
        image_size=256,
        seed=0,
        num_workers=workers,
        latent_shape=latent_shape,
        shuffle_buffer=256,
    )
    it = iter(stream)
    next(it)  # start-up (worker processes, first shard) is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - t0
    samples = batches * 64
    return {"samples_s": samples / elapsed, "per_worker": samples / elapsed / max(1, workers)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--latent-shards", type=int, default=8)
    p.add_argument("--jpeg-shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=512)
    p.add_argument("--batches", type=int, default=200, help="timed latent batches (JPEG: 8)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from nuance.data import storage
    from nuance.data.s3server import SeaweedServer, random_credentials

    root = Path(tempfile.mkdtemp(prefix="nuance-databench-"))
    shards = {
        "latent": write_shards(root / "latent", "latent", args.latent_shards, args.per_shard),
        "jpeg": write_shards(root / "jpeg", "jpeg", args.jpeg_shards, args.per_shard // 4),
    }
    sizes = {k: sum(p.stat().st_size for p in v) / sum(1 for _ in v) for k, v in shards.items()}
    access, secret = random_credentials()
    results = []
    with SeaweedServer(root / "weed", access, secret, bucket="bench") as server:
        os.environ.update(server.env())
        for kind, paths in shards.items():
            for path in paths:
                storage.put_file(path, f"s3://bench/{kind}/{path.name}")
        for kind, paths in shards.items():
            per_sample_mb = (
                sizes[kind] / (args.per_shard if kind == "latent" else args.per_shard // 4) / 2**20
            )
            for workers in (int(w) for w in args.workers.split(",")):
                row = {"kind": kind, "workers": workers}
                for where, spec in (("local", str(paths[0].parent)), ("s3", f"s3://bench/{kind}/")):
                    rate = time_stream(spec, kind, workers, args.batches if kind == "latent" else 8)
                    row[f"{where}_samples_s"] = round(rate["samples_s"], 1)
                    row[f"{where}_per_worker"] = round(rate["per_worker"], 1)
                    row[f"{where}_mb_s"] = round(rate["samples_s"] * per_sample_mb, 1)
                row["s3_vs_local"] = round(row["s3_samples_s"] / row["local_samples_s"], 3)
                results.append(row)
                print(json.dumps(row), flush=True)
    print(
        "\n| shards | workers | local samples/s (per worker) | S3 samples/s (per worker) | S3 MB/s "
        "| S3 / local |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['kind']} | {r['workers']} | {r['local_samples_s']} ({r['local_per_worker']}) | "
            f"{r['s3_samples_s']} ({r['s3_per_worker']}) | {r['s3_mb_s']} | {r['s3_vs_local']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

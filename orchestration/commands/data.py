"""`nuance data shard SRC DEST` and `nuance data precompute SRC DEST --vae PATH`: build training data.

    nuance data shard images/ shards/ --max-shard-mb 512 --image-size 512 --workers 8
    nuance data shard listing.parquet s3://bucket/shards/ --samples-per-shard 2000
    nuance data precompute shards/ latents/ --vae ~/models/sd-vae --text-encoder minilm --image-size 256

Both are resumable: run the same command again after an interruption and only the missing shards are
written. Errors (missing SRC, listing columns, empty source, a DEST made with other settings) are one
line on stderr and exit status 2; shards that failed to encode give exit status 1.
"""

from __future__ import annotations

import argparse
import sys


def cmd_shard(ns: argparse.Namespace) -> int:
    """Pack an image folder or listing into WebDataset shards."""
    from nuance.data.sharding import shard_dataset

    result = shard_dataset(
        ns.src,
        ns.dest,
        samples_per_shard=ns.samples_per_shard,
        max_shard_mb=ns.max_shard_mb,
        image_size=ns.image_size,
        workers=ns.workers,
        progress=not ns.quiet,
    )
    print(
        f"[nuance] {result.num_samples} samples in {len(result.shards)} shards at {result.dest} "
        f"({len(result.written)} written, {len(result.skipped)} already there)"
    )
    if result.bad_samples:
        examples = f", e.g. {', '.join(result.bad_examples)}" if result.bad_examples else ""
        print(f"[nuance] skipped {result.bad_samples} unreadable image(s){examples}", file=sys.stderr)
    print(f"[nuance] manifest: {result.manifest_url}")
    return 0


def cmd_precompute(ns: argparse.Namespace) -> int:
    """Encode image shards into latent shards with Ray Data."""
    from nuance.orchestration.precompute import PrecomputeError, precompute_latents

    try:
        result = precompute_latents(
            ns.src,
            ns.dest,
            vae=ns.vae,
            text_encoder=ns.text_encoder,
            batch_size=ns.batch_size,
            store=ns.store,
            workers=ns.workers,
            gpus_per_worker=ns.gpus_per_worker,
            max_length=ns.max_length,
            image_size=ns.image_size,
            progress=not ns.quiet,
        )
    except PrecomputeError as err:
        print(f"nuance: error: {err}", file=sys.stderr)
        return 1
    rate = result.num_samples / result.seconds if result.encoded and result.seconds > 0 else 0.0
    print(
        f"[nuance] {result.num_samples} samples in {len(result.shards)} latent shards at {result.dest} "
        f"({len(result.encoded)} encoded, {len(result.skipped)} already there"
        + (f", {rate:.1f} img/s overall)" if rate else ")")
    )
    if result.bad_samples:
        print(
            f"[nuance] {result.bad_samples} image(s) could not be decoded and were skipped", file=sys.stderr
        )
    print(f"[nuance] manifest: {result.manifest_url}")
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def _add_shard(dsub) -> None:
    """`nuance data shard`."""
    p = dsub.add_parser(
        "shard",
        help="pack an image folder or a .jsonl/.csv/.parquet listing into WebDataset shards",
        description="Pack images into WebDataset shards shard-000000.tar ... plus manifest.json. SRC is a "
        "folder of images with same-stem .txt captions, a folder of class sub-folders, or a .jsonl / .csv "
        "/ .parquet listing with columns path, caption (and optional label).",
    )
    p.add_argument("src", help="image folder or listing file")
    p.add_argument("dest", help="output folder: local path or s3://bucket/prefix")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=_positive_int, default=None, help="default 1000")
    size.add_argument("--max-shard-mb", type=_positive_float, default=None, help="about M MB (10^6) a shard")
    p.add_argument(
        "--image-size", type=_positive_int, default=None, help="downscale so the shorter side is at most S"
    )
    p.add_argument("--workers", type=_positive_int, default=4, help="shards written in parallel (default 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_shard)


def _add_precompute(dsub) -> None:
    """`nuance data precompute`."""
    p = dsub.add_parser(
        "precompute",
        help="encode image shards to VAE latents + text embeddings (Ray Data; GPUs when present)",
        description="Encode each image shard of SRC into a latent shard of the same name under DEST, on a "
        "Ray Data actor pool (RAY_ADDRESS joins a cluster, else a local Ray starts).",
    )
    p.add_argument("src", help="image shard folder (local or s3://), brace pattern or one .tar")
    p.add_argument("dest", help="output folder: local path or s3://bucket/prefix")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder")
    p.add_argument("--text-encoder", default="minilm", help="local CLIP / T5 / BERT folder or 'minilm'")
    p.add_argument(
        "--batch-size", type=_positive_int, default=32, help="images per encoder call (default 32)"
    )
    p.add_argument(
        "--store",
        choices=("mean_logvar", "sample"),
        default="mean_logvar",
        help="posterior mean + logvar (default) or one sampled latent",
    )
    p.add_argument("--workers", type=_positive_int, default=None, help="actors (default: one per GPU, or 1)")
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per actor (default 1 if the cluster has GPUs)",
    )
    p.add_argument("--max-length", type=_positive_int, default=32, help="caption tokens (default 32)")
    p.add_argument(
        "--image-size", type=_positive_int, default=None, help="crop size (default: the source manifest's)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_precompute)


def add_parser(sub) -> None:
    """Add the `data` command group to the `nuance` CLI."""
    p = sub.add_parser("data", help="build datasets: image shards, precomputed latents")
    dsub = p.add_subparsers(dest="data_command", required=True)
    _add_shard(dsub)
    _add_precompute(dsub)

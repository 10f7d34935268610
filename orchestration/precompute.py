"""``nuance data precompute``: encode image shards into latent shards once, on a Ray Data actor pool.

One input shard -> one output shard of the same name. The work runs as a Ray Data pipeline over the
pending shards: an actor pool (one actor per GPU, or CPU actors) of ``trainers.precompute``
``EncodeShardActor``s, each loading the VAE and the text encoder once and then encoding whole shards.
A Ray cluster scales it out (``RAY_ADDRESS``); without one, a local Ray is started
(``ray_env.init_ray``). The latent shard format, the input listing and the manifests are
``data.precompute``'s and ``data.manifest``'s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nuance.data.manifest import (
    LATENTS_FORMAT,
    PartialManifest,
    build_manifest,
    encoder_identity,
    join_url,
    manifest_url,
    write_manifest,
)
from nuance.data.precompute import (
    absolute_model,
    absolute_url,
    check_args,
    fingerprint,
    input_shards,
    latent_shape,
    manifest_fields,
    resolve_image_size,
    resume_state,
    text_shape,
)
from nuance.orchestration.ray_env import check_ray_address, init_ray, joined_worker_secrets, worker_env
from nuance.trainers.precompute import EncodeSettings, EncodeShardActor


class PrecomputeError(RuntimeError):
    """Some shards failed; the finished ones are kept and a re-run retries the rest."""


@dataclass
class PrecomputeResult:
    """Summary of ``precompute_latents``."""

    dest: str
    manifest_url: str
    shards: dict[str, int]
    encoded: list[str]
    skipped: list[str]
    bad_samples: int
    seconds: float
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Samples in the finished latent dataset."""
        return sum(self.shards.values())


# --------------------------------------------------------------------------------------------- Ray


def plan_resources(
    nodes: list[dict[str, float]], workers: int | None, gpus_per_worker: float | None
) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor) for a cluster whose alive nodes have ``nodes`` resources.

    Defaults: one actor per GPU when the cluster has GPUs, else one CPU actor. An actor gets an equal
    share of the CPUs (it decodes images on them), one CPU left for Ray Data's own tasks, and never more
    than one node can give each of the actors it hosts -- else it could never be scheduled.
    """
    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    gpus = sum(node.get("GPU", 0.0) for node in nodes)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus > 0 else 0.0
    if gpus_per_worker > 0 and not any(node.get("GPU", 0.0) >= gpus_per_worker for node in nodes):
        raise ValueError(f"gpus_per_worker={gpus_per_worker:g} but no Ray node has that many GPUs")
    if workers is None:
        workers = max(1, int(gpus // gpus_per_worker)) if gpus_per_worker > 0 else 1
    if gpus_per_worker > 0:
        hosts = [n for n in nodes if n.get("GPU", 0.0) >= gpus_per_worker]
        node_share = min(n.get("CPU", 0.0) // (n["GPU"] // gpus_per_worker) for n in hosts)
    else:
        node_share = max(n.get("CPU", 0.0) for n in nodes)
    cpus_per_worker = max(1.0, float(min((cpus - 1) // workers, node_share)))
    return workers, gpus_per_worker, cpus_per_worker


def _resources(workers: int | None, gpus_per_worker: float | None) -> tuple[int, float, float]:
    """``plan_resources`` for the cluster Ray is connected to."""
    import ray

    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    return plan_resources(nodes, workers, gpus_per_worker)


def _run_actors(
    jobs: list[dict[str, str]],
    settings: EncodeSettings,
    workers: int,
    gpus_per_worker: float,
    cpus_per_worker: float,
) -> Iterator[dict[str, Any]]:
    """Run the encoding jobs on a Ray Data actor pool; yields one result row per shard as it finishes."""
    import ray

    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, False  # ours counts shards
    dataset = ray.data.from_items(jobs, override_num_blocks=len(jobs)).map_batches(
        EncodeShardActor,
        fn_constructor_kwargs={"settings": settings},
        batch_size=1,
        batch_format="numpy",
        # One shard in flight per actor: shards are long, and a queue would leave actors idle at the end.
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        num_gpus=gpus_per_worker,
        num_cpus=cpus_per_worker,
        runtime_env={"env_vars": worker_env(secrets=joined_worker_secrets())},
    )
    try:
        yield from dataset.iter_rows()
    finally:
        context.enable_progress_bars = bars


# ---------------------------------------------------------------------------------------- the command


def _encode_pending(
    dest: str,
    inputs: dict[str, str],
    pending: list[str],
    settings: EncodeSettings,
    resources: tuple[int, float, float],
    partial: PartialManifest,
    progress: bool,
) -> tuple[int, list[str]]:
    """Encode the ``pending`` shards, recording each in ``partial``; returns (bad samples, errors)."""
    from tqdm import tqdm

    jobs = [{"name": n, "src": inputs[n], "out": join_url(dest, n)} for n in pending]
    bad, errors = 0, []
    with tqdm(total=len(pending), unit="shard", desc="precompute", disable=not progress) as bar:
        try:
            for row in _run_actors(jobs, settings, *resources):
                if row["error"]:
                    errors.append(f"{row['name']}: {row['error']}")
                else:
                    partial.record(str(row["name"]), int(row["count"]))
                    bad += int(row["bad"])
                bar.update(1)
                bar.set_postfix(images=sum(partial.shards.values()), bad=bad, refresh=False)
        finally:
            partial.flush()  # keep finished shards for the next run, also on Ctrl-C
    return bad, errors


def precompute_latents(
    src: str,
    dest: str,
    *,
    vae: str,
    text_encoder: str = "minilm",
    batch_size: int = 32,
    store: str = "mean_logvar",
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    max_length: int = 32,
    image_size: int | None = None,
    progress: bool = True,
) -> PrecomputeResult:
    """Encode the image shards of ``src`` into latent shards under ``dest`` (path or s3://) with Ray Data.

    ``vae`` is a local AutoencoderKL folder, ``text_encoder`` a local text-model folder or ``'minilm'``;
    both must exist at the same path on every Ray node. ``workers`` actors (default: one per GPU, or one
    on CPU) with ``gpus_per_worker`` GPUs each (default 1 when the cluster has GPUs) encode ``batch_size``
    images at a time, center-cropped to ``image_size`` (default: the source manifest's). Resumable:
    shards finished by an earlier run with the same settings are skipped; ``manifest.json`` is written
    last. Raises PrecomputeError naming the failed shards if any failed (the rest are kept).
    """
    start = time.perf_counter()
    check_args(batch_size, store, max_length, workers, gpus_per_worker)
    check_ray_address()  # before anything is written to dest
    src, dest = absolute_url(src), absolute_url(dest)  # actors may run in another working directory
    inputs, src_manifest_url, src_manifest = input_shards(src)
    image_size = resolve_image_size(image_size, src_manifest)
    shape = latent_shape(vae, image_size)
    text_dims = text_shape(text_encoder, max_length)  # a pipeline folder's stack: its own T
    source = src_manifest_url or src
    settings_sha = fingerprint(
        {"vae": encoder_identity(vae), "text_encoder": encoder_identity(text_encoder), "store": store,
         "image_size": image_size, "max_length": max_length, "source": source, "shards": list(inputs)}
    )  # fmt: skip

    done, pending, complete = resume_state(dest, inputs, settings_sha)
    if complete is not None and not pending:
        url, bad = manifest_url(dest), int(complete.get("bad_samples", 0))
        return PrecomputeResult(dest, url, dict(complete["shards"]), [], list(inputs), bad, 0.0, complete)

    partial = PartialManifest(dest, LATENTS_FORMAT, settings_sha, done)
    partial.flush()
    bad, errors = 0, []
    if pending:
        init_ray()
        resources = _resources(workers, gpus_per_worker)
        settings = EncodeSettings(
            vae=absolute_model(vae),
            text_encoder=absolute_model(text_encoder),
            max_length=max_length,
            image_size=image_size,
            store=store,
            batch_size=batch_size,
            latent_shape=shape,
            device="cuda" if resources[1] > 0 else "cpu",
            decode_threads=int(resources[2]),
        )
        bad, errors = _encode_pending(dest, inputs, pending, settings, resources, partial, progress)
    if errors:
        raise PrecomputeError(
            f"{len(errors)} of {len(pending)} shard(s) failed, e.g. {errors[0]}; "
            "the finished ones are kept: re-run to retry the rest"
        )

    shards = {n: partial.shards[n] for n in inputs}
    fields = manifest_fields(vae, text_encoder, store, shape, text_dims, image_size, source, src_manifest)
    fields["fingerprint"] = settings_sha
    if src_manifest is not None:
        # Samples the source lists but the latents lack: undecodable images (over all runs).
        fields["bad_samples"] = sum(src_manifest["shards"].values()) - sum(shards.values())
    manifest = build_manifest(LATENTS_FORMAT, shards, **fields)
    url = write_manifest(dest, manifest)
    skipped = [n for n in inputs if n not in pending]
    bad_total = fields.get("bad_samples", bad)
    seconds = time.perf_counter() - start
    return PrecomputeResult(dest, url, shards, pending, skipped, bad_total, seconds, manifest)

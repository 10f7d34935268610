"""Pretraining loop: stream -> encode -> objective.loss -> DeepSpeed step -> EMA -> log / sample / checkpoint.

Runs on every Ray Train worker (one process per rank; torch.distributed is already initialised).
Everything it needs comes from the recipe and the `RunContext`; nothing is read from globals.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time

import torch

from data.builder import build_stream
from orchestration.recipe import recipe_to_dict, recipe_to_yaml
from orchestration.schema import Recipe
from trainers import checkpoint
from trainers.components import build_components
from trainers.context import RunContext, reseed_for_rank, seed_everything
from trainers.ema import EMA
from trainers.engine import TrainEngine, global_batch_size
from trainers.sampling import generate, save_grid
from trainers.tracking import Tracker, peak_flops, train_flops_per_sample, zero_grads


def run(recipe: Recipe, ctx: RunContext) -> dict:
    seed_everything(recipe.train.seed, ctx.rank)
    comps = build_components(recipe, ctx.device)
    comps.backbone.to(ctx.device)
    objective, conditioner = comps.objective, comps.conditioner
    latent_shape = comps.latent_shape if recipe.vae != "none" else None
    stream = build_stream(
        recipe.data,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=recipe.train.seed,
        latent_shape=latent_shape,
    )
    micro, accum = recipe.data.batch_size, recipe.engine.grad_accum

    def to_x0(batch) -> torch.Tensor:
        if "pixels" in batch:
            return comps.autoencoder.encode(batch["pixels"].to(ctx.device, non_blocking=True))
        # Precomputed latents: draw z ~ N(mean, exp(logvar)) with the trainer's RNG (resumable).
        mean = batch["latent_mean"].to(ctx.device, non_blocking=True)
        std = torch.exp(0.5 * batch["latent_logvar"].to(ctx.device, non_blocking=True))
        return mean + std * torch.randn_like(mean)

    def loss_fn(model, batch) -> torch.Tensor:
        x0 = to_x0(batch)
        cond = conditioner.training(batch, recipe.objective.cond_dropout)
        return objective.loss(model, x0, {k: v.to(ctx.device) for k, v in cond.items()})

    flops_per_image = None
    if ctx.rank == 0:  # counted on the plain module, before DeepSpeed partitions it
        example = next(
            iter(build_stream(recipe.data, rank=0, world_size=1, seed=recipe.train.seed, num_workers=0))
        )
        rng = torch.get_rng_state()
        flops_per_image = train_flops_per_sample(lambda: loss_fn(comps.backbone, example), micro)
        torch.set_rng_state(rng)
        zero_grads(comps.backbone)
    engine = TrainEngine(
        comps.backbone,
        recipe.engine,
        recipe.optim,
        micro_batch=micro,
        world_size=ctx.world_size,
        total_steps=recipe.optim.decay_steps or recipe.train.max_steps,
    )
    ema = EMA(engine.module, recipe.train.ema_decay) if recipe.train.ema_decay > 0 else None
    reseed_for_rank(recipe.train.seed, ctx.rank)
    step = 0
    if ctx.resume_from:
        meta, data_state = checkpoint.load(
            ctx.resume_from, engine=engine, ema=ema, rank=ctx.rank, world_size=ctx.world_size
        )
        stream.load_state_dict(data_state)
        step = meta["step"]
        ctx.log(f"resumed from {ctx.resume_from} at step {step}")

    tracker = Tracker(
        recipe.tracking,
        run_name=recipe.name,
        run_id=ctx.run_id,
        run_dir=ctx.run_dir,
        config=recipe_to_dict(recipe),
        enabled=ctx.rank == 0,
    )
    peak = peak_flops(recipe.tracking)
    images_per_step = global_batch_size(micro, accum, ctx.world_size)
    batches = iter(stream)
    key_log = ctx.open_rank_file("keys", "jsonl") if recipe.data.log_keys else None
    last: dict = {}
    window_start, window_data, window_steps = time.perf_counter(), 0.0, 0

    def save_and_report(step: int, metrics: dict) -> None:
        meta = {
            "step": step,
            "world_size": ctx.world_size,
            "zero_stage": recipe.engine.zero_stage,
            "run_id": ctx.run_id,
            "kind": recipe.kind,
        }
        with tempfile.TemporaryDirectory(prefix="nuance-ckpt-") as tmp:
            checkpoint.save(
                tmp,
                engine=engine,
                ema=ema,
                data_state=stream.state_dict(),
                meta=meta,
                recipe_yaml=recipe_to_yaml(recipe),
                rank=ctx.rank,
            )
            ctx.report({**metrics, "step": step}, tmp)

    while step < recipe.train.max_steps:
        t0 = time.perf_counter()
        micro_batches = [next(batches) for _ in range(accum)]
        window_data += time.perf_counter() - t0
        stats = engine.train_step(micro_batches, loss_fn)
        if ema is not None:
            ema.update()
        step += 1
        window_steps += 1
        if key_log is not None:
            key_log.write(
                json.dumps({"step": step, "keys": [k for b in micro_batches for k in b["key"]]}) + "\n"
            )
            key_log.flush()
        if step % recipe.train.log_every == 0 or step == recipe.train.max_steps:
            loss, grad_norm = stats.as_floats()  # the only host-device sync of a step
            if not math.isfinite(loss):
                tracker.alert("nuance: loss is not finite", f"run {recipe.name}: loss={loss} at step {step}")
                raise FloatingPointError(
                    f"loss became {loss} by step {step}; lower optim.lr or check the data"
                )
            elapsed = time.perf_counter() - window_start
            img_s = images_per_step * window_steps / elapsed
            last = {
                "loss": loss,
                "lr": stats.lr,
                "grad_norm": grad_norm,
                "img_per_s": img_s,
                "data_wait_frac": window_data / elapsed,
            }
            if flops_per_image and peak:
                last["mfu"] = flops_per_image * img_s / (peak * ctx.world_size)
            last["data/bad_fraction"] = stream.bad_fraction
            last.update({f"data/bad_{reason}": n for reason, n in stream.bad_counts.items()})
            tracker.log(last, step)
            ctx.log(
                f"step {step}/{recipe.train.max_steps} | loss {loss:.4f} | lr {stats.lr:.2e} | "
                f"gnorm {grad_norm:.3f} | {img_s:.1f} img/s | data {100 * last['data_wait_frac']:.0f}%"
            )
            window_start, window_data, window_steps = time.perf_counter(), 0.0, 0
        every = recipe.sample.every
        if (every and step % every == 0) or step == recipe.train.max_steps:
            _sample_grid(recipe, comps, engine, ema, tracker, ctx, step)
        ckpt_every = recipe.train.ckpt_every
        if (ckpt_every and step % ckpt_every == 0) or step == recipe.train.max_steps:
            save_and_report(step, last)
    tracker.finish()
    if key_log is not None:
        key_log.close()
    return last


@torch.no_grad()
def _sample_grid(
    recipe: Recipe, comps, engine: TrainEngine, ema: EMA | None, tracker: Tracker, ctx: RunContext, step: int
) -> None:
    # Under ZeRO-3 every rank holds a slice of the weights, so every rank takes part in sampling.
    if ctx.rank != 0 and recipe.engine.zero_stage != 3:
        return
    smp = recipe.sample
    engine.module.eval()
    try:
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            images, titles = generate(
                engine.ds,
                comps.objective,
                comps.conditioner,
                comps.autoencoder,
                prompts=smp.prompts,
                classes=smp.classes,
                num_per_condition=smp.num_per_condition,
                latent_shape=comps.latent_shape,
                steps=smp.steps,
                cfg=smp.cfg,
                sampler=smp.sampler,
                seed=smp.seed,
                device=ctx.device,
            )
    finally:
        engine.module.train()
    if ctx.rank == 0:
        path = save_grid(images, ctx.run_dir / "samples" / f"step_{step:08d}.png", ncol=smp.num_per_condition)
        tracker.log_image("samples", path, " | ".join(dict.fromkeys(titles)), step)
        ctx.log(f"sample grid: {path}")

"""Pretraining with pipeline parallelism (engine.pipeline_stages > 1): the pretrain loop's steps, with
the backbone cut into stages (trainers.pipeline) and data parallel over the pipeline replicas.

Every stage of one replica reads the same micro batches (the stream is split by data-parallel rank), so
the stream position, key audit and checkpoints stay per rank; only the first stage turns them into
inputs (encode, condition dropout, noise: the RNG seeded by the data-parallel rank, as a PP=1 run with
that many workers seeds it), so a pipeline run computes the same loss as the plain loop.
"""

from __future__ import annotations

from nuance.trainers.components import training_components
from nuance.trainers.config import RunConfig
from nuance.trainers.context import RunContext, reseed_for_rank, seed_everything
from nuance.trainers.ema import EMA
from nuance.trainers.loops.harness import Harness
from nuance.trainers.pipeline.engine import PipelineEngine
from nuance.trainers.pipeline.layers import pipeline_inputs


def run(recipe: RunConfig, ctx: RunContext) -> dict:
    stages = recipe.engine.pipeline_stages
    dp_world = ctx.world_size // stages
    dp_rank = ctx.rank % dp_world  # DeepSpeed's pipe-then-data topology: rank = stage x dp + dp_rank
    seed_everything(recipe.train.seed, dp_rank)
    comps = training_components(recipe, ctx.rank, ctx.world_size, ctx.device)
    h = Harness(recipe, ctx, comps, data_rank=dp_rank, data_world=dp_world)
    h.count_flops(lambda net, x0, cond: comps.objective.loss(net, x0, cond))
    engine = PipelineEngine(
        comps.backbone,
        recipe.engine,
        recipe.optim,
        micro_batch=recipe.data.batch_size,
        world_size=ctx.world_size,
        total_steps=recipe.optim.decay_steps or recipe.train.max_steps,
        activation_checkpointing=recipe.model.gradient_checkpointing,
    )
    ctx.log(
        f"pipeline engine: {stages} stages x {dp_world} data-parallel, {recipe.engine.micro_batches} "
        f"micro batches per step, stage layer boundaries {engine.parts}"
    )
    ema = EMA(engine.module, recipe.train.ema_decay) if recipe.train.ema_decay > 0 else None
    if ema is not None:
        ema.partitioned = True  # per stage: every rank saves and restores the EMA of its own layers
    reseed_for_rank(recipe.train.seed, dp_rank)
    step = h.resume(engine, ema)
    family = comps.backbone.family

    def prepare(batch: dict) -> tuple:
        x0, cond = h.to_x0(batch), h.cond(batch)  # the draws of the plain loop's loss_fn, in its order
        x_t, t_model, target = comps.objective.noised(x0)
        return pipeline_inputs(family, x_t, t_model, cond, target)

    while step < recipe.train.max_steps:
        batches = h.next_batches()
        stats = engine.train_step(batches, prepare)
        if ema is not None:
            ema.update()
        step += 1
        whole = h.samples_at(step) or h.saves_at(step)
        if whole:
            engine.gather_full(ema)  # every rank: rank 0 needs the whole (EMA) model
        h.end_step(step, stats, batches, engine=engine, ema=ema)
        if whole:
            engine.park_full()
    return h.finish()

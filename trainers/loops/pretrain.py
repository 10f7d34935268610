"""Pretraining: stream -> encode -> objective.loss -> DeepSpeed step -> EMA (the Harness does the rest).

Runs on every Ray Train worker (one process per rank; torch.distributed is already initialised).
Everything it needs comes from the recipe and the `RunContext`; nothing is read from globals.
"""

from __future__ import annotations

from nuance.trainers.components import training_components
from nuance.trainers.config import RunConfig
from nuance.trainers.context import RunContext, seed_everything
from nuance.trainers.loops import pipeline
from nuance.trainers.loops.harness import Harness


def run(recipe: RunConfig, ctx: RunContext) -> dict:
    if recipe.engine.pipeline_stages > 1:
        return pipeline.run(recipe, ctx)
    seed_everything(recipe.train.seed, ctx.rank)
    comps = training_components(recipe, ctx.rank, ctx.world_size, ctx.device)
    h = Harness(recipe, ctx, comps)

    def loss_fn(model, batch):
        return comps.objective.loss(model, h.to_x0(batch), h.cond(batch))

    h.count_flops(lambda net, x0, cond: comps.objective.loss(net, x0, cond))
    engine = h.engine(comps.backbone)
    ema, step = h.start(engine)
    return h.train_loop(engine, ema, step, loss_fn)

"""Adversarial distillation as in SDXL-Lightning (Lin, Wang & Yang 2024, "SDXL-Lightning: Progressive
Adversarial Diffusion Distillation", sec. 3): each student step t -> s = t - ns is trained to produce the
teacher's n-step DDIM result x_s from the same x_t, judged by a discriminator D(x_t, x_s, t, s, c) whose
encoder is a trainable copy of the teacher's (trainers/discriminator.py):

    L_D = -log D(x_t, x_s^teacher) - log(1 - D(x_t, x_s^student))        L_G = -log D(x_t, x_s^student)

plus, optionally, `distill.mse_weight` times the progressive-distillation MSE of Salimans & Ho 2022 (the
Algorithm 2 target for the n-step teacher transition). The student (generator) and the discriminator are
two DeepSpeed engines updated alternately in one loop; the discriminator is checkpointed / resumed by
the Harness through `extra_engines`. The teacher (n = teacher_steps / student_steps DDIM steps per
student step) is the fixed `distill.teacher` folder, so a resume rebuilds it from there.

Schedule fix (Lightning sec. 3.4 / Lin et al. 2024 "Common Diffusion Noise Schedules and Sample Steps
are Flawed"): trailing timesteps make the first student step start at t = T - 1, and its input is pure
noise (trainers.distill.student_input); the student predicts v or x0, which stay defined at alpha_bar = 0.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from nuance.trainers import distill
from nuance.trainers.components import training_components
from nuance.trainers.config import RunConfig
from nuance.trainers.context import RunContext, seed_everything
from nuance.trainers.discriminator import Discriminator, discriminator_loss, generator_loss


class LightningLosses:
    """The two losses of one adversarial step on clean latents x0 and condition kwargs already on the
    device (the loop feeds them from the stream; benchmarks/throughput.py from random tensors).

    `generator` makes the student transitions and keeps them in `pending`; `discriminator` consumes
    one pending item, so D's update reuses the generator pass's transitions (no second student pass).
    `last` holds the latest d_loss / p_real / p_fake / mse tensors for logging.
    """

    def __init__(self, teacher: distill.Teacher, objective, grids, n: int, mse_weight: float, weighting: str):
        self.teacher, self.objective, self.grids, self.n = teacher, objective, grids, n
        self.mse_weight, self.weighting = mse_weight, weighting
        self.pending: list[dict] = []
        self.last: dict = {}

    def generator(self, model, disc, x0: torch.Tensor, cond: dict) -> torch.Tensor:
        """L_G (+ mse_weight x the progressive term); D's weights are frozen for this pass."""
        tr = distill.student_transition(model, self.teacher, self.objective, x0, cond, self.grids, self.n)
        with distill.frozen(disc) as d:
            logit = d(tr["z_t"], tr["z_s_hat"], tr["t"].float(), tr["s"].float(), **cond)
        loss = generator_loss(logit)
        if self.mse_weight > 0:
            mse = distill.transition_loss(tr, self.weighting)
            loss = loss + self.mse_weight * mse
            self.last["mse"] = mse.detach()
        fake = tr["z_s_hat"].detach()
        self.pending.append(
            {"z_t": tr["z_t"], "real": tr["z_s"], "fake": fake, "t": tr["t"], "s": tr["s"], "cond": cond}
        )
        return loss

    def discriminator(self, model, item: dict) -> torch.Tensor:
        """L_D on the teacher's (real) and the student's (fake, detached) transitions from the same x_t."""

        def twice(x):  # real and fake pairs share x_t, t, s and c: one batched pass of 2B
            return torch.cat([x, x])

        cond = {k: twice(v) for k, v in item["cond"].items()}
        x_s = torch.cat([item["real"], item["fake"]])
        logits = model(twice(item["z_t"]), x_s, twice(item["t"]).float(), twice(item["s"]).float(), **cond)
        real_logit, fake_logit = logits.chunk(2)
        self.last["p_real"] = torch.sigmoid(real_logit).mean()
        self.last["p_fake"] = torch.sigmoid(fake_logit).mean()
        return discriminator_loss(real_logit, fake_logit)

    def discriminator_step(self, disc_engine):
        """D's update on the pending transitions (then cleared); returns the engine's StepStats."""
        stats = disc_engine.train_step(self.pending, self.discriminator)
        self.pending.clear()
        self.last["d_loss"] = stats.loss
        return stats


def run(recipe: RunConfig, ctx: RunContext) -> dict:
    dc = recipe.distill
    seed_everything(recipe.train.seed, ctx.rank)
    # the student starts as the teacher
    comps = training_components(distill.student_recipe(recipe), ctx.rank, ctx.world_size, ctx.device)
    objective = comps.objective
    teacher = distill.Teacher.from_recipe(recipe, comps.backbone, objective, ctx.rank, ctx.device)
    grids = distill.nested_grids(objective.schedule, dc.student_steps, dc.teacher_steps)
    n = dc.teacher_steps // dc.student_steps
    disc = Discriminator.from_teacher(teacher.backbone).float()  # same init on every rank (seeded above)
    losses = LightningLosses(teacher, objective, grids, n, dc.mse_weight, dc.weighting)
    h = distill.DistillHarness(recipe, ctx, comps)
    h.sample_steps = dc.student_steps

    # The generator pass on the plain modules (Harness.count_flops, rank 0); its transitions are dropped.
    h.count_flops(lambda net, x0, cond: losses.generator(net, disc, x0, cond))
    losses.pending.clear()
    engine = h.engine(comps.backbone)
    disc_engine = h.engine(disc, optim=replace(recipe.optim, lr=dc.disc_lr))
    extra = {"discriminator": disc_engine}
    ema, step = h.start(engine, extra)

    def generator_loss_fn(model, batch):
        return losses.generator(model, disc_engine.module, h.to_x0(batch), h.cond(batch))

    def metrics() -> dict:
        last = losses.last
        out = {f"distill/{k}": float(last[k]) for k in ("d_loss", "p_real", "p_fake")}
        if "mse" in last:
            out["distill/mse"] = float(last["mse"])
        return out

    while step < recipe.train.max_steps:
        batches = h.next_batches()
        stats = engine.train_step(batches, generator_loss_fn)  # generator (student) update
        losses.discriminator_step(disc_engine)  # then the discriminator's
        if ema is not None:
            ema.update()
        step += 1
        h.end_step(step, stats, batches, engine=engine, ema=ema, extra_engines=extra, extra_metrics=metrics)
    return h.finish()

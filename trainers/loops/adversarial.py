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

from orchestration.schema import Recipe
from trainers import distill
from trainers.components import build_components
from trainers.context import RunContext, seed_everything
from trainers.discriminator import Discriminator, discriminator_loss, generator_loss


def run(recipe: Recipe, ctx: RunContext) -> dict:
    dc = recipe.distill
    seed_everything(recipe.train.seed, ctx.rank)
    comps = build_components(distill.student_recipe(recipe), ctx.device)  # the student starts as the teacher
    comps.backbone.to(ctx.device)
    objective = comps.objective
    teacher = distill.Teacher.from_recipe(recipe, comps.backbone, objective, ctx.rank, ctx.device)
    grids = distill.nested_grids(objective.schedule, dc.student_steps, dc.teacher_steps)
    n = dc.teacher_steps // dc.student_steps
    disc = Discriminator.from_teacher(teacher.backbone).float()  # same init on every rank (seeded above)
    h = distill.DistillHarness(recipe, ctx, comps)
    h.sample_steps = dc.student_steps
    pending: list[dict] = []  # the generator pass's transitions, consumed by the discriminator update
    last: dict = {}

    def generator_loss_fn(model, batch):
        """L_G (+ mse_weight x the progressive term); D's weights are frozen for this pass."""
        x0, cond = h.to_x0(batch), h.cond(batch)
        tr = distill.student_transition(model, teacher, objective, x0, cond, grids, n)
        with distill.frozen(disc_engine.module) as d:
            logit = d(tr["z_t"], tr["z_s_hat"], tr["t"].float(), tr["s"].float(), **cond)
        loss = generator_loss(logit)
        if dc.mse_weight > 0:
            mse = distill.transition_loss(tr, dc.weighting)
            loss = loss + dc.mse_weight * mse
            last["mse"] = mse.detach()
        fake = tr["z_s_hat"].detach()  # D's update reuses this pass's transitions (no second student pass)
        pending.append(
            {"z_t": tr["z_t"], "real": tr["z_s"], "fake": fake, "t": tr["t"], "s": tr["s"], "cond": cond}
        )
        return loss

    def discriminator_loss_fn(model, item):
        """L_D on the teacher's (real) and the student's (fake, detached) transitions from the same x_t."""

        def twice(x):  # real and fake pairs share x_t, t, s and c: one batched pass of 2B
            return torch.cat([x, x])

        cond = {k: twice(v) for k, v in item["cond"].items()}
        x_s = torch.cat([item["real"], item["fake"]])
        logits = model(twice(item["z_t"]), x_s, twice(item["t"]).float(), twice(item["s"]).float(), **cond)
        real_logit, fake_logit = logits.chunk(2)
        last["p_real"], last["p_fake"] = torch.sigmoid(real_logit).mean(), torch.sigmoid(fake_logit).mean()
        return discriminator_loss(real_logit, fake_logit)

    def flops_pass(batch):  # the generator pass on the plain modules (Harness.count_flops, rank 0)
        x0, cond = h.to_x0(batch), h.cond(batch)
        tr = distill.student_transition(comps.backbone, teacher, objective, x0, cond, grids, n)
        with distill.frozen(disc):
            return generator_loss(disc(tr["z_t"], tr["z_s_hat"], tr["t"].float(), tr["s"].float(), **cond))

    h.count_flops(flops_pass)
    engine = h.engine(comps.backbone)
    disc_engine = h.engine(disc, optim=replace(recipe.optim, lr=dc.disc_lr))
    extra = {"discriminator": disc_engine}
    ema, step = h.start(engine, extra)

    def metrics() -> dict:
        out = {f"distill/{k}": float(last[k]) for k in ("d_loss", "p_real", "p_fake")}
        if "mse" in last:
            out["distill/mse"] = float(last["mse"])
        return out

    while step < recipe.train.max_steps:
        batches = h.next_batches()
        stats = engine.train_step(batches, generator_loss_fn)  # generator (student) update
        d_stats = disc_engine.train_step(pending, discriminator_loss_fn)  # then the discriminator's
        pending.clear()
        last["d_loss"] = d_stats.loss
        if ema is not None:
            ema.update()
        step += 1
        h.end_step(step, stats, batches, engine=engine, ema=ema, extra_engines=extra, extra_metrics=metrics)
    return h.finish()

"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models", Algorithm 2): a student initialised from the teacher learns to take in ONE DDIM step what the
teacher takes in TWO; after `distill.steps_per_round` optimizer steps the student becomes the teacher and
the step count halves, from distill.teacher_steps down to distill.student_steps.

The round is a function of the step (step // steps_per_round); the round's teacher goes into every
checkpoint (a frozen plain module on each rank, passed to the Harness as an extra "engine"), so a resume
continues with exactly the teacher that was in use. The Harness does the stream, resume, bookkeeping,
sample grids (at the round's student step count) and checkpoints.

ZeRO 0-3: under ZeRO-3 the new teacher is gathered from the partitioned student. The student of round
r + 1 starts from the weights it already has (they ARE the new teacher), so the optimizer state and the one
LR schedule of optim.* carry across rounds; the EMA, if any, restarts at each round.
"""

from __future__ import annotations

from nuance.trainers import distill
from nuance.trainers.components import training_components
from nuance.trainers.config import RunConfig
from nuance.trainers.context import RunContext, seed_everything


def run(recipe: RunConfig, ctx: RunContext) -> dict:
    dc = recipe.distill
    seed_everything(recipe.train.seed, ctx.rank)
    # theta <- eta (Algorithm 2)
    comps = training_components(distill.student_recipe(recipe), ctx.rank, ctx.world_size, ctx.device)
    objective = comps.objective  # the student's parameterization (objective.kind: v or x0)
    teacher = distill.Teacher.from_recipe(recipe, comps.backbone, objective, ctx.rank, ctx.device)
    rounds = distill.num_rounds(dc.teacher_steps, dc.student_steps)
    grids = {}  # round -> (student grid, teacher grid)

    def round_grids(r: int):
        if r not in grids:
            n_teacher = distill.round_teacher_steps(dc.teacher_steps, r)
            grids[r] = distill.nested_grids(objective.schedule, n_teacher // 2, n_teacher)
        return grids[r]

    h = distill.DistillHarness(recipe, ctx, comps)

    def loss_of(model, x0, cond):
        """Algorithm 2 on one minibatch: z_t, two teacher DDIM steps to z_s'', the target x_tilde, and the
        w(lambda)-weighted x0-space MSE of the student's prediction (converted from its v / x0 output)."""
        tr = distill.student_transition(model, teacher, objective, x0, cond, round_grids(teacher.round), n=2)
        return distill.transition_loss(tr, dc.weighting)

    def loss_fn(model, batch):
        return loss_of(model, h.to_x0(batch), h.cond(batch))

    h.count_flops(loss_of)
    engine = h.engine(comps.backbone)
    extra = {"teacher": teacher}  # checkpointed / resumed with the run (trainers.distill.Teacher.save/load)
    ema, step = h.start(engine, extra)

    def metrics() -> dict:
        return {
            "distill/round": teacher.round,
            "distill/student_steps": round_grids(teacher.round)[0].steps,
            "distill/teacher_fingerprint": teacher.fingerprint(),
        }

    while step < recipe.train.max_steps:
        r = distill.round_of(step, dc.steps_per_round, rounds)
        if r != teacher.round:  # eta <- theta, N <- N / 2 (also right after a resume at a round boundary)
            teacher.become(engine.module, r, prediction=objective.prediction)
            distill.reset_ema(ema)
            ctx.log(
                f"round {r}: teacher {round_grids(r)[1].steps} steps -> student {round_grids(r)[0].steps}"
            )
        h.sample_steps = round_grids(r)[0].steps
        batches = h.next_batches()
        stats = engine.train_step(batches, loss_fn)
        if ema is not None:
            ema.update()
        step += 1
        h.end_step(step, stats, batches, engine=engine, ema=ema, extra_engines=extra, extra_metrics=metrics)
    return h.finish()

"""Session fixtures of the distillation tests: a tiny teacher trained in-process (no Ray, no DeepSpeed).

The teacher is the pixart_debug backbone of `recipes/distill/*_pixart_debug.yaml` (pixel space,
v-prediction, zero terminal SNR), trained on the toy shapes with the project's own objective for 1,000
steps in fp32 (~10 s on one core), and saved with `save_pretrained` as the `distill.teacher` folder.

The tests run the recipes at 8 px (`DISTILL_OVERRIDES`), not their 16 px, so that the quality metric
can tell a good 4-step sampler from a bad one. At 16 px the teacher's 4-step DDIM samples were hardly
further from the data in KID than its 32-step ones (1,000-step teachers of 3 seeds: 0.022-0.027 vs
0.016-0.025; the 4-step blur moves the quality classifier's features little: real 16 px images blurred
2x score KID 0.008), and students beat the teacher's 4 steps for some seeds only. At 8 px the 4-step
blur is at the scale of the shapes: the teacher's 4-step KID is 2-10x its 32-step KID for each of 4
teacher seeds (0.034-0.075 vs 0.003-0.025, 512 samples), and a step costs less than half.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

TEACHER_STEPS = 1000
TEACHER_BATCH = 16
TEACHER_LR = 2e-3
DISTILL_OVERRIDES = ("data.image_size=8",)  # the teacher's and the students' (docstring)


def debug_recipe(kind: str, *overrides: str):
    """A shipped debug distillation recipe ('progressive' or 'adversarial') with overrides."""
    from nuance.orchestration.recipe import load_recipe

    recipe, _ = load_recipe(f"distill/{kind}_pixart_debug", list(overrides))
    return recipe


def train_teacher(recipe, out: Path, steps: int = TEACHER_STEPS, seed: int = 0) -> Path:
    """Plain torch loop: the recipe's backbone (random init) and objective, AdamW, toy stream, fp32."""
    threads = torch.get_num_threads()
    # One thread: on 2 shared cores torch's second OpenMP thread mostly waits for the other processes
    # (measured: a pixart_debug step at batch 16 took ~20 ms with 1 thread, up to 1 s with 2).
    torch.set_num_threads(1)
    try:
        return _train(recipe, out, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(recipe, out: Path, steps: int, seed: int) -> Path:
    from nuance.data.builder import build_stream
    from nuance.trainers.components import build_components

    torch.manual_seed(seed)
    comps = build_components(recipe)  # model.pretrained is unset: a fresh backbone
    net = comps.backbone.train()
    opt = torch.optim.AdamW(net.parameters(), lr=TEACHER_LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - 0.9 * s / steps))
    batches = iter(build_stream(recipe.data, rank=0, world_size=1, seed=seed, num_workers=0))
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        batch = next(batches)
        x0 = comps.autoencoder.encode(batch["pixels"])
        loss = comps.objective.loss(net, x0, comps.conditioner.training(batch, recipe.objective.cond_dropout))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    net.net.save_pretrained(out)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    (out / "train_log.txt").write_text(
        f"steps {steps} batch {recipe.data.batch_size} loss first20 {first:.4f} last20 {last:.4f} "
        f"time {time.perf_counter() - start:.1f}s\n"
    )
    return out


@pytest.fixture(scope="session")
def distill_teacher(tmp_path_factory, toy_cache) -> Path:
    """The teacher folder (a PixArtTransformer2DModel saved with save_pretrained)."""
    recipe = debug_recipe(
        "progressive",
        f"data.cache_dir={toy_cache}",
        f"data.batch_size={TEACHER_BATCH}",
        "model.pretrained=null",
        "distill.teacher=unused",
        *DISTILL_OVERRIDES,
    )
    return train_teacher(recipe, tmp_path_factory.mktemp("distill-teacher") / "transformer")

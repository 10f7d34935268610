"""Shared math and state of the distillation recipes (kinds progressive_distill / adversarial_distill).

Notation of Salimans & Ho 2022 ("Progressive Distillation for Fast Sampling of Diffusion Models"):
z_t = alpha_t x + sigma_t eps with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and
SNR_t = alpha_t^2 / sigma_t^2. A *student step* goes from timestep t to the next timestep s of the
student's (trailing-spaced) grid; the teacher covers the same interval with n DDIM steps of its own grid,
which nests the student's (n = 2 in progressive distillation, Algorithm 2).

What lives here: step grids, the teacher's DDIM (eq. 12 of Song et al. 2021, eta = 0), the Algorithm 2
target x_tilde and the weighted x0-space loss, the teacher as a frozen plain module that the checkpoint
carries, and a Harness whose sample grids use the student's step count.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from nuance.trainers.config import ModelConfig, RunConfig
from nuance.trainers.diffusion.objectives import DDPMObjective
from nuance.trainers.diffusion.schedules import DiscreteSchedule
from nuance.trainers.ema import EMA
from nuance.trainers.loops.harness import Harness
from nuance.trainers.models.backbone import Backbone, build_backbone

WEIGHTINGS = ("truncated_snr", "snr_plus_one")


# -- step grids ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepGrid:
    """A sampler's `steps` timesteps (trailing spacing, Lin et al. 2024 Table 2: the first is T - 1) and
    the alpha_bar at each step's start and end. Step i goes t[i] -> t[i+1]; the last step ends at
    alpha_bar = 1 (the clean x0 estimate), exactly like `trainers.diffusion.samplers.ddim`."""

    timesteps: torch.Tensor  # (steps,) int64, descending
    alpha_bar: torch.Tensor  # (steps + 1,) float64: alpha_bar[t[i]], and 1.0 after the last step

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def end_timesteps(self) -> torch.Tensor:
        """Model time of each step's end, (steps,) int64; 0 stands for the clean end of the last step."""
        return torch.cat([self.timesteps[1:], self.timesteps.new_zeros(1)])


def step_grid(schedule: DiscreteSchedule, steps: int) -> StepGrid:
    """The DDIM grid of `steps` steps on `schedule` (the one the project's sampler walks)."""
    t = schedule.spaced_timesteps(steps)
    ab = torch.cat([schedule.alphas_cumprod[t], torch.ones(1, dtype=torch.float64)])
    return StepGrid(timesteps=t, alpha_bar=ab)


def nested_grids(
    schedule: DiscreteSchedule, student_steps: int, teacher_steps: int
) -> tuple[StepGrid, StepGrid]:
    """(student grid, teacher grid) where every student step is n = teacher/student teacher steps."""
    if teacher_steps % student_steps:
        raise ValueError(f"teacher steps {teacher_steps} are not a multiple of student steps {student_steps}")
    student, teacher = step_grid(schedule, student_steps), step_grid(schedule, teacher_steps)
    n = teacher_steps // student_steps
    if not torch.equal(teacher.timesteps[::n], student.timesteps):
        raise ValueError(
            f"the {student_steps}-step grid is not a subset of the {teacher_steps}-step grid for "
            f"objective.num_timesteps={schedule.num_timesteps}; pick step counts that divide it evenly"
        )
    return student, teacher


# -- progressive rounds ----------------------------------------------------------------------------------
def num_rounds(teacher_steps: int, student_steps: int) -> int:
    """Halvings from teacher_steps to student_steps (Salimans & Ho 2022 Algorithm 2: N <- N / 2)."""
    rounds = round(math.log2(teacher_steps / student_steps))
    if rounds < 1 or student_steps * 2**rounds != teacher_steps:
        raise ValueError(
            f"distill.teacher_steps={teacher_steps} must be distill.student_steps={student_steps} times a "
            f"power of two (>= 2)"
        )
    return rounds


def round_of(step: int, steps_per_round: int, rounds: int) -> int:
    """The round that optimizer step `step` (0-based: the step about to be taken) belongs to."""
    return min(step // steps_per_round, rounds - 1)


def round_teacher_steps(teacher_steps: int, round_index: int) -> int:
    """Sampling steps of round r's teacher; its student takes half of them."""
    return teacher_steps // 2**round_index


# -- DDIM and the Algorithm 2 target -------------------------------------------------------------------
def _coeff(values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[index] (float64 table, (B,) index) shaped (B, 1, ..., 1) in like's dtype and device."""
    out = values[index].to(like.device, like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def ddim_step(x0_hat: torch.Tensor, eps_hat: torch.Tensor, alpha_bar_s: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12, eta = 0): z_s = alpha_s x0_hat + sigma_s eps_hat."""
    return alpha_bar_s.sqrt() * x0_hat + (1 - alpha_bar_s).sqrt() * eps_hat


def x0_target(
    z_t: torch.Tensor, z_s: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_s: torch.Tensor
) -> torch.Tensor:
    """Salimans & Ho 2022, Algorithm 2: x_tilde = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s /
    sigma_t) alpha_t), the x0 prediction for which ONE DDIM step t -> s lands on the teacher's z_s.

    The denominator is (alpha_s sigma_t - sigma_s alpha_t) / sigma_t > 0 because SNR_s > SNR_t, and stays
    well-defined at alpha_t = 0 (zero terminal SNR); sigma_t > 0 on every schedule (betas > 0).
    """
    alpha_t, sigma_t = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
    alpha_s, sigma_s = alpha_bar_s.sqrt(), (1 - alpha_bar_s).sqrt()
    ratio = sigma_s / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


def loss_weight(alpha_bar_t: torch.Tensor, weighting: str) -> torch.Tensor:
    """Salimans & Ho 2022 sec. 4, weights on ||x - x_hat||^2: "truncated SNR" max(SNR_t, 1) (= max of the
    x- and eps-losses) or "SNR+1" 1 + SNR_t = 1 / sigma_t^2 (= the loss on v). Both stay finite at SNR = 0."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"distill.weighting is '{weighting}'; expected one of {', '.join(WEIGHTINGS)}")
    snr = alpha_bar_t / (1 - alpha_bar_t)
    return snr.clamp_min(1.0) if weighting == "truncated_snr" else 1.0 + snr


def distill_loss(
    x0_hat: torch.Tensor, x0_tilde: torch.Tensor, alpha_bar_t: torch.Tensor, weighting: str
) -> torch.Tensor:
    """Weighted x0-space regression of Algorithm 2: mean of w(lambda_t) ||x_tilde - x_hat||^2, in at least
    fp32 (the weights reach ~1e4 near t = 0; a bf16 sum would lose the loss)."""
    dtype = torch.promote_types(x0_hat.dtype, torch.float32)
    err = (x0_hat.to(dtype) - x0_tilde.to(dtype)).square()
    return (loss_weight(alpha_bar_t.to(dtype), weighting) * err).mean()


def student_input(
    objective: DDPMObjective, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, first: torch.Tensor
) -> torch.Tensor:
    """z_t for a student step: q(z_t | x) (Ho et al. eq. 4), except that the first step (t = T - 1) is
    PURE noise. Sampling starts from pure noise; with zero terminal SNR (Lin et al. 2024) the two agree,
    otherwise this is SDXL-Lightning's schedule fix (Lin et al. 2024b, sec. 3.4): train on what inference
    sees instead of on a signal-leaking z_T."""
    z_t = objective.q_sample(x0, t, noise)
    first = first.to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.where(first, noise, z_t)


def draw_steps(grid: StepGrid, batch: int) -> torch.Tensor:
    """Student step indices i ~ U{0, ..., steps-1} on the CPU (they index CPU tables; no device sync),
    from the global torch RNG, which checkpoints restore."""
    return torch.randint(0, grid.steps, (batch,))


def step_coefficients(grid: StepGrid, i: torch.Tensor, like: torch.Tensor):
    """(t, s_model, alpha_bar_t, alpha_bar_s) of student steps i (CPU): t is the schedule index, s_model the
    end's model time (0 after the last step), all on like's device, alpha_bars shaped to broadcast."""
    t = grid.timesteps[i].to(like.device)
    s = grid.end_timesteps()[i].to(like.device)
    return t, s, _coeff(grid.alpha_bar, i, like), _coeff(grid.alpha_bar, i + 1, like)


# -- one minibatch -----------------------------------------------------------------------------------
def student_transition(
    model, teacher: Teacher, objective: DDPMObjective, x0: torch.Tensor, cond: dict, grids, n: int
) -> dict[str, torch.Tensor]:
    """One student step per sample, drawn at random, and the teacher's n-step DDIM for it:

    i ~ U{0..N-1}, z_t (pure noise for i = 0), the teacher's z_s after n DDIM steps (no grad), and the
    student's (x0_hat, eps_hat) and its own one-step DDIM result z_s_hat (differentiable). `grids` =
    (student grid, teacher grid); draws from the global RNG: step indices, then noise.
    """
    student_grid, teacher_grid = grids
    i = draw_steps(student_grid, x0.shape[0])
    noise = torch.randn_like(x0)
    t, s, ab_t, ab_s = step_coefficients(student_grid, i, x0)
    z_t = student_input(objective, x0, noise, t, first=i == 0)
    z_s = teacher.ddim(z_t, cond, teacher_grid, start=n * i, n=n)
    x0_hat, eps_hat = objective.eps_fn(lambda x, t_model: model(x, t_model, **cond)).x0_eps(z_t, t)
    z_s_hat = ddim_step(x0_hat, eps_hat, ab_s)
    return dict(z_t=z_t, t=t, s=s, ab_t=ab_t, ab_s=ab_s, z_s=z_s, x0_hat=x0_hat, z_s_hat=z_s_hat)


def transition_loss(tr: dict[str, torch.Tensor], weighting: str) -> torch.Tensor:
    """Algorithm 2's loss for a transition: the weighted x0-space MSE to x_tilde(z_t, z_s)."""
    target = x0_target(tr["z_t"], tr["z_s"], tr["ab_t"], tr["ab_s"])
    return distill_loss(tr["x0_hat"], target, tr["ab_t"], weighting)


# -- the teacher -----------------------------------------------------------------------------------------
class Teacher:
    """The frozen teacher: a plain (non-DeepSpeed) backbone on every rank, with its own parameterization.

    In progressive distillation it is replaced by the student at each round (Algorithm 2: eta <- theta);
    `save` / `load` put the current round's teacher into the checkpoint (it is passed to the Harness in
    `extra_engines`), so a resume rebuilds it exactly. Round 0's teacher is the `distill.teacher` folder
    and is not copied into checkpoints.
    """

    def __init__(self, backbone: Backbone, objective: DDPMObjective, rank: int, round_index: int = 0):
        self.backbone = backbone.eval().requires_grad_(False)
        self.objective = objective
        self.rank = rank
        self.round = round_index

    @classmethod
    def from_recipe(cls, recipe: RunConfig, student: Backbone, objective: DDPMObjective, rank: int, device):
        """Round 0's teacher from `distill.teacher`, architecture checked against the student's."""
        cfg = replace(recipe.model, pretrained=recipe.distill.teacher, gradient_checkpointing=False)
        # Inference only: keep it in the precision DeepSpeed gives the student (bf16 halves its memory).
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            recipe.engine.precision
        ]
        backbone = _teacher_backbone(cfg, student, dtype).to(device)
        prediction = recipe.distill.teacher_prediction or objective.prediction
        return cls(backbone, DDPMObjective(objective.schedule, prediction), rank)

    @torch.no_grad()
    def x0_eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) of the teacher at schedule indices t, (B,) int64."""
        fn = self.objective.eps_fn(lambda x, t_model: self.backbone(x, t_model, **cond))
        return fn.x0_eps(z_t, t)

    @torch.no_grad()
    def ddim(
        self, z_t: torch.Tensor, cond: dict, grid: StepGrid, start: torch.Tensor, n: int
    ) -> torch.Tensor:
        """n DDIM steps (eq. 12, eta = 0) of the teacher's grid from per-sample positions `start` (CPU)."""
        z = z_t
        for k in range(n):
            j = start + k
            t = grid.timesteps[j].to(z.device)
            x0_hat, eps_hat = self.x0_eps(z, t, cond)
            z = ddim_step(x0_hat, eps_hat, _coeff(grid.alpha_bar, j + 1, z))
        return z

    @torch.no_grad()
    def become(self, student: nn.Module, round_index: int, prediction: str) -> None:
        """Algorithm 2, eta <- theta: copy the student's current weights (gathered under ZeRO-3)."""
        self.backbone.load_state_dict(full_state_dict(student))
        self.objective = DDPMObjective(self.objective.schedule, prediction)
        self.round = round_index

    def fingerprint(self) -> float:
        """A cheap identity of the teacher's weights (logged, so tests can check which teacher ran)."""
        sums = [(i + 1) * p.detach().double().sum() for i, p in enumerate(self.backbone.parameters())]
        return float(torch.stack(sums).sum())  # one device sync

    # The checkpoint protocol of `Harness(..., extra_engines=...)`: every rank calls save/load.
    def save(self, directory: str) -> None:
        if self.rank != 0:
            return
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        info = {"round": self.round, "prediction": self.objective.prediction, "weights": self.round > 0}
        (path / "teacher.json").write_text(json.dumps(info))
        if self.round > 0:  # round 0 is the distill.teacher folder: rebuilt from it, not copied
            torch.save(self.backbone.state_dict(), path / "teacher.pt")

    def load(self, directory: str) -> dict:
        path = Path(directory)
        if not (path / "teacher.json").is_file():
            raise FileNotFoundError(
                f"{directory}: no teacher state; train.resume must name a checkpoint of a distillation run "
                "(start from other weights with model.pretrained instead)"
            )
        info = json.loads((path / "teacher.json").read_text())
        if info["weights"]:
            state = torch.load(path / "teacher.pt", map_location="cpu", weights_only=True)
            self.backbone.load_state_dict(state)
        elif self.round != 0:
            raise ValueError(
                f"{directory}: round 0 teacher in the checkpoint, but round {self.round} is loaded"
            )
        self.objective = DDPMObjective(self.objective.schedule, info["prediction"])
        self.round = info["round"]
        return info


def _full_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """Every state entry's shape, the full shape for ZeRO-3 partitioned parameters (`ds_shape`)."""
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    shapes.update({k: torch.Size(p.ds_shape) for k, p in module.named_parameters() if hasattr(p, "ds_shape")})
    return shapes


def _teacher_backbone(cfg: ModelConfig, student: Backbone, dtype: torch.dtype) -> Backbone:
    """The teacher folder as a backbone shaped like the student (same preset family and sizes)."""
    net = student.net.config
    cond_dim = net.get("caption_channels") if student.family == "pixart" else net.get("cross_attention_dim")
    teacher = build_backbone(
        cfg,
        in_channels=student.in_channels,
        sample_size=net.sample_size,
        cond_dim=cond_dim if student.family != "dit" else None,
        torch_dtype=dtype,
    )
    want, have = _full_shapes(student), _full_shapes(teacher)
    if have != want:  # the student becomes the next teacher (load_state_dict): same architecture needed
        diff = sorted(set(have.items()) ^ set(want.items()))[:3]
        raise ValueError(
            f"distill.teacher={cfg.pretrained} does not have the student's architecture (model.name="
            f"{cfg.name}, model.pretrained); first differences: {diff}"
        )
    return teacher


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's full weights on every rank: plain under ZeRO 0-2; under ZeRO-3 the partitioned
    parameters are gathered (GatheredParameters) and copied out."""
    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def reset_ema(ema: EMA | None) -> None:
    """Restart the EMA at the current weights: a new round trains for a new step count, and an average
    with the previous round's weights would mix two tasks."""
    if ema is None:
        return
    with torch.no_grad():
        for name, p in ema.params.items():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            ema.shadow[name].copy_(local.float())


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Run `module` without parameter gradients (the generator's pass through the discriminator): no
    grads accumulate, so no DeepSpeed gradient hook of the module's own engine fires."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


# -- recipe plumbing -------------------------------------------------------------------------------------
def student_recipe(recipe: RunConfig) -> RunConfig:
    """The recipe the student's components are built from: it starts from the teacher's weights unless
    model.pretrained names another start (Salimans & Ho 2022 Algorithm 2: theta <- eta)."""
    pretrained = recipe.model.pretrained or recipe.distill.teacher
    return replace(recipe, model=replace(recipe.model, pretrained=pretrained))


class DistillHarness(Harness):
    """The shared Harness, with sample grids drawn at the student's step count (the current round's)."""

    sample_steps: int | None = None

    def sample_grid(self, step, engine, ema, steps: int | None = None) -> None:
        super().sample_grid(step, engine, ema, steps=steps or self.sample_steps)

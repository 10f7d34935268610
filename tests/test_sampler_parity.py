"""nuance's samplers against the stock diffusers schedulers that `nuance export` writes.

Each case builds a recipe, nuance's objective from it (`components.objective_from_config`, what training and
`nuance sample` use) and the scheduler from it (`inference.diffusers_scheduler`, what `nuance export` saves),
round-trips the scheduler through `save_pretrained` / `from_pretrained` as a user loads it, and runs a toy
deterministic "model" through both: nuance's `objective.sample` and the loop a stock diffusers pipeline runs
(`set_timesteps`, then `step` per timestep). Timesteps, the final step and the samples must agree.

diffusers keeps its alpha_bar table in float32 and does its DDIM/DDPM step arithmetic with those float32
scalars, so ``1 - alpha_bar`` loses ~1e-8 absolute, which ``eps -> x0`` divides by ``sqrt(alpha_bar)``
(~5e-5 at t = T-1 of the cosine schedule). The tests compare that table with nuance's float64 one to
float32 precision, then upcast the scheduler's own table values to float64 so that what the trajectories
compare is the step math (to 1e-5 absolute on O(1) samples). The flow scheduler steps in float32 itself.
"""

from __future__ import annotations

import pytest
import torch

from nuance.trainers.components import objective_from_config
from nuance.trainers.config import ObjectiveConfig, RunConfig, SampleConfig
from nuance.trainers.inference import diffusers_scheduler

F64 = torch.float64
MU, S = 0.7, 0.4
ATOL = 1e-5
SCHEDULES = {
    "linear": dict(schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(schedule="cosine"),
}
# (schedule, prediction, zero_terminal_snr): every prediction on every schedule; zero terminal SNR with the
# predictions that allow it (eps is rejected by the recipe check, Lin et al. 2024).
CASES = [
    (schedule, prediction, ztsnr)
    for schedule in SCHEDULES
    for prediction in ("eps", "v", "x0")
    for ztsnr in (False, True)
    if not (ztsnr and prediction == "eps")
]
CASE_IDS = [f"{s}-{p}{'-ztsnr' if z else ''}" for s, p, z in CASES]


@pytest.fixture(autouse=True)
def _one_thread():
    """On 2 shared cores a second torch thread mostly waits for other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _recipe(
    kind: str, sampler: str, schedule: str = "linear", ztsnr: bool = False, T: int = 1000, shift: float = 1.0
):
    obj = ObjectiveConfig(
        kind=kind, num_timesteps=T, zero_terminal_snr=ztsnr, shift=shift, **SCHEDULES[schedule]
    )
    return RunConfig(objective=obj, sample=SampleConfig(sampler=sampler))


def _exported(recipe: RunConfig, tmp_path, sampler: str | None = None):
    """The scheduler as `nuance export` writes it and a user loads it back."""
    scheduler = diffusers_scheduler(recipe, sampler)
    scheduler.save_pretrained(tmp_path / "scheduler")
    return type(scheduler).from_pretrained(tmp_path / "scheduler")


def _x_T(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 4, dtype=F64, generator=torch.Generator().manual_seed(0))


def _batch_t(t, x: torch.Tensor) -> torch.Tensor:
    """The model time as a (B, 1) float64 column, from a 0-dim diffusers timestep or nuance's (B,) one."""
    return torch.as_tensor(t).to(F64).reshape(-1).expand(x.shape[0]).reshape(-1, 1)


def ddpm_model(objective):
    """model(x, t_model) in `objective.prediction`: the closed-form E[x0 | x_t] of N(MU, S^2) data plus a
    fixed nonlinear term (so the sampler does not see an affine map), converted to eps / v / x0 with
    nuance's float64 alpha_bar of the integer timestep."""
    table, T, prediction = objective.schedule.alphas_cumprod, objective.num_timesteps, objective.prediction

    def model(x, t_model):
        t = _batch_t(t_model, x)
        ab = table[t.round().long().flatten()].reshape(-1, 1)
        var = ab * S**2 + 1 - ab
        x0 = MU + ab.sqrt() * S**2 * (x - ab.sqrt() * MU) / var + 0.1 * torch.tanh(2 * x) * (1 + t / T)
        if prediction == "x0":
            return x0
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # 1 - ab > 0 at every t (betas > 0)
        return eps if prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0

    return model


def flow_model(num_train_timesteps: int):
    """velocity(x, t_model), sigma = t_model / T: the closed-form E[noise - x0 | x_t] of N(MU, S^2) data
    on x_t = (1 - sigma) x0 + sigma noise, plus a fixed nonlinear term."""

    def model(x, t_model):
        s = _batch_t(t_model, x) / num_train_timesteps
        var = (1 - s) ** 2 * S**2 + s**2
        r = x - (1 - s) * MU
        return s * r / var - (MU + (1 - s) * S**2 * r / var) + 0.2 * torch.sin(3 * x) * s

    return model


def _upcast(scheduler):
    """The scheduler's own (float32-computed) alpha_bar values, held in float64 (see module docstring)."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(F64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.to(F64)
    if hasattr(scheduler, "one"):
        scheduler.one = scheduler.one.to(F64)
    return scheduler


def run_diffusers(scheduler, model, x_T, steps, generator=None, **step_kwargs):
    """What a stock diffusers pipeline does with the scheduler (DiTPipeline, PixArt*Pipeline, ...); the
    flow scheduler has no init_noise_sigma / scale_model_input (SD3-style pipelines use neither)."""
    scheduler.set_timesteps(steps)
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    for t in scheduler.timesteps:
        out = model(scale(x, t), t)
        x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def _check_table(objective, scheduler):
    ours = objective.schedule.alphas_cumprod
    theirs = scheduler.alphas_cumprod.to(F64)
    # float32 precision, accumulated over a 1000-term cumprod (and, for zero terminal SNR, a float32
    # subtraction that leaves ~1e-11 absolute on the ~1e-7 entries next to the final exact 0).
    torch.testing.assert_close(theirs, ours, rtol=2e-5, atol=1e-10)
    assert (theirs[-1] == 0) == (ours[-1] == 0)


# -- DDIM ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("schedule", "prediction", "ztsnr"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("steps", [1, 25])
def test_ddim_matches_exported_ddim_scheduler(tmp_path, schedule, prediction, ztsnr, steps):
    recipe = _recipe(prediction, "ddim", schedule, ztsnr)
    objective = objective_from_config(recipe.objective)
    scheduler = _exported(recipe, tmp_path)
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert scheduler.config.set_alpha_to_one and scheduler.final_alpha_cumprod == 1  # ends at alpha_bar = 1
    _check_table(objective, scheduler)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == objective.schedule.spaced_timesteps(steps).tolist()

    model, x_T = ddpm_model(objective), _x_T()
    ours = objective.sample(model, x_T, steps, sampler=recipe.sample.sampler)
    theirs = run_diffusers(_upcast(scheduler), model, x_T, steps)
    assert ours.dtype == theirs.dtype == F64
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    assert (ours - x_T).abs().max() > 0.1  # the samplers did move


def test_ddim_final_step_returns_the_x0_estimate(tmp_path):
    """The last step of both lands on the clean estimate x0_hat (alpha_bar = 1), not at alpha_bar_0."""
    recipe = _recipe("v", "ddim", "scaled_linear")
    objective = objective_from_config(recipe.objective)
    scheduler = _upcast(_exported(recipe, tmp_path))
    model, x = ddpm_model(objective), _x_T()
    scheduler.set_timesteps(10)
    t_last = scheduler.timesteps[-1]
    out = scheduler.step(model(x, t_last), t_last, x)
    torch.testing.assert_close(out.prev_sample, out.pred_original_sample, rtol=0, atol=1e-12)
    seen = []
    objective.sample(model, x, 10, sampler="ddim", callback=lambda i, xi: seen.append(xi))
    x_prev = seen[-2]
    x0_hat, _ = objective.eps_fn(model).x0_eps(x_prev, torch.full((x.shape[0],), int(t_last)))
    torch.testing.assert_close(seen[-1], x0_hat, rtol=0, atol=1e-12)


def test_alpha_bar_0_final_step_is_detected(tmp_path):
    """The comparison can fail: the earlier export (set_alpha_to_one=False: the last step ends at
    alpha_bar_0 instead of 1) differs from nuance's DDIM far beyond the tolerance."""
    recipe = _recipe("eps", "ddim", "scaled_linear")
    objective = objective_from_config(recipe.objective)
    exported = _exported(recipe, tmp_path)
    old = _upcast(type(exported).from_config(exported.config, set_alpha_to_one=False))
    model, x_T = ddpm_model(objective), _x_T()
    ours = objective.sample(model, x_T, 25, sampler="ddim")
    assert (ours - run_diffusers(old, model, x_T, 25)).abs().max() > 1e-3
    torch.testing.assert_close(ours, run_diffusers(_upcast(exported), model, x_T, 25), rtol=0, atol=ATOL)


def test_ddim_with_eta_matches_scheduler_noise_for_noise(tmp_path):
    """eta = 1 (DDPM-like variance): nuance's `ddim(eta=1)` and `DDIMScheduler.step(eta=1)` draw the same
    noise from equally seeded generators."""
    recipe = _recipe("v", "ddim", "cosine", ztsnr=True)
    objective = objective_from_config(recipe.objective)
    scheduler = _upcast(_exported(recipe, tmp_path))
    model, x_T = ddpm_model(objective), _x_T()
    ours = objective.sample(
        model, x_T, 20, sampler="ddim", eta=1.0, generator=torch.Generator().manual_seed(7)
    )
    theirs = run_diffusers(scheduler, model, x_T, 20, generator=torch.Generator().manual_seed(7), eta=1.0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    other = run_diffusers(scheduler, model, x_T, 20, generator=torch.Generator().manual_seed(8), eta=1.0)
    assert (ours - other).abs().max() > 0.01


# -- DDPM (ancestral) ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("schedule", "prediction", "ztsnr"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("steps", [1, 7, 25])
def test_ddpm_matches_exported_ddpm_scheduler(tmp_path, schedule, prediction, ztsnr, steps):
    """Same noise: both draw torch.randn(x.shape) from equally seeded generators, one draw per step (the
    scheduler also draws on the last step, where its variance is 0 (clamped to 1e-20): after all others)."""
    recipe = _recipe(prediction, "ddpm", schedule, ztsnr)
    objective = objective_from_config(recipe.objective)
    scheduler = _exported(recipe, tmp_path)
    assert type(scheduler).__name__ == "DDPMScheduler"
    _check_table(objective, scheduler)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == objective.schedule.spaced_timesteps(steps).tolist()

    model, x_T = ddpm_model(objective), _x_T()
    ours = objective.sample(model, x_T, steps, sampler="ddpm", generator=torch.Generator().manual_seed(3))
    theirs = run_diffusers(_upcast(scheduler), model, x_T, steps, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    if steps > 1:  # the noise matters: another seed lands elsewhere
        other = run_diffusers(scheduler, model, x_T, steps, generator=torch.Generator().manual_seed(4))
        assert (ours - other).abs().max() > 0.01


# -- Euler (rectified flow) ------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1000, 500])
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_euler_matches_exported_flow_match_scheduler(tmp_path, T, steps):
    recipe = _recipe("flow", "default", T=T)
    objective = objective_from_config(recipe.objective)
    scheduler = _exported(recipe, tmp_path)
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert scheduler.config.num_train_timesteps == T  # the model's time scale, t_model = sigma * T
    seen = []
    model = flow_model(T)

    def recording(x, t_model):
        seen.append(t_model[0].item())
        return model(x, t_model)

    x_T = _x_T()
    ours = objective.sample(recording, x_T, steps, sampler=recipe.sample.sampler)
    theirs = run_diffusers(scheduler, model, x_T.float(), steps)
    assert seen == pytest.approx(scheduler.timesteps.tolist(), rel=1e-6)
    assert scheduler.sigmas[-1] == 0  # both end at sigma = 0
    torch.testing.assert_close(ours, theirs.to(F64), rtol=0, atol=ATOL)
    assert (ours - x_T).abs().max() > 0.1


def test_euler_with_time_shift_matches_scheduler_with_that_shift(tmp_path):
    """With objective.shift at its default 1 export writes shift=1; the grid also agrees for other shifts."""
    recipe = _recipe("flow", "euler")
    objective = objective_from_config(recipe.objective)
    exported = _exported(recipe, tmp_path)
    model, x_T = flow_model(1000), _x_T()
    shifted = type(exported).from_config(exported.config, shift=3.0)
    ours = objective.sample(model, x_T, 10, shift=3.0)
    torch.testing.assert_close(
        ours, run_diffusers(shifted, model, x_T.float(), 10).to(F64), rtol=0, atol=ATOL
    )
    # ... and the comparison notices a grid that differs: the unshifted scheduler lands elsewhere.
    assert (ours - run_diffusers(exported, model, x_T.float(), 10).to(F64)).abs().max() > 1e-3


@pytest.mark.parametrize("T", [1000, 500])
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_recipe_time_shift_3_samples_what_the_exported_scheduler_samples(tmp_path, T, steps):
    """objective.shift=3 (SD3): export writes shift=3 and nuance's default grid is shifted the same."""
    recipe = _recipe("flow", "default", T=T, shift=3.0)
    objective = objective_from_config(recipe.objective)
    scheduler = _exported(recipe, tmp_path)
    assert scheduler.config.shift == 3.0 and objective.shift == 3.0
    seen, model = [], flow_model(T)

    def recording(x, t_model):
        seen.append(t_model[0].item())
        return model(x, t_model)

    x_T = _x_T()
    ours = objective.sample(recording, x_T, steps, sampler=recipe.sample.sampler)  # no explicit shift
    theirs = run_diffusers(scheduler, model, x_T.float(), steps)
    assert seen == pytest.approx(scheduler.timesteps.tolist(), rel=1e-6)
    torch.testing.assert_close(ours, theirs.to(F64), rtol=0, atol=ATOL)
    unshifted = objective_from_config(_recipe("flow", "default", T=T).objective)
    if steps > 1:  # one step from sigma = 1 to 0 is the same on every grid
        assert (ours - unshifted.sample(model, x_T, steps)).abs().max() > 1e-3


def test_training_sigmas_use_the_schedulers_time_shift():
    """objective.shift=3 trains on the same logit-normal draws mapped by the time shift, and that map is
    FlowMatchEulerDiscreteScheduler(shift=3)'s: its training sigmas (before set_timesteps, what diffusers'
    SD3 training script indexes with logit-normal u) are shift(t / T) for t = T..1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nuance.trainers.diffusion.samplers import time_shift

    plain = objective_from_config(_recipe("flow", "default").objective)
    shifted = objective_from_config(_recipe("flow", "default", shift=3.0).objective)
    torch.manual_seed(0)
    a = plain.sample_sigma(4096, "cpu", F64)
    torch.manual_seed(0)
    b = shifted.sample_sigma(4096, "cpu", F64)
    torch.testing.assert_close(b, time_shift(a, 3.0), rtol=0, atol=0)
    assert b.median() > a.median() + 0.1  # shift > 1 trains at more noise

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = torch.arange(1000, 0, -1, dtype=F64) / 1000
    torch.testing.assert_close(time_shift(unshifted, 3.0), scheduler.sigmas.to(F64), rtol=1e-6, atol=0)


# -- which scheduler export writes -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "sampler", "cls"),
    [
        ("eps", "default", "DDPMScheduler"),  # eps samples best with DDPM (objectives.DEFAULT_SAMPLER)
        ("v", "default", "DDIMScheduler"),
        ("v", "ddim", "DDIMScheduler"),
        ("x0", "ddpm", "DDPMScheduler"),
        ("flow", "default", "FlowMatchEulerDiscreteScheduler"),
        ("flow", "euler", "FlowMatchEulerDiscreteScheduler"),
    ],
)
def test_export_writes_the_recipes_sampler(kind, sampler, cls):
    recipe = _recipe(kind, sampler)
    scheduler = diffusers_scheduler(recipe)
    assert type(scheduler).__name__ == cls
    if kind != "flow":
        config = scheduler.config
        assert config.timestep_spacing == "trailing" and not config.clip_sample
        assert config.prediction_type == {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[kind]


def test_export_rejects_a_sampler_of_the_other_family():
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        diffusers_scheduler(_recipe("flow", "default"), "ddim")
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        diffusers_scheduler(_recipe("v", "default"), "euler")

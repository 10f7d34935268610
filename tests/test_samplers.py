"""Samplers against a 1-D Gaussian data distribution whose optimal denoiser is known in closed form.

Data: x0 ~ N(MU, S^2) independently per dimension. For x_t = sqrt(ab) x0 + sqrt(1 - ab) eps the
posterior means are E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) MU) / (ab S^2 + 1 - ab) and
E[x0 | x_t] = MU + sqrt(ab) S^2 (x_t - sqrt(ab) MU) / (ab S^2 + 1 - ab); for the flow path
x_t = (1 - sigma) x0 + sigma eps the same regression gives v = E[eps | x_t] - E[x0 | x_t].
A correct sampler driven by these must reproduce N(MU, S^2) up to discretisation error.
"""

import math

import pytest
import torch

from nuance.trainers.diffusion import (
    DDPMObjective,
    DiscreteSchedule,
    FlowObjective,
    classifier_free_guidance,
    ddim,
    ddpm_ancestral,
    euler_flow,
    flow_sigmas,
    gather,
    v_target,
)

F64 = torch.float64
MU, S = 0.7, 0.4
N, D = 4000, 2


def _x_T(seed=0, n=N):
    """Starting noise, standardised to exactly zero mean and unit std per dimension.

    With the (linear) optimal denoiser DDIM and Euler are affine maps of x_T, so this removes their
    sampling error entirely: what the tolerances below absorb is the samplers' discretisation bias.
    """
    x = torch.randn(n, D, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return (x - x.mean(0)) / x.std(0)


def _posterior(x, ab, mu):
    """(E[x0 | x_t], E[eps | x_t]) for Gaussian data at alpha_bar = ab."""
    var = ab * S**2 + 1 - ab
    r = x - ab.sqrt() * mu
    return mu + ab.sqrt() * S**2 * r / var, (1 - ab).sqrt() * r / var


def gaussian_eps_fn(schedule, mu=MU):
    def eps_fn(x, t):
        return _posterior(x, gather(schedule.alphas_cumprod, t, x), mu)[1]

    return eps_fn


def gaussian_v_model(schedule, mu=MU):
    """A v-prediction "network" model(x_t, t_model) for the Gaussian data."""

    def model(x, t_model):
        ab = gather(schedule.alphas_cumprod, t_model.long(), x)
        x0, eps = _posterior(x, ab, mu)
        return v_target(x0, eps, ab)

    return model


def gaussian_velocity_fn(mu=MU):
    def velocity_fn(x, sigma):
        s = sigma[:, None]
        var = (1 - s) ** 2 * S**2 + s**2
        r = x - (1 - s) * mu
        return s * r / var - (mu + (1 - s) * S**2 * r / var)

    return velocity_fn


def assert_gaussian(x, mean_tol=0.02, std_rtol=0.05):
    # Discretisation bias at these step counts is 1-4% on the std (the samplers under-disperse a narrow
    # distribution); the stochastic samplers add sampling error of ~0.005 on the mean, ~0.8% on the std.
    assert x.mean().item() == pytest.approx(MU, abs=mean_tol)
    assert x.std().item() == pytest.approx(S, rel=std_rtol)


COSINE = DiscreteSchedule.from_config("cosine", 1000)


def _run(name, mu=MU):
    if name == "ddim":
        return ddim(gaussian_eps_fn(COSINE, mu), _x_T(), COSINE, 50)
    if name == "ddpm":
        return ddpm_ancestral(
            gaussian_eps_fn(COSINE, mu), _x_T(), COSINE, 200, torch.Generator().manual_seed(1)
        )
    return euler_flow(gaussian_velocity_fn(mu), _x_T(), 100)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler"])
def test_sampler_recovers_gaussian(name):
    assert_gaussian(_run(name))


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler"])
def test_wrong_denoiser_gives_wrong_mean(name):
    # The same check must be able to fail: a denoiser for mean MU + 0.3 lands measurably off.
    x = _run(name, mu=MU + 0.3)
    assert abs(x.mean().item() - MU) > 0.2
    with pytest.raises(AssertionError):
        assert_gaussian(x)


def test_ddim_eta_one_recovers_gaussian():
    x = ddim(
        gaussian_eps_fn(COSINE), _x_T(), COSINE, 200, eta=1.0, generator=torch.Generator().manual_seed(2)
    )
    assert_gaussian(x)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_flow_with_time_shift_recovers_gaussian(shift):
    assert_gaussian(euler_flow(gaussian_velocity_fn(), _x_T(), 100, shift=shift))


def test_ddim_is_the_exact_affine_map_for_gaussian_data():
    # With the optimal denoiser, one eta=0 step (Song et al. eq. 12) maps the residual
    # r_t = x_t - sqrt(ab_t) MU to r_s = c r_t with c = (sqrt(ab_s ab_t) S^2 + sqrt((1-ab_s)(1-ab_t))) / V_t.
    sched = DiscreteSchedule.from_config("linear", 1000)
    ab = sched.alphas_cumprod.tolist()
    ts = sched.spaced_timesteps(10).tolist()
    pairs = zip(ts, [*ts[1:], None])
    c = 1.0
    for t, s in pairs:
        ab_t, ab_s = ab[t], (ab[s] if s is not None else 1.0)
        c *= (math.sqrt(ab_s * ab_t) * S**2 + math.sqrt((1 - ab_s) * (1 - ab_t))) / (ab_t * S**2 + 1 - ab_t)
    x_T = _x_T(n=64)
    expected = MU + c * (x_T - math.sqrt(ab[-1]) * MU)
    assert torch.allclose(ddim(gaussian_eps_fn(sched), x_T, sched, 10), expected, rtol=0, atol=1e-12)


def test_ddpm_ancestral_with_all_steps_is_algorithm_2():
    T = 20
    sched = DiscreteSchedule.from_config("linear", T, beta_start=1e-3, beta_end=0.2)
    eps_fn = gaussian_eps_fn(sched)
    x_T = _x_T(n=64)
    got = ddpm_ancestral(eps_fn, x_T, sched, T, generator=torch.Generator().manual_seed(3))

    # Ho et al. 2020 Algorithm 2 verbatim (1-indexed t -> 0-indexed tables), sigma_t^2 = beta_tilde_t.
    g = torch.Generator().manual_seed(3)
    betas, ab = sched.betas.tolist(), sched.alphas_cumprod.tolist()
    x = x_T
    for i in reversed(range(T)):
        ab_prev = ab[i - 1] if i > 0 else 1.0
        z = torch.randn(x.shape, generator=g, dtype=F64) if i > 0 else torch.zeros_like(x)
        sigma = math.sqrt((1 - ab_prev) / (1 - ab[i]) * betas[i])
        eps = eps_fn(x, torch.full((64,), i))
        x = (x - betas[i] / math.sqrt(1 - ab[i]) * eps) / math.sqrt(1 - betas[i]) + sigma * z
    assert torch.allclose(got, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_zero_terminal_snr_v_prediction_first_step_uses_x0(sampler):
    # At alpha_bar = 0 eps says nothing about x0, but v does (x0 = -v). A one-step sampler jumps from
    # t = T-1 straight to the clean estimate, which must be E[x0] = MU for every input.
    sched = DiscreteSchedule.from_config("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=True)
    obj = DDPMObjective(sched, "v")
    x = obj.sample(gaussian_v_model(sched), _x_T(n=64), 1, sampler=sampler)
    assert torch.allclose(x, torch.full_like(x, MU), atol=1e-12)


def test_zero_terminal_snr_v_prediction_recovers_gaussian():
    sched = DiscreteSchedule.from_config("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=True)
    obj = DDPMObjective(sched, "v")
    assert_gaussian(obj.sample(gaussian_v_model(sched), _x_T(), 200))


def test_flow_objective_sample_passes_scaled_time():
    obj = FlowObjective(num_train_timesteps=1000)
    velocity = gaussian_velocity_fn()
    seen = []

    def model(x, t_model):
        seen.append(t_model)
        return velocity(x, t_model / 1000)

    assert_gaussian(obj.sample(model, _x_T(), 100))
    assert seen[0].tolist() == pytest.approx([1000.0] * N) and len(seen) == 100
    # The last step starts at the scheduler's smallest training sigma 1/T, i.e. t_model = 1.
    assert seen[-1].tolist() == pytest.approx([1.0] * N)
    seen.clear()
    FlowObjective(num_train_timesteps=50).sample(lambda x, t: seen.append(t) or x * 0, _x_T(n=4), 3)
    assert [t[0].item() for t in seen] == pytest.approx([50.0, 25.5, 1.0])
    with pytest.raises(ValueError, match="euler"):
        obj.sample(model, _x_T(n=4), 10, sampler="ddim")


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler"])
def test_callbacks_see_every_step(name):
    sched = DiscreteSchedule.from_config("linear", 100)
    calls = []

    def callback(i, x):
        calls.append((i, x))

    x_T = _x_T(n=8)
    if name == "ddim":
        out = ddim(gaussian_eps_fn(sched), x_T, sched, 7, callback=callback)
    elif name == "ddpm":
        out = ddpm_ancestral(gaussian_eps_fn(sched), x_T, sched, 7, callback=callback)
    else:
        out = euler_flow(gaussian_velocity_fn(), x_T, 7, callback=callback)
    assert [i for i, _ in calls] == list(range(7)) and calls[-1][1] is out


def test_flow_sigmas():
    # FlowMatchEulerDiscreteScheduler's grid: `steps` sigmas linear from 1 to 1/T, then a final 0.
    s = flow_sigmas(4, num_train_timesteps=1000)
    assert s.tolist() == pytest.approx([1.0, 0.667, 0.334, 0.001, 0.0], abs=1e-12)
    assert flow_sigmas(1).tolist() == [1.0, 0.0]
    assert flow_sigmas(3, num_train_timesteps=10).tolist() == pytest.approx([1.0, 0.55, 0.1, 0.0], abs=1e-12)

    def shift3(x):
        return 3 * x / (1 + 2 * x)

    # Shifted: the low end is the scheduler's shifted sigma_min, and the whole grid is shifted again.
    shifted = flow_sigmas(4, shift=3.0)
    lo = shift3(1e-3)
    expected = [shift3(1 - i * (1 - lo) / 3) for i in range(4)] + [0.0]
    assert shifted.tolist() == pytest.approx(expected, abs=1e-12)
    assert shifted[0] == 1 and shifted[-1] == 0
    assert (shifted.diff() < 0).all() and (shifted[1:-1] > s[1:-1]).all()


def test_sampler_argument_errors():
    sched = DiscreteSchedule.from_config("linear", 10)
    x = _x_T(n=2)
    with pytest.raises(ValueError, match="steps"):
        ddim(gaussian_eps_fn(sched), x, sched, 11)
    with pytest.raises(ValueError, match="steps"):
        ddpm_ancestral(gaussian_eps_fn(sched), x, sched, 0)
    with pytest.raises(ValueError, match="eta"):
        ddim(gaussian_eps_fn(sched), x, sched, 5, eta=-1.0)
    with pytest.raises(ValueError, match="shift"):
        euler_flow(gaussian_velocity_fn(), x, 5, shift=0.0)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        euler_flow(gaussian_velocity_fn(), x, 5, num_train_timesteps=0)


# --- classifier-free guidance -----------------------------------------------------------------------


class RecordingModel:
    """out = x * emb.sum(-1) + t / 1000, so cond and uncond give different outputs."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t_model, emb):
        self.batches.append(x.shape[0])
        return x * emb.sum(-1, keepdim=True) + t_model[:, None] / 1000


def _cfg_inputs(b=4):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(b, 3, dtype=F64, generator=g)
    t = torch.full((b,), 250.0, dtype=F64)
    cond = {"emb": torch.randn(b, 6, dtype=F64, generator=g)}
    uncond = {"emb": torch.zeros(b, 6, dtype=F64)}
    return x, t, cond, uncond


def test_cfg_scale_one_is_conditional_and_skips_uncond():
    x, t, cond, uncond = _cfg_inputs()
    model = RecordingModel()
    out = classifier_free_guidance(model, cond, uncond, 1.0)(x, t)
    assert model.batches == [4]
    assert torch.equal(out, RecordingModel()(x, t, **cond))


@pytest.mark.parametrize("scale", [0.0, 4.5])
def test_cfg_is_one_batched_linear_combination(scale):
    x, t, cond, uncond = _cfg_inputs()
    model = RecordingModel()
    out = classifier_free_guidance(model, cond, uncond, scale)(x, t)
    assert model.batches == [8]
    ref = RecordingModel()
    out_c, out_u = ref(x, t, **cond), ref(x, t, **uncond)
    assert torch.allclose(out, out_u + scale * (out_c - out_u), atol=1e-12)


def test_cfg_broadcasts_batch_one_uncond_and_validates_keys():
    x, t, cond, _ = _cfg_inputs()
    null = {"emb": torch.zeros(1, 6, dtype=F64)}
    model = RecordingModel()
    out = classifier_free_guidance(model, cond, null, 2.0)(x, t)
    ref = RecordingModel()
    out_c, out_u = ref(x, t, **cond), ref(x, t, emb=null["emb"].expand(4, 6))
    assert model.batches == [8] and torch.allclose(out, out_u + 2.0 * (out_c - out_u), atol=1e-12)
    with pytest.raises(ValueError, match="same keys"):
        classifier_free_guidance(model, cond, {"pooled": null["emb"]}, 2.0)

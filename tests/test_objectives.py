"""Schedules, conversions and training losses of trainers.diffusion."""

import math

import pytest
import torch

from nuance.trainers.config import SAMPLERS_FOR, Sampler, objective_family
from nuance.trainers.diffusion import (
    DEFAULT_SAMPLER,
    DDPMObjective,
    DiscreteSchedule,
    FlowObjective,
    build_objective,
    eps_to_x0,
    gather,
    make_betas,
    rescale_zero_terminal_snr,
    resolve_sampler,
    v_target,
    v_to_eps,
    v_to_x0,
    x0_to_eps,
)

F64 = torch.float64
SD = dict(beta_start=0.00085, beta_end=0.012)


def _alpha_bar(kind, **kw):
    return torch.cumprod(1 - make_betas(kind, **kw), 0)


# --- schedules -------------------------------------------------------------------------------------


def test_linear_and_scaled_linear_endpoints():
    lin = make_betas("linear", 1000, 1e-4, 0.02)
    assert lin.dtype == F64 and lin.shape == (1000,)
    assert lin[0].item() == pytest.approx(1e-4, rel=1e-12) and lin[-1].item() == pytest.approx(
        0.02, rel=1e-12
    )
    sd = make_betas("scaled_linear", 1000, **SD)
    assert sd[0].item() == pytest.approx(0.00085, rel=1e-12) and sd[-1].item() == pytest.approx(
        0.012, rel=1e-12
    )
    # Quadratic, not linear, in between: sqrt(beta) is the linear quantity.
    assert sd.sqrt().diff().std().item() < 1e-12 and sd.diff().std().item() > 1e-9
    # Lin et al. 2024 quote SD's terminal sqrt(alpha_bar) = 0.068265 (non-zero terminal SNR).
    assert _alpha_bar("scaled_linear", **SD)[-1].sqrt().item() == pytest.approx(0.068265, abs=1e-6)
    assert _alpha_bar("linear")[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)


def test_cosine_schedule_matches_closed_form():
    T, s = 1000, 0.008
    betas = make_betas("cosine", T)
    f = torch.cos((torch.arange(T + 1, dtype=F64) / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = f[1:] / f[0]
    # Exact up to where the 0.999 clip starts to bite (only the last step for T = 1000).
    assert torch.allclose(torch.cumprod(1 - betas, 0)[:-1], expected[:-1], rtol=1e-9, atol=0)
    assert betas[-1].item() == pytest.approx(0.999) and betas.max().item() <= 0.999


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_alpha_bar_monotone_in_unit_interval(kind):
    ab = DiscreteSchedule.from_config(kind, 1000, **SD).alphas_cumprod
    assert ab.dtype == F64 and ab.device.type == "cpu"
    assert (ab.diff() < 0).all() and ab[0] < 1 and ab[-1] > 0


def test_unknown_schedule_and_bad_arguments():
    with pytest.raises(ValueError, match="linear.*scaled_linear.*cosine"):
        make_betas("quadratic")
    with pytest.raises(ValueError, match="num_timesteps"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match="beta_start"):
        make_betas("linear", 10, beta_start=0.1, beta_end=0.01)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_rescale(kind):
    betas = make_betas(kind, 1000, **SD)
    ab_old = torch.cumprod(1 - betas, 0)
    ab = DiscreteSchedule.from_config(kind, 1000, zero_terminal_snr=True, **SD).alphas_cumprod
    assert ab[-1].item() == 0.0  # exactly, not approximately
    assert ab[0].item() == pytest.approx(ab_old[0].item(), rel=1e-12)
    assert (ab.diff() < 0).all()
    # Algorithm 1 is an affine map of sqrt(alpha_bar): the ratio of increments is constant.
    ratio = ab.sqrt().diff() / ab_old.sqrt().diff()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-8)
    assert torch.equal(rescale_zero_terminal_snr(betas)[-1], torch.tensor(1.0, dtype=F64))


def test_trailing_spacing():
    sched = DiscreteSchedule.from_config("linear", 1000)
    # Lin et al. 2024 Table 2, "trailing" with 10 steps.
    assert sched.spaced_timesteps(10).tolist() == list(range(999, 0, -100))
    ts = sched.spaced_timesteps(50)
    assert ts.dtype == torch.long and ts[0].item() == 999 and ts[-1].item() == 19 and len(ts) == 50
    for steps in (1, 3, 7, 333, 999):
        ts = sched.spaced_timesteps(steps)
        assert ts[0].item() == 999 and len(ts) == steps and (ts.diff() < 0).all() and ts[-1] >= 0
    assert torch.equal(sched.spaced_timesteps(1000), torch.arange(999, -1, -1))
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="steps"):
            sched.spaced_timesteps(bad)


def test_gather_broadcasts_to_x():
    table = torch.arange(10, dtype=F64) / 10
    x = torch.zeros(3, 4, 5, dtype=torch.float32)
    out = gather(table, torch.tensor([0, 5, 9]), x)
    assert out.shape == (3, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == pytest.approx([0.0, 0.5, 0.9])
    assert gather(table, torch.tensor(2), x).ndim == 0


# --- conversions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("per_sample", [True, False])
def test_conversions_round_trip(per_sample):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 6, 3, 4, 4, dtype=F64, generator=g)
    ab = torch.rand(6, dtype=F64, generator=g) * 0.98 + 0.01 if per_sample else 0.37
    ab_b = ab.reshape(6, 1, 1, 1) if per_sample else ab
    x_t = ab_b**0.5 * x0 + (1 - ab_b) ** 0.5 * eps
    v = v_target(x0, eps, ab)
    tol = dict(rtol=0, atol=1e-12)
    assert torch.allclose(eps_to_x0(x_t, eps, ab), x0, **tol)
    assert torch.allclose(x0_to_eps(x_t, x0, ab), eps, **tol)
    assert torch.allclose(v_to_x0(x_t, v, ab), x0, **tol)
    assert torch.allclose(v_to_eps(x_t, v, ab), eps, **tol)
    assert torch.allclose(v, ab_b**0.5 * eps - (1 - ab_b) ** 0.5 * x0, **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_eps_to_x0_finite_at_zero_alpha_bar(dtype):
    x_t, eps = torch.randn(2, 4, 8).to(dtype)
    assert torch.isfinite(eps_to_x0(x_t, eps, torch.zeros(4))).all()
    assert torch.isfinite(x0_to_eps(x_t, eps, torch.ones(4))).all()
    # With v-prediction the same point is well-posed: x0 = -v exactly.
    assert torch.equal(v_to_x0(x_t, eps, 0.0), -eps)


# --- DDPM objective ----------------------------------------------------------------------------------


def test_q_sample_matches_closed_form_moments():
    obj = DDPMObjective(DiscreteSchedule.from_config("linear", 1000))
    n = 20000
    x0 = torch.tensor([1.5, -0.8, 0.3], dtype=F64)[:, None].expand(3, n)
    t = torch.tensor([10, 200, 990])
    torch.manual_seed(0)
    xt = obj.q_sample(x0, t, torch.randn(3, n, dtype=F64))
    mean, var = obj.q_moments(x0, t)
    assert mean.shape == var.shape == x0.shape
    m, v = mean[:, 0], var[:, 0]
    # 5 standard errors of the sample mean / sample variance of a Gaussian.
    assert ((xt.mean(1) - m).abs() < 5 * (v / n).sqrt()).all()
    assert ((xt.var(1) - v).abs() < 5 * v * math.sqrt(2 / n)).all()
    # And the moments are not trivially equal across t (the test could fail on a wrong index).
    assert (v.diff() > 0.1).all()


def _oracle(obj, x0, seen):
    """A model that returns the exact target: the noise is recoverable from x_t because x0 is known."""

    def model(x_t, t_model, **cond):
        seen.append((t_model, cond))
        t = t_model.long()
        ab = gather(obj.schedule.alphas_cumprod, t, x_t)
        noise = x0_to_eps(x_t, x0, ab)
        return obj.target(x0, noise, t)

    return model


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_loss_zero_for_oracle_model(prediction):
    obj = DDPMObjective(DiscreteSchedule.from_config("cosine", 1000), prediction)
    x0 = torch.randn(64, 2, 4, 4, dtype=F64)
    seen = []
    cond = {"emb": torch.ones(64, 3)}
    assert obj.loss(_oracle(obj, x0, seen), x0, cond).item() < 1e-20
    ((t_model, got_cond),) = seen
    assert t_model.dtype == F64 and torch.equal(t_model, t_model.round())
    assert t_model.min() >= 0 and t_model.max() <= 999 and t_model.unique().numel() > 10
    assert got_cond.keys() == {"emb"}


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_loss_of_zero_model_is_mean_squared_target(prediction):
    obj = DDPMObjective(DiscreteSchedule.from_config("linear", 1000), prediction)
    x0 = torch.randn(16, 3, 8, 8) * 0.5 + 0.2

    def zero(x_t, t_model):
        return torch.zeros_like(x_t)

    torch.manual_seed(123)
    loss = obj.loss(zero, x0, {})
    # Documented draw order: timesteps, then noise, both from the global RNG.
    torch.manual_seed(123)
    t = torch.randint(0, 1000, (16,))
    noise = torch.randn_like(x0)
    assert loss.item() == pytest.approx(obj.target(x0, noise, t).pow(2).mean().item(), rel=1e-6)


def test_eps_loss_of_zero_model_is_unit_in_expectation():
    obj = DDPMObjective(DiscreteSchedule.from_config("linear", 1000), "eps")
    x0 = torch.randn(256, 4, 16, 16)
    torch.manual_seed(0)
    loss = obj.loss(lambda x, t: torch.zeros_like(x), x0)
    assert loss.item() == pytest.approx(1.0, abs=0.02)


def test_loss_reproducible_from_rng_state():
    obj = build_objective("v")
    x0 = torch.randn(8, 4, 4, 4)
    w = torch.randn(4, 4)

    def model(x, t):
        return torch.einsum("bchw,cd->bdhw", x, w) + t[:, None, None, None] / 1000

    state = torch.get_rng_state()
    first = obj.loss(model, x0)
    assert obj.loss(model, x0) != first  # fresh draws differ...
    torch.set_rng_state(state)
    assert obj.loss(model, x0) == first  # ...and restoring the state replays them exactly


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_eps_fn_converts_prediction_to_noise(prediction):
    obj = DDPMObjective(DiscreteSchedule.from_config("linear", 1000), prediction)
    x0, noise = torch.randn(2, 5, 3, dtype=F64)
    t = torch.tensor([0, 1, 300, 700, 999])
    x_t = obj.q_sample(x0, t, noise)
    eps_fn = obj.eps_fn(lambda x, t_model: obj.target(x0, noise, t_model.long()))
    assert torch.allclose(eps_fn(x_t, t), noise, atol=1e-9)
    x0_hat, eps_hat = eps_fn.x0_eps(x_t, t)
    assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, noise, atol=1e-9)


def test_ddpm_objective_argument_errors():
    sched = DiscreteSchedule.from_config("linear", 10)
    with pytest.raises(ValueError, match="prediction"):
        DDPMObjective(sched, "score")
    obj = DDPMObjective(sched)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"'heun'.*\['default', 'ddpm', 'ddim'\]"):
        obj.sample(lambda x, t: x, x, 5, sampler="heun")
    with pytest.raises(ValueError, match="ddpm_ancestral"):  # the function's name is not a sampler name
        obj.sample(lambda x, t: x, x, 5, sampler="ddpm_ancestral")
    with pytest.raises(ValueError, match="eta"):
        obj.sample(lambda x, t: x, x, 5, sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="shape"):
        obj.loss(lambda x, t: torch.zeros(2, 6), x)


# --- flow objective ----------------------------------------------------------------------------------


def test_flow_sigma_is_logit_normal():
    obj = FlowObjective(logit_mean=0.5, logit_std=0.8)
    torch.manual_seed(0)
    sigma = obj.sample_sigma(40000, "cpu", torch.float32)
    assert ((sigma > 0) & (sigma < 1)).all()
    assert sigma.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.01)
    logit = torch.logit(sigma.double())
    assert logit.mean().item() == pytest.approx(0.5, abs=0.02)
    assert logit.std().item() == pytest.approx(0.8, abs=0.02)


def test_flow_loss_oracle_zero_and_zero_model():
    obj = FlowObjective(num_train_timesteps=1000)
    x0 = torch.randn(32, 2, 4, 4, dtype=F64)
    seen = []

    def oracle(x_t, t_model):
        seen.append(t_model)
        sigma = (t_model / 1000).reshape(-1, 1, 1, 1)
        noise = (x_t - (1 - sigma) * x0) / sigma
        return obj.target(x0, noise)

    assert obj.loss(oracle, x0, {}).item() < 1e-20
    assert ((seen[0] > 0) & (seen[0] < 1000)).all() and seen[0].dtype == F64

    torch.manual_seed(7)
    loss = obj.loss(lambda x, t: torch.zeros_like(x), x0)
    torch.manual_seed(7)
    obj.sample_sigma(32, "cpu", F64)  # sigma first, then noise
    noise = torch.randn_like(x0)
    assert loss.item() == pytest.approx((noise - x0).pow(2).mean().item(), rel=1e-12)


def test_flow_q_sample_interpolates():
    obj = FlowObjective()
    x0, noise = torch.randn(2, 3, 5)
    assert torch.equal(obj.q_sample(x0, torch.zeros(3), noise), x0)
    assert torch.equal(obj.q_sample(x0, torch.ones(3), noise), noise)
    assert torch.allclose(obj.q_sample(x0, 0.25, noise), 0.75 * x0 + 0.25 * noise)


# --- build_objective ---------------------------------------------------------------------------------


def test_build_objective_kinds():
    for kind in ("eps", "v", "x0"):
        obj = build_objective(kind, schedule="scaled_linear", **SD)
        assert isinstance(obj, DDPMObjective) and obj.prediction == kind
        assert obj.default_sampler == ("ddpm" if kind == "eps" else "ddim")
        assert obj.schedule.betas[-1].item() == pytest.approx(0.012)
    flow = build_objective("flow", logit_mean=0.3, logit_std=1.2, num_timesteps=500)
    assert isinstance(flow, FlowObjective) and flow.prediction == "flow" and flow.default_sampler == "euler"
    assert (flow.logit_mean, flow.logit_std, flow.num_train_timesteps) == (0.3, 1.2, 500)
    assert build_objective("v", zero_terminal_snr=True).schedule.alphas_cumprod[-1].item() == 0.0


def test_sampler_names_come_from_the_recipe_table():
    """Objectives accept exactly `trainers.config.SAMPLERS_FOR` of their family; `default` is their own."""
    assert set(DEFAULT_SAMPLER) == {"eps", "v", "x0", "flow"}
    for kind in ("eps", "v", "x0", "flow"):
        family = objective_family(kind)
        assert DEFAULT_SAMPLER[kind] in SAMPLERS_FOR[family]
        assert [resolve_sampler(kind, s) for s in SAMPLERS_FOR[family]] == [
            DEFAULT_SAMPLER[kind],
            *SAMPLERS_FOR[family][1:],
        ]
        for other in set(Sampler) - set(SAMPLERS_FOR[family]):
            with pytest.raises(ValueError, match="unknown sampler"):
                resolve_sampler(kind, other)
    assert resolve_sampler("v", "default") == Sampler.ddim and resolve_sampler("flow", "default") == "euler"
    assert resolve_sampler("eps", "default") == Sampler.ddpm
    obj = DDPMObjective(DiscreteSchedule.from_config("linear", 10), prediction="v")
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    model = lambda x, t: 0.5 * x  # noqa: E731
    assert torch.equal(obj.sample(model, x, 5, sampler="default"), obj.sample(model, x, 5, sampler="ddim"))
    eps = DDPMObjective(DiscreteSchedule.from_config("linear", 10), prediction="eps")
    seeded = {"generator": torch.Generator().manual_seed(1)}
    assert torch.equal(
        eps.sample(model, x, 5, sampler="default", **seeded),
        eps.sample(model, x, 5, sampler="ddpm", generator=torch.Generator().manual_seed(1)),
    )
    assert not torch.equal(
        obj.sample(model, x, 5, sampler="ddpm", generator=torch.Generator().manual_seed(1)),
        obj.sample(model, x, 5, sampler="ddim"),
    )
    flow = FlowObjective()
    assert torch.equal(flow.sample(model, x, 5, sampler="default"), flow.sample(model, x, 5, sampler="euler"))


def test_build_objective_rejects_bad_combinations():
    with pytest.raises(ValueError, match=r"objective\.zero_terminal_snr"):
        build_objective("eps", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="'eps'.*'flow'"):
        build_objective("edm")
    with pytest.raises(ValueError, match="logit_std"):
        build_objective("flow", logit_std=0.0)

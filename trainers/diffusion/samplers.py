"""Samplers: pure functions from a denoiser and starting noise to samples.

Discrete samplers take ``eps_fn(x_t, t_long) -> eps_hat`` where ``t_long`` is a ``(B,)`` int64 tensor of
schedule indices. If ``eps_fn`` also has an ``x0_eps(x_t, t_long) -> (x0_hat, eps_hat)`` attribute (as the
callables from :meth:`DDPMObjective.eps_fn` do) it is used instead, because x0 cannot be recovered from eps
at alpha_bar = 0 (zero terminal SNR). The flow sampler takes ``velocity_fn(x, sigma) -> v_hat`` with
``sigma`` a ``(B,)`` tensor.

Every sampler calls ``callback(step_index, x)`` after each step when given. Noise comes from
``torch.randn(..., generator=generator)`` on ``x``'s device, so a generator must live on that device.

Each sampler walks the same grid and final step as the stock diffusers scheduler that ``nuance export``
writes (``nuance.trainers.inference.diffusers_scheduler``; tests/test_sampler_parity.py checks the samples
agree): :func:`ddim` = ``DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True)``,
:func:`ddpm_ancestral` = ``DDPMScheduler(timestep_spacing="trailing", variance_type="fixed_small")``,
:func:`euler_flow` = ``FlowMatchEulerDiscreteScheduler``. One known difference: when ``steps`` does not
divide ``num_timesteps``, diffusers' DDIMScheduler steps from t to ``t - num_timesteps // steps`` rather
than to the next timestep of its own trailing grid, which :func:`ddim` walks (DDPMScheduler walks it too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from .conversions import eps_to_x0
from .schedules import DiscreteSchedule


def _timestep(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def _predict(
    eps_fn: Callable, x: torch.Tensor, t: int, alpha_bar: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) at integer timestep t."""
    x0_eps = getattr(eps_fn, "x0_eps", None)
    if x0_eps is not None:
        return x0_eps(x, _timestep(t, x))
    eps = eps_fn(x, _timestep(t, x))
    return eps_to_x0(x, eps, alpha_bar), eps


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _alpha_bar_pairs(schedule: DiscreteSchedule, steps: int) -> list[tuple[int, float, float]]:
    """(t, alpha_bar_t, alpha_bar_s) for consecutive spaced timesteps t > s.

    After the last timestep the sampler jumps to alpha_bar = 1, i.e. returns the clean x0 estimate
    rather than a sample that still carries the noise level of t = 0. This is DDIM's own convention
    (Song et al. 2021 define alpha_0 := 1), diffusers' ``DDIMScheduler(set_alpha_to_one=True)``
    (``final_alpha_cumprod = 1``; the DiT conversion and nuance export use it), ``DDPMScheduler``
    (``alpha_prod_t_prev = self.one`` after the last step) and the distillation grids of
    ``trainers/distill.py``. (SD 1.x/2.x configs set ``set_alpha_to_one=False``: they end at alpha_bar_0.)
    """
    ts = schedule.spaced_timesteps(steps).tolist()
    ab = schedule.alphas_cumprod.tolist()  # python floats keep the float64 precision of the table
    return [(t, ab[t], ab[ts[i + 1]] if i + 1 < len(ts) else 1.0) for i, t in enumerate(ts)]


def ddpm_ancestral(
    eps_fn: Callable,
    x_T: torch.Tensor,
    schedule: DiscreteSchedule,
    steps: int,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2, on a strided subset of timesteps.

    Each step samples the forward-process posterior q(x_s | x_t, x0_hat) between consecutive spaced
    timesteps t > s (Ho et al. eq. 6-7 with alpha_{t|s} = alpha_bar_t / alpha_bar_s in place of alpha_t):

        mean = sqrt(ab_s) beta_{t|s} / (1 - ab_t) x0_hat + sqrt(alpha_{t|s}) (1 - ab_s) / (1 - ab_t) x_t
        var  = beta_tilde = (1 - ab_s) / (1 - ab_t) beta_{t|s}

    Substituting x0_hat = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t) gives Algorithm 2's
    (x_t - beta_t / sqrt(1 - ab_t) eps_hat) / sqrt(alpha_t), so with ``steps == num_timesteps`` this is
    exactly Algorithm 2 with sigma_t^2 = beta_tilde_t. The x0 form is used because it stays finite at
    ab_t = 0 (zero terminal SNR), where alpha_t = 0.
    """
    x = x_T
    for i, (t, ab_t, ab_s) in enumerate(_alpha_bar_pairs(schedule, steps)):
        x0_hat, _ = _predict(eps_fn, x, t, ab_t)
        alpha_ts = ab_t / ab_s
        beta_ts = 1.0 - alpha_ts
        mean = (math.sqrt(ab_s) * beta_ts / (1 - ab_t)) * x0_hat + (
            math.sqrt(alpha_ts) * (1 - ab_s) / (1 - ab_t)
        ) * x
        var = (1 - ab_s) / (1 - ab_t) * beta_ts
        # Algorithm 2 line 3: z = 0 on the last step (var is 0 there); skipping the draw also keeps
        # the generator's stream independent of whether the last step is taken.
        x = mean + math.sqrt(var) * _noise(x, generator) if var > 0 else mean
        if callback is not None:
            callback(i, x)
    return x


def ddim(
    eps_fn: Callable,
    x_T: torch.Tensor,
    schedule: DiscreteSchedule,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """DDIM, Song et al. 2021 ("Denoising Diffusion Implicit Models"), eq. 12:

        x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z
        sigma = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(1 - ab_t / ab_s)        (eq. 16)

    ``eta = 0`` is the deterministic sampler; ``eta = 1`` matches DDPM's posterior variance.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    x = x_T
    for i, (t, ab_t, ab_s) in enumerate(_alpha_bar_pairs(schedule, steps)):
        x0_hat, eps_hat = _predict(eps_fn, x, t, ab_t)
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        # Rounding can push 1 - ab_s - sigma^2 a hair below zero when eta = 1 and ab_t ~ 0.
        dir_coeff = math.sqrt(max(1 - ab_s - sigma**2, 0.0))
        x = math.sqrt(ab_s) * x0_hat + dir_coeff * eps_hat
        if sigma > 0:
            x = x + sigma * _noise(x, generator)
        if callback is not None:
            callback(i, x)
    return x


def flow_sigmas(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``steps + 1`` float64 sigmas from 1 to 0: diffusers' FlowMatchEulerDiscreteScheduler grid.

    ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift).set_timesteps(steps)`` spaces
    ``steps`` sigmas linearly from its largest training sigma, 1, to its smallest, ``shift(1 / T)``, applies
    the SD3 time shift (Esser et al. 2024 sec. 5.3.2) ``shift(s) = shift * s / (1 + (shift - 1) * s)`` to
    them and appends a final 0. So the last step goes from ``shift(shift(1 / T))`` (1 / T for shift = 1) to
    0, and the low end is shifted twice for shift != 1; both are kept here so that nuance samples exactly
    what the exported scheduler samples. shift > 1 spends more steps at high noise, which larger images
    need because their pixels are more redundant.
    """
    for name, value in (("steps", steps), ("num_train_timesteps", num_train_timesteps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    lo = time_shift(1.0 / num_train_timesteps, shift)
    s = torch.linspace(1.0, lo, steps, dtype=torch.float64)
    return torch.cat([time_shift(s, shift), torch.zeros(1, dtype=torch.float64)])


def time_shift(sigma, shift: float):
    """SD3's time shift (Esser et al. 2024 sec. 5.3.2): shift * sigma / (1 + (shift - 1) * sigma), the
    formula of diffusers' FlowMatchEulerDiscreteScheduler (``shift``). Keeps 0 and 1 fixed; shift > 1
    moves every sigma in between towards 1 (more noise)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def euler_flow(
    velocity_fn: Callable,
    x_1: torch.Tensor,
    steps: int,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Euler integration of the rectified-flow ODE dx/dsigma = v(x, sigma) from sigma = 1 to 0.

    Esser et al. 2024 eq. 1-3; x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_hat on :func:`flow_sigmas`
    (``FlowMatchEulerDiscreteScheduler.step``).
    """
    sigmas = flow_sigmas(steps, shift, num_train_timesteps).tolist()
    x = x_1
    for i in range(steps):
        sigma = torch.full((x.shape[0],), sigmas[i], device=x.device, dtype=x.dtype)
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity_fn(x, sigma)
        if callback is not None:
            callback(i, x)
    return x


def _batch_pair(key: str, uncond: object, cond: object, batch: int) -> torch.Tensor | None:
    """Stack the uncond and cond values of one conditioning input along dim 0."""
    if uncond is None and cond is None:
        return None
    if not (isinstance(uncond, torch.Tensor) and isinstance(cond, torch.Tensor)):
        raise ValueError(f"cond/uncond[{key!r}] must both be tensors (or both None)")
    # A batch-1 value (typically the null-prompt embedding) stands for the whole batch.
    uncond, cond = (v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for v in (uncond, cond))
    if uncond.shape[0] != batch or cond.shape[0] != batch:
        raise ValueError(
            f"cond/uncond[{key!r}] batch sizes {cond.shape[0]}/{uncond.shape[0]} "
            f"do not match x's batch {batch}"
        )
    return torch.cat([uncond, cond])


def classifier_free_guidance(
    model_fn: Callable, cond: Mapping[str, torch.Tensor], uncond: Mapping[str, torch.Tensor], scale: float
) -> Callable:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): out_u + scale * (out_c - out_u).

    ``model_fn(x, t_model, **cond)`` is run once on a batch of 2B (uncond first, then cond); with
    ``scale == 1`` the unconditional half is skipped. Guiding the raw output is the same as guiding eps
    for eps/v/x0 models and the velocity for flow models, since those conversions are affine in the
    output at fixed (x_t, t).
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")

    def guided(x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        if scale == 1:
            return model_fn(x, t_model, **cond)
        batch = x.shape[0]
        t = torch.as_tensor(t_model, device=x.device)
        t = t.expand(batch) if t.ndim == 0 else t
        kwargs = {k: _batch_pair(k, uncond[k], cond[k], batch) for k in cond}
        out_uncond, out_cond = model_fn(torch.cat([x, x]), torch.cat([t, t]), **kwargs).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided

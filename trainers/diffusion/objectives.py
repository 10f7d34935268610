"""Training objectives: each wraps the backbone and owns noise, targets and loss weighting.

The design follows k-diffusion: the backbone is any callable ``model(x_t, t_model, **cond)`` returning
a tensor shaped like ``x_t``, and the objective decides what ``t_model`` means, what the output is
trained to match, and how to turn that output back into what a sampler needs.

Noise and timesteps are drawn from the *global* torch RNG (on ``x0``'s device), so restoring
``torch.get_rng_state()`` / ``torch.cuda.get_rng_state()`` at a checkpoint reproduces the run.
Order of draws in ``loss``: timesteps (or sigmas) first, then noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from nuance.trainers.config import SAMPLERS_FOR, Sampler, objective_family

from .conversions import as_coeff, eps_to_x0, v_target, v_to_eps, v_to_x0, x0_to_eps
from .samplers import ddim, ddpm_ancestral, euler_flow, time_shift
from .schedules import DiscreteSchedule, gather

PREDICTIONS = ("eps", "v", "x0")
OBJECTIVE_KINDS = (*PREDICTIONS, "flow")

# The sampler each objective kind uses for `Sampler.default`, as measured on the toy quickstart (README,
# "Sample quality"): eps with DDPM ancestral sampling (25 steps, cfg 4: accuracy 0.875, KID 0.015; DDIM
# gave 0.641 / 0.096), v and x0 with DDIM, flow with Euler. The names a family accepts are
# `nuance.trainers.config.SAMPLERS_FOR` (the one table the recipe check and the CLI use too).
DEFAULT_SAMPLER = {"eps": Sampler.ddpm, "v": Sampler.ddim, "x0": Sampler.ddim, "flow": Sampler.euler}


def resolve_sampler(objective_kind: str, sampler: str) -> Sampler:
    """The concrete sampler that ``sampler`` names for an objective of kind ``objective_kind``
    (eps / v / x0 / flow): ``default`` becomes the kind's own (DEFAULT_SAMPLER)."""
    family = objective_family(objective_kind)
    valid = SAMPLERS_FOR[family]
    if sampler not in valid:
        raise ValueError(
            f"unknown sampler {sampler!r} for objective {objective_kind!r}; "
            f"expected one of {[str(s) for s in valid]}"
        )
    return DEFAULT_SAMPLER[str(objective_kind)] if sampler == Sampler.default else Sampler(sampler)


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements, computed in at least fp32 (bf16 sums lose the loss)."""
    if pred.shape != target.shape:
        raise ValueError(f"model output shape {tuple(pred.shape)} != x_t shape {tuple(target.shape)}")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return F.mse_loss(pred.to(dtype), target.to(dtype))


class DDPMObjective:
    """Discrete-time diffusion trained with L_simple (Ho et al. 2020, eq. 14).

    ``prediction`` selects the network's parameterisation: ``"eps"`` (Ho et al. 2020), ``"v"``
    (Salimans & Ho 2022) or ``"x0"``. The loss is the unweighted MSE to that target; the model sees
    ``t_model = t.to(x0.dtype)`` (integer-valued float, as diffusers backbones expect).
    """

    def __init__(self, schedule: DiscreteSchedule, prediction: str = "eps") -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {list(PREDICTIONS)}")
        self.schedule = schedule
        self.prediction = prediction
        self.default_sampler = DEFAULT_SAMPLER[prediction]

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Ho et al. eq. 4: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        ab = gather(self.schedule.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def q_moments(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form mean and variance of q(x_t | x0) (Ho et al. eq. 4), both shaped like x0."""
        ab = gather(self.schedule.alphas_cumprod, t, x0)
        return ab.sqrt() * x0, (1 - ab).expand_as(x0)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses onto for this ``prediction``."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return v_target(x0, noise, gather(self.schedule.alphas_cumprod, t, x0))

    def loss(
        self, model: Callable, x0: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """L_simple (Ho et al. eq. 14): t ~ U{0, ..., T-1}, noise ~ N(0, I), mean-squared error."""
        x_t, t_model, target = self.noised(x0)
        return _mse(model(x_t, t_model, **(cond or {})), target)

    def noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t_model, target) of one training example batch, drawing t first, then noise (the
        pipeline engine draws these on its first stage and feeds the target to its last)."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return self.q_sample(x0, t, noise), t.to(x0.dtype), self.target(x0, noise, t)

    def _x0_eps(
        self, out: torch.Tensor, x_t: torch.Tensor, ab: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat), each converted directly from the raw output (no round trip through eps),
        so v- and x0-predictions stay exact at alpha_bar = 0."""
        if self.prediction == "eps":
            return eps_to_x0(x_t, out, ab), out
        if self.prediction == "x0":
            return out, x0_to_eps(x_t, out, ab)
        return v_to_x0(x_t, out, ab), v_to_eps(x_t, out, ab)

    def eps_fn(self, model_fn: Callable) -> Callable:
        """Wrap ``model_fn(x_t, t_model)`` (cond already closed over) as ``(x_t, t_long) -> eps_hat``.

        The returned callable also carries ``.x0_eps(x_t, t_long) -> (x0_hat, eps_hat)``, which the
        samplers prefer: at alpha_bar = 0 (zero terminal SNR) x0 cannot be recovered from eps, but it
        can from a v or x0 prediction, which is the point of Lin et al. 2024 sec. 3.2.
        """

        def x0_eps(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = model_fn(x_t, t.to(x_t.dtype))
            return self._x0_eps(out, x_t, gather(self.schedule.alphas_cumprod, t, x_t))

        def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return x0_eps(x_t, t)[1]

        eps.x0_eps = x0_eps
        return eps

    def sample(
        self,
        model_fn: Callable,
        x_T: torch.Tensor,
        steps: int,
        sampler: str = "ddim",
        generator: torch.Generator | None = None,
        callback: Callable | None = None,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Draw samples from noise ``x_T`` with DDIM (``eta`` applies) or DDPM ancestral sampling.

        ``sampler`` is a :class:`~nuance.trainers.config.Sampler` name of the DDPM family: ``ddim``,
        ``ddpm`` or ``default`` (= ddim).
        """
        sampler = resolve_sampler(self.prediction, sampler)
        eps_fn = self.eps_fn(model_fn)
        if sampler == Sampler.ddim:
            return ddim(eps_fn, x_T, self.schedule, steps, eta=eta, generator=generator, callback=callback)
        if eta != 0.0:
            raise ValueError(f"eta only applies to the 'ddim' sampler, got eta={eta} with '{sampler}'")
        return ddpm_ancestral(eps_fn, x_T, self.schedule, steps, generator=generator, callback=callback)


class FlowObjective:
    """Rectified flow as in SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers").

    Forward process (eq. 1-3): x_t = (1 - sigma) x0 + sigma * noise, trained to predict the velocity
    v = noise - x0 (the conditional flow-matching target). sigma follows the logit-normal density of
    sec. 3.1: sigma = sigmoid(u), u ~ N(logit_mean, logit_std), which concentrates training on the
    intermediate noise levels. ``shift`` != 1 applies SD3's time shift (sec. 5.3.2) to those sigmas and
    is the sampler's default grid shift, as diffusers' SD3 training script and FlowMatchEulerDiscreteScheduler
    (``shift``) do. The model sees ``t_model = sigma * num_train_timesteps``.
    """

    prediction = "flow"
    default_sampler = DEFAULT_SAMPLER["flow"]

    def __init__(
        self,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
    ) -> None:
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if not num_train_timesteps > 0:
            raise ValueError(f"num_train_timesteps must be > 0, got {num_train_timesteps}")
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)

    def sample_sigma(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """Logit-normal sigma in (0, 1) (Esser et al. sec. 3.1), median sigmoid(logit_mean), then
        time-shifted when ``shift`` != 1 (median shift(sigmoid(logit_mean)))."""
        # Draw in >= fp32: a bf16 sigma would quantise the noise levels the model is trained on.
        dtype = torch.promote_types(dtype, torch.float32)
        u = torch.randn(batch_size, device=device, dtype=dtype)
        sigma = torch.sigmoid(self.logit_mean + self.logit_std * u)
        return sigma if self.shift == 1.0 else time_shift(sigma, self.shift)

    def q_sample(self, x0: torch.Tensor, sigma: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
        """Esser et al. eq. 3 (rectified flow path): x_t = (1 - sigma) x0 + sigma * noise."""
        s = as_coeff(sigma, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Velocity dx_t/dsigma = noise - x0 (Esser et al. sec. 2, conditional flow matching)."""
        return noise - x0

    def loss(
        self, model: Callable, x0: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Flow-matching MSE with logit-normal sigma; draws sigma first, then noise."""
        x_t, t_model, target = self.noised(x0)
        return _mse(model(x_t, t_model, **(cond or {})), target)

    def noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t_model, target) of one training example batch: sigma first, then noise."""
        sigma = self.sample_sigma(x0.shape[0], x0.device, x0.dtype)
        noise = torch.randn_like(x0)
        t_model = (sigma * self.num_train_timesteps).to(x0.dtype)
        return self.q_sample(x0, sigma, noise), t_model, self.target(x0, noise)

    def velocity_fn(self, model_fn: Callable) -> Callable:
        """Wrap ``model_fn(x, t_model)`` as ``(x, sigma) -> v_hat`` for :func:`euler_flow`."""

        def velocity(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
            sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
            if sigma.ndim == 0:
                sigma = sigma.expand(x.shape[0])
            return model_fn(x, sigma * self.num_train_timesteps)

        return velocity

    def sample(
        self,
        model_fn: Callable,
        x_1: torch.Tensor,
        steps: int,
        sampler: str = "euler",
        generator: torch.Generator | None = None,
        callback: Callable | None = None,
        shift: float | None = None,
    ) -> torch.Tensor:
        """Integrate the learned ODE from noise ``x_1`` (sigma = 1) to data (sigma = 0).

        ``sampler`` is ``euler`` or ``default`` (= euler). ``generator`` is accepted for a uniform sampler
        signature; Euler integration is deterministic. The sigma grid is
        ``flow_sigmas(steps, shift, num_train_timesteps)``, the one diffusers'
        FlowMatchEulerDiscreteScheduler walks; ``shift`` defaults to the objective's own.
        """
        resolve_sampler(self.prediction, sampler)
        shift = self.shift if shift is None else shift
        T = self.num_train_timesteps
        return euler_flow(self.velocity_fn(model_fn), x_1, steps, shift, T, callback=callback)


def build_objective(
    kind: str,
    *,
    schedule: str = "linear",
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    zero_terminal_snr: bool = False,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
) -> DDPMObjective | FlowObjective:
    """Build an objective from recipe values.

    ``kind`` is a DDPM prediction type (``"eps"``, ``"v"``, ``"x0"``) or ``"flow"``. For ``"flow"``
    the beta-schedule arguments are unused (``num_timesteps`` sets the ``t_model`` scale) and
    ``zero_terminal_snr`` is moot: sigma = 1 is already pure noise; ``shift`` is flow's time shift.
    """
    if kind not in OBJECTIVE_KINDS:
        raise ValueError(f"unknown objective {kind!r}; expected one of {list(OBJECTIVE_KINDS)}")
    if kind == "flow":
        return FlowObjective(
            logit_mean=logit_mean, logit_std=logit_std, num_train_timesteps=num_timesteps, shift=shift
        )
    if zero_terminal_snr and kind == "eps":
        raise ValueError(
            "objective.zero_terminal_snr=true requires v- or x0-prediction: at alpha_bar=0 the input is pure "
            "noise, so an eps-prediction model carries no information about x0 (Lin et al. 2024, sec. 3.2). "
            "Set the objective to 'v' or disable objective.zero_terminal_snr."
        )
    sched = DiscreteSchedule.from_config(schedule, num_timesteps, beta_start, beta_end, zero_terminal_snr)
    return DDPMObjective(sched, prediction=kind)

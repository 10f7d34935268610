"""Discrete noise schedules for DDPM-family objectives.

Notation follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models"): ``betas[t]`` is the
per-step noise variance, ``alpha = 1 - beta`` and ``alpha_bar[t] = prod_{s<=t} alpha[s]`` so that
``q(x_t | x_0) = N(sqrt(alpha_bar[t]) x_0, (1 - alpha_bar[t]) I)``. Timesteps are 0-indexed:
``t = 0`` is the least noisy step and ``t = T - 1`` the noisiest.

Tables are kept in float64 on the CPU: ``alpha_bar`` near ``t = T - 1`` is tiny, and the products
``1 - alpha_bar`` near ``t = 0`` lose most of their digits in low precision. They are cast to the
data's device and dtype only when indexed (see :func:`gather`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")

# Nichol & Dhariwal 2021 (sec. 3.2): small offset so beta_0 is not vanishingly small, and the cap
# that keeps the last betas away from 1 where alpha_bar(t) = cos(...)^2 reaches 0.
_COSINE_S = 0.008
_COSINE_MAX_BETA = 0.999


def _linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Ho et al. 2020, sec. 4: betas linear from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def _scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Stable Diffusion (Rombach et al. 2022): linear in sqrt(beta), then squared."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def _cosine_betas(num_timesteps: int) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2.

    Betas are ``1 - alpha_bar(t + 1) / alpha_bar(t)`` clipped at 0.999; f(0) cancels in the ratio.
    """

    def f(t: float) -> float:
        return math.cos((t / num_timesteps + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), _COSINE_MAX_BETA) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(
    kind: str, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """Return the float64 beta table of shape ``(num_timesteps,)``.

    ``kind`` is one of ``"linear"`` (Ho et al. 2020), ``"scaled_linear"`` (Stable Diffusion; pass
    ``beta_start=0.00085, beta_end=0.012``) or ``"cosine"`` (Nichol & Dhariwal 2021, which ignores
    ``beta_start``/``beta_end``).
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {kind!r}; expected one of {list(BETA_SCHEDULES)}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if kind == "cosine":
        return _cosine_betas(num_timesteps)
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    if kind == "linear":
        return _linear_betas(num_timesteps, beta_start, beta_end)
    return _scaled_linear_betas(num_timesteps, beta_start, beta_end)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.

    Shift and scale sqrt(alpha_bar) so that its last entry is exactly 0 (zero terminal SNR: the last
    training step sees pure noise, matching what sampling starts from) while its first entry is kept.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    if not first > last:
        raise ValueError(
            "rescale_zero_terminal_snr needs a decreasing alpha_bar (at least two distinct steps)"
        )
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    # alphas[-1] is exactly 0 here, so betas[-1] == 1 and cumprod reproduces alpha_bar[T-1] == 0 exactly.
    return 1.0 - alphas


def gather(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index a per-timestep table at ``t`` and shape it to broadcast against ``x``.

    ``t`` is a 0-dim or ``(B,)`` integer tensor; the result is 0-dim or ``(B, 1, ..., 1)`` with
    ``x.ndim`` dimensions, on ``x``'s device and in ``x``'s dtype.
    """
    values = table.to(x.device, x.dtype)[torch.as_tensor(t, device=x.device).long()]
    if values.ndim == 0:
        return values
    return values.reshape(values.shape[0], *([1] * (x.ndim - 1)))


@dataclass
class DiscreteSchedule:
    """A discrete diffusion schedule: ``betas`` and ``alphas_cumprod`` (alpha_bar), float64 on CPU."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    def __post_init__(self) -> None:
        if self.betas.ndim != 1 or self.betas.shape != self.alphas_cumprod.shape:
            raise ValueError(
                f"betas and alphas_cumprod must be 1-D of equal length, got {tuple(self.betas.shape)} "
                f"and {tuple(self.alphas_cumprod.shape)}"
            )

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> DiscreteSchedule:
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_config(
        cls,
        kind: str,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        zero_terminal_snr: bool = False,
    ) -> DiscreteSchedule:
        """Build from :func:`make_betas` arguments, optionally rescaled to zero terminal SNR."""
        betas = make_betas(kind, num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls.from_betas(betas)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def spaced_timesteps(self, steps: int) -> torch.Tensor:
        """``steps`` descending timesteps with "trailing" spacing (Lin et al. 2024, Table 2).

        ``t_i = round(T - i * T / steps) - 1``: the first sampling step is always ``T - 1``, so sampling
        starts from the same noise level training ended at (the "leading" spacing used by older
        samplers never visits the noisiest step).
        """
        T = self.num_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer in [1, {T}], got {steps!r}")
        ratio = T / steps
        # ratio >= 1, so rounding keeps the sequence strictly decreasing.
        return torch.round(T - torch.arange(steps, dtype=torch.float64) * ratio).long() - 1

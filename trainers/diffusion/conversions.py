"""Conversions between the DDPM parameterizations eps / x0 / v at a given alpha_bar.

Both the objectives (training targets, the model-output -> (x0, eps) wrapper) and the samplers (eps -> x0
for a bare ``eps_fn``) need these; they live here, below both, so that neither imports the other's module
for them.
"""

from __future__ import annotations

import torch

# Floor for alpha_bar (and 1 - alpha_bar) when dividing by its square root. With zero terminal SNR
# alpha_bar[T-1] == 0 and x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) is 0/0: eps-prediction carries no
# information about x0 there (Lin et al. 2024, sec. 3.2). The floor keeps the result finite; it is far
# below every non-zero alpha_bar of the stock schedules (linear ~4e-5, cosine ~2e-9 at T-1), so it only
# acts at that degenerate point. Per dtype it is at least finfo.tiny so that it does not underflow.
_ALPHA_BAR_FLOOR = 1e-12


def as_coeff(alpha_bar: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """alpha_bar (or sigma) as a tensor on x's device/dtype, a (B,) vector reshaped to broadcast over x."""
    ab = torch.as_tensor(alpha_bar, device=x.device, dtype=x.dtype)
    if ab.ndim == 1:
        ab = ab.reshape(ab.shape[0], *([1] * (x.ndim - 1)))
    return ab


def _floor(x: torch.Tensor) -> float:
    return max(_ALPHA_BAR_FLOOR, torch.finfo(x.dtype).tiny)


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """Invert Ho et al. eq. 4: x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab), with ab floored (see module)."""
    ab = as_coeff(alpha_bar, x_t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.clamp_min(_floor(x_t)).sqrt()


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """Invert Ho et al. eq. 4 for the noise: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab).

    1 - ab is floored like ab in :func:`eps_to_x0` so that ab == 1 cannot produce inf/nan.
    """
    ab = as_coeff(alpha_bar, x_t)
    return (x_t - ab.sqrt() * x0) / (1 - ab).clamp_min(_floor(x_t)).sqrt()


def v_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """Salimans & Ho 2022 ("Progressive Distillation"), sec. 4: v = sqrt(ab) eps - sqrt(1 - ab) x0."""
    ab = as_coeff(alpha_bar, x0)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def v_to_x0(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """x0 = sqrt(ab) x_t - sqrt(1 - ab) v (Salimans & Ho 2022, appendix D); well-posed at ab = 0."""
    ab = as_coeff(alpha_bar, x_t)
    return ab.sqrt() * x_t - (1 - ab).sqrt() * v


def v_to_eps(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """eps = sqrt(1 - ab) x_t + sqrt(ab) v (Salimans & Ho 2022)."""
    ab = as_coeff(alpha_bar, x_t)
    return (1 - ab).sqrt() * x_t + ab.sqrt() * v

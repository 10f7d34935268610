"""Diffusion objectives, noise schedules and samplers (DDPM eps/v/x0 and SD3-style rectified flow)."""

from .conversions import eps_to_x0, v_target, v_to_eps, v_to_x0, x0_to_eps
from .objectives import DEFAULT_SAMPLER, DDPMObjective, FlowObjective, build_objective, resolve_sampler
from .samplers import classifier_free_guidance, ddim, ddpm_ancestral, euler_flow, flow_sigmas
from .schedules import DiscreteSchedule, gather, make_betas, rescale_zero_terminal_snr

__all__ = [
    "DEFAULT_SAMPLER",
    "DDPMObjective",
    "DiscreteSchedule",
    "FlowObjective",
    "build_objective",
    "classifier_free_guidance",
    "ddim",
    "ddpm_ancestral",
    "eps_to_x0",
    "euler_flow",
    "flow_sigmas",
    "gather",
    "make_betas",
    "rescale_zero_terminal_snr",
    "resolve_sampler",
    "v_target",
    "v_to_eps",
    "v_to_x0",
    "x0_to_eps",
]

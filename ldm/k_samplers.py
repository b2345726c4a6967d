"""Sigma-space samplers in the style of k-diffusion (Karras et al. 2022): Euler, Euler ancestral, Heun, DPM++ 2M.

They follow the contract of ``ldm.sampling`` but integrate ``x = x0 + sigma * eps`` with
``sigma = sqrt((1 - a_t) / a_t)``, i.e. the diffusion's ``x_t`` divided by ``sqrt(a_t)``. In these
units the probability-flow ODE is ``dx / dsigma = eps``. Conventions:

- Noise levels: ``num_steps + 1`` training sigmas at the integer timesteps
  ``round(linspace(T - 1, 0, num_steps + 1))`` (diffusers' "linspace" spacing, rounded so that the
  denoiser always sees the noise level it was trained on), or with ``karras=True`` Karras et al.'s
  rho = 7 schedule between the same end points, sigma(T - 1) and sigma(0). The run ends at sigma(0),
  the noise level where DDIM ends (SD's ``set_alpha_to_one=False``; diffusers'
  ``final_sigmas_type="sigma_min"``), and returns that sample in the diffusion's units, as DDIM does.
  k-diffusion takes one step more, to sigma 0, which returns the x0 estimate at timestep 0 instead,
  which followed prompts worse on the bundled model (docs/samplers.md).
- The denoiser gets ``x / sqrt(sigma^2 + 1)`` (the diffusion's ``x_t``) and the timestep whose training
  sigma is nearest to ``sigma`` after interpolating log-sigma linearly between timesteps, rounded to the
  nearest integer (diffusers' ``_sigma_to_t`` plus rounding). Its eps or v output is turned back into
  ``x0`` and ``eps`` at the continuous ``sigma``.
- Initial noise: ``x_T`` ~ N(0, I) is multiplied by the first sigma (k-diffusion; also diffusers'
  ``init_noise_sigma`` for "linspace" spacing), not by ``sqrt(sigma^2 + 1)``. From ``init_latents``
  at step ``start_step`` the start is ``init_latents + sigmas[start_step] * x_T``, which is
  ``NoiseSchedule.add_noise`` at that noise level divided by ``sqrt(a_t)`` (diffusers' ``add_noise``
  of these schedulers).
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm import tqdm

from ldm.sampling import (
    FROM_NOISE,
    Denoiser,
    Generators,
    StartPoint,
    StepCallback,
    X0Transform,
    check_num_steps,
    check_start,
    per_step,
    predict,
    randn,
)
from ldm.schedule import NoiseSchedule, check_parameterization

KARRAS_RHO = 7.0


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = KARRAS_RHO) -> Tensor:
    """Karras et al. (2022) eq. 5: ``num_steps`` sigmas from ``sigma_max`` down to ``sigma_min``, float64."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigmas_to_timesteps(sigmas: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Nearest training timestep for each sigma (> 0): log-sigma interpolated linearly between
    timesteps, then rounded. ``sigmas`` (N,) -> ``(N,)`` long in ``0 .. T - 1``."""
    log_sigmas = schedule.sigmas.log()
    log_sigma = sigmas.to(torch.float64).log()
    upper = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
    lower = upper - 1
    weight = (log_sigma - log_sigmas[lower]) / (log_sigmas[upper] - log_sigmas[lower])
    return (lower + weight.clamp(0, 1)).round().long()


def sampling_sigmas(schedule: NoiseSchedule, num_steps: int, karras: bool = False) -> tuple[Tensor, Tensor]:
    """Noise levels of a sampling run and the timesteps the denoiser sees at them.

    Returns ``sigmas`` (num_steps + 1,) float64, decreasing from sigma(T - 1) to sigma(0), and
    ``timesteps`` (num_steps,) long for ``sigmas[:-1]``.
    """
    check_num_steps(num_steps, schedule.num_timesteps)
    all_sigmas = schedule.sigmas
    if karras:
        sigmas = karras_sigmas(all_sigmas[0].item(), all_sigmas[-1].item(), num_steps + 1)
        return sigmas, sigmas_to_timesteps(sigmas[:-1], schedule)
    last = schedule.num_timesteps - 1
    timesteps = torch.linspace(last, 0, num_steps + 1, dtype=torch.float64).round().long()
    return all_sigmas[timesteps], timesteps[:-1]


class _SigmaSpace:
    """One sampling run's noise levels, and the denoiser in sigma units: ``self(x, i) -> (x0, eps)``
    for ``x`` (B, C, h, w) at noise level ``sigmas[i]``, with ``x0_transform`` applied."""

    def __init__(self, denoiser: Denoiser, schedule: NoiseSchedule, num_steps: int, karras: bool, like: Tensor,
                 parameterization: str, x0_transform: X0Transform | None) -> None:
        check_parameterization(parameterization)
        self.sigmas, timesteps = sampling_sigmas(schedule, num_steps, karras)
        # x_t = x / sqrt(sigma^2 + 1) has sqrt(a_t) = 1 / sqrt(sigma^2 + 1), sqrt(1 - a_t) = sigma * that.
        input_scales = (self.sigmas**2 + 1).rsqrt()
        self.sqrt_alphas = per_step(input_scales, like)
        self.sqrt_one_minus_alphas = per_step(self.sigmas * input_scales, like)
        self.timesteps = timesteps.to(like.device)
        self.denoiser = denoiser
        self.parameterization = parameterization
        self.x0_transform = x0_transform

    def __call__(self, x: Tensor, i: int) -> tuple[Tensor, Tensor]:
        # x0 comes out unscaled, and eps equals (x - x0) / sigma, the ODE's dx / dsigma.
        return predict(self.denoiser, self.to_x_t(x, i), self.timesteps[i].expand(x.shape[0]), self.sqrt_alphas[i],
                       self.sqrt_one_minus_alphas[i], self.parameterization, self.x0_transform)

    def start(self, x_T: Tensor, start: StartPoint) -> Tensor:
        """The first ``x`` (B, C, h, w): noise ``x_T`` at the first sigma, or ``start.init_latents`` plus
        ``x_T`` at ``sigmas[start.start_step]``."""
        check_start(len(self.timesteps), start, x_T)
        if start.init_latents is None:
            return x_T * self.sigmas[0].item()
        return start.init_latents.to(x_T) + x_T * self.sigmas[start.start_step].item()

    def to_x_t(self, x: Tensor, i: int) -> Tensor:
        """``x`` at noise level ``sigmas[i]`` in the diffusion's units (what DDIM's callback sees)."""
        return self.sqrt_alphas[i] * x


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    eta: float = 0.0,
    karras: bool = False,
    stiffness: float = 1.0,
    generator: Generators = None,
    parameterization: str = "eps",
    progress: bool = True,
    callback: StepCallback | None = None,
    start: StartPoint = FROM_NOISE,
) -> Tensor:
    """Euler's method on ``dx / dsigma = eps``: ``x_T`` (B, C, h, w) ~ N(0, I) -> latents (B, C, h, w).

    One denoiser call per step. After every step ``callback(step_index, x_t)`` gets the new sample in
    the diffusion's units, ``x / sqrt(sigma_next^2 + 1)`` (as DDIM's; the last one is the latents, at
    sigma(0)).
    ``start`` as in ``ldm.sampling``: from step
    ``start_step`` on, ``num_steps - start_step`` calls.
    """
    space = _SigmaSpace(denoiser, schedule, num_steps, karras, x_T, parameterization, start.x0_transform)
    sigmas = space.sigmas
    step_sizes = per_step(sigmas[1:] - sigmas[:-1], x_T)

    x = space.start(x_T, start)
    for i in tqdm(range(start.start_step, num_steps), desc="Euler", disable=not progress):
        _, eps = space(x, i)
        x = x + step_sizes[i] * eps
        if callback is not None:
            callback(i, space.to_x_t(x, i + 1))
    return space.to_x_t(x, num_steps)


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    eta: float = 0.0,
    karras: bool = False,
    stiffness: float = 1.0,
    generator: Generators = None,
    parameterization: str = "eps",
    progress: bool = True,
    callback: StepCallback | None = None,
    start: StartPoint = FROM_NOISE,
) -> Tensor:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral`` with eta = 1), ``x_T`` (B, C, h, w) ->
    latents (B, C, h, w).

    Each step goes deterministically down to ``sigma_down`` and adds fresh noise of std ``sigma_up``,
    with ``sigma_down^2 + sigma_up^2 = sigma_next^2`` and the split that matches DDPM's posterior
    variance. The last step, into sigma(0), is an Euler step and adds no noise, as DDPM's last step
    (and k-diffusion's, to sigma 0): fresh noise there lowered the bundled model's prompt following
    (docs/samplers.md). Noise is drawn with ``randn`` from ``generator`` on every
    other step. ``callback`` and ``start`` as in ``sample_euler``.
    """
    space = _SigmaSpace(denoiser, schedule, num_steps, karras, x_T, parameterization, start.x0_transform)
    sigmas = space.sigmas
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()
    sigma_up[-1] = 0
    sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
    step_sizes = per_step(sigma_down - sigma, x_T)
    noise_scales = per_step(sigma_up, x_T)

    x = space.start(x_T, start)
    for i in tqdm(range(start.start_step, num_steps), desc="Euler a", disable=not progress):
        _, eps = space(x, i)
        x = x + step_sizes[i] * eps
        if i < num_steps - 1:
            x = x + noise_scales[i] * randn(x.shape, generator, x.device, x.dtype)
        if callback is not None:
            callback(i, space.to_x_t(x, i + 1))
    return space.to_x_t(x, num_steps)


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    eta: float = 0.0,
    karras: bool = False,
    stiffness: float = 1.0,
    generator: Generators = None,
    parameterization: str = "eps",
    progress: bool = True,
    callback: StepCallback | None = None,
    start: StartPoint = FROM_NOISE,
) -> Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1 without churn), ``x_T`` (B, C, h, w) -> latents.

    Two denoiser calls per step except the last, into sigma(0), which is an Euler step: a corrector from
    the trained model's eps at timestep 0 made results worse (docs/samplers.md).
    ``2 * num_steps - 1`` calls in all, ``2 * (num_steps - start_step) - 1`` from ``start_step``.
    ``callback`` and ``start`` as in ``sample_euler``.
    """
    space = _SigmaSpace(denoiser, schedule, num_steps, karras, x_T, parameterization, start.x0_transform)
    sigmas = space.sigmas
    step_sizes = per_step(sigmas[1:] - sigmas[:-1], x_T)

    x = space.start(x_T, start)
    for i in tqdm(range(start.start_step, num_steps), desc="Heun", disable=not progress):
        _, eps = space(x, i)
        x_euler = x + step_sizes[i] * eps
        if i < num_steps - 1:
            _, eps_next = space(x_euler, i + 1)
            x = x + step_sizes[i] * (eps + eps_next) / 2
        else:
            x = x_euler
        if callback is not None:
            callback(i, space.to_x_t(x, i + 1))
    return space.to_x_t(x, num_steps)


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    eta: float = 0.0,
    karras: bool = False,
    stiffness: float = 1.0,
    generator: Generators = None,
    parameterization: str = "eps",
    progress: bool = True,
    callback: StepCallback | None = None,
    start: StartPoint = FROM_NOISE,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), ``x_T`` (B, C, h, w) -> latents (B, C, h, w).

    The exponential integrator in ``lambda = -log(sigma)`` steps ``x`` to
    ``(sigma_next / sigma) x + (1 - sigma_next / sigma) x0_hat``, where ``x0_hat`` extrapolates the last
    two denoised estimates linearly in lambda. The first step, the first from ``start_step`` and the
    last two are first order. On evenly spaced timesteps the lambda steps grow towards sigma(0): the
    last is several times the one before it (diffusers' ``lower_order_final`` step), and with guidance
    extrapolating over either of the last two overshoots (on the bundled model second order on the
    step before the last changed colours; docs/samplers.md). One denoiser call per step; ``callback``
    and ``start`` as in ``sample_euler``.
    """
    space = _SigmaSpace(denoiser, schedule, num_steps, karras, x_T, parameterization, start.x0_transform)
    sigmas = space.sigmas
    ratios = sigmas[1:] / sigmas[:-1]
    # x0_hat = x0 + (h / (2 h_last)) (x0 - x0_last), h = lambda step; zero on the first and last two steps.
    extrapolations = torch.zeros(num_steps, dtype=torch.float64)
    if num_steps > 3:
        lambda_steps = sigmas[:-1].log() - sigmas[1:].log()
        extrapolations[1:-2] = lambda_steps[1:-2] / (2 * lambda_steps[:-3])
    x_scales = per_step(ratios, x_T)
    x0_scales = per_step(1 - ratios, x_T)
    extrapolations = per_step(extrapolations, x_T)

    x = space.start(x_T, start)
    x0_last = None
    for i in tqdm(range(start.start_step, num_steps), desc="DPM++ 2M", disable=not progress):
        x0, _ = space(x, i)
        x0_hat = x0 if x0_last is None else x0 + extrapolations[i] * (x0 - x0_last)
        x = x_scales[i] * x + x0_scales[i] * x0_hat
        x0_last = x0
        if callback is not None:
            callback(i, space.to_x_t(x, i + 1))
    return space.to_x_t(x, num_steps)


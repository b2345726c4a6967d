"""Samplers over the training timesteps: DDIM, DDPM and PLMS (ldm's, with its orders kept stable).

They keep the contract of ``ldm.sampling``; ``ldm.samplers`` picks them by name.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm import tqdm

from ldm.errors import InputError
from ldm.sampling import (
    FROM_NOISE,
    Denoiser,
    Generators,
    StartPoint,
    StepCallback,
    check_num_steps,
    noised_start,
    per_step,
    predict,
    randn,
)
from ldm.schedule import NoiseSchedule, check_parameterization


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """Evenly spaced timesteps with offset 1, in sampling order (descending): ``(num_steps,)`` long
    ``[floor(k * T / n) + 1 for k = n - 1, ..., 1, 0]`` with ``T = num_train_timesteps``, ``n = num_steps``.

    Where ``n`` divides ``T`` (10, 20, 25, 50, 100, ...) these are SD's "leading" timesteps, as
    diffusers' DDIMScheduler ships them for SD: ``[(n - 1) * T / n + 1, ..., T / n + 1, 1]``. Elsewhere
    "leading" uses the stride ``T // n`` and starts far below ``T`` for large ``n`` (600 steps would start
    at timestep 600, from a pure-noise ``x_T`` that belongs to timestep 999); rounding ``k * T / n``
    instead always starts within one stride of ``T``. The offset is dropped when it would step past the
    last index, i.e. for ``n = T``.
    """
    check_num_steps(num_steps, num_train_timesteps)
    offset = 1 if num_steps < num_train_timesteps else 0
    return torch.arange(num_steps - 1, -1, -1, dtype=torch.long) * num_train_timesteps // num_steps + offset


@torch.no_grad()
def sample_ddim(
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
    """DDIM (Song et al. 2021) from ``x_T`` (B, C, h, w) to latents (B, C, h, w).

    ``eta`` = 0 is the deterministic sampler, ``eta`` = 1 has DDPM's posterior variance. The
    step after the last timestep goes to the noise level ``alphas_cumprod[0]`` (SD's
    ``set_alpha_to_one=False``). ``callback(step_index, x_t)`` is called after every step with
    the new ``x_t``. ``start`` as in ``ldm.sampling``: from step ``start_step`` on,
    ``num_steps - start_step`` denoiser calls. Runs under
    ``torch.no_grad``.
    """
    check_num_steps(num_steps, schedule.num_timesteps)
    if eta < 0:
        raise InputError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
    check_parameterization(parameterization)

    timesteps = ddim_timesteps(num_steps, schedule.num_timesteps)
    x_t = noised_start(x_T, schedule, timesteps, start)
    alphas = schedule.alphas_cumprod[timesteps]
    alphas_prev = torch.cat([alphas[1:], schedule.alphas_cumprod[:1]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    direction_variances = 1 - alphas_prev - sigmas**2
    if (direction_variances < 0).any():
        raise InputError(f"eta={eta} adds more noise than a DDIM step allows; use eta <= 1")

    sqrt_alphas = per_step(alphas.sqrt(), x_T)
    sqrt_one_minus_alphas = per_step((1 - alphas).sqrt(), x_T)
    sqrt_alphas_prev = per_step(alphas_prev.sqrt(), x_T)
    direction_scales = per_step(direction_variances.sqrt(), x_T)
    noise_scales = per_step(sigmas, x_T)
    timesteps = timesteps.to(x_T.device)

    batch_size = x_T.shape[0]
    for i in tqdm(range(start.start_step, num_steps), desc="DDIM", disable=not progress):
        x0, eps = predict(denoiser, x_t, timesteps[i].expand(batch_size), sqrt_alphas[i], sqrt_one_minus_alphas[i],
                          parameterization, start.x0_transform)
        x_t = sqrt_alphas_prev[i] * x0 + direction_scales[i] * eps
        if eta > 0:
            noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
            x_t = x_t + noise_scales[i] * noise
        if callback is not None:
            callback(i, x_t)
    return x_t


@torch.no_grad()
def sample_ddpm(
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
    """Ancestral DDPM sampling (Ho et al. 2020) over a subset of timesteps, ``x_T`` (B, C, h, w) -> latents.

    Uses ``ddim_timesteps`` (where the step count divides 1000, diffusers' DDPMScheduler as SD ships it);
    each step draws from the posterior q(x_prev | x_t, x0) at the predicted x0, with the betas of
    the skipped stretch of timesteps and DDPM's posterior ("fixed small") variance. The last step
    lands on clean data (noise level 1, as DDPM's t = 0 step) and adds no noise; the others draw
    ``randn`` from ``generator``. ``callback`` and ``start`` as in ``sample_ddim``.
    """
    check_num_steps(num_steps, schedule.num_timesteps)
    check_parameterization(parameterization)

    timesteps = ddim_timesteps(num_steps, schedule.num_timesteps)
    x_t = noised_start(x_T, schedule, timesteps, start)
    alphas = schedule.alphas_cumprod[timesteps]
    alphas_prev = torch.cat([alphas[1:], alphas.new_ones(1)])
    betas = 1 - alphas / alphas_prev
    x0_scales = per_step(alphas_prev.sqrt() * betas / (1 - alphas), x_T)
    x_t_scales = per_step((1 - betas).sqrt() * (1 - alphas_prev) / (1 - alphas), x_T)
    noise_scales = per_step(((1 - alphas_prev) / (1 - alphas) * betas).sqrt(), x_T)
    sqrt_alphas = per_step(alphas.sqrt(), x_T)
    sqrt_one_minus_alphas = per_step((1 - alphas).sqrt(), x_T)
    timesteps = timesteps.to(x_T.device)

    batch_size = x_T.shape[0]
    for i in tqdm(range(start.start_step, num_steps), desc="DDPM", disable=not progress):
        x0, _ = predict(denoiser, x_t, timesteps[i].expand(batch_size), sqrt_alphas[i], sqrt_one_minus_alphas[i],
                        parameterization, start.x0_transform)
        x_t = x0_scales[i] * x0 + x_t_scales[i] * x_t
        if i < num_steps - 1:
            x_t = x_t + noise_scales[i] * randn(x_t.shape, generator, x_t.device, x_t.dtype)
        if callback is not None:
            callback(i, x_t)
    return x_t


# Adams-Bashforth weights of order k (1 = Euler's method, here a plain DDIM step), newest eps first, and the
# real stability interval of each: a step h on y' = lambda y stays bounded only while -h lambda lies in
# [-bound, 0] (Hairer & Wanner, Solving ODEs II, Sec. V.1). ldm's PLMS uses order 4 from its fourth step on.
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
_ADAMS_BASHFORTH_STABLE_STEP = {1: 2.0, 2: 1.0, 3: 6 / 11, 4: 3 / 10}


def plms_orders(sigmas: Tensor, sigmas_prev: Tensor, stiffness: float) -> list[int]:
    """The highest Adams-Bashforth order (1-4) that is stable on each PLMS step from noise level ``sigmas`` to
    ``sigmas_prev`` (``NoiseSchedule.sigmas`` units, float64 vectors, one per step), for eps of ``stiffness``
    (see below).

    ``stiffness`` bounds how fast eps changes with ``x_t``, ``sqrt(1 - a) |d eps / d x_t|``: 1 for an eps
    model alone (an exact one has 1 off the data), about the guidance scale for classifier-free guidance
    (``ClassifierFreeGuidance.stiffness``). Each step takes the highest order whose stability interval
    holds it, at most 4: with guidance, fourth order is unstable on the last steps of evenly spaced
    timesteps, where sigma falls by 20-70 % per step whatever the number of steps, and its overshoot
    changes colours and shapes (docs/samplers.md, "PLMS with guidance"). ``stiffness=0`` keeps order 4
    everywhere: ldm's PLMS and diffusers' PNDM without Runge-Kutta warm-up.

    A DDIM step is an Euler step of d xbar / d sigma = eps, xbar = x / sqrt(a), so a perturbation of xbar
    grows with -h lambda = stiffness * (sigma - sigma_prev) / sigma.
    """
    steps = (stiffness * (1 - sigmas_prev / sigmas)).tolist()  # tolist: no per-step reads of tensor values
    return [max(k for k, bound in _ADAMS_BASHFORTH_STABLE_STEP.items() if k == 1 or step <= bound)
            for step in steps]


@torch.no_grad()
def sample_plms(
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
    """PLMS (Liu et al. 2022, the original ldm PLMSSampler), ``x_T`` (B, C, h, w) -> latents, with its
    multistep order kept where it is stable.

    DDIM (eta = 0) steps over ``ddim_timesteps``, each driven by a linear multistep combination of
    the eps predictions so far (Adams-Bashforth of order up to 4). The first step has no history
    and uses a pseudo improved Euler step instead: the mean of eps at ``x_t`` and at the DDIM step's
    landing point, which costs one extra denoiser call (``num_steps + 1`` in all). v-predictions are
    turned into eps first. With ``num_steps = 1`` that extra call sees timestep 0, the level the step
    lands on (ldm reuses the current timestep there).

    Each step takes the highest order that is stable for ``stiffness`` (``plms_orders``).
    ``callback`` and ``start`` as in ``sample_ddim``; a run from
    ``start_step`` begins without history, so it makes ``num_steps - start_step + 1`` calls.
    """
    check_num_steps(num_steps, schedule.num_timesteps)
    check_parameterization(parameterization)
    if stiffness < 0:
        raise InputError(f"stiffness must be >= 0 (0 = ldm's PLMS, order 4 throughout), got {stiffness}")

    timesteps = ddim_timesteps(num_steps, schedule.num_timesteps)
    prev_timesteps = torch.cat([timesteps[1:], timesteps.new_zeros(1)])
    x_t = noised_start(x_T, schedule, timesteps, start)
    alphas = schedule.alphas_cumprod[timesteps]
    alphas_prev = schedule.alphas_cumprod[prev_timesteps]
    stable_orders = plms_orders(schedule.sigmas[timesteps], schedule.sigmas[prev_timesteps], stiffness)
    # A DDIM step written in eps alone: x_prev = sqrt(a_prev / a) x_t + eps_scale * eps.
    x_t_scales = per_step((alphas_prev / alphas).sqrt(), x_T)
    eps_scales = per_step((1 - alphas_prev).sqrt() - (alphas_prev * (1 - alphas) / alphas).sqrt(), x_T)
    sqrt_alphas = per_step(alphas.sqrt(), x_T)
    sqrt_one_minus_alphas = per_step((1 - alphas).sqrt(), x_T)
    sqrt_alphas_prev = per_step(alphas_prev.sqrt(), x_T)
    sqrt_one_minus_alphas_prev = per_step((1 - alphas_prev).sqrt(), x_T)
    timesteps = timesteps.to(x_T.device)
    prev_timesteps = prev_timesteps.to(x_T.device)

    batch_size = x_T.shape[0]
    earlier_eps: list[Tensor] = []  # newest first, at most 3
    for i in tqdm(range(start.start_step, num_steps), desc="PLMS", disable=not progress):
        _, eps = predict(denoiser, x_t, timesteps[i].expand(batch_size), sqrt_alphas[i], sqrt_one_minus_alphas[i],
                         parameterization, start.x0_transform)
        if earlier_eps:
            order = min(len(earlier_eps) + 1, stable_orders[i])
            eps_prime = sum(w * e for w, e in zip(_ADAMS_BASHFORTH[order], [eps, *earlier_eps], strict=False))
        else:
            x_euler = x_t_scales[i] * x_t + eps_scales[i] * eps
            _, eps_euler = predict(denoiser, x_euler, prev_timesteps[i].expand(batch_size), sqrt_alphas_prev[i],
                                   sqrt_one_minus_alphas_prev[i], parameterization, start.x0_transform)
            eps_prime = (eps + eps_euler) / 2
        x_t = x_t_scales[i] * x_t + eps_scales[i] * eps_prime
        earlier_eps = [eps, *earlier_eps[:2]]
        if callback is not None:
            callback(i, x_t)
    return x_t

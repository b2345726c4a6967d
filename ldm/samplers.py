"""Samplers: functions that integrate a denoiser from noise ``x_T`` back to latents.

Every sampler shares one contract, so new ones can be added as sibling functions:

- ``denoiser(x_t, t) -> model_output`` with ``x_t`` (B, C, h, w) and ``t`` (B,) long timestep
  indices on ``x_t``'s device; the output is eps or v according to ``parameterization``.
  Conditioning (e.g. classifier-free guidance, see ``ldm.guidance``) lives inside the denoiser.
- ``sample_<name>(denoiser, x_T, schedule, num_steps, ..., generator=None,
  parameterization="eps", progress=True, callback=None, init_latents=None, start_step=0,
  x0_transform=None) -> latents`` (B, C, h, w), with ``x_T`` ~ N(0, I) and
  ``callback(step_index, x_t)`` after every step.
- A start point (img2img, inpainting): with ``init_latents`` (B, C, h, w) the sampler runs only
  its steps ``start_step .. num_steps - 1`` (the callback sees these step indices), from
  ``init_latents`` noised with the noise ``x_T`` to the noise level of step ``start_step``
  (``noised_start``; the sigma samplers do the same in their units). Nothing from the skipped
  steps carries over, e.g. PLMS's multistep history starts empty, as in ldm's truncated PLMS runs.
- ``x0_transform(x0) -> x0`` (B, C, h, w), if given, edits every prediction of x0 before a step
  uses it, and eps is re-derived from the edited x0 at the sampler's own noise level (see
  ``predict``). Latent-blending inpainting pastes the known region there, which works the same
  for every sampler, also between training timesteps (Karras sigmas).
- Per-step scalars are built before the loop, so the loop never syncs host and device
  (``tests/test_pipeline.py`` counts the host reads of tensor values per run, for every sampler).
- Randomness comes only from ``generator``: one torch.Generator on ``x_T``'s device, or one per
  batch row so that each sample is reproducible on its own (see ``randn``).

This module holds the samplers over discrete timesteps (DDIM, DDPM, PLMS) and ``sample``, the one
entry point by name; the sigma-space samplers (Euler, Euler ancestral, Heun, DPM++ 2M) live in
``ldm.k_samplers``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from ldm.errors import InputError
from ldm.schedule import NoiseSchedule, check_parameterization, x0_and_eps_from_output

SAMPLERS: tuple[str, ...] = ("ddim", "ddpm", "plms", "euler", "euler_a", "heun", "dpmpp_2m")
SIGMA_SAMPLERS: tuple[str, ...] = ("euler", "euler_a", "heun", "dpmpp_2m")
# Steps each sampler gets when none are asked for (txt2img's --steps): about where its images stop changing
# much, at a comparable cost. DDIM and PLMS take the original SD scripts' 50; Euler too (first order, like
# DDIM). Heun makes two model evaluations per step, so 25 steps cost 49, about what 50 first-order steps do.
# DPM++ 2M is a second-order multistep method that is close to converged at 20 (Lu et al. 2022). The
# ancestral samplers' fresh noise loses quality fast as timesteps are skipped (Song et al. 2021, Table 1:
# eta = 1 needs hundreds of steps where eta = 0 needs tens), so DDPM and Euler ancestral get 250, a quarter
# of the training timesteps (on the bundled model Euler ancestral follows prompts 95.3 / 97.8 / 99.0 % of
# the time at 50 / 100 / 250 steps, DDIM at 50 98.8 %; docs/samplers.md). SD tools often run Euler
# ancestral at 20-50 steps on large models: pass --steps.
DEFAULT_STEPS: dict[str, int] = {"ddim": 50, "ddpm": 250, "plms": 50, "euler": 50, "euler_a": 250, "heun": 25,
                                 "dpmpp_2m": 20}
# Samplers that step on Karras et al.'s noise levels unless told otherwise (the "DPM++ 2M Karras" of SD
# tools): their higher-order steps overshoot on the long low-noise steps of evenly spaced timesteps, which
# Karras' levels split finer. On the bundled model at guidance 5 (1800 val captions, docs/samplers.md) Heun 25
# follows prompts 97.5 % of the time on evenly spaced levels and 98.8 % on Karras', DPM++ 2M 20 97.0 / 98.9 %,
# DDIM 50 99.1 %. Euler and Euler ancestral keep evenly spaced levels: there Euler is DDIM (98.7 %).
KARRAS_BY_DEFAULT: frozenset[str] = frozenset({"heun", "dpmpp_2m"})

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor], None]
X0Transform = Callable[[Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Standard normal noise (B, ...); with one generator per row, row k depends only on generator k."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
    return torch.stack(rows).to(device)


def check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    """Raise InputError unless 1 <= ``num_steps`` <= ``num_train_timesteps``."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise InputError(f"num_steps must be between 1 and {num_train_timesteps}, got {num_steps}")


def per_step(values: Tensor, like: Tensor) -> Tensor:
    """Move a float64 CPU vector of per-step scalars to ``like``'s dtype and device, once."""
    return values.to(dtype=like.dtype).to(device=like.device)


def check_start(num_steps: int, start_step: int, init_latents: Tensor | None, x_T: Tensor) -> None:
    """Raise InputError unless ``start_step`` is one of the ``num_steps`` steps and ``init_latents``,
    which a start past step 0 needs, have the shape of ``x_T``."""
    if not 0 <= start_step < num_steps:
        raise InputError(f"start_step must be between 0 and num_steps - 1 = {num_steps - 1}, got {start_step}")
    if init_latents is None:
        if start_step:
            raise InputError(f"start_step {start_step} needs init_latents to start from; pass them or start at 0")
    elif init_latents.shape != x_T.shape:
        raise InputError(f"init_latents must have the shape of x_T {tuple(x_T.shape)}, "
                         f"got {tuple(init_latents.shape)}")


def noised_start(x_T: Tensor, schedule: NoiseSchedule, timesteps: Tensor, init_latents: Tensor | None,
                 start_step: int) -> Tensor:
    """The first ``x_t`` (B, C, h, w) of a sampler over ``timesteps`` (num_steps,): ``x_T`` itself, or
    ``init_latents`` noised with the noise ``x_T`` to ``timesteps[start_step]`` (``schedule.add_noise``)."""
    check_start(len(timesteps), start_step, init_latents, x_T)
    if init_latents is None:
        return x_T
    t = timesteps[start_step].expand(x_T.shape[0])
    return schedule.add_noise(init_latents.to(x_T), x_T, t)


def predict(denoiser: Denoiser, x_t: Tensor, t: Tensor, sqrt_alpha: Tensor, sqrt_one_minus_alpha: Tensor,
            parameterization: str, x0_transform: X0Transform | None = None) -> tuple[Tensor, Tensor]:
    """``(x0, eps)`` (B, C, h, w) from the denoiser at ``x_t`` (B, C, h, w) of noise level
    ``sqrt_alpha``, ``sqrt_one_minus_alpha`` (the sampler's own, which between training timesteps
    need not be ``t``'s). ``x0_transform`` edits x0, and eps follows from it at that noise level."""
    x0, eps = x0_and_eps_from_output(denoiser(x_t, t), x_t, sqrt_alpha, sqrt_one_minus_alpha, parameterization)
    if x0_transform is None:
        return x0, eps
    x0 = x0_transform(x0)
    return x0, (x_t - sqrt_alpha * x0) / sqrt_one_minus_alpha


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
    eta: float = 0.0,
    generator: Generators = None,
    parameterization: str = "eps",
    progress: bool = True,
    callback: StepCallback | None = None,
    init_latents: Tensor | None = None,
    start_step: int = 0,
    x0_transform: X0Transform | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021) from ``x_T`` (B, C, h, w) to latents (B, C, h, w).

    ``eta`` = 0 is the deterministic sampler, ``eta`` = 1 has DDPM's posterior variance. The
    step after the last timestep goes to the noise level ``alphas_cumprod[0]`` (SD's
    ``set_alpha_to_one=False``). ``callback(step_index, x_t)`` is called after every step with
    the new ``x_t``. ``init_latents``, ``start_step`` and ``x0_transform`` as in the module
    docstring: from step ``start_step`` on, ``num_steps - start_step`` denoiser calls. Runs under
    ``torch.no_grad``.
    """
    check_num_steps(num_steps, schedule.num_timesteps)
    if eta < 0:
        raise InputError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
    check_parameterization(parameterization)

    timesteps = ddim_timesteps(num_steps, schedule.num_timesteps)
    x_t = noised_start(x_T, schedule, timesteps, init_latents, start_step)
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
    for i in tqdm(range(start_step, num_steps), desc="DDIM", disable=not progress):
        x0, eps = predict(denoiser, x_t, timesteps[i].expand(batch_size), sqrt_alphas[i], sqrt_one_minus_alphas[i],
                          parameterization, x0_transform)
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
    generator: Generators = None,
    parameterization: str = "eps",
    progress: bool = True,
    callback: StepCallback | None = None,
    init_latents: Tensor | None = None,
    start_step: int = 0,
    x0_transform: X0Transform | None = None,
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020) over a subset of timesteps, ``x_T`` (B, C, h, w) -> latents.

    Uses ``ddim_timesteps`` (where the step count divides 1000, diffusers' DDPMScheduler as SD ships it);
    each step draws from the posterior q(x_prev | x_t, x0) at the predicted x0, with the betas of
    the skipped stretch of timesteps and DDPM's posterior ("fixed small") variance. The last step
    lands on clean data (noise level 1, as DDPM's t = 0 step) and adds no noise; the others draw
    ``randn`` from ``generator``. ``callback``, ``init_latents``, ``start_step`` and
    ``x0_transform`` as in ``sample_ddim``.
    """
    check_num_steps(num_steps, schedule.num_timesteps)
    check_parameterization(parameterization)

    timesteps = ddim_timesteps(num_steps, schedule.num_timesteps)
    x_t = noised_start(x_T, schedule, timesteps, init_latents, start_step)
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
    for i in tqdm(range(start_step, num_steps), desc="DDPM", disable=not progress):
        x0, _ = predict(denoiser, x_t, timesteps[i].expand(batch_size), sqrt_alphas[i], sqrt_one_minus_alphas[i],
                        parameterization, x0_transform)
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
    (see ``sample_plms``).

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
    stiffness: float = 1.0,
    parameterization: str = "eps",
    progress: bool = True,
    callback: StepCallback | None = None,
    init_latents: Tensor | None = None,
    start_step: int = 0,
    x0_transform: X0Transform | None = None,
) -> Tensor:
    """PLMS (Liu et al. 2022, the original ldm PLMSSampler), ``x_T`` (B, C, h, w) -> latents, with its
    multistep order kept where it is stable.

    DDIM (eta = 0) steps over ``ddim_timesteps``, each driven by a linear multistep combination of
    the eps predictions so far (Adams-Bashforth of order up to 4). The first step has no history
    and uses a pseudo improved Euler step instead: the mean of eps at ``x_t`` and at the DDIM step's
    landing point, which costs one extra denoiser call (``num_steps + 1`` in all). v-predictions are
    turned into eps first. With ``num_steps = 1`` that extra call sees timestep 0, the level the step
    lands on (ldm reuses the current timestep there).

    ``stiffness`` bounds how fast eps changes with ``x_t``, ``sqrt(1 - a) |d eps / d x_t|``: 1 for an eps
    model alone (an exact one has 1 off the data), about the guidance scale for classifier-free guidance
    (``ClassifierFreeGuidance.stiffness``). Each step takes the highest order whose stability interval
    holds it (``plms_orders``), at most 4: with guidance, fourth order is unstable on the last steps of
    evenly spaced timesteps, where sigma falls by 20-70 % per step whatever ``num_steps``, and its
    overshoot changes colours and shapes (docs/samplers.md, "PLMS with guidance"). ``stiffness=0`` keeps
    order 4 everywhere: ldm's PLMS and diffusers' PNDM without Runge-Kutta warm-up.

    ``callback``, ``init_latents``, ``start_step`` and ``x0_transform`` as in ``sample_ddim``; a run from
    ``start_step`` begins without history, so it makes ``num_steps - start_step + 1`` calls.
    """
    check_num_steps(num_steps, schedule.num_timesteps)
    check_parameterization(parameterization)
    if stiffness < 0:
        raise InputError(f"stiffness must be >= 0 (0 = ldm's PLMS, order 4 throughout), got {stiffness}")

    timesteps = ddim_timesteps(num_steps, schedule.num_timesteps)
    prev_timesteps = torch.cat([timesteps[1:], timesteps.new_zeros(1)])
    x_t = noised_start(x_T, schedule, timesteps, init_latents, start_step)
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
    for i in tqdm(range(start_step, num_steps), desc="PLMS", disable=not progress):
        _, eps = predict(denoiser, x_t, timesteps[i].expand(batch_size), sqrt_alphas[i], sqrt_one_minus_alphas[i],
                         parameterization, x0_transform)
        if earlier_eps:
            order = min(len(earlier_eps) + 1, stable_orders[i])
            eps_prime = sum(w * e for w, e in zip(_ADAMS_BASHFORTH[order], [eps, *earlier_eps], strict=False))
        else:
            x_euler = x_t_scales[i] * x_t + eps_scales[i] * eps
            _, eps_euler = predict(denoiser, x_euler, prev_timesteps[i].expand(batch_size), sqrt_alphas_prev[i],
                                   sqrt_one_minus_alphas_prev[i], parameterization, x0_transform)
            eps_prime = (eps + eps_euler) / 2
        x_t = x_t_scales[i] * x_t + eps_scales[i] * eps_prime
        earlier_eps = [eps, *earlier_eps[:2]]
        if callback is not None:
            callback(i, x_t)
    return x_t


def sample(
    name: str,
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    eta: float = 0.0,
    karras: bool | None = None,
    stiffness: float = 1.0,
    generator: Generators = None,
    parameterization: str = "eps",
    progress: bool = True,
    callback: StepCallback | None = None,
    init_latents: Tensor | None = None,
    start_step: int = 0,
    x0_transform: X0Transform | None = None,
) -> Tensor:
    """Run the sampler called ``name`` (one of SAMPLERS) from ``x_T`` (B, C, h, w) ~ N(0, I) to latents.

    ``eta`` applies to "ddim" only, ``karras`` (Karras et al. sigmas; None: the sampler's default, on
    for KARRAS_BY_DEFAULT) to SIGMA_SAMPLERS only; ``stiffness`` (how fast the denoiser's eps can change
    with x_t, e.g. ``ClassifierFreeGuidance.stiffness``) sets the orders PLMS may use (see ``sample_plms``)
    and does not matter to the others; ``generator`` feeds the stochastic ones (ddim with
    eta > 0, ddpm, euler_a) and is ignored by the others. img2img and inpainting: ``init_latents``
    (B, C, h, w) noised with ``x_T`` to the level of step ``start_step``, from where the sampler runs its
    remaining steps; ``x0_transform`` edits each prediction of x0 (see the module docstring). Raises
    InputError for an unknown name or an option the sampler does not take.
    """
    # Imported here: ldm.k_samplers builds on this module's helpers.
    from ldm import k_samplers

    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if karras is None:
        karras = name in KARRAS_BY_DEFAULT
    if karras and name not in SIGMA_SAMPLERS:
        raise InputError(f"karras sigmas work only with the samplers {', '.join(SIGMA_SAMPLERS)}; "
                         f"drop karras for {name!r}")
    if eta != 0 and name != "ddim":
        raise InputError(f"eta applies only to the ddim sampler; set eta to 0 for {name!r}")

    common = {"parameterization": parameterization, "progress": progress, "callback": callback,
              "init_latents": init_latents, "start_step": start_step, "x0_transform": x0_transform}
    if name == "ddim":
        return sample_ddim(denoiser, x_T, schedule, num_steps, eta=eta, generator=generator, **common)
    if name == "ddpm":
        return sample_ddpm(denoiser, x_T, schedule, num_steps, generator=generator, **common)
    if name == "plms":
        return sample_plms(denoiser, x_T, schedule, num_steps, stiffness=stiffness, **common)
    if name == "euler_a":
        return k_samplers.sample_euler_ancestral(denoiser, x_T, schedule, num_steps, karras=karras,
                                                 generator=generator, **common)
    ode_samplers = {"euler": k_samplers.sample_euler, "heun": k_samplers.sample_heun,
                    "dpmpp_2m": k_samplers.sample_dpmpp_2m}
    return ode_samplers[name](denoiser, x_T, schedule, num_steps, karras=karras, **common)

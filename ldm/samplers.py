"""Samplers: functions that integrate a denoiser from noise ``x_T`` back to latents.

Every sampler shares one contract, so new ones can be added as sibling functions:

- ``denoiser(x_t, t) -> model_output`` with ``x_t`` (B, C, h, w) and ``t`` (B,) long timestep
  indices on ``x_t``'s device; the output is eps or v according to ``parameterization``.
  Conditioning (e.g. classifier-free guidance, see ``ldm.guidance``) lives inside the denoiser.
- ``sample_<name>(denoiser, x_T, schedule, num_steps, ..., generator=None,
  parameterization="eps", progress=True, callback=None) -> latents`` (B, C, h, w).
- Per-step scalars are built before the loop, so the loop never syncs host and device.
- Randomness comes only from ``generator``: one torch.Generator on ``x_T``'s device, or one per
  batch row so that each sample is reproducible on its own (see ``randn``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from ldm.schedule import NoiseSchedule, check_parameterization, x0_and_eps_from_output

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor], None]


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Standard normal noise (B, ...); with one generator per row, row k depends only on generator k."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
    return torch.stack(rows).to(device)


def _check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_steps must be between 1 and {num_train_timesteps}, got {num_steps}"
        )


def _per_step(values: Tensor, like: Tensor) -> Tensor:
    """Move a float64 CPU vector of per-step scalars to ``like``'s dtype and device, once."""
    return values.to(dtype=like.dtype).to(device=like.device)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """SD's evenly spaced ("leading", offset 1) timesteps, in sampling order (descending).

    Returns a ``(num_steps,)`` long tensor ``[(num_steps - 1) * k + 1, ..., k + 1, 1]`` with
    ``k = num_train_timesteps // num_steps`` (diffusers' DDIMScheduler as SD ships it). The
    offset is dropped when it would step past the last index, i.e. for ``num_steps`` equal to
    ``num_train_timesteps``.
    """
    _check_num_steps(num_steps, num_train_timesteps)
    stride = num_train_timesteps // num_steps
    offset = 1 if (num_steps - 1) * stride + 1 < num_train_timesteps else 0
    return torch.arange(num_steps - 1, -1, -1, dtype=torch.long) * stride + offset


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
) -> Tensor:
    """DDIM (Song et al. 2021) from ``x_T`` (B, C, h, w) to latents (B, C, h, w).

    ``eta`` = 0 is the deterministic sampler, ``eta`` = 1 has DDPM's posterior variance. The
    step after the last timestep goes to the noise level ``alphas_cumprod[0]`` (SD's
    ``set_alpha_to_one=False``). ``callback(step_index, x_t)`` is called after every step with
    the new ``x_t``. Runs under ``torch.no_grad``.
    """
    _check_num_steps(num_steps, schedule.num_timesteps)
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
    check_parameterization(parameterization)

    timesteps = ddim_timesteps(num_steps, schedule.num_timesteps)
    alphas = schedule.alphas_cumprod[timesteps]
    alphas_prev = torch.cat([alphas[1:], schedule.alphas_cumprod[:1]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    direction_variances = 1 - alphas_prev - sigmas**2
    if (direction_variances < 0).any():
        raise ValueError(f"eta={eta} adds more noise than a DDIM step allows; use eta <= 1")

    sqrt_alphas = _per_step(alphas.sqrt(), x_T)
    sqrt_one_minus_alphas = _per_step((1 - alphas).sqrt(), x_T)
    sqrt_alphas_prev = _per_step(alphas_prev.sqrt(), x_T)
    direction_scales = _per_step(direction_variances.sqrt(), x_T)
    noise_scales = _per_step(sigmas, x_T)
    timesteps = timesteps.to(x_T.device)

    x_t = x_T
    batch_size = x_T.shape[0]
    for i in tqdm(range(num_steps), desc="DDIM", disable=not progress):
        model_output = denoiser(x_t, timesteps[i].expand(batch_size))
        x0, eps = x0_and_eps_from_output(
            model_output, x_t, sqrt_alphas[i], sqrt_one_minus_alphas[i], parameterization
        )
        x_t = sqrt_alphas_prev[i] * x0 + direction_scales[i] * eps
        if eta > 0:
            noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
            x_t = x_t + noise_scales[i] * noise
        if callback is not None:
            callback(i, x_t)
    return x_t

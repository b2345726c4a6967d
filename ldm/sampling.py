"""The contract every sampler keeps, and the helpers they share.

- ``denoiser(x_t, t) -> model_output`` with ``x_t`` (B, C, h, w) and ``t`` (B,) long timestep
  indices on ``x_t``'s device; the output is eps or v according to ``parameterization``.
  Conditioning (e.g. classifier-free guidance, see ``ldm.guidance``) lives inside the denoiser.
- A sampler is ``sample_<name>(denoiser, x_T, schedule, num_steps, *, eta, karras, stiffness,
  generator, parameterization, progress, callback, start) -> latents`` (B, C, h, w), with ``x_T`` ~
  N(0, I) and ``callback(step_index, x_t)`` after every step. Options a sampler has no use for are
  ignored; ``ldm.samplers.sample`` refuses them by name.
- A ``StartPoint`` (img2img, inpainting): with ``init_latents`` (B, C, h, w) the sampler runs only
  its steps ``start_step .. num_steps - 1`` (the callback sees these step indices), from
  ``init_latents`` noised with the noise ``x_T`` to the noise level of step ``start_step``
  (``noised_start``; the sigma samplers do the same in their units). Nothing from the skipped
  steps carries over, e.g. PLMS's multistep history starts empty, as in ldm's truncated PLMS runs.
  Its ``x0_transform(x0) -> x0`` (B, C, h, w), if given, edits every prediction of x0 before a step
  uses it, and eps is re-derived from the edited x0 at the sampler's own noise level (see
  ``predict``). Latent-blending inpainting pastes the known region there, which works the same
  for every sampler, also between training timesteps (Karras sigmas).
- Per-step scalars are built before the loop, so the loop never syncs host and device
  (``tests/test_pipeline.py`` counts the host reads of tensor values per run, for every sampler).
- Randomness comes only from ``generator``: one torch.Generator on ``x_T``'s device, or one per
  batch row so that each sample is reproducible on its own (see ``randn``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.errors import InputError
from ldm.schedule import NoiseSchedule, x0_and_eps_from_output

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor], None]
X0Transform = Callable[[Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts when it does not start from pure noise (img2img, inpainting): ``init_latents``
    (B, C, h, w) noised to the level of step ``start_step``, and an optional ``x0_transform``."""

    init_latents: Tensor | None = None
    start_step: int = 0
    x0_transform: X0Transform | None = None


FROM_NOISE = StartPoint()


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


def check_start(num_steps: int, start: StartPoint, x_T: Tensor) -> None:
    """Raise InputError unless ``start.start_step`` is one of the ``num_steps`` steps and its
    ``init_latents``, which a start past step 0 needs, have the shape of ``x_T``."""
    if not 0 <= start.start_step < num_steps:
        raise InputError(f"start_step must be between 0 and num_steps - 1 = {num_steps - 1}, "
                         f"got {start.start_step}")
    if start.init_latents is None:
        if start.start_step:
            raise InputError(f"start_step {start.start_step} needs init_latents to start from; pass them or "
                             "start at 0")
    elif start.init_latents.shape != x_T.shape:
        raise InputError(f"init_latents must have the shape of x_T {tuple(x_T.shape)}, "
                         f"got {tuple(start.init_latents.shape)}")


def noised_start(x_T: Tensor, schedule: NoiseSchedule, timesteps: Tensor, start: StartPoint) -> Tensor:
    """The first ``x_t`` (B, C, h, w) of a sampler over ``timesteps`` (num_steps,): ``x_T`` itself, or
    ``start.init_latents`` noised with the noise ``x_T`` to ``timesteps[start.start_step]``
    (``schedule.add_noise``)."""
    check_start(len(timesteps), start, x_T)
    if start.init_latents is None:
        return x_T
    t = timesteps[start.start_step].expand(x_T.shape[0])
    return schedule.add_noise(start.init_latents.to(x_T), x_T, t)


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



"""The sampler registry: every sampler by name, with what it takes, and ``sample``, the one entry point.

A sampler is a function over a denoiser callable (the contract is in ``ldm.sampling``); the ones over
training timesteps live in ``ldm.timestep_samplers``, the sigma-space ones in ``ldm.k_samplers``.
Adding a sampler is its function plus one ``REGISTRY`` entry: the CLI's choices, the default step
counts and the option checks below follow from the entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ldm import k_samplers, timestep_samplers
from ldm.errors import InputError
from ldm.sampling import FROM_NOISE, Denoiser, Generators, StartPoint, StepCallback
from ldm.schedule import NoiseSchedule


@dataclass(frozen=True)
class Sampler:
    """A sampler and its defaults.

    ``default_steps``: the steps it gets when none are asked for, about where its images stop changing
    much at a comparable cost (docs/samplers.md has the measurements). ``sigma_space``: it steps on noise
    levels rather than training timesteps, so it can take Karras et al.'s levels; ``karras_by_default``:
    it does unless told otherwise, because its higher-order steps overshoot on the long low-noise steps
    of evenly spaced levels, which Karras' levels split finer. ``takes_eta``: DDIM's eta applies.
    ``deterministic``: the same noise always gives the same latents.
    """

    function: Callable[..., Tensor]
    default_steps: int
    sigma_space: bool = False
    karras_by_default: bool = False
    takes_eta: bool = False
    deterministic: bool = True


# DDIM and PLMS take the original SD scripts' 50 steps, Euler too (first order, like DDIM). Heun makes two
# model evaluations per step, so 25 steps cost 49. DPM++ 2M is second-order multistep, close to converged at
# 20 (Lu et al. 2022). The ancestral samplers' fresh noise loses quality fast as timesteps are skipped (Song
# et al. 2021, Table 1: eta = 1 needs hundreds of steps where eta = 0 needs tens), so DDPM and Euler
# ancestral get 250, a quarter of the training timesteps; SD tools often run Euler ancestral at 20-50 steps
# on large models: pass the steps.
REGISTRY: dict[str, Sampler] = {
    "ddim": Sampler(timestep_samplers.sample_ddim, 50, takes_eta=True),
    "ddpm": Sampler(timestep_samplers.sample_ddpm, 250, deterministic=False),
    "plms": Sampler(timestep_samplers.sample_plms, 50),
    "euler": Sampler(k_samplers.sample_euler, 50, sigma_space=True),
    "euler_a": Sampler(k_samplers.sample_euler_ancestral, 250, sigma_space=True, deterministic=False),
    "heun": Sampler(k_samplers.sample_heun, 25, sigma_space=True, karras_by_default=True),
    "dpmpp_2m": Sampler(k_samplers.sample_dpmpp_2m, 20, sigma_space=True, karras_by_default=True),
}
SAMPLERS: tuple[str, ...] = tuple(REGISTRY)
SIGMA_SAMPLERS: tuple[str, ...] = tuple(name for name, s in REGISTRY.items() if s.sigma_space)
DETERMINISTIC_SAMPLERS: tuple[str, ...] = tuple(name for name, s in REGISTRY.items() if s.deterministic)
DEFAULT_STEPS: dict[str, int] = {name: s.default_steps for name, s in REGISTRY.items()}
KARRAS_BY_DEFAULT: frozenset[str] = frozenset(name for name, s in REGISTRY.items() if s.karras_by_default)


def get_sampler(name: str) -> Sampler:
    """The registry entry of ``name``; InputError naming the choices for an unknown one."""
    if name not in REGISTRY:
        raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return REGISTRY[name]


def check_options(name: str, karras: bool | None, eta: float) -> Sampler:
    """The registry entry of ``name`` after checking that it takes ``karras`` and ``eta``; InputError if not."""
    sampler = get_sampler(name)
    if karras and not sampler.sigma_space:
        raise InputError(f"karras sigmas work only with the samplers {', '.join(SIGMA_SAMPLERS)}; "
                         f"drop karras for {name!r}")
    if eta != 0 and not sampler.takes_eta:
        raise InputError(f"eta applies only to the ddim sampler; set eta to 0 for {name!r}")
    return sampler


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
    start: StartPoint = FROM_NOISE,
) -> Tensor:
    """Run the sampler called ``name`` (one of SAMPLERS) from ``x_T`` (B, C, h, w) ~ N(0, I) to latents.

    ``eta`` applies to samplers that take it (ddim), ``karras`` (Karras et al. sigmas; None: the sampler's
    default) to SIGMA_SAMPLERS only; ``stiffness`` (how fast the denoiser's eps can change with x_t, e.g.
    ``ClassifierFreeGuidance.stiffness``) sets the orders PLMS may use and does not matter to the others;
    ``generator`` feeds the stochastic ones and is ignored by the others. img2img and inpainting:
    ``start`` (see ``ldm.sampling``). Raises InputError for an unknown name or an option the sampler does
    not take.
    """
    sampler = check_options(name, karras, eta)
    if karras is None:
        karras = sampler.karras_by_default
    return sampler.function(denoiser, x_T, schedule, num_steps, eta=eta, karras=karras, stiffness=stiffness,
                            generator=generator, parameterization=parameterization, progress=progress,
                            callback=callback, start=start)

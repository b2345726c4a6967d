"""The SDXL base-to-refiner hand-off: the base model denoises the high-noise part of the schedule and the
refiner, trained on low noise levels only, the rest, on the same latents in one sampler run (the
"ensemble of expert denoisers" of the SDXL report, Podell et al. 2023)."""

from __future__ import annotations

from torch import Tensor

from ldm.sampling import Denoiser


def switch_timestep(switch: float, num_timesteps: int) -> int:
    """The first timestep the refiner denoises after the base has run `switch` of the noise schedule:
    0.8 of 1000 timesteps leaves the refiner t < 200, as diffusers' `denoising_end` / `denoising_start`."""
    return round(num_timesteps * (1 - switch))


class RefinerSwitch:
    """Denoiser `(x_t, t) -> output`: the base's for t >= `timestep`, the refiner's below it.

    Which model runs is decided on the host, so each call reads `t` back once; samplers otherwise never
    sync (see `ldm.sampling`), but next to an SDXL U-Net call the read costs nothing measurable.
    Multistep samplers keep their history across the switch: it is one run on one set of latents.
    """

    def __init__(self, base: Denoiser, refiner: Denoiser, timestep: int) -> None:
        self.base, self.refiner, self.timestep = base, refiner, timestep

    @property
    def stiffness(self) -> float:
        return max(getattr(self.base, "stiffness", 1.0), getattr(self.refiner, "stiffness", 1.0))

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        denoiser = self.base if t.max().item() >= self.timestep else self.refiner
        return denoiser(x_t, t)

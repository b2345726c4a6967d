"""Discrete DDPM noise schedule and the algebra between x0, eps and v.

Timesteps are integer indices ``0 .. num_timesteps - 1`` as in the original ldm code; index ``t``
means "after ``t + 1`` noising steps", so ``alphas_cumprod[0] < 1``. A noisy sample is
``x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps`` with ``a_t = alphas_cumprod[t]``, and the
v-target is ``v = sqrt(a_t) * eps - sqrt(1 - a_t) * x0``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "cosine")
PARAMETERIZATIONS = ("eps", "v")


def check_parameterization(parameterization: str) -> None:
    """Raise ValueError unless ``parameterization`` is one of PARAMETERIZATIONS."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
        )


def _linear_betas(num_timesteps: int, linear_start: float, linear_end: float) -> Tensor:
    # SD's "linear" is linear in sqrt(beta) (diffusers calls it "scaled_linear").
    root = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64)
    return root**2


def _cosine_betas(num_timesteps: int, cosine_s: float) -> Tensor:
    # Nichol & Dhariwal: alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2) on u in [0, 1].
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    # The cap keeps the last steps from destroying the signal in one jump (beta -> 1).
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0.0, 0.999)


def x0_and_eps_from_output(
    model_output: Tensor,
    x_t: Tensor,
    sqrt_alpha: Tensor,
    sqrt_one_minus_alpha: Tensor,
    parameterization: str = "eps",
) -> tuple[Tensor, Tensor]:
    """Turn a model prediction into ``(x0, eps)`` given the noise level of ``x_t``.

    ``model_output`` and ``x_t`` are ``(B, C, h, w)``; ``sqrt_alpha`` and ``sqrt_one_minus_alpha``
    are ``sqrt(a_t)`` and ``sqrt(1 - a_t)``, broadcastable to ``x_t`` (e.g. ``(B, 1, 1, 1)`` or 0-d).
    Samplers call this with per-step scalars they built up front.
    """
    check_parameterization(parameterization)
    if parameterization == "eps":
        x0 = (x_t - sqrt_one_minus_alpha * model_output) / sqrt_alpha
        return x0, model_output
    x0 = sqrt_alpha * x_t - sqrt_one_minus_alpha * model_output
    eps = sqrt_one_minus_alpha * x_t + sqrt_alpha * model_output
    return x0, eps


class NoiseSchedule:
    """Betas and cumulative alphas of a discrete diffusion process, built from SD YAML names.

    ``betas`` and ``alphas_cumprod`` are ``(num_timesteps,)`` float64 CPU tensors (computed and
    kept in float64 like the original ldm code; they are cast to the data's dtype only when used).
    ``sigmas`` is the noise level of each timestep in the variance-exploding view, ``x_t / sqrt(a_t) =
    x0 + sigma_t * eps`` with ``sigma_t = sqrt((1 - a_t) / a_t)``, increasing with t (float64, as above).

    Args:
        num_timesteps: number of training timesteps T (SD YAML ``timesteps``).
        linear_start: first beta of the "linear" schedule (SD YAML ``linear_start``).
        linear_end: last beta of the "linear" schedule (SD YAML ``linear_end``).
        beta_schedule: "linear" (linear in sqrt(beta), as SD) or "cosine".
        cosine_s: offset of the "cosine" schedule (SD YAML ``cosine_s``).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        beta_schedule: str = "linear",
        cosine_s: float = 8e-3,
    ) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if beta_schedule == "linear":
            betas = _linear_betas(num_timesteps, linear_start, linear_end)
        elif beta_schedule == "cosine":
            betas = _cosine_betas(num_timesteps, cosine_s)
        else:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        self.num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self._sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self._sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_timesteps={self.num_timesteps}, {self.beta_schedule!r})"

    def _gather(self, values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        # Cast on the host before moving: some backends (MPS) have no float64.
        values = values.to(dtype=like.dtype).to(device=like.device)
        return values[t.to(like.device)].reshape(-1, *([1] * (like.ndim - 1)))

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(sqrt(a_t), sqrt(1 - a_t))`` for timesteps ``t`` (B,) long, each ``(B, 1, ..., 1)``
        in ``like``'s dtype and device, ready to broadcast against ``like`` (B, C, h, w)."""
        return (
            self._gather(self._sqrt_alphas_cumprod, t, like),
            self._gather(self._sqrt_one_minus_alphas_cumprod, t, like),
        )

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample ``x_t ~ q(x_t | x0)``: ``x0``, ``noise`` (B, C, h, w), ``t`` (B,) long -> x_t."""
        sqrt_alpha, sqrt_one_minus_alpha = self.coefficients(t, x0)
        return sqrt_alpha * x0 + sqrt_one_minus_alpha * noise

    def v_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Velocity target ``sqrt(a_t) noise - sqrt(1 - a_t) x0``: (B, C, h, w), ``t`` (B,) long."""
        sqrt_alpha, sqrt_one_minus_alpha = self.coefficients(t, x0)
        return sqrt_alpha * noise - sqrt_one_minus_alpha * x0

    def predict_x0_and_eps(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, parameterization: str = "eps"
    ) -> tuple[Tensor, Tensor]:
        """``(x0, eps)`` implied by a model's eps- or v-prediction.

        ``model_output`` and ``x_t`` are ``(B, C, h, w)``; ``t`` is ``(B,)`` long.
        """
        sqrt_alpha, sqrt_one_minus_alpha = self.coefficients(t, x_t)
        return x0_and_eps_from_output(
            model_output, x_t, sqrt_alpha, sqrt_one_minus_alpha, parameterization
        )

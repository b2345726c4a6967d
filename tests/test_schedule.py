from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from ldm.schedule import NoiseSchedule


def _sd_ddpm() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )


def test_linear_betas_match_closed_form() -> None:
    schedule = NoiseSchedule(num_timesteps=1000, linear_start=0.00085, linear_end=0.012)
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    expected = torch.tensor(
        [(lo + (hi - lo) * i / 999) ** 2 for i in range(1000)], dtype=torch.float64
    )
    assert schedule.betas.shape == (1000,)
    torch.testing.assert_close(schedule.betas, expected, rtol=1e-12, atol=0)
    cumprod = torch.tensor(
        [math.prod(1 - b for b in expected[: i + 1].tolist()) for i in range(0, 1000, 111)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(schedule.alphas_cumprod[::111], cumprod, rtol=1e-12, atol=0)


def test_alphas_cumprod_match_diffusers_scaled_linear() -> None:
    schedule = NoiseSchedule()
    reference = _sd_ddpm().alphas_cumprod.double()
    assert (schedule.alphas_cumprod - reference).abs().max() < 1e-6


def test_cosine_matches_diffusers_squaredcos() -> None:
    schedule = NoiseSchedule(num_timesteps=1000, beta_schedule="cosine")
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    # diffusers computes these in float64 and stores them in float32.
    torch.testing.assert_close(schedule.betas.float(), reference.betas, rtol=1e-6, atol=1e-7)


def test_bad_beta_schedule_raises() -> None:
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(beta_schedule="quadratic")


def test_add_noise_and_v_target_match_diffusers() -> None:
    schedule, reference = NoiseSchedule(), _sd_ddpm()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=gen)
    noise = torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(
        schedule.add_noise(x0, noise, t), reference.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        schedule.v_target(x0, noise, t), reference.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_conversions_round_trip(parameterization: str) -> None:
    schedule = NoiseSchedule()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(5, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 998, 999])
    x_t = schedule.add_noise(x0, noise, t)
    target = noise if parameterization == "eps" else schedule.v_target(x0, noise, t)
    x0_hat, eps_hat = schedule.predict_x0_and_eps(target, x_t, t, parameterization)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-12)


def test_v_is_derivative_of_x_t_along_the_noise_circle() -> None:
    # With x_t = cos(phi) x0 + sin(phi) eps, v = d x_t / d phi; an independent check of the formula.
    schedule = NoiseSchedule()
    x0 = torch.tensor([[0.3]], dtype=torch.float64)
    noise = torch.tensor([[-1.2]], dtype=torch.float64)
    t = torch.tensor([400])
    phi = math.acos(math.sqrt(schedule.alphas_cumprod[400].item()))
    expected = -math.sin(phi) * 0.3 + math.cos(phi) * -1.2
    assert schedule.v_target(x0, noise, t).item() == pytest.approx(expected, abs=1e-12)


def test_coefficients_follow_data_dtype() -> None:
    schedule = NoiseSchedule()
    x = torch.zeros(2, 4, 3, 3, dtype=torch.bfloat16)
    sqrt_alpha, sqrt_one_minus_alpha = schedule.coefficients(torch.tensor([3, 900]), x)
    assert sqrt_alpha.dtype == torch.bfloat16 and sqrt_alpha.shape == (2, 1, 1, 1)
    assert sqrt_one_minus_alpha.dtype == torch.bfloat16


def test_bad_parameterization_raises() -> None:
    schedule = NoiseSchedule()
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="parameterization"):
        schedule.predict_x0_and_eps(x, x, torch.tensor([5]), "x0")

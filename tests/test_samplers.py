from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch import Tensor

from ldm.samplers import ddim_timesteps, sample_ddim
from ldm.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule()


def _alpha(t: Tensor, like: Tensor) -> Tensor:
    return SCHEDULE.alphas_cumprod[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _as_output(x_t: Tensor, t: Tensor, x0: Tensor, parameterization: str) -> Tensor:
    """The exact eps or v a perfect model would output, given the exact E[x0 | x_t]."""
    a = _alpha(t, x_t)
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    return eps if parameterization == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0


def _delta_denoiser(x0_star: Tensor, parameterization: str):
    """Exact denoiser for data that is the single point ``x0_star``."""
    return lambda x_t, t: _as_output(x_t, t, x0_star.expand_as(x_t), parameterization)


def _gaussian_denoiser(mu: Tensor, s: Tensor, parameterization: str):
    """Exact denoiser for data ~ N(mu, s^2) per channel: E[x0|x_t] is linear in x_t."""

    def denoiser(x_t: Tensor, t: Tensor) -> Tensor:
        a = _alpha(t, x_t)
        x0 = mu + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x_t - a.sqrt() * mu)
        return _as_output(x_t, t, x0, parameterization)

    return denoiser


def _sd_ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )


@pytest.mark.parametrize("num_steps", [1, 7, 10, 50, 999])
def test_ddim_timesteps_match_diffusers(num_steps: int) -> None:
    reference = _sd_ddim_scheduler()
    reference.set_timesteps(num_steps)
    timesteps = ddim_timesteps(num_steps)
    assert timesteps.dtype == torch.long
    assert torch.equal(timesteps, reference.timesteps)


def test_ddim_timesteps_with_all_training_steps_stay_in_range() -> None:
    assert torch.equal(ddim_timesteps(1000), torch.arange(999, -1, -1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 1001}, "num_steps"),
        ({"eta": -0.5}, "eta"),
        ({"eta": 3.0}, "eta"),
        ({"parameterization": "x0"}, "parameterization"),
    ],
)
def test_sample_ddim_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    calls = []

    def denoiser(x_t: Tensor, t: Tensor) -> Tensor:
        calls.append(t)
        return x_t

    arguments = {"num_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_ddim(denoiser, torch.zeros(1, 4, 2, 2), SCHEDULE, progress=False, **arguments)
    assert not calls


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_delta_data_lands_on_closed_form(parameterization: str) -> None:
    # With data = {x0*}, the eps of x_T never changes along the eta=0 flow, so the sampler must end
    # at sqrt(a_0) x0* + sqrt(1 - a_0) eps_T; a_0 = alphas_cumprod[0] (SD's final noise level).
    gen = torch.Generator().manual_seed(0)
    x0_star = torch.randn(1, 4, 8, 8, generator=gen)
    x_T = 3 * torch.randn(2, 4, 8, 8, generator=gen)
    denoiser = _delta_denoiser(x0_star, parameterization)
    latents = sample_ddim(denoiser, x_T, SCHEDULE, 10, parameterization=parameterization,
                          progress=False)
    a_T = SCHEDULE.alphas_cumprod[901].item()
    a_0 = SCHEDULE.alphas_cumprod[0].item()
    eps_T = (x_T - math.sqrt(a_T) * x0_star) / math.sqrt(1 - a_T)
    expected = math.sqrt(a_0) * x0_star + math.sqrt(1 - a_0) * eps_T
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)
    # The one step left to a noise-free sample recovers x0* itself.
    x0_hat, _ = SCHEDULE.predict_x0_and_eps(
        denoiser(latents, torch.zeros(2, dtype=torch.long)), latents, torch.zeros(2, dtype=torch.long),
        parameterization,
    )
    torch.testing.assert_close(x0_hat, x0_star.expand_as(x0_hat), rtol=0, atol=1e-5)


def test_ddim_stochastic_delta_data_keeps_marginal() -> None:
    # For a delta, x0_hat is the true x0, so every eta samples q(x_prev | x_t, x0) exactly and the
    # marginal N(sqrt(a) x0*, (1 - a) I) is preserved. 65536 values: the standard error of the
    # mean is 1/256 and of the std about 1/362; 5 standard errors gives the tolerances below.
    gen = torch.Generator().manual_seed(1)
    x0_star = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    a_T, a_0 = SCHEDULE.alphas_cumprod[901], SCHEDULE.alphas_cumprod[0]
    z = torch.randn(256, 4, 8, 8, generator=gen, dtype=torch.float64)
    x_T = a_T.sqrt() * x0_star + (1 - a_T).sqrt() * z
    latents = sample_ddim(_delta_denoiser(x0_star, "eps"), x_T, SCHEDULE, 10, eta=1.0,
                          generator=gen, progress=False)
    standardized = (latents - a_0.sqrt() * x0_star) / (1 - a_0).sqrt()
    assert abs(standardized.mean().item()) < 5 / 256
    assert abs(standardized.std().item() - 1) < 5 / 362
    # The end point must not be a deterministic function of x_T: fresh noise was injected.
    assert (standardized - z).std().item() > 0.5


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_is_euler_on_probability_flow_for_gaussian_data(parameterization: str) -> None:
    # DDIM (eta=0) is Euler's method for d xbar / d sigma = eps(xbar) with xbar = x / sqrt(a),
    # sigma = sqrt((1 - a) / a). For data N(mu, s^2), eps = sigma (xbar - mu) / (s^2 + sigma^2),
    # so each step multiplies (xbar - mu) by 1 + sigma_i (sigma_{i+1} - sigma_i) / (s^2 + sigma_i^2).
    mu = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64).view(1, 4, 1, 1)
    s = torch.tensor([0.5, 0.3, 1.5, 1.0], dtype=torch.float64).view(1, 4, 1, 1)
    x_T = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    latents = sample_ddim(_gaussian_denoiser(mu, s, parameterization), x_T, SCHEDULE, 20,
                          parameterization=parameterization, progress=False)

    alphas = [SCHEDULE.alphas_cumprod[t].item() for t in range(951, 0, -50)]
    alphas.append(SCHEDULE.alphas_cumprod[0].item())
    sigmas = [math.sqrt((1 - a) / a) for a in alphas]
    gain = torch.ones_like(s)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        gain = gain * (1 + sigma * (sigma_next - sigma) / (s**2 + sigma**2))
    expected = math.sqrt(alphas[-1]) * (mu + gain * (x_T / math.sqrt(alphas[0]) - mu))
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-10)


def test_ddim_gaussian_data_statistics_approach_exact_flow() -> None:
    # x_T ~ N(0, I) through DDIM with the exact denoiser of N(mu, s^2) data. The exact flow maps
    # N(0, 1) at the first noise level a_T onto mean m_0 - (sd_0 / sd_T) m_T, std sd_0 / sd_T, where
    # m = sqrt(a) mu and sd^2 = a s^2 + 1 - a are the true marginals at a_T and a_0. That is
    # (mu, s) up to a_0 = 0.99915 and to SD's nonzero a_T, which leaves a bias of about
    # -sqrt(a_T) mu in the mean (~ -0.07 mu at 50 steps). DDIM is first order, so its error must
    # shrink ~10x from 5 to 50 steps (asserted: > 4x); at 50 steps the tolerance is that
    # Euler discretization error (computed in closed form) plus 5 Monte Carlo standard errors.
    mu = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
    s = torch.tensor([0.5, 0.3, 1.5, 1.0], dtype=torch.float64)
    shape = (1, 4, 1, 1)
    x_T = torch.randn(4096, 4, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    num_values = 4096 * 2 * 2  # per channel
    denoiser = _gaussian_denoiser(mu.view(shape), s.view(shape), "eps")

    errors = {}
    for num_steps in (5, 50):
        timesteps = list(range(1000 - 1000 // num_steps + 1, 0, -(1000 // num_steps)))
        alphas = [SCHEDULE.alphas_cumprod[t].item() for t in timesteps]
        a_T, a_0 = alphas[0], SCHEDULE.alphas_cumprod[0].item()
        sd_T, sd_0 = (a_T * s**2 + 1 - a_T).sqrt(), (a_0 * s**2 + 1 - a_0).sqrt()
        exact_std = sd_0 / sd_T
        exact_mean = math.sqrt(a_0) * mu - exact_std * math.sqrt(a_T) * mu

        sigmas = [math.sqrt((1 - a) / a) for a in [*alphas, a_0]]
        gain = torch.ones_like(s)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            gain = gain * (1 + sigma * (sigma_next - sigma) / (s**2 + sigma**2))
        euler_std = math.sqrt(a_0 / a_T) * gain
        euler_mean = math.sqrt(a_0) * (mu - gain * mu)

        latents = sample_ddim(denoiser, x_T, SCHEDULE, num_steps, progress=False)
        mean_error = (latents.mean(dim=(0, 2, 3)) - exact_mean).abs()
        std_error = (latents.std(dim=(0, 2, 3)) - exact_std).abs()
        errors[num_steps] = (mean_error, std_error)
        if num_steps == 50:
            assert torch.all(mean_error <= (euler_mean - exact_mean).abs()
                             + 5 * exact_std / math.sqrt(num_values))
            assert torch.all(std_error <= (euler_std - exact_std).abs()
                             + 5 * exact_std / math.sqrt(2 * num_values))
    assert torch.all(errors[50][1] < errors[5][1] / 4)
    assert torch.all(errors[50][0] < errors[5][0] / 4 + 5 * s / math.sqrt(num_values))


def _fixed_denoiser(parameterization: str):
    """A nonlinear, t-dependent stand-in for a U-Net with fixed random weights."""
    gen = torch.Generator().manual_seed(4)
    mix = torch.randn(4, 4, generator=gen) / 2
    pattern = torch.randn(1, 4, 8, 8, generator=gen)

    def denoiser(x_t: Tensor, t: Tensor) -> Tensor:
        phase = torch.sin(t.float() / 97).view(-1, 1, 1, 1)
        mixed = torch.einsum("oc,bchw->bohw", mix, x_t)
        out = 0.6 * mixed + 0.3 * torch.tanh(x_t) + phase * pattern
        return out if parameterization == "eps" else 0.5 * out
    return denoiser


@pytest.mark.parametrize(
    ("parameterization", "eta"), [("eps", 0.0), ("v", 0.0), ("eps", 1.0), ("v", 0.5)]
)
def test_ddim_matches_diffusers(parameterization: str, eta: float) -> None:
    prediction_type = "epsilon" if parameterization == "eps" else "v_prediction"
    reference = _sd_ddim_scheduler(prediction_type)
    reference.set_timesteps(10)
    denoiser = _fixed_denoiser(parameterization)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    # Both draw one randn(x.shape) per step from the generator when eta > 0.
    gen = torch.Generator().manual_seed(6)
    x_t = x_T
    for t in reference.timesteps:
        output = denoiser(x_t, t.expand(2))
        x_t = reference.step(output, t, x_t, eta=eta, generator=gen if eta else None).prev_sample
    expected = x_t

    latents = sample_ddim(denoiser, x_T, SCHEDULE, 10, eta=eta,
                          generator=torch.Generator().manual_seed(6),
                          parameterization=parameterization, progress=False)
    relative_error = ((latents - expected).norm() / expected.norm()).item()
    assert relative_error <= 1e-5
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_sample_ddim_callback_generator_and_dtype() -> None:
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    seen_t, seen_steps = [], []

    def denoiser(x_t: Tensor, t: Tensor) -> Tensor:
        seen_t.append(t)
        return 0.1 * x_t

    def callback(step_index: int, x_t: Tensor) -> None:
        seen_steps.append(step_index)

    first = sample_ddim(denoiser, x_T, SCHEDULE, 5, eta=0.7, progress=False, callback=callback,
                        generator=torch.Generator().manual_seed(8))
    assert seen_steps == [0, 1, 2, 3, 4]
    assert all(t.shape == (2,) and t.dtype == torch.long for t in seen_t)
    assert torch.equal(torch.stack(seen_t)[:, 0], ddim_timesteps(5))
    assert first.shape == x_T.shape and first.dtype == x_T.dtype
    again = sample_ddim(denoiser, x_T, SCHEDULE, 5, eta=0.7, progress=False,
                        generator=torch.Generator().manual_seed(8))
    other = sample_ddim(denoiser, x_T, SCHEDULE, 5, eta=0.7, progress=False,
                        generator=torch.Generator().manual_seed(9))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)

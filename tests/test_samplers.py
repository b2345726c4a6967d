from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)
from torch import Tensor

from ldm.errors import InputError
from ldm.k_samplers import karras_sigmas, sampling_sigmas, sigmas_to_timesteps
from ldm.samplers import KARRAS_BY_DEFAULT, SAMPLERS, SIGMA_SAMPLERS, sample
from ldm.sampling import StartPoint
from ldm.schedule import NoiseSchedule
from ldm.timestep_samplers import (
    _ADAMS_BASHFORTH,
    _ADAMS_BASHFORTH_STABLE_STEP,
    ddim_timesteps,
    plms_orders,
    sample_ddim,
)

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


@pytest.mark.parametrize("num_steps", [1, 10, 20, 25, 50, 250, 999])
def test_ddim_timesteps_match_diffusers(num_steps: int) -> None:
    reference = _sd_ddim_scheduler()
    reference.set_timesteps(num_steps)
    timesteps = ddim_timesteps(num_steps)
    assert timesteps.dtype == torch.long
    assert torch.equal(timesteps, reference.timesteps)


@pytest.mark.parametrize("num_steps", [7, 30, 300, 600, 998])
def test_ddim_timesteps_start_near_pure_noise_for_every_step_count(num_steps: int) -> None:
    # diffusers' "leading" stride 1000 // num_steps would start these at 853, 958, 898, 600 and 998
    # (600 steps: x_T ~ N(0, I) taken for timestep 600, where SD's alphas_cumprod is still 0.16, not 0.005).
    timesteps = ddim_timesteps(num_steps)
    assert len(timesteps) == num_steps and timesteps[-1] == 1
    assert (timesteps.diff() < 0).all()
    assert timesteps[0] >= 1000 - 1000 / num_steps


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


# --- The sampler family: DDPM, PLMS and the sigma-space samplers, through the `sample` dispatcher. ---

SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
MU = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64).view(1, 4, 1, 1)
S = torch.tensor([0.5, 0.3, 1.5, 1.0], dtype=torch.float64).view(1, 4, 1, 1)


def _sigma(alpha: Tensor) -> Tensor:
    return ((1 - alpha) / alpha).sqrt()


def _gaussian_flow(x: Tensor, sigma_from: Tensor, sigma_to: Tensor) -> Tensor:
    """Exact probability-flow ODE map between two noise levels for data N(MU, S^2), in sigma units.

    With x = x0 + sigma * eps the flow is dx/dsigma = (x - E[x0|x]) / sigma, and for Gaussian data
    E[x0|x] = MU + S^2 / (S^2 + sigma^2) (x - MU), so dx/dsigma = sigma (x - MU) / (S^2 + sigma^2).
    Its solution keeps (x - MU) / sqrt(S^2 + sigma^2) constant along the flow.
    """
    return MU + (x - MU) * ((S**2 + sigma_to**2) / (S**2 + sigma_from**2)).sqrt()


def _flow_end_point(name: str, x_T: Tensor, num_steps: int, karras: bool = False) -> Tensor:
    """Where the exact flow takes ``x_T`` over the noise levels that sampler ``name`` spans.

    DDIM and PLMS start at x_t = x_T at the first DDIM timestep (x = x_T / sqrt(a_T) in sigma units)
    and stop at the noise level alphas_cumprod[0], returned as x_t = sqrt(a_0) x. The sigma-space
    samplers start at x = sigma_max x_T and flow to the same level, sigma_min = sigma(0). With
    sigma_max -> inf and sigma_min -> 0 both tend to MU + S x_T.
    """
    a_0 = SCHEDULE.alphas_cumprod[0]
    if name in ("ddim", "plms"):
        a_T = SCHEDULE.alphas_cumprod[ddim_timesteps(num_steps)[0]]
        return a_0.sqrt() * _gaussian_flow(x_T / a_T.sqrt(), _sigma(a_T), _sigma(a_0))
    sigmas, _ = sampling_sigmas(SCHEDULE, num_steps, karras)
    torch.testing.assert_close(sigmas[-1], _sigma(a_0), rtol=1e-12, atol=0)
    return a_0.sqrt() * _gaussian_flow(sigmas[0] * x_T, sigmas[0], sigmas[-1])


def _flow_error(name: str, num_steps: int, karras: bool = False, parameterization: str = "eps",
                stiffness: float = 1.0) -> float:
    x_T = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    latents = sample(name, _gaussian_denoiser(MU, S, parameterization), x_T, SCHEDULE, num_steps, karras=karras,
                     stiffness=stiffness, parameterization=parameterization, progress=False)
    return (latents - _flow_end_point(name, x_T, num_steps, karras)).abs().max().item()


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize(
    ("name", "karras", "tolerance"),
    [("ddim", False, 0.02), ("euler", False, 0.02), ("euler", True, 0.02), ("plms", False, 2e-3),
     ("heun", False, 3e-3), ("heun", True, 2e-3), ("dpmpp_2m", False, 3e-3), ("dpmpp_2m", True, 2e-3)],
)
def test_deterministic_samplers_reach_the_flow_end_point(name: str, karras: bool, tolerance: float,
                                                         parameterization: str) -> None:
    # 500 steps: first-order samplers are within ~0.01 of the exact end point, the others within
    # ~2e-4 (DPM++ 2M and Heun on the linspace grid: 1.3e-3 and 2.0e-3, see the order test). Karras sigmas fall between
    # timesteps and are rounded to one, which leaves an error floor of ~2e-4.
    assert _flow_error(name, 500, karras, parameterization) < tolerance


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize(
    ("name", "karras", "order"),
    [("ddim", False, 1), ("euler", False, 1), ("euler", True, 1),
     ("heun", True, 2), ("dpmpp_2m", True, 2)],
)
def test_convergence_order(name: str, karras: bool, order: int, parameterization: str) -> None:
    # Slope of log(error) against log(num_steps) over 10, 20, 40 steps. Beyond ~80 steps the
    # rounding of Karras sigmas to timesteps dominates the second-order errors. DPM++ 2M and Heun are
    # not checked on the linspace grid: their first-order step into sigma(0) (timestep k to 0,
    # k ~ 1000 / N) spans log(sigma_k / sigma_0) ~ log(N) / 2 in lambda whatever N, so its error falls
    # only like sigma_k^2 ~ 1 / N until N is large (Heun there: 0.22, 0.12, 0.057 at 10, 20, 40 steps;
    # with a corrector on that step it was second order, but on the trained model the corrector made the
    # result 2.5-3 times worse, docs/samplers.md).
    steps = torch.tensor([10.0, 20.0, 40.0], dtype=torch.float64)
    errors = torch.tensor([_flow_error(name, int(n), karras, parameterization) for n in steps], dtype=torch.float64)
    log_steps = steps.log() - steps.log().mean()
    slope = (log_steps * errors.log()).sum() / (log_steps**2).sum()
    assert abs(slope.item() + order) < 0.35, f"slope {slope.item():.2f}, errors {errors.tolist()}"


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize(("stiffness", "margin", "gain"), [(0.0, 4, 8), (1.0, 2, 4)])
def test_plms_beats_first_order(parameterization: str, stiffness: float, margin: float, gain: float) -> None:
    # PLMS is DDIM driven by an Adams-Bashforth combination of eps, on the same timesteps. ldm's (stiffness 0,
    # order 4 from the fourth step on) beats DDIM 4-10-fold and its error falls 9-fold from 10 to 40 steps; the
    # unguided default (stiffness 1: orders 2-3 on the last few steps, plms_orders) 2.8-5-fold, and 6.7-fold
    # from 10 to 40 steps. First order: 4-fold.
    errors = [_flow_error("plms", n, parameterization=parameterization, stiffness=stiffness) for n in (10, 20, 40)]
    ddim_errors = [_flow_error("ddim", n, parameterization=parameterization) for n in (10, 20, 40)]
    assert all(e < d / margin for e, d in zip(errors, ddim_errors, strict=True)), (errors, ddim_errors)
    assert errors[2] < errors[0] / gain, errors


@pytest.mark.parametrize("guidance_scale", [5.0, 7.5])
def test_plms_with_guidance_stays_stable(guidance_scale: float) -> None:
    # Classifier-free guidance over exact denoisers: unconditional data N(mu, 1), conditional N(mu, 0.1^2).
    # Where 0.1 << sigma < 1 the guided eps has sqrt(1 - a) d eps / d x_t = w (1 for cond, 0 for uncond), so
    # fourth-order steps of 20 evenly spaced timesteps leave their stability interval. The guided flow is
    # linear: d xbar / d sigma = sigma ((1 - w) / (1 + sigma^2) + w / (0.01 + sigma^2)) (xbar - mu), which
    # scales xbar - mu by Phi(sigma_to) / Phi(sigma_from), Phi = (1 + sigma^2)^((1 - w) / 2) (0.01 + sigma^2)^(w / 2).
    mu, cond_variance, w = 0.5, 0.01, guidance_scale
    uncond = _gaussian_denoiser(mu, 1.0, "eps")
    cond = _gaussian_denoiser(mu, cond_variance**0.5, "eps")

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        return uncond(x_t, t) + w * (cond(x_t, t) - uncond(x_t, t))

    def phi(sigma: Tensor) -> Tensor:
        return (1 + sigma**2) ** ((1 - w) / 2) * (cond_variance + sigma**2) ** (w / 2)

    x_T = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    a_T, a_0 = SCHEDULE.alphas_cumprod[ddim_timesteps(20)[0]], SCHEDULE.alphas_cumprod[0]
    exact = a_0.sqrt() * (mu + (x_T / a_T.sqrt() - mu) * phi(_sigma(a_0)) / phi(_sigma(a_T)))

    def error(name: str, stiffness: float = 1.0) -> float:
        latents = sample(name, guided, x_T, SCHEDULE, 20, stiffness=stiffness, progress=False)
        return (latents - exact).abs().max().item()

    ddim = error("ddim")
    assert error("plms", stiffness=w) <= 1.1 * ddim  # 0.25 / 1.0 of DDIM's error at w = 5 / 7.5
    assert error("plms", stiffness=0) > 100 * ddim  # ldm's orders: 4600 / 8600 times DDIM's error


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_adams_bashforth_stability_intervals(order: int) -> None:
    # Independently of the table: AB of order k applied to y' = lambda y, z = h lambda, has the characteristic
    # polynomial zeta^k - zeta^(k-1) - z sum_j beta_j zeta^(k-1-j); a step is stable while all its roots lie
    # in the unit disc. That must hold just inside the tabled interval [-bound, 0] and fail just outside it.
    bound = _ADAMS_BASHFORTH_STABLE_STEP[order]

    def largest_root(z: float) -> float:
        coefficients = [1.0, -1.0, *([0.0] * (order - 1))]
        for j, beta in enumerate(_ADAMS_BASHFORTH[order]):
            coefficients[j + 1] -= z * beta
        return max(abs(root) for root in np.roots(coefficients))

    assert all(largest_root(-bound * f) <= 1 + 1e-9 for f in (0.1, 0.5, 0.9, 0.999))
    assert largest_root(-bound * 1.01) > 1


def test_plms_orders_fall_where_sigma_falls_fast() -> None:
    # 50 steps: sigma falls by 6-11 % per step until the last few (20, 30, 71, 29 %; sigma ~ sqrt(t) near 0).
    timesteps = ddim_timesteps(50)
    sigmas = SCHEDULE.sigmas[timesteps]
    sigmas_prev = torch.cat([sigmas[1:], SCHEDULE.sigmas[:1]])
    assert plms_orders(sigmas, sigmas_prev, 0.0) == [4] * 50  # ldm's
    unguided = plms_orders(sigmas, sigmas_prev, 1.0)
    assert unguided[:48] == [4] * 48 and unguided[48] == 2  # the step from timestep 21 to 1
    guided = plms_orders(sigmas, sigmas_prev, 7.5)
    assert guided[-5:] == [1] * 5 and all(a >= b for a, b in zip(unguided, guided, strict=True))


@pytest.mark.parametrize(
    ("name", "eta", "karras"), [("ddpm", 0.0, False), ("euler_a", 0.0, False), ("euler_a", 0.0, True),
                                ("ddim", 1.0, False)],
)
def test_stochastic_samplers_sample_the_data_distribution(name: str, eta: float, karras: bool) -> None:
    # Data N(mu, s^2) in two channels, 10000 values each, 500 steps. Standard errors: s / sqrt(n)
    # for the mean, s / sqrt(2n) for the std; 5 of them are allowed, plus the samplers' own bias,
    # which exact moment propagation through these affine-Gaussian chains puts at: std 0.55-0.8% low
    # (the posterior, "fixed small", variance leaves out Var(x0 | x_t) at every step; still ~0.4% at
    # 1000 steps), mean off by < 0.011 (x_T ~ N(0, I) instead of the true first marginal shifts it
    # by ~a_T s^2 mu). DDIM with eta = 1 ends at the noise level alphas_cumprod[0], so its target is
    # that marginal, N(sqrt(a_0) mu, a_0 s^2 + 1 - a_0).
    mu = torch.tensor([0.5, 2.0], dtype=torch.float64).view(1, 2, 1, 1)
    s = torch.tensor([1.0, 1.5], dtype=torch.float64).view(1, 2, 1, 1)
    gen = torch.Generator().manual_seed(11)
    num_values = 10000
    x_T = torch.randn(num_values, 2, 1, 1, generator=gen, dtype=torch.float64)
    latents = sample(name, _gaussian_denoiser(mu, s, "eps"), x_T, SCHEDULE, 500, eta=eta, karras=karras,
                     generator=gen, progress=False)
    if name == "ddim":
        a_0 = SCHEDULE.alphas_cumprod[0]
        mu, s = a_0.sqrt() * mu, (a_0 * s**2 + 1 - a_0).sqrt()
    mean, std = latents.mean(dim=0).flatten(), latents.std(dim=0).flatten()
    mu, s = mu.flatten(), s.flatten()
    assert torch.all((mean - mu).abs() < 5 * s / math.sqrt(num_values) + 0.011), mean
    assert torch.all((std / s - 1).abs() < 5 / math.sqrt(2 * num_values) + 0.01), std
    # Fresh noise was injected: the samples are not the deterministic flow of x_T.
    assert (latents - mu.view(1, 2, 1, 1) - s.view(1, 2, 1, 1) * x_T).std() > 0.2


SIGMA_SCHEDULERS = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
                    DPMSolverMultistepScheduler)


def _run_diffusers(scheduler, denoiser, x: Tensor, generator: torch.Generator | None = None,
                   timesteps: Tensor | None = None, **step_kwargs) -> Tensor:
    """diffusers' own sampling loop, over ``timesteps`` (default: all of the scheduler's). Timesteps
    between integers (Karras sigmas) are rounded for the denoiser, as ours does; the scheduler itself
    keeps its fractional timesteps.

    The sigma schedulers' grids (``_diffusers_scheduler``) end with a step from sigma(0) to 0 that ours
    does not take: the loop stops at sigma(0) and returns x_t there, as ours. Their last steps are
    taken as ours takes them: DPM-Solver++'s last two at first order, Euler ancestral's last without
    noise (the Euler step to sigma(0) from the scheduler's own x0 estimate).
    """
    stochastic = {} if generator is None else {"generator": generator}
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    if isinstance(scheduler, SIGMA_SCHEDULERS):
        # Heun's grid lists the timestep of its last step twice (predictor and corrector).
        timesteps = timesteps[:-2] if isinstance(scheduler, HeunDiscreteScheduler) else timesteps[:-1]
    for i, t in enumerate(timesteps):
        if isinstance(scheduler, DPMSolverMultistepScheduler) and i >= len(timesteps) - 2:
            scheduler.lower_order_nums = 0  # forgets the history: a first-order step
        model_input = scheduler.scale_model_input(x, t)
        output = denoiser(model_input, t.round().long().expand(x.shape[0]))
        result = scheduler.step(output, t, x, **stochastic, **step_kwargs)
        if isinstance(scheduler, EulerAncestralDiscreteScheduler) and i == len(timesteps) - 1:
            sigma, sigma_next = scheduler.sigmas[scheduler.step_index - 1 : scheduler.step_index + 1]
            x = x + (sigma_next - sigma) * (x - result.pred_original_sample) / sigma
        else:
            x = result.prev_sample
    if isinstance(scheduler, SIGMA_SCHEDULERS) and not isinstance(scheduler, DPMSolverMultistepScheduler):
        x = x / (SCHEDULE.sigmas[0] ** 2 + 1).sqrt()  # sigma units to x_t (DPM-Solver++ works on x_t)
    return x


def _diffusers_scheduler(name: str, num_steps: int, karras: bool, prediction_type: str):
    """Each sampler's diffusers counterpart, configured to our documented choices, its timesteps set.

    Our sigma samplers' grid of ``num_steps`` steps is the "linspace" grid of ``num_steps + 1`` steps
    of diffusers' schedulers without its last step, from sigma(0) to 0.
    """
    custom = {"timesteps": [*sampling_sigmas(SCHEDULE, num_steps)[1].tolist(), 0]}
    if name == "ddim":
        scheduler = _sd_ddim_scheduler(prediction_type)
        scheduler.set_timesteps(num_steps)
    elif name == "ddpm":  # SD's "leading" spacing with offset 1, no clipping, fixed-small variance.
        scheduler = DDPMScheduler(**SD_BETAS, clip_sample=False, timestep_spacing="leading", steps_offset=1,
                                  prediction_type=prediction_type)
        scheduler.set_timesteps(num_steps)
    elif name == "plms":  # PNDM without Runge-Kutta warm-up is ldm's PLMS; SD's final alpha and spacing.
        scheduler = PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                                  timestep_spacing="leading", prediction_type=prediction_type)
        scheduler.set_timesteps(num_steps)
    elif name == "euler_a":
        # No custom timesteps here: "linspace" with 999 / num_steps an integer is our grid.
        assert 999 % num_steps == 0 and not karras
        scheduler = EulerAncestralDiscreteScheduler(**SD_BETAS, timestep_spacing="linspace",
                                                    prediction_type=prediction_type)
        scheduler.set_timesteps(num_steps + 1)
    elif name in ("euler", "heun"):
        # "linspace" spacing: init_noise_sigma is sigma_max (ours), and Karras sigmas span
        # sigma(999) .. sigma(0). Without Karras, our rounded-linspace timesteps are passed in.
        scheduler_class = EulerDiscreteScheduler if name == "euler" else HeunDiscreteScheduler
        scheduler = scheduler_class(**SD_BETAS, timestep_spacing="linspace", use_karras_sigmas=karras,
                                    prediction_type=prediction_type)
        if karras:
            scheduler.set_timesteps(num_steps + 1)
        else:
            scheduler.set_timesteps(**custom)
    else:
        scheduler = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                                final_sigmas_type="zero", use_karras_sigmas=karras,
                                                prediction_type=prediction_type)
        if karras:
            scheduler.set_timesteps(num_steps + 1)
        else:
            scheduler.set_timesteps(**custom)
    return scheduler


def _diffusers_reference(name: str, num_steps: int, karras: bool, prediction_type: str, x_T: Tensor, denoiser,
                         generator: torch.Generator | None) -> Tensor:
    """A full diffusers run from the noise ``x_T``."""
    scheduler = _diffusers_scheduler(name, num_steps, karras, prediction_type)
    if name == "dpmpp_2m":
        # DPM-Solver++ works on x_t itself: start at x_t = sigma_max x_T / sqrt(sigma_max^2 + 1).
        sigma_max = scheduler.sigmas[0]
        x_T = x_T * sigma_max / (sigma_max**2 + 1).sqrt()
    return _run_diffusers(scheduler, denoiser, x_T * scheduler.init_noise_sigma, generator)


def _diffusers_img2img(name: str, num_steps: int, karras: bool, prediction_type: str, init_latents: Tensor,
                       noise: Tensor, start_step: int, denoiser, generator: torch.Generator | None,
                       **step_kwargs) -> Tensor:
    """diffusers' img2img recipe: the scheduler's timesteps from ``start_step * order`` on (with
    ``set_begin_index`` where the scheduler counts its steps), from the init latents noised by the
    scheduler's ``add_noise`` at the first of them. In each scheduler's own units, as ours."""
    scheduler = _diffusers_scheduler(name, num_steps, karras, prediction_type)
    begin = start_step * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    if name == "plms":
        # PNDM's warm-up step evaluates its second timestep twice; a truncated run warms up afresh
        # (ldm's PLMS starts with an empty history there too).
        distinct = scheduler.timesteps.unique_consecutive()
        timesteps = torch.cat([distinct[start_step:start_step + 2], distinct[start_step + 1:]])
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    x = scheduler.add_noise(init_latents, noise, timesteps[:1])
    return _run_diffusers(scheduler, denoiser, x, generator, timesteps, **step_kwargs)


@pytest.mark.parametrize(
    ("name", "karras", "parameterization"),
    [("ddpm", False, "eps"), ("ddpm", False, "v"), ("plms", False, "eps"),
     ("euler", False, "eps"), ("euler", False, "v"), ("euler", True, "eps"), ("euler", True, "v"),
     ("euler_a", False, "eps"), ("euler_a", False, "v"),
     ("heun", False, "eps"), ("heun", False, "v"), ("heun", True, "eps"), ("heun", True, "v"),
     ("dpmpp_2m", False, "eps"), ("dpmpp_2m", False, "v"), ("dpmpp_2m", True, "eps"), ("dpmpp_2m", True, "v")],
)
def test_samplers_match_diffusers(name: str, karras: bool, parameterization: str) -> None:
    # PLMS with v is not compared: diffusers' PNDM combines raw v outputs across steps and converts
    # the mix to eps at the current sample, while ldm's PLMS (and ours) converts each v to eps first.
    # 9 steps: diffusers' 10-step "linspace" grid, on integer timesteps (999 / 9 = 111), is ours for Euler a.
    num_steps = 9
    prediction_type = "epsilon" if parameterization == "eps" else "v_prediction"
    denoiser = _fixed_denoiser(parameterization)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    stochastic = name in ("ddpm", "euler_a")
    expected = _diffusers_reference(name, num_steps, karras, prediction_type, x_T, denoiser,
                                    torch.Generator().manual_seed(13) if stochastic else None)
    # stiffness 0: PLMS at ldm's orders, which PNDM takes; the other samplers do not use it.
    latents = sample(name, denoiser, x_T, SCHEDULE, num_steps, karras=karras, stiffness=0,
                     parameterization=parameterization, generator=torch.Generator().manual_seed(13), progress=False)
    relative_error = ((latents - expected).norm() / expected.norm()).item()
    assert relative_error <= 1e-4


@pytest.mark.parametrize(
    ("num_steps", "karras"),
    # Without Karras, diffusers' "linspace" timesteps are integers (= ours) when 999 / num_steps is.
    [(1, False), (3, False), (9, False), (27, False), (1, True), (7, True), (10, True), (25, True)],
)
def test_sampling_sigmas_match_diffusers(num_steps: int, karras: bool) -> None:
    # Ours: diffusers' grid of num_steps + 1 steps up to sigma(0), without its last step from sigma(0) to 0.
    sigmas, timesteps = sampling_sigmas(SCHEDULE, num_steps, karras)
    assert sigmas.shape == (num_steps + 1,) and timesteps.shape == (num_steps,) and timesteps.dtype == torch.long
    torch.testing.assert_close(sigmas[-1], SCHEDULE.sigmas[0], rtol=1e-12, atol=0)
    assert torch.all(sigmas[1:] < sigmas[:-1])
    reference = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="linspace", use_karras_sigmas=karras)
    reference.set_timesteps(num_steps + 1)
    assert reference.sigmas[-1] == 0
    torch.testing.assert_close(sigmas.float(), reference.sigmas[:-1], rtol=1e-4, atol=0)  # diffusers: float32 betas
    # diffusers keeps fractional timesteps (linspace, or log-sigma interpolation for Karras); ours round them.
    assert torch.equal(timesteps, reference.timesteps[:-1].double().round().long())


@pytest.mark.parametrize("karras", [False, True])
def test_one_step_goes_from_the_largest_to_the_smallest_training_sigma(karras: bool) -> None:
    sigmas, timesteps = sampling_sigmas(SCHEDULE, 1, karras)
    all_sigmas = SCHEDULE.sigmas
    torch.testing.assert_close(sigmas, torch.stack([all_sigmas[-1], all_sigmas[0]]))
    assert timesteps.tolist() == [999]


def test_sigmas_to_timesteps_inverts_the_training_sigmas() -> None:
    all_sigmas = SCHEDULE.sigmas
    assert torch.equal(sigmas_to_timesteps(all_sigmas, SCHEDULE), torch.arange(1000))
    # Just off the geometric midpoints of neighbouring sigmas, log-sigma interpolation picks the nearer one.
    midpoints = (all_sigmas[:-1] * all_sigmas[1:]).sqrt()
    assert torch.equal(sigmas_to_timesteps(midpoints * 0.999, SCHEDULE), torch.arange(999))
    assert torch.equal(sigmas_to_timesteps(midpoints * 1.001, SCHEDULE), torch.arange(1, 1000))


def test_karras_sigmas_follow_equation_5() -> None:
    sigmas = karras_sigmas(0.1, 10.0, 5, rho=7.0)
    ramp = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    expected = (10.0 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(sigmas, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
def test_karras_default_depends_on_the_sampler(name: str) -> None:
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(16))

    def timesteps_seen(karras: bool | None) -> Tensor:
        seen = []

        def denoiser(x_t: Tensor, t: Tensor) -> Tensor:
            seen.append(t)
            return 0.1 * x_t

        sample(name, denoiser, x_T, SCHEDULE, 6, karras=karras, generator=torch.Generator().manual_seed(17),
               progress=False)
        return torch.cat(seen)

    karras, evenly_spaced = timesteps_seen(True), timesteps_seen(False)
    assert not torch.equal(karras, evenly_spaced)
    assert torch.equal(timesteps_seen(None), karras if name in KARRAS_BY_DEFAULT else evenly_spaced)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_reports_steps_and_keeps_shape_and_dtype(name: str) -> None:
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(14))
    seen_t, seen_steps, seen_x_t = [], [], []

    def denoiser(x_t: Tensor, t: Tensor) -> Tensor:
        seen_t.append(t)
        return 0.1 * x_t

    def callback(step_index: int, x_t: Tensor) -> None:
        seen_steps.append(step_index)
        seen_x_t.append(x_t)

    latents = sample(name, denoiser, x_T, SCHEDULE, 5, generator=torch.Generator().manual_seed(15),
                     progress=False, callback=callback)
    assert seen_steps == [0, 1, 2, 3, 4]
    assert torch.equal(seen_x_t[-1], latents)
    assert all(t.shape == (2,) and t.dtype == torch.long and 0 <= t.min() and t.max() < 1000 for t in seen_t)
    assert len(seen_t) == {"plms": 6, "heun": 9}.get(name, 5)
    assert latents.shape == x_T.shape and latents.dtype == x_T.dtype


@pytest.mark.parametrize("name", ["ddpm", "euler_a"])
def test_stochastic_samplers_depend_only_on_their_generators(name: str) -> None:
    # One generator per row: row 0 of a batch equals that row sampled alone.
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(16))
    denoiser = _fixed_denoiser("eps")
    generators = [torch.Generator().manual_seed(17), torch.Generator().manual_seed(18)]
    both = sample(name, denoiser, x_T, SCHEDULE, 6, generator=generators, progress=False)
    alone = sample(name, denoiser, x_T[:1], SCHEDULE, 6, generator=[torch.Generator().manual_seed(17)],
                   progress=False)
    torch.testing.assert_close(both[:1], alone, rtol=1e-6, atol=1e-6)
    other = sample(name, denoiser, x_T, SCHEDULE, 6, generator=torch.Generator().manual_seed(19), progress=False)
    assert not torch.allclose(both, other)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [("dpm_fast", {}, "choose one of ddim, ddpm, plms, euler, euler_a, heun, dpmpp_2m"),
     ("ddim", {"karras": True}, "karras"), ("plms", {"karras": True}, "karras"),
     ("euler", {"eta": 0.5}, "eta"), ("ddpm", {"eta": 1.0}, "eta"), ("euler_a", {"num_steps": 0}, "num_steps"),
     ("heun", {"num_steps": 1001}, "num_steps"), ("ddim", {"eta": -1.0}, "eta"),
     ("plms", {"stiffness": -1.0}, "stiffness")],
)
def test_sample_rejects_bad_input(name: str, kwargs: dict, match: str) -> None:
    calls = []

    def denoiser(x_t: Tensor, t: Tensor) -> Tensor:
        calls.append(t)
        return x_t

    arguments = {"num_steps": 10, **kwargs}
    num_steps = arguments.pop("num_steps")
    with pytest.raises(InputError, match=match):
        sample(name, denoiser, torch.zeros(1, 4, 2, 2), SCHEDULE, num_steps, progress=False, **arguments)
    assert not calls


# --- Start points: img2img's init_latents and start_step. ---

SAMPLER_VARIANTS = [("ddim", False), ("ddpm", False), ("plms", False), ("euler", False), ("euler", True),
                    ("euler_a", False), ("euler_a", True), ("heun", False), ("heun", True), ("dpmpp_2m", False),
                    ("dpmpp_2m", True)]


@pytest.mark.parametrize(("name", "karras"), SAMPLER_VARIANTS)
def test_start_step_zero_is_a_full_run_from_the_noised_latents(name: str, karras: bool) -> None:
    # From step 0, init latents L and noise n must give exactly the full run from the x_T that the sampler
    # turns into sqrt(a) L + sqrt(1 - a) n at its first timestep (DDIM, DDPM, PLMS), or into L + sigma_max n
    # at its first sigma (the others multiply x_T by sigma_max): x_T = n + L / sigma_max.
    gen = torch.Generator().manual_seed(20)
    init_latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    if name in ("ddim", "ddpm", "plms"):
        a = SCHEDULE.alphas_cumprod[ddim_timesteps(10)[0]].item()
        x_T = math.sqrt(a) * init_latents + math.sqrt(1 - a) * noise
    else:
        all_sigmas = ((1 - SCHEDULE.alphas_cumprod) / SCHEDULE.alphas_cumprod).sqrt()
        x_T = noise + init_latents / all_sigmas[-1].item()  # sigma(999), also Karras sigmas' sigma_max
    denoiser = _fixed_denoiser("eps")
    eta = 0.5 if name == "ddim" else 0.0
    from_latents = sample(name, denoiser, noise, SCHEDULE, 10, eta=eta, karras=karras, progress=False,
                          generator=torch.Generator().manual_seed(21), start=StartPoint(init_latents))
    full = sample(name, denoiser, x_T, SCHEDULE, 10, eta=eta, karras=karras, progress=False,
                  generator=torch.Generator().manual_seed(21))
    torch.testing.assert_close(from_latents, full, rtol=1e-5, atol=1e-5 * full.abs().max().item())


@pytest.mark.parametrize("start_step", [3, 8])
@pytest.mark.parametrize(
    ("name", "karras", "parameterization", "eta"),
    [("ddim", False, "eps", 0.0), ("ddim", False, "v", 0.0), ("ddim", False, "eps", 1.0),
     ("ddpm", False, "eps", 0.0), ("ddpm", False, "v", 0.0), ("plms", False, "eps", 0.0),
     ("euler", False, "eps", 0.0), ("euler", True, "v", 0.0), ("euler_a", False, "eps", 0.0),
     ("euler_a", False, "v", 0.0), ("heun", False, "eps", 0.0), ("heun", True, "eps", 0.0),
     ("heun", True, "v", 0.0), ("dpmpp_2m", False, "eps", 0.0), ("dpmpp_2m", True, "eps", 0.0),
     ("dpmpp_2m", True, "v", 0.0)],
)
def test_start_step_matches_diffusers_img2img(name: str, karras: bool, parameterization: str, eta: float,
                                              start_step: int) -> None:
    num_steps = 9  # as in test_samplers_match_diffusers
    if name == "plms" and start_step == num_steps - 1:
        # PNDM's warm-up from the last timestep evaluates at t + stride, not at the step's landing
        # level 0 as ours (and diffusers cannot express that run); the call count test covers it.
        start_step = num_steps - 2
    prediction_type = "epsilon" if parameterization == "eps" else "v_prediction"
    denoiser = _fixed_denoiser(parameterization)
    gen = torch.Generator().manual_seed(22)
    init_latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    stochastic = name in ("ddpm", "euler_a") or eta > 0
    step_kwargs = {"eta": eta} if name == "ddim" else {}
    expected = _diffusers_img2img(name, num_steps, karras, prediction_type, init_latents, noise, start_step,
                                  denoiser, torch.Generator().manual_seed(23) if stochastic else None, **step_kwargs)
    # stiffness 0 as in test_samplers_match_diffusers.
    latents = sample(name, denoiser, noise, SCHEDULE, num_steps, eta=eta, karras=karras, stiffness=0,
                     parameterization=parameterization, generator=torch.Generator().manual_seed(23), progress=False,
                     start=StartPoint(init_latents, start_step))
    relative_error = ((latents - expected).norm() / expected.norm()).item()
    assert relative_error <= 1e-4
    # Not a full run that ignores the start point.
    full = sample(name, denoiser, noise, SCHEDULE, num_steps, eta=eta, karras=karras,
                  parameterization=parameterization, generator=torch.Generator().manual_seed(23), progress=False)
    assert not torch.allclose(latents, full, atol=0.1)


@pytest.mark.parametrize("start_step", [0, 2, 4])
@pytest.mark.parametrize(("name", "karras"), SAMPLER_VARIANTS)
def test_a_start_step_runs_only_the_remaining_steps(name: str, karras: bool, start_step: int) -> None:
    num_steps = 5
    seen_t, seen_steps = [], []

    def denoiser(x_t: Tensor, t: Tensor) -> Tensor:
        seen_t.append(int(t[0]))
        return 0.1 * x_t

    def callback(step_index: int, x_t: Tensor) -> None:
        seen_steps.append(step_index)

    gen = torch.Generator().manual_seed(24)
    x_T, init_latents = torch.randn(1, 2, 4, 4, generator=gen), torch.randn(1, 2, 4, 4, generator=gen)
    latents = sample(name, denoiser, x_T, SCHEDULE, num_steps, karras=karras, progress=False,
                     generator=torch.Generator().manual_seed(25), callback=callback,
                     start=StartPoint(init_latents, start_step))
    num_run = num_steps - start_step
    assert seen_steps == list(range(start_step, num_steps))
    assert len(seen_t) == {"plms": num_run + 1, "heun": 2 * num_run - 1}.get(name, num_run)
    if name in ("ddim", "ddpm", "plms"):
        timesteps = ddim_timesteps(num_steps)
    else:
        # The denoiser's timestep for each sigma, from diffusers' own sigma grid (rounded, as ours).
        reference = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="linspace", use_karras_sigmas=karras)
        reference.set_timesteps(num_steps + 1)
        timesteps = reference.timesteps.double().round().long()
    assert seen_t[0] == timesteps[start_step]
    assert latents.shape == x_T.shape and latents.dtype == x_T.dtype


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"start_step": -1}, "start_step must be between 0 and num_steps - 1 = 9"),
     ({"start_step": 10}, "start_step must be between 0 and num_steps - 1 = 9"),
     ({"start_step": 3, "init_latents": None}, "needs init_latents"),
     ({"init_latents": torch.zeros(1, 4, 2, 3)}, r"init_latents must have the shape of x_T \(1, 4, 2, 2\)")],
)
def test_bad_start_points_are_input_errors(name: str, kwargs: dict, match: str) -> None:
    calls = []

    def denoiser(x_t: Tensor, t: Tensor) -> Tensor:
        calls.append(t)
        return x_t

    arguments = {"init_latents": torch.zeros(1, 4, 2, 2), **kwargs}
    with pytest.raises(InputError, match=match):
        sample(name, denoiser, torch.zeros(1, 4, 2, 2), SCHEDULE, 10, progress=False, start=StartPoint(**arguments))
    assert not calls


@pytest.mark.parametrize(("num_steps", "strength"), [(50, 0.3), (10, 0.75), (100, 0.29), (25, 0.5), (4, 1.0)])
def test_img2img_strength_starts_where_diffusers_img2img_does(tiny_pipeline, monkeypatch, num_steps, strength):
    """Issue 26 item 12: the pipeline's first x_t for an init image and a strength is diffusers'
    StableDiffusionImg2ImgPipeline's: its get_timesteps (steps run, first timestep) and its add_noise of
    the init image's scaled latents, with the same noise. (10, 0.75) and (100, 0.29) round differently
    from int(): diffusers, ldm's img2img.py and AUTOMATIC1111 run int(steps * strength) steps."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionImg2ImgPipeline

    from ldm import timestep_samplers
    from ldm.sampling import noised_start

    scheduler = _sd_ddim_scheduler()
    scheduler.set_timesteps(num_steps)
    timesteps, num_run = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), num_steps,
                                                                     strength, "cpu")
    seen = {}

    def first_x_t(x_T, schedule, all_timesteps, start):
        seen.update(noise=x_T, x0=start.init_latents, t=all_timesteps[start.start_step],
                    num_run=len(all_timesteps) - start.start_step)
        seen["x_t"] = noised_start(x_T, schedule, all_timesteps, start)
        return seen["x_t"]

    monkeypatch.setattr(timestep_samplers, "noised_start", first_x_t)
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    tiny_pipeline("a", init_images=init, strength=strength, num_steps=num_steps, guidance_scale=1, seed=4,
                  output_type="latent", progress=False)
    assert (seen["num_run"], seen["t"].item()) == (num_run, timesteps[0].item())
    # The init latents: the posterior's mean, scaled (diffusers draws a posterior sample; see docs/generation.md).
    torch.testing.assert_close(seen["x0"], tiny_pipeline.encode(init))
    torch.testing.assert_close(seen["noise"], torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(seen["x_t"], scheduler.add_noise(seen["x0"], seen["noise"], timesteps[:1]))

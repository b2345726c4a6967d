"""Generation features on tiny models: guidance rescale, prompt weights and long prompts, img2img, inpainting."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import Tensor

from ldm.errors import InputError
from ldm.guidance import ClassifierFreeGuidance
from ldm.img2img import InpaintingUNet, LatentBlend, start_step
from ldm.pipeline import Pipeline
from ldm.prompts import apply_weights, encode_prompts, parse_weights
from ldm.samplers import SAMPLERS, sample
from ldm.sampling import StartPoint
from ldm.schedule import NoiseSchedule
from ldm.sd_checkpoint import UNET_PREFIX, detect_spec
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.timestep_samplers import ddim_timesteps, sample_ddim
from tests.conftest import randomize_, tiny_spec

SCHEDULE = NoiseSchedule()


def _toy_unet(x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
    """Per-sample toy U-Net whose output mixes neighbouring positions and depends on the context."""
    shift = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return (1 + shift) * _toy_denoiser(x_t, t) + shift


def _toy_denoiser(x_t: Tensor, t: Tensor) -> Tensor:
    return 0.5 * torch.tanh(x_t) + 0.2 * x_t.roll(1, dims=-1) + 0.1 * torch.cos(t.float() / 90).view(-1, 1, 1, 1)


def _sd_ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def _encoder(context_length: int = 77, ln_bias: float = 0.5) -> TextEncoder:
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(width=64, layers=2, heads=4, context_length=context_length))
    with torch.no_grad():
        # A trained final LayerNorm has a bias, so contexts have a mean to restore.
        encoder.ln_final.bias.fill_(ln_bias)
    return encoder


# Guidance rescale (Lin et al. 2023, eq. 15-16).

@pytest.mark.parametrize("guidance_rescale", [0.3, 0.7, 1.0])
def test_guidance_rescale_matches_the_formula(guidance_rescale):
    gen = torch.Generator().manual_seed(0)
    x_t, context, uncond_context = (torch.randn(shape, generator=gen) for shape in [(3, 4, 6, 6), (3, 5, 8),
                                                                                    (3, 5, 8)])
    t = torch.tensor([10, 500, 990])
    guided = ClassifierFreeGuidance(_toy_unet, context, uncond_context, 7.5, guidance_rescale)(x_t, t)
    cond, uncond = _toy_unet(x_t, t, context), _toy_unet(x_t, t, uncond_context)
    plain = uncond + 7.5 * (cond - uncond)
    torch.testing.assert_close(guided, rescale_noise_cfg(plain, cond, guidance_rescale))
    # Eq. 15 alone (phi = 1): every sample takes the standard deviation of its conditional prediction.
    std_ratio = cond.flatten(1).std(dim=1) / plain.flatten(1).std(dim=1)
    expected = guidance_rescale * plain * std_ratio.view(-1, 1, 1, 1) + (1 - guidance_rescale) * plain
    torch.testing.assert_close(guided, expected)
    assert not torch.allclose(guided, plain, atol=1e-3)


def test_guidance_rescale_zero_changes_nothing_and_range_is_checked(tiny_pipeline):
    gen = torch.Generator().manual_seed(1)
    x_t, context, uncond_context = torch.randn(2, 4, 6, 6, generator=gen), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    t = torch.tensor([3, 700])
    assert torch.equal(ClassifierFreeGuidance(_toy_unet, context, uncond_context, 5.0, 0.0)(x_t, t),
                       ClassifierFreeGuidance(_toy_unet, context, uncond_context, 5.0)(x_t, t))
    with pytest.raises(ValueError, match="guidance_rescale"):
        ClassifierFreeGuidance(_toy_unet, context, uncond_context, 5.0, 1.5)
    kwargs = dict(num_steps=3, guidance_scale=6.0, seed=4, output_type="latent", progress=False)
    plain = tiny_pipeline(["a red circle"], **kwargs)
    assert torch.equal(plain, tiny_pipeline(["a red circle"], guidance_rescale=0.0, **kwargs))
    assert not torch.allclose(plain, tiny_pipeline(["a red circle"], guidance_rescale=0.7, **kwargs), atol=1e-4)
    with pytest.raises(InputError, match="guidance rescale must be in"):
        tiny_pipeline(["a red circle"], guidance_rescale=-0.1, **kwargs)


# Prompt weights.

@pytest.mark.parametrize(("prompt", "pieces"), [
    ("a red circle", [("a red circle", 1.0)]),
    ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
    ("((red:2) circle:0.25) on (blue: -0.5 )", [("red", 0.5), (" circle", 0.25), (" on ", 1.0), ("blue", -0.5)]),
    ("((big:2) dot:0.5)", [("big", 1.0), (" dot", 0.5)]),  # nested weights multiply back to 1
    ("a (small) dot", [("a (small) dot", 1.0)]),  # no weight: literal parentheses
    ("\\(red:1.5\\) \\\\ end\\", [("(red:1.5) \\ end\\", 1.0)]),
    ("(red:1.5)", [("red", 1.5)]),
    ("", [("", 1.0)]),
])
def test_parse_weights(prompt, pieces):
    assert parse_weights(prompt) == pieces


@pytest.mark.parametrize(("prompt", "message"), [("a (red:1.5 circle", "unclosed"), ("a red:1.5) circle", "unmatched")])
def test_unbalanced_parentheses_are_input_errors(prompt, message):
    with pytest.raises(InputError, match=message):
        parse_weights(prompt)


def test_unweighted_prompts_encode_exactly_as_the_text_encoder():
    encoder = _encoder()
    prompts = ["a red circle", "a blue square (small) on white"]
    context, uncond_context = encode_prompts(encoder, prompts, ["", "green"])
    assert torch.equal(context, encoder(prompts))
    assert torch.equal(uncond_context, encoder(["", "green"]))
    # Weight 1 is the identity.
    assert torch.equal(encode_prompts(encoder, ["a (red:1.0) circle"])[0], encoder(["a red circle"]))


def test_weights_multiply_token_vectors_and_restore_the_mean():
    encoder = _encoder()
    weighted = encode_prompts(encoder, ["a (red:1.5) circle on (white:0.8)"])[0][0]
    plain = encoder(["a red circle on white"])[0]
    weights = torch.ones(77)
    weights[2], weights[5] = 1.5, 0.8  # start, a, red, circle, on, white
    expected = plain * weights[:, None]
    expected = expected * plain.mean() / expected.mean()
    torch.testing.assert_close(weighted, expected)
    assert abs(weighted.mean() - plain.mean()) < 1e-6 and not torch.allclose(weighted, plain, atol=1e-3)


def test_a_context_without_mean_is_only_multiplied():
    encoder = _encoder(ln_bias=0.0)  # untrained final LayerNorm: every token vector has mean 0
    plain = encoder(["a red circle"])
    weights = torch.ones(1, 77)
    weights[0, 2] = 1.5
    torch.testing.assert_close(apply_weights(plain, weights), plain * weights[..., None])


# Prompts longer than the context.

def test_long_prompts_are_chunked_not_cut():
    encoder = _encoder()
    prompt = " ".join(["red", "blue", "green"] * 30)  # 90 one-token words: 2 chunks of 75
    ids = encoder.tokenizer.encode(prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        context, uncond_context = encode_prompts(encoder, [prompt, "a circle"], ["", "square"])
    assert len(ids) == 90 and context.shape == uncond_context.shape == (2, 2 * 77, 64)
    first, second = (encoder.encode_tokens(encoder.token_row(chunk)[None])[0] for chunk in (ids[:75], ids[75:]))
    torch.testing.assert_close(context[0, :77], first)
    torch.testing.assert_close(context[0, 77:], second)
    # The shorter prompts and the negative prompts are padded with the encoding of "".
    empty = encoder([""])[0]
    torch.testing.assert_close(context[1], torch.cat([encoder(["a circle"])[0], empty]))
    torch.testing.assert_close(uncond_context[0], torch.cat([empty, empty]))
    torch.testing.assert_close(uncond_context[1], torch.cat([encoder(["square"])[0], empty]))
    # A long negative prompt pads the prompt instead.
    context, uncond_context = encode_prompts(encoder, ["a circle"], [prompt])
    assert context.shape == uncond_context.shape == (1, 2 * 77, 64)


def test_small_context_length_chunks_and_weights_per_chunk():
    encoder = _encoder(context_length=8)  # 6 ids per chunk, like a small bundled encoder
    prompt = "one two three four five six seven (eight:2) nine ten eleven twelve thirteen"
    context = encode_prompts(encoder, [prompt])[0]
    assert context.shape == (1, 3 * 8, 64)
    ids = encoder.tokenizer.encode(prompt.replace("(eight:2)", "eight"))
    assert len(ids) == 13
    chunks = [encoder.encode_tokens(encoder.token_row(ids[i:i + 6])[None])[0] for i in (0, 6, 12)]
    torch.testing.assert_close(context[0, :8], chunks[0])
    torch.testing.assert_close(context[0, 16:], chunks[2])
    # "eight" is the second id of chunk 2 (position 2 after the start token); the mean is restored per chunk.
    weights = torch.ones(8)
    weights[2] = 2.0
    expected = chunks[1] * weights[:, None]
    torch.testing.assert_close(context[0, 8:16], expected * chunks[1].mean() / expected.mean())


def test_pipeline_takes_long_prompts(tiny_pipeline):
    long_prompt = "a red circle " * 30
    kwargs = dict(num_steps=2, guidance_scale=3.0, seed=0, output_type="latent", progress=False)
    full = tiny_pipeline([long_prompt], **kwargs)
    first_chunk_only = tiny_pipeline([("a red circle " * 25).strip()], **kwargs)
    assert full.shape == (1, 4, 8, 8) and not torch.allclose(full, first_chunk_only, atol=1e-4)


# img2img.

def test_start_step_runs_the_last_int_strength_times_steps():
    # Truncated as diffusers' img2img does (tests/test_samplers.py compares the first x_t with it).
    assert start_step(50, 1.0) == 0 and start_step(50, 0.75) == 50 - 37 and start_step(4, 0.5) == 2
    assert start_step(10, 0.16) == 9  # 1.6 steps run 1
    for strength, message in [(0.0, r"in \(0, 1\]"), (1.01, r"in \(0, 1\]"), (0.06, "runs no step")]:
        with pytest.raises(InputError, match=message):
            start_step(10, strength)


def _init_image(seed: int = 5) -> Tensor:
    """A smooth random image (1, 3, 64, 64) in [-1, 1]."""
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear")


def test_img2img_at_strength_one_is_txt2img_from_the_noised_image(tiny_pipeline):
    image = _init_image()
    kwargs = dict(num_steps=4, guidance_scale=3.0, seed=7, output_type="latent", progress=False)
    img2img = tiny_pipeline(["a red circle"], init_images=image, strength=1.0, **kwargs)
    x0 = tiny_pipeline.encode(image)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    a = SCHEDULE.alphas_cumprod[ddim_timesteps(4)[0]].float()
    start = a.sqrt() * x0 + (1 - a).sqrt() * noise
    txt2img = tiny_pipeline(["a red circle"], latents=start, **kwargs)
    torch.testing.assert_close(img2img, txt2img, rtol=0, atol=1e-5)


SAMPLER_VARIANTS = [(name, False) for name in SAMPLERS] + [(name, True) for name in ("euler", "euler_a", "heun",
                                                                                     "dpmpp_2m")]


@pytest.mark.parametrize(("sampler", "karras"), SAMPLER_VARIANTS)
def test_small_strength_changes_the_image_little(tiny_pipeline, sampler, karras):
    # Strength 0.1 of 10 steps runs only the last step, from the init latents at its (low) noise level: timestep
    # 1 for DDIM, DDPM and PLMS (SD's timesteps), 100 for the evenly spaced sigma samplers, which then change
    # the (random) model's latents by 2.4 % of what a full run does (DDIM 0.5 %).
    image = _init_image()
    x0 = tiny_pipeline.encode(image)
    kwargs = dict(num_steps=10, guidance_scale=3.0, seed=1, output_type="latent", progress=False, sampler=sampler,
                  karras=karras)
    change = {strength: (tiny_pipeline(["a blue square"], init_images=image, strength=strength, **kwargs) - x0)
              .abs().mean().item() for strength in (0.1, 0.5, 1.0)}
    assert change[0.1] < 0.03 * change[1.0] and change[0.1] < change[0.5] < change[1.0]


@pytest.mark.parametrize(("sampler", "karras"), [("euler_a", True), ("plms", False)])
def test_img2img_runs_the_sampler_from_the_strengths_step(tiny_pipeline, sampler, karras):
    image = _init_image()
    latents = tiny_pipeline(["a red circle"], num_steps=8, guidance_scale=3.0, seed=3, sampler=sampler, karras=karras,
                            init_images=image, strength=0.5, output_type="latent", progress=False)
    context, uncond_context = tiny_pipeline.text_encoder(["a red circle"]), tiny_pipeline.text_encoder([""])
    denoiser = ClassifierFreeGuidance(tiny_pipeline.unet, context, uncond_context, 3.0)
    # The seed's generator draws the noise, then the sampler's noise (Euler ancestral).
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 4, 8, 8, generator=generator)
    expected = sample(sampler, denoiser, noise, SCHEDULE, 8, karras=karras, stiffness=denoiser.stiffness,
                      generator=generator, start=StartPoint(tiny_pipeline.encode(image), 4), progress=False)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)


def test_img2img_bad_input_is_an_input_error(tiny_pipeline):
    kwargs = dict(num_steps=4, progress=False)
    image = _init_image()
    for extra, message in [
        ({"init_images": image, "strength": 0.0}, r"strength must be in \(0, 1\]"),
        ({"init_images": image, "strength": 0.1}, "runs no step"),
        ({"init_images": image[..., :60, :]}, "multiples of 8"),
        ({"init_images": image, "height": 128}, "was asked for"),
        ({"init_images": image, "masks": torch.ones(1, 1, 32, 32)}, "masks must be"),
        ({"masks": torch.ones(1, 1, 64, 64)}, "needs an init image"),
        ({"strength": 0.5}, "needs an init image"),
    ]:
        with pytest.raises(InputError, match=message):
            tiny_pipeline(["a red circle"], **{**kwargs, **extra})


# Inpainting with a plain U-Net: latent blending.

def _half_mask() -> Tensor:
    """(1, 1, 64, 64): repaint the right half."""
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:] = 1
    return mask


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_latent_blend_follows_the_noised_original_like_diffusers(parameterization):
    # The reference is diffusers' 4-channel inpainting loop: a DDIM step, then the kept region of x_t is
    # replaced by the original noised to the next timestep (the clean original after the last step).
    gen = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, ..., 3:] = 1
    masks[1, ..., :5, :] = 1
    num_steps, first_step = 8, 2
    scheduler = DDIMScheduler(**{**_sd_ddim_scheduler().config, "prediction_type": {"eps": "epsilon", "v":
                                                                                    "v_prediction"}[parameterization]})
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps[first_step:]
    blend = LatentBlend(x0, masks)
    latents = blend(sample("ddim", _toy_denoiser, noise, SCHEDULE, num_steps, parameterization=parameterization,
                           progress=False, start=StartPoint(x0, first_step, blend)))
    expected = scheduler.add_noise(x0, noise, timesteps[:1])
    for i, t in enumerate(timesteps):
        expected = scheduler.step(_toy_denoiser(expected, t.expand(2)), t, expected).prev_sample
        original = scheduler.add_noise(x0, noise, timesteps[i + 1:i + 2]) if i + 1 < len(timesteps) else x0
        expected = (1 - masks) * original + masks * expected
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-4)
    assert torch.equal(latents[masks.expand_as(x0) == 0], x0[masks.expand_as(x0) == 0])


def _noised_original(x0: Tensor, noise: Tensor, name: str, karras: bool, num_steps: int, step: int) -> Tensor:
    """The original latents noised with ``noise`` to the level sampler ``name`` reaches after step ``step``,
    in the diffusion's units (what the callback sees): DDIM and PLMS land on the next DDIM timestep and
    finally alphas_cumprod[0]; the sigma samplers on the next sigma, finally sigma(0). Sigmas are the
    training sigmas at round(linspace(999, 0, num_steps + 1)), or Karras et al.'s (rho 7) between sigma(999)
    and sigma(0)."""
    if name in ("ddim", "plms"):
        timesteps = ddim_timesteps(num_steps)
        a = SCHEDULE.alphas_cumprod[timesteps[step + 1] if step + 1 < num_steps else 0].item()
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise
    all_sigmas = ((1 - SCHEDULE.alphas_cumprod) / SCHEDULE.alphas_cumprod).sqrt()
    if karras:
        ramp = (step + 1) / num_steps
        sigma_max, sigma_min = all_sigmas[-1].item() ** (1 / 7), all_sigmas[0].item() ** (1 / 7)
        sigma = (sigma_max + ramp * (sigma_min - sigma_max)) ** 7
    else:
        sigma = all_sigmas[round(999 * (1 - (step + 1) / num_steps))].item()
    return (x0 + sigma * noise) / (sigma**2 + 1) ** 0.5


@pytest.mark.parametrize(("name", "karras"), SAMPLER_VARIANTS)
def test_latent_blend_keeps_the_unmasked_latents_with_every_sampler(name, karras):
    # The deterministic samplers keep the unmasked region of x_t on the noising path of the original at
    # every step, even between training timesteps (Karras sigmas); the stochastic ones (fresh noise at
    # every step) leave it, but land on the predicted x0, the original there (DDPM), or within the noise
    # level of timestep 0 of it (Euler ancestral's last step, an Euler step into sigma(0)).
    gen = torch.Generator().manual_seed(9)
    x0 = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    masks[0, ..., 3:] = 1
    masks[1, ..., :5, :] = 1
    keep = masks.expand_as(x0) == 0
    num_steps, first_step, seen = 8, 2, []
    latents = sample(name, _toy_denoiser, noise, SCHEDULE, num_steps, karras=karras, progress=False,
                     generator=torch.Generator().manual_seed(10), callback=lambda i, x_t: seen.append((i, x_t)),
                     start=StartPoint(x0, first_step, LatentBlend(x0, masks)))
    assert [i for i, _ in seen] == list(range(first_step, num_steps))
    if name == "ddpm":
        torch.testing.assert_close(latents[keep], x0[keep], rtol=0, atol=1e-6)
    elif name == "euler_a":
        a_0 = SCHEDULE.alphas_cumprod[0].item()
        residual = (latents[keep] / a_0**0.5 - x0[keep]) / ((1 - a_0) / a_0) ** 0.5  # in units of sigma(0)
        assert residual.abs().max() < 5 and 0.5 < residual.std() < 2
    else:
        for i, x_t in seen:
            expected = _noised_original(x0, noise, name, karras, num_steps, i)
            torch.testing.assert_close(x_t[keep], expected[keep], rtol=0, atol=1e-9)
    # The repainted region is the sampler's own.
    assert (latents - x0)[~keep].abs().mean() > 0.1


@pytest.mark.parametrize(("sampler", "karras"), SAMPLER_VARIANTS)
def test_pipeline_inpainting_keeps_the_unmasked_latents(tiny_pipeline, sampler, karras):
    image, mask = _init_image(), _half_mask()
    kwargs = dict(num_steps=4, guidance_scale=3.0, seed=2, output_type="latent", progress=False, sampler=sampler,
                  karras=karras)
    latents = tiny_pipeline(["a red circle"], init_images=image, masks=mask, **kwargs)
    x0 = tiny_pipeline.encode(image)
    assert torch.equal(latents[..., :4], x0[..., :4])
    assert (latents[..., 4:] - x0[..., 4:]).abs().mean() > 0.1
    # The repainted half depends on the prompt; the kept half does not.
    other = tiny_pipeline(["a green triangle"], init_images=image, masks=mask, **kwargs)
    assert torch.equal(other[..., :4], x0[..., :4]) and not torch.allclose(other, latents, atol=1e-4)


# Inpainting with an SD 2 inpainting U-Net (9 input channels).

def test_inpainting_unet_concatenates_latents_mask_and_masked_latents():
    seen = []

    def unet(x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        seen.append(x)
        return x[:, :4]

    gen = torch.Generator().manual_seed(8)
    masks, masked_latents = (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).float(), torch.randn(2, 4, 8, 8)
    x_t = torch.randn(2, 4, 8, 8, generator=gen)
    denoiser = ClassifierFreeGuidance(InpaintingUNet(unet, masks, masked_latents), torch.zeros(2, 3, 8),
                                      torch.ones(2, 3, 8), 5.0)
    denoiser(x_t, torch.tensor([5, 5]))
    (x,) = seen
    assert x.shape == (4, 9, 8, 8)  # guidance batches unconditional and conditional rows
    for half in (x[:2], x[2:]):
        assert torch.equal(half[:, :4], x_t) and torch.equal(half[:, 4:5], masks)
        assert torch.equal(half[:, 5:], masked_latents)


def test_nine_channel_checkpoints_are_detected():
    conv_in = torch.zeros(320, 9, 3, 3)
    state_dict = {UNET_PREFIX + "input_blocks.0.0.weight": conv_in,
                  UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024),
                  UNET_PREFIX + "input_blocks.1.1.proj_in.weight": torch.zeros(320, 320)}
    spec = detect_spec(state_dict, {"global_step": "875000"})
    assert spec.unet.in_channels == 9 and spec.unet.out_channels == 4
    # SD 2 inpainting (continued from 512-base, eps) without a stored step: not taken for a 768-v model.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = detect_spec(state_dict, {})
    assert (spec.parameterization, spec.image_size) == ("eps", 512)


@pytest.fixture
def inpainting_pipeline() -> Pipeline:
    spec = tiny_spec()
    spec = dataclasses.replace(spec, unet=dataclasses.replace(spec.unet, in_channels=9))
    torch.manual_seed(0)
    pipe = Pipeline.from_spec(spec, name="tiny-inpainting")
    randomize_(pipe.unet, seed=3)
    return pipe


def test_nine_channel_inpainting_matches_a_hand_built_sd2_loop(inpainting_pipeline, tmp_path):
    pipe = inpainting_pipeline
    assert Pipeline.from_checkpoint(pipe.save(tmp_path / "inpainting.safetensors")).is_inpainting
    image, mask = _init_image(), _half_mask()
    latents = pipe(["a red circle"], num_steps=3, guidance_scale=4.0, seed=9, init_images=image, masks=mask,
                   output_type="latent", progress=False)
    # SD 2's inpainting inputs: the mask downsampled by nearest neighbour, the latents of the image with
    # the region to repaint set to 0, concatenated after x_t; strength 1 starts at the first timestep.
    small_mask = mask[..., ::8, ::8]
    masked_latents = pipe.autoencoder.encode(image * (mask < 0.5)).mode() * pipe.autoencoder.scale_factor
    context, uncond_context = pipe.text_encoder(["a red circle"]), pipe.text_encoder([""])

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        inputs = torch.cat([x, small_mask, masked_latents], dim=1)
        cond, uncond = pipe.unet(inputs, t, context), pipe.unet(inputs, t, uncond_context)
        return uncond + 4.0 * (cond - uncond)

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    a = SCHEDULE.alphas_cumprod[ddim_timesteps(3)[0]].float()
    x_T = a.sqrt() * pipe.encode(image) + (1 - a).sqrt() * noise
    torch.testing.assert_close(latents, sample_ddim(denoiser, x_T, SCHEDULE, 3, progress=False), rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="inpainting model"):
        pipe(["a red circle"], num_steps=2, progress=False)


# Samplers.

def test_pipeline_runs_the_chosen_sampler(tiny_pipeline):
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    latents = tiny_pipeline(["a red circle"], num_steps=3, guidance_scale=3.0, latents=x_T, sampler="heun",
                            karras=True, guidance_rescale=0.5, output_type="latent", progress=False)
    context, uncond_context = tiny_pipeline.text_encoder(["a red circle"]), tiny_pipeline.text_encoder([""])
    denoiser = ClassifierFreeGuidance(tiny_pipeline.unet, context, uncond_context, 3.0, 0.5)
    expected = sample("heun", denoiser, x_T, SCHEDULE, 3, karras=True, progress=False)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(latents, tiny_pipeline(["a red circle"], num_steps=3, guidance_scale=3.0, latents=x_T,
                                                     guidance_rescale=0.5, output_type="latent", progress=False))
    with pytest.raises(InputError, match="unknown sampler"):
        tiny_pipeline(["a red circle"], num_steps=3, sampler="lms", progress=False)

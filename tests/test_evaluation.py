"""Evaluation: prompt following judged by the checker, sampler comparisons, negative prompts, img2img, FID's
Fréchet distance, PSNR."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import run_main
from ldm.data.loader import to_tensor
from ldm.errors import InputError
from ldm.evaluation import (
    INCEPTION_FILE,
    SamplerSetting,
    inception_features,
    inception_features_model,
    prompt_following,
    prompt_following_by_sampler,
    sampler_quality,
)
from ldm.images import to_pil
from ldm.metrics import frechet_distance, psnr
from ldm.pipeline import Pipeline
from ldm.samplers import DETERMINISTIC_SAMPLERS
from ldm.shapes.checker import parse_caption, read_attributes
from ldm.shapes.dataset import BACKGROUNDS, ShapeSample, render, sample_attributes
from ldm.shapes.evaluation import (
    attributes_kept,
    autoencoder_keep_rates,
    canonical_captions,
    check_caption,
    color_shares,
    erased_shares,
    img2img_keep_rates,
    most_drawn_color,
    negative_prompt_effect,
)
from ldm.weights_io import convert_to_safetensors
from tests.conftest import randomize_, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import check_autoencoder  # noqa: E402
import evaluate_samplers  # noqa: E402


class DrawingPipeline:
    """Stands in for a model: draws exactly what the caption asks, except that it paints every
    `wrong_every`-th image blue, so the expected scores are known in advance."""

    def __init__(self, wrong_every: int):
        self.wrong_every = wrong_every
        self.count = 0

    def __call__(self, captions, num_steps, guidance_scale, seed, progress, sampler="ddim", karras=False):
        images = []
        for caption in captions:
            attrs = parse_caption(caption)
            if self.count % self.wrong_every == 0:
                attrs["color"] = "blue" if attrs["color"] != "blue" else "red"
            images.append(render(ShapeSample(**attrs)))
            self.count += 1
        return images


def test_prompt_following_counts_attributes():
    captions = canonical_captions("val", 40)
    scores = prompt_following(DrawingPipeline(wrong_every=4), captions, check_caption, batch_size=16, progress=False)
    assert scores["all"] == pytest.approx(0.75) and scores["color"] == pytest.approx(0.75)
    assert scores["shape"] == scores["size"] == scores["position"] == scores["background"] == 1.0


def test_frechet_distance_closed_form():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=generator)
    b = torch.randn(4000, 8, generator=generator) * 2 + 1
    # N(0, I) vs N(1, 4I) in 8 dims: ||mu||^2 + tr(I + 4I - 2 * 2I) = 8 + 8.
    assert frechet_distance(a, b) == pytest.approx(16.0, rel=0.08)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_psnr_of_a_known_error():
    images = torch.zeros(2, 3, 8, 8)
    shifted = images + 10 / 127.5  # 10 levels of 255 everywhere
    assert torch.allclose(psnr(images, shifted), torch.full((2,), 10 * torch.log10(torch.tensor(255.0**2 / 100))))


def test_fid_without_inception_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(InputError, match="inception_v3_google"):
        inception_features_model()


def test_inception_sees_what_torchvision_feeds_its_imagenet_weights(tmp_path, monkeypatch):
    # torchvision's documented path for these weights: ImageNet-normalised pixels into a model built with
    # transform_input=True. Our features of [-1, 1] images must equal that, whatever the weights.
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    # torchvision's own initialisation: with PyTorch's default one the features all but vanish (~1e-7).
    reference = inception_v3(weights=None, aux_logits=True, init_weights=True, transform_input=True)
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / INCEPTION_FILE)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = inception_features_model()
    reference.fc = torch.nn.Identity()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        expected = reference.eval()((x - mean) / std)
    scale = expected.abs().max()  # these weights give large features: compare relative to their size
    torch.testing.assert_close(inception_features(model, images) / scale, expected / scale, rtol=0, atol=1e-5)


class GaussianDataUNet(torch.nn.Module):
    """The exact eps of latents ~ N(mean, std^2) per channel, whatever the prompt: a perfect model of that data,
    so every sampler integrates the same probability-flow ODE and more steps must land closer to its end."""

    def __init__(self, config, alphas_cumprod: torch.Tensor, mean: torch.Tensor, std: float):
        super().__init__()
        self.config = config
        self.mean = torch.nn.Parameter(mean.view(1, -1, 1, 1), requires_grad=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.std = std

    def forward(self, x_t, t, context):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        # E[x0 | x_t] of Gaussian data is linear in x_t.
        x0 = self.mean + a.sqrt() * self.std**2 / (a * self.std**2 + 1 - a) * (x_t - a.sqrt() * self.mean)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def with_exact_unet(pipe: Pipeline, std: float) -> Pipeline:
    pipe.unet = GaussianDataUNet(pipe.unet.config, pipe.schedule.alphas_cumprod, torch.tensor([0.5, -0.3, 0.2, 0.0]),
                                 std)
    return pipe


def test_sampler_quality_on_an_exact_model(tiny_pipeline):
    settings = [SamplerSetting("ddim", 1000), *(SamplerSetting("ddim", n) for n in (10, 50)),
                *(SamplerSetting("dpmpp_2m", n, karras=True) for n in (20, 40)),
                *(SamplerSetting(name, n) for name in ("heun", "plms") for n in (10, 20))]
    rows = sampler_quality(with_exact_unet(tiny_pipeline, std=0.5), ["a red circle", "a blue square", "a square"],
                           settings, reference_steps=1000, batch_size=2, progress=False)
    assert [(r["sampler"], r["karras"], r["steps"]) for r in rows] == [
        (s.sampler, s.karras, s.num_steps) for s in settings]
    rmse = {(r["sampler"], r["steps"]): r["rmse"] for r in rows}
    assert rmse[("ddim", 1000)] == 0.0  # the reference itself, from the same seeds
    # DPM++ 2M from 20 steps: its first-order last steps dominate the error at 10 Karras steps.
    for name, few, many in (("ddim", 10, 50), ("dpmpp_2m", 20, 40), ("heun", 10, 20), ("plms", 10, 20)):
        assert rmse[(name, many)] < 0.6 * rmse[(name, few)], name
    # Heun's last step is a single Euler step; PLMS's first step makes a second call.
    evaluations = {(r["sampler"], r["steps"]): r["evaluations"] for r in rows}
    assert evaluations == {("ddim", 1000): 1000, ("ddim", 10): 10, ("ddim", 50): 50, ("dpmpp_2m", 20): 20,
                           ("dpmpp_2m", 40): 40, ("heun", 10): 19, ("heun", 20): 39, ("plms", 10): 11,
                           ("plms", 20): 21}


def test_sampler_quality_compares_at_one_end_point(tiny_pipeline):
    # Data that is a single point: every sampler solves its ODE exactly and stops at the noise level of timestep
    # 0, at sqrt(a_0) x0 + sqrt(1 - a_0) eps, where eps is the noise of the start point. The runs differ only in
    # where x_T starts (DDIM and PLMS at their first timestep, 801 for 5 steps and 951 for 20; the others at
    # sigma(999)), by about 0.001. One that went on to sigma 0 would land sqrt(1 - a_0) |eps| ~ 0.03 away.
    settings = [SamplerSetting(name, 5) for name in DETERMINISTIC_SAMPLERS] + [SamplerSetting("dpmpp_2m", 5, True)]
    rows = sampler_quality(with_exact_unet(tiny_pipeline, std=0.0), ["a red circle", "a square"], settings,
                           reference_steps=20, progress=False)
    assert all(r["rmse"] < 0.002 for r in rows), rows


@pytest.mark.parametrize("sampler", ["euler", "plms"])
def test_sampler_quality_is_the_rmse_over_all_images(tiny_pipeline, sampler):
    captions = ["a red circle", "a small blue square in the center on a white background", "a green triangle"]
    (row,) = sampler_quality(tiny_pipeline, captions, [SamplerSetting(sampler, 3)], reference_steps=6,
                             guidance_scale=3.0, batch_size=2, seed=4, progress=False)
    # The same runs made directly, as one batch: image k from seed 4 + k.
    common = {"guidance_scale": 3.0, "seed": 4, "output_type": "latent", "progress": False}
    reference = tiny_pipeline(captions, num_steps=6, sampler="ddim", **common)
    latents = tiny_pipeline(captions, num_steps=3, sampler=sampler, **common)
    expected = ((latents - reference) ** 2).mean().sqrt().item()
    assert expected > 0.01
    assert row == {"sampler": sampler, "karras": False, "steps": 3, "evaluations": 3 + (sampler == "plms"),
                   "rmse": pytest.approx(expected, rel=1e-4)}


def test_sampler_quality_refuses_stochastic_samplers(tiny_pipeline):
    with pytest.raises(InputError, match="no single result"):
        sampler_quality(tiny_pipeline, ["a red circle"], [SamplerSetting("euler_a", 2)], reference_steps=2)


class SamplerDrawingPipeline:
    """Draws what the caption asks, except that `bad_sampler` gets every colour wrong; calls its `unet` once
    per step, so that the evaluations can be counted, and records each call's settings."""

    def __init__(self, bad_sampler: str):
        self.bad_sampler = bad_sampler
        self.unet = torch.nn.Identity()
        self.calls = []

    def __call__(self, captions, num_steps, guidance_scale, seed, progress, sampler="ddim", karras=False):
        self.calls.append((sampler, karras, num_steps, guidance_scale, seed))
        for _ in range(num_steps):
            self.unet(torch.zeros(1))
        images = []
        for caption in captions:
            attrs = parse_caption(caption)
            if sampler == self.bad_sampler:
                attrs["color"] = "blue" if attrs["color"] != "blue" else "red"
            images.append(render(ShapeSample(**attrs)))
        return images


def test_prompt_following_by_sampler_runs_each_at_its_steps():
    pipe = SamplerDrawingPipeline(bad_sampler="heun")
    results = prompt_following_by_sampler(pipe, canonical_captions("val", 5), check_caption, {"ddim": 4, "heun": 2},
                                          guidance_scale=3.0, batch_size=2, seed=10, progress=False)
    assert results["ddim"] == {"steps": 4, "karras": False, "evaluations": 4, "all": 1.0, "color": 1.0, "shape": 1.0,
                               "size": 1.0, "position": 1.0, "background": 1.0}
    assert results["heun"]["steps"] == 2 and results["heun"]["evaluations"] == 2 and results["heun"]["karras"]
    assert results["heun"]["all"] == results["heun"]["color"] == 0.0 and results["heun"]["shape"] == 1.0
    assert pipe.calls == [("ddim", False, 4, 3.0, 10), ("ddim", False, 4, 3.0, 12), ("ddim", False, 4, 3.0, 14),
                          ("heun", True, 2, 3.0, 10), ("heun", True, 2, 3.0, 12), ("heun", True, 2, 3.0, 14)]


def _shape(color: str, shape: str = "circle", size: str = "large", position: str = "center",
           background: str = "white"):
    return render(ShapeSample(color, shape, size, position, background))


def _blank(background: str = "white") -> np.ndarray:
    return np.full((64, 64, 3), BACKGROUNDS[background], dtype=np.uint8)


def test_color_shares_count_checker_colours():
    images = [_shape("red"), _shape("blue", "square"), np.asarray(_shape("red", "triangle", "small", "top left",
                                                                       "black")), _blank()]
    shares = color_shares(images)
    assert list(shares) == ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink", "none"]
    assert shares == {**dict.fromkeys(shares, 0.0), "red": 0.5, "blue": 0.25, "none": 0.25}
    with pytest.raises(InputError):
        color_shares([])


class NegativePromptPipeline:
    """Draws red circles, except with the negative prompt "red", where images from odd seeds come out blue."""

    def __call__(self, prompts, num_steps, guidance_scale, seed, negative_prompts, progress):
        colors = ["blue" if negative_prompts == "red" and (seed + k) % 2 else "red" for k in range(len(prompts))]
        return [_shape(color) for color in colors]


def test_negative_prompt_effect_counts_both_runs_from_the_same_seeds():
    shares = negative_prompt_effect(NegativePromptPipeline(), num_samples=5, batch_size=2, seed=0, progress=False)
    assert shares["without"]["red"] == 1.0
    assert shares["with"]["red"] == 0.6 and shares["with"]["blue"] == 0.4  # seeds 0, 2 and 4 of 0 .. 4 stay red
    shares = negative_prompt_effect(NegativePromptPipeline(), num_samples=5, batch_size=3, seed=1, progress=False)
    assert shares["without"]["red"] == 1.0 and shares["with"]["red"] == 0.4  # seeds 2 and 4 of 1 .. 5
    assert shares["negative_prompt"] == "red"  # the colour drawn without a negative prompt


class MixedColorPipeline:
    """Without a negative prompt: green from seeds 0, 3, 6, ..., else blue; with one: no object at all."""

    def __init__(self):
        self.negative_prompts = []

    def __call__(self, prompts, num_steps, guidance_scale, seed, negative_prompts, progress):
        self.negative_prompts.append(negative_prompts)
        if negative_prompts:
            return [_blank() for _ in prompts]
        return [_shape("green" if (seed + k) % 3 == 0 else "blue") for k in range(len(prompts))]


def test_negative_prompt_effect_takes_the_most_drawn_colour_unless_told():
    pipe = MixedColorPipeline()
    effect = negative_prompt_effect(pipe, num_samples=5, batch_size=5, progress=False)  # green 2, blue 3
    assert effect["negative_prompt"] == "blue" and pipe.negative_prompts == ["", "blue"]
    assert effect["without"]["blue"] == 0.6 and effect["with"]["none"] == 1.0
    pipe = MixedColorPipeline()
    effect = negative_prompt_effect(pipe, negative_prompt="green", num_samples=5, batch_size=5, progress=False)
    assert effect["negative_prompt"] == "green" and pipe.negative_prompts == ["", "green"]


def test_most_drawn_color_breaks_ties_in_vocabulary_order_and_needs_a_colour():
    none = dict.fromkeys(["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"], 0.0)
    assert most_drawn_color({**none, "pink": 0.4, "cyan": 0.4, "none": 0.2}, "a circle") == "cyan"
    with pytest.raises(InputError, match="no image of 'a circle' has an object of a colour"):
        most_drawn_color({**none, "none": 1.0}, "a circle")


def test_attributes_kept_on_a_hand_made_mix():
    inputs = [_shape("red"), _shape("green", "square"), _shape("blue", "triangle", "small", "top left"),
              _shape("yellow", background="black")]
    outputs = [_shape("red"),  # all kept
               _shape("pink", "square"),  # colour changed
               _shape("blue", "triangle", "large", "bottom right"),  # size and position changed
               _blank("black")]  # the object is gone: only the background stays
    assert attributes_kept(inputs, outputs) == {"all": 0.25, "color": 0.5, "shape": 0.75, "size": 0.5,
                                                "position": 0.5, "background": 1.0}
    with pytest.raises(InputError):
        attributes_kept(inputs, outputs[:3])


class GrayBlankingAutoencoder(torch.nn.Module):
    """Encodes to the image itself and decodes it unchanged, except images on a gray background, which it
    decodes as their plain background (`blank_gray=False`: the identity)."""

    def __init__(self, blank_gray: bool = True):
        super().__init__()
        self.blank_gray = blank_gray
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # device and dtype, as a real module has
        self.gray = to_tensor(render(ShapeSample("red", "circle", "small", "center", "gray")))[:, 0, 0]

    def encode(self, images):
        return SimpleNamespace(mean=images)

    def decode(self, latents):
        corners = latents[:, :, :1, :1]
        on_gray = (corners[:, :, 0, 0] - self.gray).abs().amax(dim=1) < 1e-3
        return torch.where(self.blank_gray & on_gray[:, None, None, None], corners.expand_as(latents), latents)


def test_erased_shares_per_colour_and_background():
    shares = erased_shares(GrayBlankingAutoencoder(), num_samples=60, batch_size=25)
    samples = [sample_attributes("val", k)[0] for k in range(60)]
    assert set(shares) == {f"{s.color} on {s.background}" for s in samples}
    assert shares == {group: float(group.endswith("on gray")) for group in shares}
    assert set(erased_shares(GrayBlankingAutoencoder(blank_gray=False), num_samples=60).values()) == {0.0}


def test_check_autoencoder_fails_on_an_erased_group(monkeypatch, capsys):
    monkeypatch.setattr(check_autoencoder, "load_stage", lambda path, kind: GrayBlankingAutoencoder())
    assert run_main(check_autoencoder.main, ["ae.safetensors", "--num_samples", "40"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ae.safetensors erases the shape")
    assert "on gray (100%)" in error[0]
    monkeypatch.setattr(check_autoencoder, "load_stage", lambda path, kind: GrayBlankingAutoencoder(False))
    assert run_main(check_autoencoder.main, ["ae.safetensors", "--num_samples", "40"]) == 0


class Img2ImgPipeline:
    """Returns the init images below `redraw_from` strength; from there on draws its captions anew, with
    the colour changed."""

    def __init__(self, redraw_from: float):
        self.redraw_from = redraw_from

    def __call__(self, prompts, num_steps, guidance_scale, seed, init_images, strength, progress):
        assert init_images.shape == (len(prompts), 3, 64, 64) and -1 <= init_images.min() < init_images.max() <= 1
        if strength < self.redraw_from:
            return to_pil(init_images)
        images = []
        for prompt in prompts:
            attrs = parse_caption(prompt)
            attrs["color"] = "blue" if attrs["color"] != "blue" else "red"
            images.append(render(ShapeSample(**attrs)))
        return images


def test_img2img_keep_rates_of_stub_pipelines():
    results = img2img_keep_rates(Img2ImgPipeline(redraw_from=0.5), num_samples=5, strengths=(0.01, 0.3, 0.9),
                                 batch_size=2, progress=False)
    assert list(results) == ["0.01", "0.3", "0.9"]
    assert results["0.01"] == results["0.3"] == dict.fromkeys(("all", "color", "shape", "size", "position",
                                                               "background"), 1.0)
    # Redrawn from its own caption, each image keeps all but its colour: the captions are the images'.
    assert results["0.9"] == {"all": 0.0, "color": 0.0, "shape": 1.0, "size": 1.0, "position": 1.0,
                              "background": 1.0}


class RoundTripPipeline:
    """An autoencoder that turns every colour blue on the way back, on images (B, 3, 64, 64)."""

    device, dtype = torch.device("cpu"), torch.float32

    def encode(self, images):
        return images

    def decode(self, latents):
        return torch.stack([to_tensor(render(ShapeSample(**{**read_attributes(image), "color": "blue"})))
                            for image in to_pil(latents)])


def test_autoencoder_keep_rates_compare_each_image_with_its_round_trip():
    # Samples 0 .. 5 of val: two of them are blue.
    num_blue = sum(sample_attributes("val", i)[0].color == "blue" for i in range(6))
    assert num_blue == 2
    rates = autoencoder_keep_rates(RoundTripPipeline(), num_samples=6, batch_size=4)
    assert rates == {"all": 2 / 6, "color": 2 / 6, "shape": 1.0, "size": 1.0, "position": 1.0, "background": 1.0}


def test_evaluate_samplers_script_end_to_end(tmp_path, capsys, monkeypatch):
    pipe = Pipeline.from_spec(tiny_spec(), name="tiny")
    randomize_(pipe.unet, seed=1)
    ckpt = pipe.save(tmp_path / "tiny.safetensors")
    monkeypatch.setattr(evaluate_samplers, "QUALITY_SETTINGS", (SamplerSetting("ddim", 2),
                                                                SamplerSetting("dpmpp_2m", 2, karras=True)))
    monkeypatch.setattr(evaluate_samplers, "DEFAULT_STEPS", {"ddim": 2, "heun": 2})
    out = tmp_path / "report.json"
    argv = ["--ckpt", str(ckpt), "--num_quality", "2", "--reference_steps", "4", "--num_prompts", "2",
            "--num_negative", "2", "--negative_color", "red", "--num_img2img", "2", "--steps", "4", "--device", "cpu",
            "--out", str(out)]
    assert run_main(evaluate_samplers.main, argv) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert [(r["sampler"], r["karras"], r["evaluations"]) for r in results["quality"]["rows"]] == [
        ("ddim", False, 2), ("dpmpp_2m", True, 2)]
    assert list(results["prompt_following"]["by_sampler"]) == ["ddim", "heun"]
    assert results["prompt_following"]["by_sampler"]["heun"]["evaluations"] == 3
    assert set(results["negative_prompt"]["with"]) == {"red", "green", "blue", "yellow", "purple", "orange", "cyan",
                                                       "pink", "none"}
    assert list(results["img2img"]["by_strength"]) == ["0.3", "0.6", "0.9"]
    assert set(results["img2img"]["autoencoder"]) == {"all", "color", "shape", "size", "position", "background"}
    assert printed == evaluate_samplers.report(results) + "\n\n"
    assert set(results["seconds"]) == {"quality", "prompt_following", "negative_prompt", "img2img"}
    for text in ("Latent RMSE to DDIM 4 steps", "| dpmpp_2m | 2 | 2 |", "| heun | 2 | 3 |",
                 '| "red" |', "| 0.6 |", "| autoencoder only |"):
        assert text in printed


def test_evaluate_samplers_runs_only_the_samplers_asked_for(tmp_path, capsys, monkeypatch):
    pipe = Pipeline.from_spec(tiny_spec(), name="tiny")
    randomize_(pipe.unet, seed=1)
    ckpt = pipe.save(tmp_path / "tiny.safetensors")
    monkeypatch.setattr(evaluate_samplers, "QUALITY_SETTINGS", (SamplerSetting("ddim", 2), SamplerSetting("heun", 2),
                                                                SamplerSetting("plms", 2)))
    monkeypatch.setattr(evaluate_samplers, "DEFAULT_STEPS", {"ddim": 2, "heun": 2, "plms": 2})
    out = tmp_path / "report.json"
    argv = ["--ckpt", str(ckpt), "--samplers", "heun", "euler", "--num_quality", "2", "--reference_steps", "4",
            "--num_prompts", "2", "--num_negative", "0", "--num_img2img", "0", "--device", "cpu", "--out", str(out)]
    assert run_main(evaluate_samplers.main, argv) == 0
    results = json.loads(out.read_text())
    assert [r["sampler"] for r in results["quality"]["rows"]] == ["heun"]
    assert list(results["prompt_following"]["by_sampler"]) == ["heun"]


@pytest.mark.parametrize(("dpm", "verdict"), [(0.01, "lands closer"), (0.03, "lands not closer")])
def test_report_states_the_issue_check(dpm, verdict):
    rows = [{"sampler": "ddim", "karras": False, "steps": 50, "evaluations": 50, "rmse": 0.02},
            {"sampler": "dpmpp_2m", "karras": False, "steps": 20, "evaluations": 20, "rmse": dpm},
            {"sampler": "dpmpp_2m", "karras": True, "steps": 20, "evaluations": 20, "rmse": 0.04 - dpm}]
    text = evaluate_samplers.report({"quality": {"reference_steps": 1000, "num_images": 3, "rows": rows}})
    assert f"| dpmpp_2m --no-karras | 20 | 20 | {dpm:.3f} |" in text
    assert f"| dpmpp_2m | 20 | 20 | {0.04 - dpm:.3f} |" in text
    assert (f"DPM++ 2M at 20 steps on evenly spaced noise levels (RMSE {dpm:.4f}) {verdict} to the reference than "
            "DDIM at 50 (RMSE 0.0200)") in text
    other = "lands not closer" if verdict == "lands closer" else "lands closer"
    assert f"DPM++ 2M at 20 steps on Karras noise levels (RMSE {0.04 - dpm:.4f}) {other} to the reference" in text


@pytest.mark.parametrize(("argv", "match"), [
    (["--num_prompts", "-1"], "--num_prompts must be >= 0"),
    (["--reference_steps", "0"], "--reference_steps must be >= 1"),
    (["--ckpt", "MISSING"], "checkpoint not found"),
    (["--negative_color", "violet"], "--negative_color must be a shapes-v1 colour (red, green"),
    (["--out", "TMP"], "is a folder"),
    (["--samplers", "ddpm", "euler_a"], "--samplers names none"),
])
def test_evaluate_samplers_bad_input(tmp_path, capsys, argv, match):
    argv = [{"MISSING": str(tmp_path / "none.safetensors"), "TMP": str(tmp_path)}.get(a, a) for a in argv]
    assert run_main(evaluate_samplers.main, argv) == 1
    assert match in capsys.readouterr().err


def test_evaluate_script_writes_every_figure_of_the_model_card(random_ckpt, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("script_evaluate", ROOT / "scripts" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    out = tmp_path / "eval.json"
    argv = ["--ckpt", str(random_ckpt), "--num_psnr", "6", "--num_prompts", "6", "--num_heldout", "2", "--steps",
            "2", "--scales", "5", "--batch_size", "3", "--out", str(out)]
    assert run_main(evaluate.main, argv) == 0
    results = json.loads(out.read_text())
    assert 0 <= results["autoencoder_keep_rate_val_6"] <= 1 and results["autoencoder_psnr_val_6"] > 0
    assert {"rendered", "decoded"} <= results["autoencoder_sharpness_val_6"].keys()
    rendered = results["autoencoder_sharpness_val_6"]["rendered"]
    assert sum(group["n"] for group in rendered.values()) == 6
    assert set(results["prompt_following_val_6_scale_5"]) >= {"all", "shape", "color"}
    assert "prompt_following_heldout_2_scale_5" in results and "sharpness_val_6_scale_5" in results


def test_compare_decoders_grid_has_a_row_per_rendering_reconstruction_and_generation(random_ckpt, tmp_path):
    spec = importlib.util.spec_from_file_location("script_compare_decoders", ROOT / "scripts" / "compare_decoders.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    out, half = tmp_path / "grid.png", tmp_path / "half.safetensors"
    convert_to_safetensors(random_ckpt, half, torch.float16)  # a float16 file lends its VAE too
    argv = ["--ckpt", str(random_ckpt), "--vae", str(half), "--vae", str(half), "--out", str(out),
            "--num_shapes", "2", "--zoom", "2"]
    assert run_main(compare.main, argv) == 0
    cell = compare.CROP * 2
    grid = Image.open(out)
    assert grid.size == (2 * cell, 5 * cell)
    rows = [grid.crop((0, row * cell, 2 * cell, (row + 1) * cell)).tobytes() for row in range(5)]
    assert rows[1] == rows[2] and rows[3] == rows[4] and rows[0] != rows[1]  # the same VAE twice
    assert run_main(compare.main, [*argv[:4], str(tmp_path / "absent.safetensors"), *argv[6:]]) == 1

"""A1111 infotext: written next to our own PNG text, parsed as A1111 parses it, and replayed by txt2img."""

from __future__ import annotations

import re

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.errors import InputError
from ldm.infotext import A1111_SAMPLERS, format_infotext, parse_infotext, parse_sampler, read_infotext
from ldm.samplers import SAMPLERS
from ldm.settings import GenerationSettings
from tests.test_txt2img import run

# As A1111 1.10 writes it: a two-line prompt, quoted values, keys we do not use.
A1111_TEXT = """masterpiece, a (red:1.2) circle
on a black background
Negative prompt: blurry, (blue:0.8)
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.4, Lora hashes: "fox: a1b2, owl: c3d4", \
Version: v1.10.1"""


def test_every_sampler_has_one_a1111_name_that_reads_back():
    assert set(A1111_SAMPLERS) == set(SAMPLERS)
    for ours, (name, aliases) in A1111_SAMPLERS.items():
        for spelling in (name, ours, *aliases, name.upper()):
            assert parse_sampler(spelling) == (ours, None)
    assert parse_sampler("DPM++ 2M", "Karras") == ("dpmpp_2m", True)
    assert parse_sampler("Euler", "uniform") == ("euler", False)
    assert parse_sampler("DPM++ 2M Karras") == ("dpmpp_2m", True)  # A1111 before 1.9
    assert parse_sampler("Euler a", "Automatic") == ("euler_a", None)
    choices = "DDIM, DDPM, PLMS, Euler, Euler a, Heun, DPM++ 2M"
    with pytest.raises(InputError, match=re.escape(f"unknown sampler 'DPM++ SDE'; choose one of {choices}")):
        parse_sampler("DPM++ SDE")
    with pytest.raises(InputError, match="unknown scheduler 'Exponential'; choose one of Automatic, Uniform, Karras"):
        parse_sampler("Euler", "Exponential")


def test_a1111_infotext_parses_as_a1111_parses_it():
    fields = parse_infotext(A1111_TEXT)
    assert fields["Prompt"] == "masterpiece, a (red:1.2) circle\non a black background"
    assert fields["Negative prompt"] == "blurry, (blue:0.8)"
    assert (fields["Size-1"], fields["Size-2"], fields["Lora hashes"]) == ("512", "768", "fox: a1b2, owl: c3d4")
    values, other = read_infotext(A1111_TEXT)
    assert values == {"prompt": fields["Prompt"], "negative_prompt": "blurry, (blue:0.8)", "sampler": "dpmpp_2m",
                      "karras": True, "steps": 28, "seed": 1234, "scale": 6.5, "width": 512, "height": 768,
                      "strength": 0.4}
    assert other == {"model": "v1-5-pruned-emaonly", "model_hash": "6ce0161689", "batch_index": "0"}
    assert parse_infotext("just a prompt, no parameters") == {"Prompt": "just a prompt, no parameters",
                                                              "Negative prompt": ""}
    with pytest.raises(InputError, match="no Steps and no Sampler and no Seed"):
        read_infotext("just a prompt")
    with pytest.raises(InputError, match="unreadable value"):
        read_infotext("a\nSteps: many, Sampler: DDIM, Seed: 1")


@pytest.mark.parametrize("settings", [
    GenerationSettings(prompt="a circle, big: yes", negative_prompt="red", seed=7, steps=12, sampler="heun",
                       karras=False, scale=3, guidance_rescale=0.5, height=64, width=128, batch_size=3),
    GenerationSettings(prompt="", sampler="ddim", eta=0.5, steps=3, height=64, width=64, clip_skip=2),
    GenerationSettings(prompt="a\nb", sampler="euler_a", steps=4, height=64, width=64),
])
def test_our_infotext_reads_back_into_the_same_settings(settings):
    index = settings.batch_size - 1
    text = format_infotext(settings, index, settings.width, settings.height, "tiny", "0123456789")
    values, other = read_infotext(text)
    assert GenerationSettings(**values) == settings.image(index)
    assert other["batch_index"] == str(index) and other["model"] == "tiny"


def test_txt2img_writes_infotext_and_replays_a_png_that_has_only_it(random_ckpt, tmp_path, capsys):
    code, err = run(["--prompt", "a (red:1.3) circle, small", "--ckpt", str(random_ckpt), "--outdir",
                     str(tmp_path / "a"), "--steps", "3", "--scale", "3", "--seed", "5", "--n_samples", "2",
                     "--sampler", "dpmpp_2m", "--skip_grid", "--device", "cpu"], capsys)
    assert code == 0, err
    original = Image.open(tmp_path / "a" / "00001.png")
    text = original.text["parameters"]
    assert text.startswith("a (red:1.3) circle, small\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, "
                           "CFG scale: 3.0, Seed: 6, Size: 64x64, Model hash: ")
    assert text.endswith(", Model: tiny, Batch size: 2, Batch pos: 1")
    # The same image as A1111 would have written it: the infotext alone.
    info = PngInfo()
    info.add_text("parameters", text)
    original.save(tmp_path / "a1111.png", pnginfo=info)
    code, err = run(["--replay", str(tmp_path / "a1111.png"), "--ckpt", str(random_ckpt), "--outdir",
                     str(tmp_path / "b"), "--device", "cpu"], capsys)
    assert code == 0 and "warning" not in err, err
    (replayed,) = (tmp_path / "b").glob("*.png")
    assert Image.open(replayed).tobytes() == original.tobytes()
    code, err = run(["--replay", str(tmp_path / "a1111.png"), "--outdir", str(tmp_path / "c")], capsys)
    assert code == 1 and "made with the model tiny; pass that file with --ckpt" in err

"""GenerationSettings: defaults filled from the sampler, one-line errors naming labels or flags, the
PNG text round trip, the flags derived from the fields, and the pipeline generating from it."""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from ldm.errors import InputError
from ldm.lora import parse_lora_spec
from ldm.samplers import DEFAULT_STEPS
from ldm.settings import (
    FIELDS,
    FLAGS,
    MAX_SEED,
    GenerationSettings,
    SettingError,
    add_arguments,
    from_arguments,
    from_text,
)


def test_none_means_the_default_of_the_setting_it_depends_on():
    plain = GenerationSettings(prompt="a red circle")
    assert (plain.steps, plain.karras, plain.strength, plain.seed) == (50, False, None, 42)
    heun = GenerationSettings(sampler="heun")
    assert (heun.steps, heun.karras) == (DEFAULT_STEPS["heun"], True)
    assert GenerationSettings(init_img="x.png").strength == 0.75
    assert GenerationSettings(init_img="x.png", mask="m.png").strength == 1.0


def test_batches_give_each_image_its_prompt_and_seed():
    s = GenerationSettings(prompt=["a", "b"], negative_prompt="n", seed=7, batch_size=2)
    assert (s.prompts(), s.negative_prompts(), s.seeds()) == (["a", "b"], ["n", "n"], [7, 8])
    assert s.prompt == ("a", "b")  # lists become tuples: the settings stay hashable
    assert s.image(1) == GenerationSettings(prompt="b", negative_prompt="n", seed=8, batch_size=2)
    assert GenerationSettings(seed=(5, 1), batch_size=2).seeds() == [5, 1]


@pytest.mark.parametrize(("values", "label_message", "flag_message"), [
    ({"scale": -1.0}, "guidance scale must be >= 0, got -1.0", "--scale must be >= 0, got -1.0"),
    ({"scale": math.nan}, "guidance scale must be a finite number, got nan", "--scale must be a finite number"),
    ({"eta": math.inf}, "eta must be a finite number, got inf", "--ddim_eta must be a finite number"),
    ({"guidance_rescale": 1.5}, "guidance rescale must be in [0, 1], got 1.5", "--guidance_rescale must be in"),
    ({"steps": 0}, "steps must be >= 1, got 0", "--steps must be >= 1"),
    ({"steps": 10**9}, "steps must be at most 1000, got 1000000000", "--steps must be at most 1000"),
    ({"steps": 2.5}, "steps must be a whole number, got 2.5", "--steps must be a whole number"),
    ({"height": 100000}, "height must be at most 8192", "--H must be at most 8192"),
    ({"batch_size": 0}, "batch size must be >= 1, got 0", "--n_samples must be >= 1"),
    ({"batch_size": 10**6}, "batch size must be at most 64", "--n_samples must be at most 64"),
    ({"seed": -5}, "seed must be >= 0, got -5", "--seed must be >= 0"),
    ({"seed": 1180591620717411303424}, f"seed must be at most {MAX_SEED}", "--seed must be at most"),
    ({"seed": MAX_SEED, "batch_size": 2}, f"seed must be at most {MAX_SEED - 1}", "--seed must be at most"),
    ({"strength": 0.5}, "strength needs an init image", "--strength needs --init-img"),
    ({"mask": "m.png"}, "a mask needs an init image", "--mask needs --init-img"),
    ({"init_img": "x.png", "strength": 0.0}, "strength must be in (0, 1]", "--strength must be in (0, 1]"),
    ({"karras": "yes"}, "karras must be true or false", "--karras must be true or false"),
    ({"prompt": 5}, "prompt must be text, got 5", "--prompt must be text"),
])
def test_bad_settings_are_one_line_errors_in_the_callers_words(values, label_message, flag_message):
    with pytest.raises(SettingError) as error:
        GenerationSettings(**values)
    assert label_message in str(error.value) and "\n" not in str(error.value)
    assert flag_message in error.value.render(FLAGS)


def test_sampler_options_and_prompt_syntax_are_checked_once_there():
    for values, message in [({"sampler": "lms"}, "unknown sampler 'lms'"), ({"karras": True}, "karras sigmas work"),
                            ({"sampler": "euler", "eta": 0.5}, "eta applies only"),
                            ({"prompt": "a (red:1.3"}, "unclosed '('"), ({"prompt": ()}, "no prompts given"),
                            ({"prompt": ("a", "b")}, "got 2 prompts for a batch size of 1"),
                            ({"init_img": "x.png", "steps": 10, "strength": 0.01}, "runs no step")]:
        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            GenerationSettings(**values)


def test_seed_minus_one_draws_a_seed_that_is_then_recorded():
    drawn = {GenerationSettings(seed=-1).seed for _ in range(5)}
    assert all(isinstance(seed, int) and 0 <= seed < 2**32 for seed in drawn) and len(drawn) > 1
    s = GenerationSettings(seed=-1)
    assert s.to_text(0)["seed"] == str(s.seed)


def test_png_text_reads_back_into_the_same_settings(tmp_path):
    s = GenerationSettings(prompt="a (red:1.2) fox", negative_prompt="blurry", seed=9, steps=12, sampler="dpmpp_2m",
                           karras=False, scale=3.5, guidance_rescale=0.7, height=64, width=128, batch_size=3,
                           init_img=tmp_path / "in.png", strength=0.4, mask=tmp_path / "mask.png")
    text = s.to_text(2)
    assert text["seed"] == "11" and text["init_img"] == str((tmp_path / "in.png").resolve())
    assert all(isinstance(v, str) for v in text.values())
    back = GenerationSettings(**from_text({**text, "model": "tiny"}))  # keys that are not settings are ignored
    assert back == s.image(2) and back.init_img == (tmp_path / "in.png").resolve()
    with pytest.raises(InputError, match="unreadable karras 'maybe'"):
        from_text({**text, "karras": "maybe"})
    # Pixels given as a tensor are not recorded: there is no file to name.
    assert "init_img" not in GenerationSettings(init_img=torch.zeros(1, 3, 8, 8)).to_text(0)


def test_every_field_has_a_flag_and_the_flags_build_the_settings():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert set(FIELDS) == {f.name for f in fields(GenerationSettings)} == set(FLAGS)
    args = parser.parse_args(["--prompt", "a", "--ddim_steps", "7", "--plms", "--no-karras", "--scale", "2",
                              "--eta", "0", "--H", "128", "--n_samples", "2", "--init_img", "in.png"])
    s = from_arguments(args)
    assert (s.prompt, s.steps, s.sampler, s.karras, s.scale, s.height, s.batch_size) == ("a", 7, "plms", False, 2.0,
                                                                                         128, 2)
    assert (s.init_img, s.strength, s.width, s.seed) == (Path("in.png"), 0.75, None, 42)  # not given: defaults
    # Over recorded settings: the flags given win; recorded noise levels go with the recorded sampler only.
    recorded = {"prompt": "old", "seed": 3, "sampler": "euler", "karras": True}
    assert from_arguments(parser.parse_args([]), recorded).karras is True
    assert from_arguments(parser.parse_args(["--sampler", "euler_a"]), recorded).karras is False
    assert from_arguments(parser.parse_args(["--seed", "8"]), recorded).seed == 8
    with pytest.raises(InputError, match="^--scale must be >= 0"):
        from_arguments(parser.parse_args(["--scale", "-3"]))


def test_pipeline_generates_from_settings_as_from_keywords(tiny_pipeline):
    s = GenerationSettings(prompt=("a red circle", "a blue square"), batch_size=2, steps=3, scale=4.0, seed=5,
                           sampler="euler")
    latents = tiny_pipeline.generate(s, output_type="latent", progress=False)
    same = tiny_pipeline(["a red circle", "a blue square"], num_steps=3, guidance_scale=4.0, seed=5, sampler="euler",
                         output_type="latent", progress=False)
    assert torch.equal(latents, same) and latents.abs().sum() > 0
    solo = GenerationSettings(prompt="a blue square", steps=3, scale=4.0, seed=6, sampler="euler")
    assert torch.allclose(tiny_pipeline.generate(solo, output_type="latent", progress=False)[0], latents[1],
                          atol=1e-5)  # image 1 of the batch, made alone
    with pytest.raises(InputError, match="unknown setting.*num_stepz"):
        tiny_pipeline(["a red circle"], num_stepz=3)


def test_loras_and_clip_skip_round_trip_through_png_text(tmp_path):
    settings = GenerationSettings(prompt="a <lora:style:0.5> circle", lora=[f"{tmp_path}/a.safetensors:0.5",
                                  "b.safetensors"], clip_skip=2)
    text = settings.to_text(0)
    assert text["lora"] == f"{tmp_path}/a.safetensors:0.5\n{Path('b.safetensors').resolve()}:1"
    assert text["clip_skip"] == "2"
    replayed = GenerationSettings(**from_text(text))
    assert replayed.clip_skip == 2 and [parse_lora_spec(s) for s in replayed.lora] == [
        (tmp_path / "a.safetensors", 0.5), (Path("b.safetensors").resolve(), 1.0)]
    for bad, message in (({"clip_skip": 0}, "clip skip must be >= 1"), ({"lora": "a.safetensors"}, "must be a list"),
                         ({"lora": ["a.safetensors:inf"]}, "not a finite number")):
        with pytest.raises(InputError, match=message):
            GenerationSettings(**bad)

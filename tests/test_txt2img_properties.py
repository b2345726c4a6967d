"""Property-based: whatever txt2img's flags, or the PNG text that --replay reads, say, the run ends with
images or with one `error: ...` line and exit 1: never a traceback, a hang or a partial file.

Each value is usually one its flag accepts (so that runs get past the first check), else drawn over the
whole type (any integer, any float with nan and inf, any text), except where a valid value is only slow:
--steps and --n_iter are drawn small or out of range (--n_iter above txt2img's --max_images default),
--max_images small or refused, and --compile (minutes of compiling) is left out. The free memory is set
to 16 MiB, so that sizes and batches drawn anywhere either fit the tiny model in a few MiB or are
refused by the memory check.
"""

from __future__ import annotations

import contextlib
import io
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm import pipeline
from ldm.cli import run_main
from ldm.precision import PRECISION_NAMES
from ldm.settings import FIELDS
from tests.test_txt2img import tiny_ckpt, txt2img, write_bomb_png  # noqa: F401 - tiny_ckpt is a fixture

BOOLEAN_FLAGS = ("--plms", "--karras", "--no-karras", "--use_ema", "--skip_grid", "--channels_last")
SECONDS_PER_RUN = 60  # a hang: far past the slowest run drawn (a few seconds)


class Hang(BaseException):
    """Not an Exception: run_main must not turn it into an error line."""


def anything() -> st.SearchStrategy[str]:
    return st.one_of(st.integers().map(str), st.floats().map(str), st.text(max_size=12),
                     st.sampled_from(["nan", "inf", "-inf", "1e309", "", "-1", "0", "0.5", "1"]))


def small_or_out_of_range(high: int | None = None) -> st.SearchStrategy[str]:
    """A count that runs fast (at most 3) or is refused (below 1, above `high`, not a whole number)."""
    def slow(text: str) -> bool:
        try:
            number = int(text)  # as argparse reads it: " 7", "+7" and other digits than 0-9 too
        except ValueError:
            return False
        return 3 < number and (high is None or number <= high)

    above = [] if high is None else [st.integers(min_value=high + 1)]
    return st.one_of(st.integers(max_value=3), *above, anything().filter(lambda text: not slow(text))).map(str)


def image_files(folder: Path) -> dict[str, Path]:
    """Init-image and mask candidates: fine, of another size, odd sides, not an image, missing, a folder,
    and a PNG whose header claims 30000 x 30000 pixels (a decompression bomb)."""
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "init.png")
    Image.new("L", (64, 64), 255).save(folder / "mask.png")
    Image.new("L", (32, 32)).save(folder / "small.png")
    Image.new("RGB", (60, 64)).save(folder / "odd.png")
    (folder / "text.png").write_text("not an image")
    write_bomb_png(folder / "bomb.png")
    files = {name: folder / f"{name}.png" for name in ("init", "mask", "small", "odd", "text", "bomb", "missing")}
    return {**files, "folder": folder}


def flag_values(files: dict[str, Path]) -> dict[str, st.SearchStrategy[str]]:
    """Each flag's values: usually one it accepts (so that runs get past the first check), else anything."""
    prompt = st.text(alphabet="ab ():1.5<>\\[]\n", max_size=20)
    valid = {"--sampler": st.sampled_from(["ddim", "ddpm", "plms", "euler", "euler_a", "heun", "dpmpp_2m"]),
             "--precision": st.sampled_from(list(PRECISION_NAMES)),
             "--prediction": st.sampled_from(["eps", "v"]), "--attention": st.sampled_from(["sdpa", "sliced", "math",
                                                                                           "xformers"]),
             "--device": st.sampled_from(["cpu", "meta", "cuda", "mps"]),
             "--seed": st.one_of(st.integers(0, 2**64 - 1), st.just(-1)), "--scale": st.floats(0, 30),
             "--guidance_rescale": st.floats(0, 1), "--ddim_eta": st.floats(0, 1),
             "--H": st.sampled_from([8, 16, 32, 64, 128]), "--W": st.sampled_from([8, 16, 32, 64, 128]),
             "--n_samples": st.integers(1, 4), "--strength": st.floats(0.01, 1), "--clip_skip": st.integers(1, 3),
             "--vae_tile_size": st.sampled_from([0, 4, 8, 16]), "--max_memory": st.floats(1e-4, 1),
             "--prompt": prompt, "--negative_prompt": prompt, "--steps": st.integers(1, 3),
             "--n_iter": st.integers(1, 2), "--max_images": st.integers(1, 12),
             **{flag: st.just("") for flag in BOOLEAN_FLAGS},
             # SDXL's settings: the tiny model refuses them, after they parse.
             **{flag: st.sampled_from(["64,64", "0,0", "(32, 16)"]) for flag in ("--original_size", "--crop_coords",
                                                                                  "--target_size")},
             "--aesthetic_score": st.floats(0, 10), "--negative_aesthetic_score": st.floats(0, 10),
             "--refiner_switch": st.floats(0.1, 0.9),
             **{flag: st.sampled_from([str(p) for p in files.values()])
                for flag in ("--init-img", "--mask", "--lora", "--vae", "--config", "--embeddings_dir", "--lora_dir",
                             "--from-file", "--refiner")}}
    # --n_iter above --max_images's default is refused at once, as --max_images is drawn at most 12 (or refused).
    bad = {"--steps": small_or_out_of_range(1000), "--n_iter": small_or_out_of_range(txt2img.MAX_IMAGES),
           "--max_images": small_or_out_of_range()}
    return {flag: st.one_of(*[value.map(str)] * 3, bad.get(flag, anything())) for flag, value in valid.items()}


def png_text(flags: dict[str, st.SearchStrategy[str]]) -> st.SearchStrategy[dict[str, str]]:
    """What --replay reads: the settings' keys (values as for their flags) and txt2img's others."""
    values = {name: flags[field.metadata["flags"][0]] for name, field in FIELDS.items()}
    values["karras"] = st.one_of(st.sampled_from(["True", "False"]), anything())
    others = {"height": flags["--H"], "width": flags["--W"], "batch_index": st.one_of(st.integers(0, 3).map(str),
                                                                                      anything()),
              **{key: st.one_of(st.just("tiny.safetensors"), anything()) for key in ("model_file", "vae")},
              **{key: anything() for key in ("use_ema", "embeddings", "lora_hashes")}}
    text = st.fixed_dictionaries({"prompt": values.pop("prompt"), "seed": values.pop("seed"),
                                  "steps": values.pop("steps")}, optional={**values, **others})
    return text.map(lambda text: {key: value.replace("\0", "") for key, value in text.items()})


def check_run(argv: list[str], outdir: Path) -> None:
    """The run's stderr and files: images with exit 0, or one error line and exit 1 leaving no file."""
    def hang(*_):
        raise Hang(f"txt2img {argv} ran past {SECONDS_PER_RUN} s")

    err, out = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(SECONDS_PER_RUN)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as mp:
            mp.setattr(pipeline, "available_memory", lambda device: 16 * 2**20)
            code = run_main(txt2img.main, argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err, files = err.getvalue(), sorted(outdir.rglob("*")) if outdir.exists() else []
    assert "Traceback" not in err, err
    event("images" if code == 0 else " ".join(word for word in err.split()[1:4] if "/" not in word))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if code == 1:
        assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
        assert files == [], (argv, err, files)
    else:
        assert code == 0 and not errors, err
        written = [Path(line) for line in out.getvalue().splitlines()]
        assert written and sorted(written) == files, (written, files)
        for path in files:  # whole PNGs under their final names
            assert not path.name.startswith(".")
            with Image.open(path) as image:
                image.load()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return image_files(tmp_path_factory.mktemp("inputs"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_flags_give_images_or_one_error_line(tiny_ckpt, inputs, data):  # noqa: F811 - the fixture
    values = flag_values(inputs)
    flags = data.draw(st.lists(st.sampled_from(sorted(values)), max_size=5, unique=True), label="flags")
    argv = ["--ckpt", str(tiny_ckpt), "--steps", "1"]
    if "--from-file" not in flags:
        argv += ["--prompt", "a red circle"]
    for flag in flags:
        value = data.draw(values[flag], label=flag)
        argv += [flag] if flag in BOOLEAN_FLAGS else [flag, value]
    with tempfile.TemporaryDirectory() as folder:
        check_run([*argv, "--outdir", f"{folder}/out"], Path(folder) / "out")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_png_text_replays_or_is_one_error_line(tiny_ckpt, inputs, data):  # noqa: F811 - the fixture
    text = data.draw(png_text(flag_values(inputs)), label="PNG text")
    with tempfile.TemporaryDirectory() as folder:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        png = Path(folder) / "recorded.png"
        Image.new("RGB", (8, 8)).save(png, pnginfo=info)
        check_run(["--replay", str(png), "--ckpt", str(tiny_ckpt), "--outdir", f"{folder}/out"], Path(folder) / "out")

"""The persistent compile cache (ldm.compile_cache): programs reused by a later pipeline, corrupt entries
rebuilt, changed weights never served by a stale program."""

from __future__ import annotations

import pytest
import torch

from ldm.compile_cache import CompiledUNet, default_cache_dir, program_key
from ldm.errors import InputError
from ldm.pipeline import Pipeline
from tests.conftest import randomize_, tiny_spec

KWARGS = dict(num_steps=2, guidance_scale=3.0, output_type="tensor", progress=False)
PROMPTS = ["a red circle"]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max())


def tiny() -> Pipeline:
    """The same weights in every call, as a later process loading one checkpoint has."""
    torch.manual_seed(0)
    pipe = Pipeline.from_spec(tiny_spec())
    randomize_(pipe.unet, seed=1)
    return pipe


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LDM_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "ldm" / "compiled"
    monkeypatch.setenv("LDM_COMPILE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_the_key_changes_with_shape_dtype_and_inlined_weights_only():
    unet = tiny().unet
    inputs = (torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, 77, 64))
    key = program_key(unet, inputs)
    assert program_key(unet, (torch.zeros(4, 4, 8, 8), *inputs[1:])) != key
    assert program_key(unet, (inputs[0], inputs[1], torch.zeros(2, 154, 64))) != key
    assert program_key(unet, (inputs[0].double(), *inputs[1:])) != key
    with torch.no_grad():
        unet.input_blocks[0][0].weight.add_(1)  # read from the module at load time: same program
        assert program_key(unet, inputs) == key
        unet.out[2].bias.add_(1)  # 4 elements: inductor copies it into the code
        assert program_key(unet, inputs) != key


def test_a_corrupt_entry_is_a_one_line_warning_and_runs_eager(tmp_path):
    pipe = tiny()
    reference = pipe(PROMPTS, **KWARGS)
    pipe.compile_unet("auto", tmp_path)
    assert torch.equal(pipe(PROMPTS, **KWARGS), reference)  # nothing cached: eager, nothing built
    assert (pipe.compiled_unet.loaded, pipe.compiled_unet.built) == (0, 0)
    (path,) = pipe.compiled_unet.entries.values()
    path.write_bytes(b"not a package")
    pipe.compile_unet("auto", tmp_path)
    with pytest.warns(UserWarning, match="could not be loaded.*running eager") as caught:
        images = pipe(PROMPTS, **KWARGS)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert torch.equal(images, reference)


def test_unknown_compile_mode_is_an_input_error():
    with pytest.raises(InputError, match="jit, cache, auto or off"):
        tiny().compile_unet("fast")


@pytest.mark.slow
def test_a_later_pipeline_loads_the_program_and_sees_new_weights(tmp_path):
    # One AOTInductor build of the tiny U-Net (about a minute on 2 busy cores), then loads only.
    first = tiny()
    reference = first(PROMPTS, **KWARGS)
    first.compile_unet("auto", tmp_path)
    first(PROMPTS, **KWARGS)
    (path,) = first.compiled_unet.entries.values()
    path.write_bytes(b"half a package")  # a corrupt entry: rebuilt with a warning
    first.compile_unet("cache", tmp_path)
    with pytest.warns(UserWarning, match="could not be loaded.*rebuilding it"):
        images = first(PROMPTS, **KWARGS)
    assert (first.compiled_unet.loaded, first.compiled_unet.built) == (0, 1)
    assert close(images, reference)
    assert not list(tmp_path.glob(".*"))  # no temporary file left

    second = tiny().compile_unet("cache", tmp_path)  # as a new process finds it
    assert close(second(PROMPTS, **KWARGS), reference)
    assert (second.compiled_unet.loaded, second.compiled_unet.built) == (1, 0)

    # A weight changed in place (what a LoRA merge does) is read by the loaded program.
    with torch.no_grad():
        second.unet.input_blocks[0][0].weight.mul_(1.5)
    eager = tiny()
    eager.unet.load_state_dict(second.unet.state_dict())
    changed = eager(PROMPTS, **KWARGS)
    assert not close(changed, reference)
    assert close(second(PROMPTS, **KWARGS), changed)
    assert (second.compiled_unet.loaded, second.compiled_unet.built) == (1, 0)

    # A weight the program inlines changed: another key, nothing cached for it, so eager in auto mode.
    with torch.no_grad():
        second.unet.out[2].bias.add_(0.5)
        eager.unet.out[2].bias.add_(0.5)
    second.compile_unet("auto", tmp_path)
    assert torch.equal(second(PROMPTS, **KWARGS), eager(PROMPTS, **KWARGS))
    assert (second.compiled_unet.loaded, second.compiled_unet.built) == (0, 0)


def test_compiled_unet_keeps_the_unets_config():
    unet = tiny().unet
    assert CompiledUNet(unet).config is unet.config

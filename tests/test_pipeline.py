"""Pipeline end to end on a tiny random model: seeds, saving and loading, bad input."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from ldm import pipeline, samplers
from ldm.errors import InputError
from ldm.pipeline import Pipeline
from ldm.samplers import SAMPLERS
from ldm.sd_checkpoint import spec_from_yaml
from ldm.settings import GenerationSettings
from ldm.weights_io import read_checkpoint
from tests.conftest import randomize_

PROMPTS = ["a red circle", "a large blue square on a white background"]


def test_generates_one_image_per_prompt(tiny_pipeline):
    images = tiny_pipeline(PROMPTS, num_steps=3, guidance_scale=5.0, seed=1, progress=False)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    tensor = tiny_pipeline(PROMPTS, num_steps=3, guidance_scale=5.0, seed=1, output_type="tensor", progress=False)
    assert tensor.shape == (2, 3, 64, 64) and tensor.min() >= -1 and tensor.max() <= 1
    # The PIL images are the tensor quantised to 8 bits.
    first = torch.from_numpy(np.asarray(images[0], dtype=np.float32)).permute(2, 0, 1)
    assert (first - (tensor[0] + 1) * 127.5).abs().max() <= 0.5 + 1e-3


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_image_k_of_a_batch_is_reproducible_alone(tiny_pipeline, eta):
    batch = tiny_pipeline(PROMPTS, num_steps=4, eta=eta, seed=10, output_type="latent", progress=False)
    alone = tiny_pipeline(PROMPTS[1:], num_steps=4, eta=eta, seed=11, output_type="latent", progress=False)
    assert torch.allclose(batch[1:], alone, atol=1e-5)
    other_seed = tiny_pipeline(PROMPTS[1:], num_steps=4, eta=eta, seed=12, output_type="latent", progress=False)
    assert not torch.allclose(alone, other_seed, atol=1e-3)


def test_given_latents_replace_the_seeded_noise(tiny_pipeline):
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    seeded = tiny_pipeline(PROMPTS[:1], num_steps=2, seed=3, output_type="latent", progress=False)
    given = tiny_pipeline(PROMPTS[:1], num_steps=2, seed=99, latents=x_T, output_type="latent", progress=False)
    assert torch.allclose(seeded, given)
    with pytest.raises(InputError, match="initial latents must have shape"):
        tiny_pipeline(PROMPTS[:1], num_steps=2, latents=torch.randn(1, 4, 4, 4), progress=False)


def test_prompt_steers_the_result(tiny_pipeline):
    a = tiny_pipeline(["a red circle"], num_steps=3, seed=0, output_type="latent", progress=False)
    b = tiny_pipeline(["a green triangle"], num_steps=3, seed=0, output_type="latent", progress=False)
    assert not torch.allclose(a, b, atol=1e-4)


def test_stages_can_be_driven_alone(tiny_pipeline):
    context = tiny_pipeline.text_encoder(PROMPTS)
    assert context.shape == (2, 77, 64)
    out = tiny_pipeline.unet(torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), context)
    assert out.shape == (2, 4, 8, 8)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = tiny_pipeline.encode(images)
    assert latents.shape == (1, 4, 8, 8)
    expected = tiny_pipeline.autoencoder.encode(images).mean * tiny_pipeline.autoencoder.scale_factor
    assert torch.allclose(latents, expected)
    assert tiny_pipeline.decode(latents).shape == (1, 3, 64, 64)


def test_save_and_load_round_trip(tiny_pipeline, tmp_path):
    path = tiny_pipeline.save(tmp_path / "tiny.safetensors")
    loaded = Pipeline.from_checkpoint(path)
    assert loaded.spec == tiny_pipeline.spec
    kwargs = dict(num_steps=3, seed=5, output_type="tensor", progress=False)
    assert torch.equal(tiny_pipeline(PROMPTS, **kwargs), loaded(PROMPTS, **kwargs))
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"height": 60}, "height must be a positive multiple of 8"),
    ({"width": 0}, "width must be a positive multiple of 8"),
    ({"num_steps": 0}, "steps must be >= 1"),
    ({"guidance_scale": -1.0}, "guidance scale must be >= 0"),
    ({"output_type": "np"}, "output_type must be 'pil', 'tensor' or 'latent', got 'np'"),
])
def test_bad_arguments_are_input_errors(tiny_pipeline, kwargs, message):
    with pytest.raises(InputError, match=message):
        tiny_pipeline(PROMPTS, **{"num_steps": 2, **kwargs})


def test_bad_checkpoints_are_one_line_input_errors(tiny_pipeline, tmp_path):
    with pytest.raises(InputError, match="checkpoint not found"):
        Pipeline.from_checkpoint(tmp_path / "missing.safetensors")

    good = tiny_pipeline.save(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        Pipeline.from_checkpoint(truncated)

    ckpt = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    with pytest.raises(InputError, match="cannot read"):
        Pipeline.from_checkpoint(ckpt)

    unknown = tmp_path / "unknown.safetensors"
    save_file({"some.other.weight": torch.zeros(2)}, str(unknown))
    with pytest.raises(InputError, match="unknown checkpoint family"):
        Pipeline.from_checkpoint(unknown)

    tensors, metadata = read_checkpoint(good)
    key = "model.diffusion_model.out.2.weight"
    tensors.pop(key)
    tensors["model.diffusion_model.extra.weight"] = torch.zeros(1)
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata=metadata)
    with pytest.raises(InputError, match=r"missing out\.2\.weight; unexpected extra\.weight"):
        Pipeline.from_checkpoint(damaged)


def test_negative_prompt_replaces_the_empty_unconditional_prompt(tiny_pipeline):
    kwargs = dict(num_steps=3, guidance_scale=4.0, seed=2, output_type="latent", progress=False)
    default = tiny_pipeline(PROMPTS, **kwargs)
    assert torch.equal(default, tiny_pipeline(PROMPTS, negative_prompts="", **kwargs))
    negative = tiny_pipeline(PROMPTS, negative_prompts=["green", "red"], **kwargs)
    assert not torch.allclose(default, negative, atol=1e-4)
    # With guidance 1 the unconditional branch is never run, so the negative prompt cannot matter.
    no_guidance = {**kwargs, "guidance_scale": 1.0}
    plain = tiny_pipeline(PROMPTS, **no_guidance)
    assert torch.equal(plain, tiny_pipeline(PROMPTS, negative_prompts="x", **no_guidance))
    # Row 1 with its own negative prompt equals a batch of one with the same negative prompt.
    alone = tiny_pipeline(PROMPTS[1:], negative_prompts="red", **{**kwargs, "seed": 3})
    assert torch.allclose(negative[1:], alone, atol=1e-5)
    with pytest.raises(InputError, match="negative prompts for 2 prompts"):
        tiny_pipeline(PROMPTS, negative_prompts=["a", "b", "c"], **kwargs)


@pytest.mark.parametrize(("guidance_scale", "stiffness"), [(0.5, 1.0), (1.0, 1.0), (7.5, 7.5)])
def test_samplers_get_the_guided_stiffness(tiny_pipeline, monkeypatch, guidance_scale, stiffness):
    # PLMS bounds its orders by how fast the guided eps can change (ldm.timestep_samplers.plms_orders); the pipeline
    # passes on ClassifierFreeGuidance.stiffness, max(1, guidance scale).
    seen = []

    def recording_sample(*args, **kwargs):
        seen.append(kwargs["stiffness"])
        return samplers.sample(*args, **kwargs)

    monkeypatch.setattr(pipeline, "sample", recording_sample)
    tiny_pipeline(PROMPTS, num_steps=3, guidance_scale=guidance_scale, sampler="plms", output_type="latent",
                  progress=False)
    assert seen == [stiffness]


def test_yaml_with_an_unknown_parameter_is_an_input_error(tiny_pipeline, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  params:\n    unet_config:\n      params:\n        model_channelz: 3\n"
                      "    first_stage_config:\n      params: {}\n    cond_stage_config:\n      target: x\n")
    with pytest.raises(InputError, match=r"unknown UNetConfig parameter\(s\) \['model_channelz'\]"):
        Pipeline.from_checkpoint(tiny_pipeline.save(tmp_path / "tiny.safetensors"), config=config)


def test_yaml_with_an_unknown_text_layer_is_an_input_error(tmp_path):
    # ldm's FrozenCLIPEmbedder knows layer "hidden" too; ours takes "last" and "penultimate" only.
    config = tmp_path / "hidden.yaml"
    config.write_text("model:\n  params:\n    unet_config:\n      params: {}\n"
                      "    first_stage_config:\n      params: {}\n"
                      "    cond_stage_config:\n      target: x\n      params:\n        layer: hidden\n")
    with pytest.raises(InputError, match="layer must be 'last' or 'penultimate', got 'hidden'"):
        spec_from_yaml(config)


def test_compiled_unet_with_frozen_weights_gives_the_same_images(tiny_pipeline):
    # About 35 s on 2 CPU cores, nearly all of it compiling: the one check that the compiled path runs.
    kwargs = dict(num_steps=3, guidance_scale=3.0, output_type="tensor", progress=False)
    reference = tiny_pipeline(PROMPTS, **kwargs)
    images = tiny_pipeline.compile_unet()(PROMPTS, **kwargs)
    assert (images - reference).abs().max() < 1e-4 * reference.abs().max()
    # On a CPU the frozen graph runs its convolutions NHWC (faster there: docs/benchmarks.md).
    weights = [m.weight for m in tiny_pipeline.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not torch.equal(images, tiny_pipeline(PROMPTS, **{**kwargs, "seed": 1}))


def test_channels_last_runs_every_convolution_nhwc_with_the_same_images(tiny_pipeline):
    randomize_(tiny_pipeline.autoencoder, seed=2)
    prompts = ["a red circle", "a blue square"]
    reference = tiny_pipeline(prompts, num_steps=3, guidance_scale=3.0, output_type="tensor", progress=False)
    tiny_pipeline.to_channels_last()
    layouts = []
    hooks = [conv.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(
        memory_format=torch.channels_last))) for module in (tiny_pipeline.unet, tiny_pipeline.autoencoder)
        for conv in module.modules() if isinstance(conv, torch.nn.Conv2d)]
    images = tiny_pipeline(prompts, num_steps=3, guidance_scale=3.0, output_type="tensor", progress=False)
    for hook in hooks:
        hook.remove()
    assert layouts and all(layouts)  # a contiguous() somewhere in a block would turn its convolutions back
    assert (images - reference).abs().max() < 1e-4 * reference.abs().max()


def test_decode_runs_the_decoder_channels_last_with_the_same_images(tiny_pipeline):
    # Pipeline.decode lays the latents out NHWC (less memory on CPU): the decoder's convolutions
    # follow, and the images equal a plain NCHW decode.
    randomize_(tiny_pipeline.autoencoder, seed=3)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    layouts = []
    hooks = [conv.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(
        memory_format=torch.channels_last))) for conv in tiny_pipeline.autoencoder.decoder.modules()
        if isinstance(conv, torch.nn.Conv2d)]
    with torch.no_grad():
        images = tiny_pipeline.decode(latents)
    for hook in hooks:
        hook.remove()
    assert layouts and all(layouts)
    with torch.no_grad():
        reference = tiny_pipeline.autoencoder.decode(latents / tiny_pipeline.autoencoder.scale_factor).clamp(-1, 1)
    assert reference.is_contiguous()
    assert (images - reference).abs().max() < 1e-5


class HostReads(TorchDispatchMode):
    """Counts the ops that hand a tensor's values to the host (`.item()`, `bool(t)`, `float(t)`, `nonzero`):
    on a GPU each one waits for the device to finish its queued work."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def inpainting_inputs() -> dict[str, torch.Tensor]:
    """A random init image (1, 3, 64, 64) in [-1, 1] and a mask that repaints its right half."""
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:] = 1
    return {"init_images": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1,
            "masks": mask}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_sampling_loop_reads_no_tensor_values_on_the_host(tiny_pipeline, sampler):
    # Reads before the loop are fine; one inside it would sync host and device at every step, so the
    # count must not grow with the steps (txt2img with guidance rescale, and inpainting).
    def host_reads(num_steps: int, **inputs) -> int:
        with torch.no_grad(), HostReads() as reads:
            tiny_pipeline(PROMPTS, num_steps=num_steps, guidance_scale=3.0, sampler=sampler, output_type="latent",
                          progress=False, **inputs)
        return reads.count

    assert host_reads(2, guidance_rescale=0.5) == host_reads(4, guidance_rescale=0.5)
    inpainting = {**inpainting_inputs(), "strength": 0.9}
    assert host_reads(2, **inpainting) == host_reads(4, **inpainting)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipeline_follows_float32(tiny_pipeline, dtype):
    # Every module cast, as txt2img --precision fp16 / bf16 does on a GPU: the U-Net's GroupNorm32, which
    # normalizes in float32, must take the cast affine parameters. Tolerance: 10 units of the format's
    # rounding (torch.finfo(dtype).eps) on images in [-1, 1], for every sampler, txt2img and inpainting.
    half = copy.deepcopy(tiny_pipeline).to(dtype=dtype)
    for sampler in SAMPLERS:
        for inputs in ({}, inpainting_inputs()):
            settings = {"num_steps": 3, "guidance_scale": 3.0, "sampler": sampler, "seed": 2, "output_type": "tensor",
                        "progress": False, **inputs}
            expected = tiny_pipeline(PROMPTS, **settings)
            images = half(PROMPTS, **settings)
            assert images.dtype == dtype
            assert (images.float() - expected).abs().max() < 10 * torch.finfo(dtype).eps, (sampler, list(inputs))


def test_context_cache_encodes_a_repeated_prompt_once(tiny_pipeline, monkeypatch):
    settings = GenerationSettings(prompt="a red circle", negative_prompt="blue", steps=2, seed=3)
    plain = tiny_pipeline.generate(settings, output_type="latent", progress=False)
    calls, encode = [], pipeline.encode_prompts_pooled
    monkeypatch.setattr(pipeline, "encode_prompts_pooled",
                        lambda *args, **kwargs: calls.append(args[1]) or encode(*args, **kwargs))
    tiny_pipeline.enable_context_cache(size=1)
    first = tiny_pipeline.generate(settings, output_type="latent", progress=False)
    again = tiny_pipeline.generate(replace(settings, seed=4), output_type="latent", progress=False)
    assert calls == [["a red circle"]] and torch.equal(first, plain) and not torch.equal(again, first)
    tiny_pipeline.generate(replace(settings, prompt="a blue square"), output_type="latent", progress=False)
    tiny_pipeline.generate(settings, output_type="latent", progress=False)  # evicted by the other prompt (size 1)
    assert calls == [["a red circle"], ["a blue square"], ["a red circle"]]


def test_batches_that_cannot_fit_in_memory_are_refused_before_any_work(tiny_pipeline, monkeypatch):
    monkeypatch.setattr(pipeline, "available_memory", lambda device: 48 * 2**20)
    monkeypatch.setattr(pipeline, "randn", lambda *args: pytest.fail("allocated the noise of a refused batch"))
    # Tiny model: the decode needs 4 x 32 channels x 4 B + 36 B = 548 B per pixel, 137 MiB at 512 x 512.
    with pytest.raises(InputError, match=r"a batch of 1 512x512 image needs about 137.0 MiB for decoding, more "
                       r"than the 48.0 MiB free on cpu; .* decode in tiles .* \(--max_memory GIB, Pipeline.max_memory"):
        tiny_pipeline("a", height=512, width=512, num_steps=1)
    tiny_pipeline.enable_tiling(8, 2)  # tiles of 64 x 64 px: sampling (64 MiB for 2 rows of 64 x 64 latents) is left
    with pytest.raises(InputError, match="needs about 64.0 MiB for sampling") as refused:
        tiny_pipeline("a", height=512, width=512, num_steps=1)
    assert "tiles" not in str(refused.value)
    tiny_pipeline.max_memory = 2**20  # the limit set replaces the device's figure, either way
    with pytest.raises(InputError, match="more than the 1.0 MiB set as max_memory"):
        tiny_pipeline("a", num_steps=1)


def test_memory_estimate_covers_what_sd_measured():
    """The factors of `ldm.memory` against docs/benchmarks.md's CPU figures for SD 1.5 (the configs' defaults)
    in float32: 225 MiB for a 256 x 256 decode, 129 MiB for a U-Net call on 2 rows of 32 x 32 latents."""
    from ldm.autoencoder import AutoencoderConfig
    from ldm.memory import estimate_memory
    from ldm.unet import UNetConfig

    decode = estimate_memory(UNetConfig(), AutoencoderConfig(), 1, 256, 256, False, 4).decode
    unet = estimate_memory(UNetConfig(), AutoencoderConfig(), 1, 256, 256, True, 4).unet
    assert 225 <= decode / 2**20 <= 1.25 * 225 and 129 <= unet / 2**20 <= 1.25 * 129

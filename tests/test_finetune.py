"""Fine-tuning a tiny random SD 1.x-layout checkpoint on a dozen tiny images: LoRA and full runs, their
exports against our loaders and diffusers', resume, buckets, and bad input."""

from __future__ import annotations

import copy
import io
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.cli import run_main
from ldm.data.buckets import bucket_sizes, cover_and_crop, nearest_bucket
from ldm.data.loader import to_tensor
from ldm.errors import InputError
from ldm.pipeline import Pipeline
from ldm.training.finetune import FinetuneStage, min_snr_weights
from ldm.training.loop import train
from ldm.training.lora_train import LoRANetwork
from tests.conftest import randomize_, tiny_spec, write_tar
from tests.test_lora import UNETS, relative_error, unet_output

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import finetune  # noqa: E402
from benchmark import _load_meta, diffusers_unet, original_config  # noqa: E402

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}


def _png(colour: tuple[int, int, int], size: tuple[int, int], offset: int) -> bytes:
    image = Image.new("RGB", size, (240, 240, 240))
    image.paste(colour, (offset, 4, offset + 12, 16))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD 1.x-layout checkpoint (random weights) and one shard of 12 images, 32 x 32 and 48 x 32."""
    root = tmp_path_factory.mktemp("finetune")
    spec = tiny_spec()
    spec.family, spec.unet, spec.image_size = "sd1", UNETS["sd1"], 32
    torch.manual_seed(0)
    pipe = Pipeline.from_spec(spec, name="tiny")
    randomize_(pipe.unet, seed=1)
    randomize_(pipe.text_encoder, seed=2, std=0.1)
    members = []
    for i in range(12):
        name = list(COLOURS)[i % 3]
        size = (48, 32) if i % 2 else (32, 32)
        meta = {"caption": f"a {name} square", "width": size[0], "height": size[1]}
        members += [(f"{i:04d}.png", _png(COLOURS[name], size, 2 * i)), (f"{i:04d}.txt", meta["caption"].encode()),
                    (f"{i:04d}.json", json.dumps(meta).encode())]
    return {"base": pipe.save(root / "base.safetensors"), "shard": write_tar(root / "shard-000000.tar", members),
            "root": root}


def config(data: dict[str, Path], run_dir: Path, method: str = "lora", **finetune) -> dict:
    return {
        "finetune": {"base": str(data["base"]), "method": method, "sample_prompts": ["a red square"],
                     "sample_steps": 2, **finetune},
        "lora": {"rank": 4, "alpha": 4.0, "targets": "attention+conv"},
        "buckets": {"step": 16},
        "data": {"dataset": "webdataset", "urls": str(data["shard"]), "size": 32},
        "train": {"output_dir": str(run_dir), "max_steps": 4, "batch_size": 4, "learning_rate": 3e-3,
                  "log_every": 1, "checkpoint_every": 2, "sample_every": 1000, "seed": 0},
    }


def held_out_loss(pipe: Pipeline) -> float:
    """The eps MSE of `pipe` over the 12 training images at fixed noise and timesteps (the same for every pipe)."""
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        for width, first in ((32, 0), (48, 1)):
            names = [list(COLOURS)[i % 3] for i in range(first, 12, 2)]
            images = torch.stack([to_tensor(Image.open(io.BytesIO(_png(COLOURS[name], (width, 32), 2 * i))))
                                  for name, i in zip(names, range(first, 12, 2), strict=True)])
            latents = pipe.encode(images)
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
            context = pipe.text_encoder([f"a {name} square" for name in names])
            prediction = pipe.unet(pipe.schedule.add_noise(latents, noise, t), t, context)
            total += (prediction - noise).pow(2).mean().item()
    return total / 2


def test_buckets_are_64_pixel_steps_under_the_area_and_images_keep_their_aspect():
    sizes = bucket_sizes(512 * 512, 64, 256, 1024)
    assert (512, 512) in sizes and (768, 320) in sizes and (320, 768) in sizes
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    assert nearest_bucket(1200, 800, sizes) == (640, 384) and nearest_bucket(800, 800, sizes) == (512, 512)
    image = Image.new("RGB", (300, 100))
    image.paste((255, 0, 0), (0, 0, 150, 100))  # left half red: a centred 2:1 crop of the 3:1 image is half red
    crop = cover_and_crop(image, (64, 32))
    assert crop.size == (64, 32) and crop.getpixel((10, 16))[0] > 200 and crop.getpixel((54, 16))[0] < 50


def test_min_snr_weights_follow_the_paper():
    schedule = Pipeline.from_spec(tiny_spec()).schedule
    t = torch.tensor([0, 500, 999])
    alphas = schedule.alphas_cumprod[t].float()
    snr = alphas / (1 - alphas)
    assert torch.allclose(min_snr_weights(schedule, t, 5.0, "eps"), snr.clamp(max=5) / snr)
    assert torch.allclose(min_snr_weights(schedule, t, 5.0, "v"), snr.clamp(max=5) / (snr + 1))
    assert torch.equal(min_snr_weights(schedule, t, 0.0, "eps"), torch.ones(3))


def test_lora_trains_only_its_pairs_and_loads_here_and_in_diffusers(data, tmp_path):
    stage = FinetuneStage(config(data, tmp_path / "lora", train_text_encoder=True,
                                 min_snr_gamma=5.0, noise_offset=0.05) | {"train": {
        **config(data, tmp_path / "lora")["train"], "max_steps": 30, "checkpoint_every": 30, "learning_rate": 1e-2}})
    path = train(stage)
    base = Pipeline.from_checkpoint(data["base"])
    # The base weights are untouched: the run changed the model only through its pairs.
    trained_unet = stage.pipe.unet.state_dict()
    assert all(torch.equal(v, trained_unet[k]) for k, v in base.unet.state_dict().items())
    trained_text = stage.pipe.text_encoder.state_dict()
    assert all(torch.equal(v, trained_text[k]) for k, v in base.text_encoder.state_dict().items())
    with safe_open(str(path), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4.0"
    assert metadata["ss_sd_model_name"] == "base.safetensors" and metadata["ss_base_model"] == "sd1"
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in keys)  # LoCon
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    stage.pipe.unet.eval()
    trained = unet_output(stage.pipe.unet)  # the training U-Net, pairs hooked in

    before = held_out_loss(base)
    ours = Pipeline.from_checkpoint(data["base"]).load_lora(path)
    assert relative_error(unet_output(ours.unet), trained) < 1e-4
    assert held_out_loss(ours) < 0.97 * before  # the loss fell (0.998 -> 0.940 when written)

    reference = diffusers_unet(copy.deepcopy(base.unet), base.spec.autoencoder)
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, reference)
    assert relative_error(unet_output(reference, diffusers=True), trained) < 1e-4


def test_full_export_loads_here_and_converts_with_diffusers(data, tmp_path):
    base = Pipeline.from_checkpoint(data["base"])
    run = config(data, tmp_path / "full", "full", train_text_encoder=True)
    run["train"] |= {"max_steps": 20, "checkpoint_every": 20, "learning_rate": 1e-3}
    stage = FinetuneStage(run)
    path = train(stage)
    tuned = Pipeline.from_checkpoint(path)
    for module in ("unet", "text_encoder"):  # the export holds the trained weights, bit for bit
        trained = getattr(stage.pipe, module).state_dict()
        assert all(torch.equal(v, trained[k]) for k, v in getattr(tuned, module).state_dict().items())
    assert held_out_loss(tuned) < 0.95 * held_out_loss(base)  # 0.998 -> 0.908 when written
    checkpoint = load_file(str(path))
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj")
               for k in checkpoint)  # SD 1.x's layout: what other tools' single-file loaders read

    # diffusers' single-file conversion of the file gives the same U-Net and text encoder.
    unet_config = create_unet_diffusers_config_from_ldm(original_config(tuned.unet.config, tuned.spec.autoencoder),
                                                        checkpoint)
    unet_config["norm_num_groups"] = tuned.unet.config.norm_num_groups
    reference = _load_meta(UNet2DConditionModel, unet_config, convert_ldm_unet_checkpoint(checkpoint, unet_config))
    assert relative_error(unet_output(reference, diffusers=True), unet_output(tuned.unet)) < 1e-4
    text = tuned.text_encoder.config
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=text.vocab_size, hidden_size=text.width, intermediate_size=4 * text.width,
        num_hidden_layers=text.layers, num_attention_heads=text.heads, max_position_embeddings=text.context_length,
        hidden_act=text.act))
    converted = convert_ldm_clip_checkpoint(checkpoint)
    if not any(k.startswith("text_model.") for k in clip.state_dict()):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    clip.load_state_dict(converted, strict=False)
    prompts = ["a red square", "a blue one"]
    with torch.no_grad():
        reference_context = clip(tuned.text_encoder.tokenize(prompts)).last_hidden_state
        assert relative_error(tuned.text_encoder(prompts), reference_context) < 1e-4


@pytest.mark.parametrize("cache_latents", [True, False])
def test_resume_ends_bit_identical_to_an_uninterrupted_run(data, tmp_path, cache_latents):
    def run(name: str, max_steps: int, resume: bool = False) -> dict[str, torch.Tensor]:
        settings = config(data, tmp_path / name, cache_latents=cache_latents, caption_dropout=0.3)
        settings["train"]["max_steps"] = max_steps
        settings["data"]["random_crop"] = True
        return load_file(str(train(FinetuneStage(settings), resume=resume)))

    straight = run("straight", 4)
    run("resumed", 2)
    resumed = run("resumed", 4, resume=True)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("case, message", [
    ("empty", "no usable sample in 1 shard(s)"),
    ("no captions", "no usable sample in 1 shard(s)"),
    ("inpainting", "is an inpainting model (its U-Net takes 9 channels)"),
    ("bucket", "buckets.step must be a multiple of 16 (this model's autoencoder x U-Net downsampling), got 24"),
])
def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path, capsys, case, message):
    shard, base, extra = data["shard"], data["base"], []
    if case == "empty":
        shard = write_tar(tmp_path / "empty.tar", [])
    elif case == "no captions":
        shard = write_tar(tmp_path / "bare.tar", [("0000.png", _png(COLOURS["red"], (32, 32), 0))])
    elif case == "inpainting":
        spec = copy.deepcopy(Pipeline.from_checkpoint(base).spec)
        spec.unet.in_channels = 9
        base = Pipeline.from_spec(spec).save(tmp_path / "inpainting.safetensors")
    else:
        extra = ["--set", "buckets.step=24", "data.size=48"]
    out = tmp_path / "run"
    code = run_main(finetune.main, ["--config", str(ROOT / "configs/finetune/smoke.yaml"), "--ckpt", str(base),
                                    "--data", str(shard), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_a_missing_base_is_an_input_error(data, tmp_path):
    with pytest.raises(InputError, match="finetune.base: .* not found"):
        FinetuneStage(config(data, tmp_path / "run") | {"finetune": {"base": str(tmp_path / "none.safetensors")}})


def test_dreambooth_generates_class_images_once_and_trains_with_the_prior(data, tmp_path, monkeypatch):
    class_dir = tmp_path / "class"
    dreambooth = {"instance_prompt": "a zqx square", "class_prompt": "a square", "num_class_images": 3,
                  "class_dir": str(class_dir), "class_steps": 2}
    settings = config(data, tmp_path / "first") | {"dreambooth": dreambooth}
    settings["train"]["max_steps"] = 2
    stage = FinetuneStage(settings)
    train(stage)
    made = {path.name: path.stat().st_mtime_ns for path in class_dir.glob("class-*.png")}
    assert sorted(made) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert {s.caption for s in stage.images.index.samples} == {"a zqx square"}
    assert stage.class_images is not None and len(stage.class_images.index) == 3

    generated = []
    monkeypatch.setattr(Pipeline, "__call__", lambda self, prompts, **kw: generated.extend(prompts) or
                        [Image.new("RGB", (32, 32))] * len(prompts))
    settings = config(data, tmp_path / "second") | {"dreambooth": {**dreambooth, "num_class_images": 5}}
    settings["train"]["max_steps"] = 1
    train(FinetuneStage(settings))
    assert generated.count("a square") == 2  # only the missing two (the rest: the run's sample grid)
    assert all(path.stat().st_mtime_ns == made[path.name] for path in class_dir.glob("class-0000[012].png"))


def test_lora_pairs_act_under_gradient_checkpointing():
    """The pairs run in forward hooks, which checkpointing's recomputation in the backward pass runs too: the
    gradients are the same with and without it."""
    spec = tiny_spec()
    torch.manual_seed(0)
    unet = randomize_(Pipeline.from_spec(spec).unet.train(), seed=1)
    network = LoRANetwork(unet, "attention+conv", rank=2, alpha=2.0)
    with torch.no_grad():
        for pair in network.unet_layers.values():
            pair.up.weight.normal_(0, 0.1)
    grads = []
    for checkpointing in (False, True):
        unet.gradient_checkpointing = checkpointing
        network.zero_grad()
        prediction = unet(torch.ones(2, 4, 8, 8), torch.tensor([10, 500]), torch.ones(2, 77, 64))
        prediction.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in network.parameters()]))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
    with network.paused():
        assert unet_output(unet.eval()).abs().max() > 0
        paused = unet_output(unet)
    assert relative_error(unet_output(unet), paused) > 1e-3  # paused, the pairs do not act

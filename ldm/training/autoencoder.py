"""Stage 1: train the KL autoencoder with L1 + LPIPS + KL + a PatchGAN discriminator.

The generator (encoder + decoder) and the discriminator take turns every step, as in the
latent-diffusion paper; the discriminator only starts at `loss.disc_start`. Training can run on
random crops: the network is fully convolutional and full-resolution convolutions dominate the
cost. At the end the latent scale factor (1 / std of the latents, 0.18215 for SD) is measured on
training images and stored with the exported autoencoder, so the diffusion stage picks it up.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ldm.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.config import config_dict
from ldm.data.loader import Batches, make_loader
from ldm.files import write_json
from ldm.generate import save_grid
from ldm.images import to_pil
from ldm.losses import AutoencoderLoss, AutoencoderLossConfig
from ldm.metrics import psnr
from ldm.sd_checkpoint import AUTOENCODER_PREFIX, autoencoder_file, detect_spec
from ldm.training.common import TrainingRun, build_dataset, lr_scheduler, optimizer_step
from ldm.training.config import DataConfig, at_least, config_errors, parse_section, require
from ldm.training.loop import Stage, StepResult, train
from ldm.weights_io import load_strict, module_config, read_checkpoint, save_module

SECTIONS = ("autoencoder", "loss", "autoencoder_training", "data", "train")


@dataclass
class AutoencoderTraining:
    """The `autoencoder_training:` section of a training YAML."""

    crop_size: int = 0  # train on random square crops of this size (0 = whole images)
    scale_factor_samples: int = 1024  # images used to measure the latent scale factor
    eval_samples: int = 500  # validation images for the final PSNR
    num_sample_images: int = 8  # reconstructions shown in the sample grids
    # Start from these weights (same `autoencoder:` section): an autoencoder.safetensors this stage exported,
    # a whole checkpoint (its first_stage_model.*) or a VAE file in the original layout.
    init_from: str = ""
    # Freeze the encoder (and quant_conv): the latents and the scale factor stay those of `init_from`, so a
    # U-Net trained on them still fits the fine-tuned decoder (how SD's improved ft-MSE decoder was made).
    train_decoder_only: bool = False
    # The discriminator's learning rate (0: train.learning_rate, as in the original): a fresh discriminator
    # beside a decoder fine-tuned at a low rate may need a higher one.
    disc_learning_rate: float = 0.0


def check_autoencoder_config(model: AutoencoderConfig, loss: AutoencoderLossConfig, training: AutoencoderTraining,
                             data: DataConfig) -> None:
    """Values that would only fail inside the run: image and crop sizes the encoder cannot halve to
    whole latents, negative loss weights, empty evaluations."""
    factor = model.downsampling_factor
    require(data.size % factor == 0, "data.size", f"a multiple of {factor} (the autoencoder's downsampling "
            f"factor, from autoencoder.ch_mult)", data.size)
    crop = training.crop_size
    require(crop == 0 or (crop % factor == 0 and 0 < crop <= data.size), "autoencoder_training.crop_size",
            f"0 (whole images) or a multiple of {factor} no larger than data.size {data.size}", crop)
    at_least(training, "autoencoder_training", 1, "scale_factor_samples", "eval_samples", "num_sample_images")
    at_least(training, "autoencoder_training", 0, "disc_learning_rate")
    at_least(loss, "loss", 0, "disc_start", "kl_weight", "disc_weight", "perceptual_weight", "disc_factor",
             "edge_weight", "disc_warmup")
    require(not training.train_decoder_only or training.init_from, "autoencoder_training.train_decoder_only",
            "false unless autoencoder_training.init_from names the autoencoder whose encoder stays fixed", True)
    require(not training.init_from or Path(training.init_from).is_file(), "autoencoder_training.init_from",
            "an existing autoencoder.safetensors, checkpoint or VAE file", training.init_from)


def read_start(path: str | Path) -> tuple[dict[str, torch.Tensor], float | None]:
    """Weights and latent scale factor of `autoencoder_training.init_from`: an autoencoder this stage exported,
    a whole checkpoint (its autoencoder, and the scale factor it generates with) or a bare VAE file (whose
    scale factor, None, is then the config's)."""
    state_dict, metadata = read_checkpoint(path)
    if "ldm_module" in metadata:
        return state_dict, module_config(metadata, "autoencoder", path)["scale_factor"]
    whole = any(key.startswith(AUTOENCODER_PREFIX) for key in state_dict)
    scale_factor = detect_spec(state_dict, metadata).autoencoder.scale_factor if whole else None
    # Weights train in float32 (autocast lowers the compute), whatever the file stores (often float16).
    weights = {key: value.float() for key, value in autoencoder_file(state_dict, path).items()}
    return weights, scale_factor


def random_crop(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random square crop per batch (B, C, H, W) -> (B, C, size, size)."""
    if size <= 0 or size >= images.shape[-1]:
        return images
    top, left = (int(torch.randint(dim - size + 1, (1,), generator=generator)) for dim in images.shape[-2:])
    return images[..., top : top + size, left : left + size]


@torch.no_grad()
def measure_scale_factor(autoencoder: AutoencoderKL, batches: Iterator[dict], num_samples: int,
                         device: torch.device) -> float:
    """1 / std of sampled latents over `num_samples` images: makes the diffusion stage's data unit-variance."""
    latents, count = [], 0
    while count < num_samples:
        images = next(batches)["images"].to(device)
        latents.append(autoencoder.encode(images).sample(None).float().cpu())
        count += images.shape[0]
    return 1.0 / torch.cat(latents)[:num_samples].std().item()


@torch.no_grad()
def evaluate_psnr(autoencoder: AutoencoderKL, batches: Iterator[dict], num_samples: int,
                  device: torch.device) -> float:
    """Mean PSNR (dB) of posterior-mean reconstructions of `num_samples` images."""
    values = []
    while sum(len(v) for v in values) < num_samples:
        images = next(batches)["images"].to(device)
        values.append(psnr(images, autoencoder.decode(autoencoder.encode(images).mode())).cpu())
    return torch.cat(values)[:num_samples].mean().item()


class AutoencoderStage(Stage):
    name, sections, output = "autoencoder", SECTIONS, "autoencoder.safetensors"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.model_config = parse_section(config, "autoencoder", AutoencoderConfig)
        self.loss_config = parse_section(config, "loss", AutoencoderLossConfig)
        self.acfg = parse_section(config, "autoencoder_training", AutoencoderTraining)
        check_autoencoder_config(self.model_config, self.loss_config, self.acfg, self.data)

    def build(self, accelerator: Accelerator) -> torch.nn.Module:
        cfg, acfg = self.cfg, self.acfg
        self.accelerator = accelerator
        with config_errors("autoencoder"):
            model = AutoencoderKL(self.model_config)
        if acfg.init_from:
            state_dict, scale_factor = read_start(acfg.init_from)
            load_strict(model, state_dict, "autoencoder", acfg.init_from)
            model.config.scale_factor = model.config.scale_factor if scale_factor is None else scale_factor
        if acfg.train_decoder_only:
            model.encoder.requires_grad_(False)
            model.quant_conv.requires_grad_(False)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        with config_errors("loss"):
            self.loss_fn = AutoencoderLoss(self.loss_config)
        # The original trains both players with Adam betas (0.5, 0.9): set train.adam_betas to match.
        # Fused Adam: one kernel for all tensors instead of a loop over them (as for the other stages).
        trained = [p for p in model.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(trained, lr=cfg.learning_rate, betas=cfg.adam_betas, fused=True)
        opt_d = torch.optim.Adam(self.loss_fn.discriminator.parameters(),
                                 lr=acfg.disc_learning_rate or cfg.learning_rate, betas=cfg.adam_betas, fused=True)
        # The discriminator runs inside the loss several times per step, which DDP does not allow, so
        # it stays unwrapped and its gradients are averaged across processes by hand.
        self.loss_fn.to(accelerator.device)
        accelerator.register_for_checkpointing(self.loss_fn)
        self.model, self.opt_g, self.opt_d, self.sched_g, self.sched_d = accelerator.prepare(
            model, opt_g, opt_d, lr_scheduler(opt_g, cfg), lr_scheduler(opt_d, cfg))
        self.last_layer = accelerator.unwrap_model(self.model).decoder.conv_out.weight
        return self.model

    def start(self, run: TrainingRun) -> None:
        cfg, data = self.cfg, self.data
        self.dataset = build_dataset(data, self.accelerator, run.samples_seen, seed=cfg.seed + run.step)
        self.batches = Batches(make_loader(self.dataset, cfg.batch_size, cfg.num_workers), self.dataset)
        self.val_data = dataclasses.replace(data, split="val") if data.dataset == "shapes-v1" else data
        self.val_images = next(self.val_batches(self.acfg.num_sample_images))["images"]

    def step(self, run: TrainingRun, generator: torch.Generator, device_generator: torch.Generator) -> StepResult:
        accelerator, loss_fn = self.accelerator, self.loss_fn
        batch = next(self.batches)
        run.samples_seen += len(batch["captions"])
        images = random_crop(batch["images"], self.acfg.crop_size, generator).to(accelerator.device)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            reconstructions, posterior = self.model(images, generator=device_generator)
        g_loss, logs = loss_fn.generator_loss(images, reconstructions.float(), posterior, run.step, self.last_layer)
        if run.skip(g_loss):  # the discriminator sits the step out too
            self.opt_g.zero_grad(set_to_none=True)
            return g_loss, {"skipped_samples": self.dataset.num_skipped}
        optimizer_step(accelerator, g_loss, self.model, self.opt_g, self.sched_g, self.cfg.max_grad_norm)
        if run.step >= self.loss_config.disc_start - self.loss_config.disc_warmup:
            d_loss, d_logs = loss_fn.discriminator_loss(images, reconstructions.detach().float(), run.step)
            logs.update(d_logs)
            accelerator.backward(d_loss)
            if accelerator.num_processes > 1:
                for p in loss_fn.discriminator.parameters():
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                self.sched_d.step()
        return g_loss, {"rec_loss": logs["rec_loss"], **logs, "skipped_samples": self.dataset.num_skipped}

    def val_batches(self, batch_size: int) -> Batches:
        dataset = build_dataset(self.val_data, self.accelerator)
        return Batches(make_loader(dataset, batch_size), dataset)

    def write_samples(self, model: torch.nn.Module, path: Path) -> None:
        write_reconstructions(model, self.val_images.to(self.accelerator.device), path)

    def export(self, model: torch.nn.Module, run: TrainingRun) -> None:
        """`autoencoder.safetensors` with the measured scale factor (kept from `init_from` when only the
        decoder trained), and `metrics.json` with the validation PSNR."""
        autoencoder, acfg, device = model.eval(), self.acfg, self.accelerator.device
        run_dir = Path(self.cfg.output_dir)
        if not acfg.train_decoder_only:
            autoencoder.config.scale_factor = measure_scale_factor(autoencoder, self.batches,
                                                                   acfg.scale_factor_samples, device)
        val_batches = self.val_batches(self.cfg.batch_size)
        metrics = {"steps": run.step, "scale_factor": autoencoder.config.scale_factor,
                   f"psnr_val_{acfg.eval_samples}": evaluate_psnr(autoencoder, val_batches, acfg.eval_samples, device)}
        write_json(run_dir / "metrics.json", metrics)
        self.accelerator.print(json.dumps(metrics))
        save_module(run_dir / self.output, autoencoder, "autoencoder", config_dict(autoencoder.config))


def train_autoencoder(config: dict[str, Any], resume: bool = False) -> Path | None:
    """Run (or resume) an autoencoder training run; returns the exported `autoencoder.safetensors`, or None
    when a stop signal ended the run early (after saving a checkpoint to resume from)."""
    return train(AutoencoderStage(config), resume)


@torch.no_grad()
def write_reconstructions(autoencoder: AutoencoderKL, images: torch.Tensor, path: Path) -> None:
    """Originals above their reconstructions."""
    was_training = autoencoder.training
    reconstructions = autoencoder.eval().decode(autoencoder.encode(images).mode())
    autoencoder.train(was_training)
    save_grid(to_pil(torch.cat([images, reconstructions])), len(images), path)

"""Stage 2: train the U-Net on latents of a frozen autoencoder, conditioned on a frozen text encoder.

Objective: noise prediction (eps) or v-prediction, MSE over drawn timesteps (uniformly by default). Captions
are replaced by the empty prompt with probability `caption_dropout`, which teaches the same
network the unconditional prediction that classifier-free guidance needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from ldm.autoencoder import AutoencoderKL
from ldm.data.loader import Batches, make_loader
from ldm.errors import InputError
from ldm.generate import save_grid
from ldm.pipeline import Pipeline
from ldm.schedule import NoiseSchedule
from ldm.sd_checkpoint import ModelSpec
from ldm.text_encoder import TextEncoder
from ldm.training.common import TrainingRun, build_dataset, load_stage, lr_scheduler, optimizer_step
from ldm.training.config import at_least, check_stage_file, config_errors, parse_section, require
from ldm.training.loop import Stage, StepResult, train
from ldm.unet import UNetConfig, UNetModel

SECTIONS = ("unet", "diffusion", "data", "train")


class TimestepOptions(Protocol):
    """How `draw_timesteps` draws: the keys of the diffusion and fine-tuning sections that name it."""

    uniform_timesteps: float
    log_sigma_mean: float
    log_sigma_std: float


class SampleOptions(Protocol):
    """What `write_samples` draws: the keys of the diffusion and fine-tuning sections that name it."""

    sample_prompts: list
    sample_steps: int
    sample_guidance_scale: float


@dataclass
class DiffusionConfig:
    """The `diffusion:` section of a training YAML."""

    autoencoder: str  # .safetensors exported by the autoencoder run
    text_encoder: str  # .safetensors exported by the CLIP run
    parameterization: str = "eps"
    caption_dropout: float = 0.1
    # Encode this many samples once and train on them (0 = encode every batch). Their captions' contexts
    # are kept too, one per distinct caption: 77 x 768 floats (236 KB) each with SD's text encoder.
    precompute_latents: int = 0
    schedule: dict = field(default_factory=lambda: {"num_timesteps": 1000, "linear_start": 0.00085,
                                                     "linear_end": 0.012})
    # Training timesteps: this share uniformly (DDPM, SD: 1.0), the rest from a log-normal over the noise
    # level sigma = sqrt((1 - a_t) / a_t) (EDM's training distribution, log sigma ~ N(mean, std^2)), which
    # puts more of the training on low noise levels, where fine detail is drawn.
    uniform_timesteps: float = 1.0
    log_sigma_mean: float = -1.2
    log_sigma_std: float = 1.2
    sample_prompts: list = field(default_factory=lambda: ["a red circle"])
    sample_steps: int = 50
    sample_guidance_scale: float = 5.0


def check_diffusion_config(dcfg: DiffusionConfig) -> None:
    """The `diffusion:` values that would otherwise fail only inside the run, the stage files included."""
    for kind in ("autoencoder", "text_encoder"):
        check_stage_file(getattr(dcfg, kind), kind, f"diffusion.{kind}")
    require(dcfg.parameterization in ("eps", "v"), "diffusion.parameterization", "eps or v", dcfg.parameterization)
    require(0 <= dcfg.caption_dropout <= 1, "diffusion.caption_dropout", "in [0, 1]", dcfg.caption_dropout)
    at_least(dcfg, "diffusion", 0, "precompute_latents", "sample_guidance_scale")
    at_least(dcfg, "diffusion", 1, "sample_steps")
    require(0 <= dcfg.uniform_timesteps <= 1, "diffusion.uniform_timesteps", "in [0, 1]", dcfg.uniform_timesteps)
    require(dcfg.log_sigma_std > 0, "diffusion.log_sigma_std", "> 0", dcfg.log_sigma_std)
    require(len(dcfg.sample_prompts) > 0 and all(isinstance(p, str) for p in dcfg.sample_prompts),
            "diffusion.sample_prompts", "a list of prompts", dcfg.sample_prompts)


def check_sizes(image_size: int, autoencoder_factor: int, unet: UNetConfig) -> None:
    """Images must halve into whole latents, and latents into whole U-Net levels."""
    require(image_size % autoencoder_factor == 0, "data.size", f"a multiple of {autoencoder_factor} (the "
            "autoencoder's downsampling factor)", image_size)
    unet_factor = 2 ** (len(unet.channel_mult) - 1)
    require(image_size // autoencoder_factor % unet_factor == 0, "data.size", f"a multiple of "
            f"{autoencoder_factor * unet_factor} (autoencoder x U-Net downsampling, from unet.channel_mult)",
            image_size)


def draw_timesteps(schedule: NoiseSchedule, batch_size: int, dcfg: TimestepOptions, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """Training timesteps (B,) long: `dcfg.uniform_timesteps` of them uniformly on average, the others the first
    timestep whose noise level sigma reaches a log-normal draw. With a share of 1 the draws are exactly
    `randint`'s, so runs from before the option reproduce."""
    t = torch.randint(0, schedule.num_timesteps, (batch_size,), generator=generator, device=device)
    if dcfg.uniform_timesteps == 1:
        return t
    sigmas = schedule.sigmas.to(device)
    log_sigma = dcfg.log_sigma_mean + dcfg.log_sigma_std * torch.randn(batch_size, generator=generator, device=device,
                                                                       dtype=torch.float64)
    log_normal = torch.searchsorted(sigmas, log_sigma.exp()).clamp(max=schedule.num_timesteps - 1)
    uniform = torch.rand(batch_size, generator=generator, device=device) < dcfg.uniform_timesteps
    return torch.where(uniform, t, log_normal)


def keep_captions(num_captions: int, dropout: float, generator: torch.Generator) -> torch.Tensor:
    """(num_captions,) bool: False where a caption is dropped, with probability `dropout`."""
    return torch.rand(num_captions, generator=generator) >= dropout


def drop_captions(captions: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with `probability` (the unconditional prompt of guidance)."""
    keep = keep_captions(len(captions), probability, generator)
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


class LatentCache:
    """`num_samples` encoded images and their captions, encoded once by the frozen stages.

    Latents are drawn afresh from the stored posterior (mean, std) at every draw; the text encoder's
    context is stored once per distinct caption (and for "", the dropped caption), which saves its
    forward pass at every step (docs/benchmarks.md, "The training step's optimizer").
    """

    def __init__(self, autoencoder: AutoencoderKL, text_encoder: TextEncoder, batches: Iterator[dict],
                 num_samples: int, device: torch.device, progress: bool = True) -> None:
        means, stds, captions = [], [], []
        with torch.no_grad(), tqdm(total=num_samples, desc="encoding latents", disable=not progress) as bar:
            while len(captions) < num_samples:
                batch = next(batches)
                posterior = autoencoder.encode(batch["images"].to(device))
                means.append(posterior.mean)
                stds.append(posterior.std)
                captions.extend(batch["captions"])
                bar.update(len(batch["captions"]))
            self.means = torch.cat(means)[:num_samples]
            self.stds = torch.cat(stds)[:num_samples]
            captions = captions[:num_samples]
            distinct = sorted(set(captions) | {""})
            row = {caption: i for i, caption in enumerate(distinct)}
            self.caption_rows = torch.tensor([row[c] for c in captions], device=device)
            self.empty_row = row[""]
            self.captions = distinct
            self.contexts = torch.cat([text_encoder(distinct[i:i + 256]) for i in range(0, len(distinct), 256)])

    def draw_rows(self, batch_size: int, caption_dropout: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, C, h, w) sampled from the posteriors of random samples and the rows (B,) of their
        captions in `captions` and `contexts`, the empty caption's with probability `caption_dropout`
        (random numbers drawn as by drop_captions)."""
        index = torch.randint(len(self.caption_rows), (batch_size,), generator=generator)
        noise = torch.randn((batch_size, *self.means.shape[1:]), generator=generator).to(self.means.device)
        keep = keep_captions(batch_size, caption_dropout, generator)
        rows = index.to(self.means.device)
        caption_rows = torch.where(keep.to(rows.device), self.caption_rows[rows], self.empty_row)
        return self.means[rows] + self.stds[rows] * noise, caption_rows

    def draw(self, batch_size: int, caption_dropout: float,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, C, h, w) as `draw_rows` draws them and their context (B, L, D)."""
        latents, caption_rows = self.draw_rows(batch_size, caption_dropout, generator)
        return latents, self.contexts[caption_rows]


class DiffusionStage(Stage):
    name, sections, output = "diffusion", SECTIONS, "model.safetensors"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.dcfg = parse_section(config, "diffusion", DiffusionConfig)
        self.unet_config = parse_section(config, "unet", UNetConfig)
        check_diffusion_config(self.dcfg)
        with config_errors("diffusion.schedule"):
            self.schedule = NoiseSchedule(**self.dcfg.schedule)

    def build(self, accelerator: Accelerator) -> nn.Module:
        cfg, dcfg, unet_config, device = self.cfg, self.dcfg, self.unet_config, accelerator.device
        self.accelerator = accelerator
        self.autoencoder = load_stage(dcfg.autoencoder, "autoencoder").to(device)
        self.text_encoder = load_stage(dcfg.text_encoder, "text_encoder").to(device)
        check_sizes(self.data.size, self.autoencoder.config.downsampling_factor, unet_config)
        self.spec = ModelSpec(family="custom", unet=unet_config, autoencoder=self.autoencoder.config,
                              text_encoder=self.text_encoder.config, parameterization=dcfg.parameterization,
                              schedule=dict(dcfg.schedule), image_size=self.data.size)
        if unet_config.context_dim != self.text_encoder.config.width:
            raise InputError(f"unet.context_dim is {unet_config.context_dim} but the text encoder is "
                             f"{self.text_encoder.config.width} wide; set unet.context_dim="
                             f"{self.text_encoder.config.width}")
        with config_errors("unet"):
            unet = UNetModel(unet_config)
        unet.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.channels_last:
            unet.to(memory_format=torch.channels_last)
        # Fused AdamW: one kernel over all tensors, several times faster than the default on a CPU
        # (docs/benchmarks.md).
        optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, betas=cfg.adam_betas,
                                      weight_decay=cfg.weight_decay, fused=True)
        self.unet, self.optimizer, self.lr_schedule = accelerator.prepare(unet, optimizer,
                                                                          lr_scheduler(optimizer, cfg))
        return self.unet

    def start(self, run: TrainingRun) -> None:
        # With a latent cache the cache is the whole data set, always encoded from the first samples of the
        # run's first stream, so a resumed run trains on the same cache; otherwise the stream continues
        # where the checkpoint left it (shapes-v1), or restarts reshuffled by the step (shards).
        dcfg, accelerator = self.dcfg, self.accelerator
        cached = dcfg.precompute_latents > 0
        start, seed = (0, self.cfg.seed) if cached else (run.samples_seen, self.cfg.seed + run.step)
        self.dataset = build_dataset(self.data, accelerator, start, seed=seed)
        self.batches = Batches(make_loader(self.dataset, self.cfg.batch_size, self.cfg.num_workers), self.dataset)
        self.cache = LatentCache(self.autoencoder, self.text_encoder, self.batches, dcfg.precompute_latents,
                                 accelerator.device, accelerator.is_local_main_process) if cached else None

    def step(self, run: TrainingRun, generator: torch.Generator, device_generator: torch.Generator) -> StepResult:
        cfg, dcfg, schedule, device = self.cfg, self.dcfg, self.schedule, self.accelerator.device
        if self.cache is not None:
            latents, context = self.cache.draw(cfg.batch_size, dcfg.caption_dropout, generator)
        else:
            batch = next(self.batches)
            with torch.no_grad():
                latents = self.autoencoder.encode(batch["images"].to(device)).sample(device_generator)
                context = self.text_encoder(drop_captions(batch["captions"], dcfg.caption_dropout, generator))
        run.samples_seen += latents.shape[0]
        latents = latents * self.autoencoder.scale_factor
        noise = torch.randn(latents.shape, generator=device_generator, device=device, dtype=latents.dtype)
        t = draw_timesteps(schedule, latents.shape[0], dcfg, device_generator, device)
        x_t = schedule.add_noise(latents, noise, t)
        if cfg.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        target = noise if dcfg.parameterization == "eps" else schedule.v_target(latents, noise, t)
        with self.accelerator.autocast():
            prediction = self.unet(x_t, t, context)
        loss = F.mse_loss(prediction.float(), target.float())
        if run.skip(loss):
            self.optimizer.zero_grad(set_to_none=True)
        else:
            optimizer_step(self.accelerator, loss, self.unet, self.optimizer, self.lr_schedule, cfg.max_grad_norm)
        return loss, {"lr": self.lr_schedule.get_last_lr()[0], "skipped_samples": self.dataset.num_skipped}

    def write_samples(self, model: nn.Module, path: Path) -> None:
        write_samples(self.pipeline(model), self.dcfg, path)

    def export(self, model: nn.Module, run: TrainingRun) -> None:
        self.pipeline(model).save(Path(self.cfg.output_dir) / self.output, metadata={"training_steps": str(run.step)})

    def pipeline(self, unet: UNetModel) -> Pipeline:
        """The pipeline to sample from and save, with `unet`'s weights in float32 on the CPU."""
        export_unet = UNetModel(self.spec.unet)
        export_unet.load_state_dict({k: v.float().cpu() for k, v in unet.state_dict().items()})
        return Pipeline(self.spec, export_unet, self.text_encoder, self.autoencoder, name=self.spec.family)


def train_diffusion(config: dict[str, Any], resume: bool = False) -> Path | None:
    """Run (or resume) a diffusion training run; returns the exported pipeline checkpoint, or None when a
    stop signal ended the run early (after saving a checkpoint to resume from)."""
    return train(DiffusionStage(config), resume)


def write_samples(pipe: Pipeline, dcfg: SampleOptions, path: Path) -> None:
    device = next(pipe.text_encoder.parameters()).device
    pipe.unet.to(device)
    images = pipe(dcfg.sample_prompts, num_steps=dcfg.sample_steps, guidance_scale=dcfg.sample_guidance_scale,
                  seed=0, progress=False)
    save_grid(images, len(images), path)

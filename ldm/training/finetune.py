"""Fine-tuning: teach a checkpoint that `Pipeline.from_checkpoint` loads new images, as a LoRA or in full.

The objective is the diffusion stage's (noise or v prediction, MSE over drawn timesteps, captions
dropped with probability `caption_dropout`), optionally weighted by min-SNR-gamma (Hang et al. 2023)
and with offset noise. The autoencoder is always frozen, the text encoder unless `train_text_encoder`.

- `lora`: the base weights stay as they are; LoRA pairs (`ldm.training.lora_train`) on the U-Net's
  transformer blocks (and ResBlocks: `attention+conv`), optionally on the text encoder, train and are
  exported as one kohya LoRA file;
- `full`: every U-Net weight (and optionally the text encoder) trains; the export is one checkpoint
  in the original layout of the base's family.

Data are WebDataset shards, indexed once (`ldm.data.shard_index`) and split into aspect-ratio
buckets (`ldm.data.buckets`). Every micro-batch picks a bucket (with probability proportional to its
samples) and samples of it from the step's seed, so a resumed run reads exactly what an uninterrupted
one does, whether the latents are cached (one `LatentCache` per bucket) or encoded at every step.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from ldm.data.buckets import Bucket, bucket_sizes, cover_and_crop, nearest_bucket
from ldm.data.loader import to_tensor
from ldm.data.shard_index import ShardIndex
from ldm.errors import InputError
from ldm.pipeline import Pipeline
from ldm.schedule import NoiseSchedule
from ldm.training.common import TrainingRun, lr_scheduler, optimizer_step
from ldm.training.config import at_least, parse_section, require
from ldm.training.diffusion import LatentCache, check_sizes, draw_timesteps, drop_captions, write_samples
from ldm.training.dreambooth import DreamBoothConfig, check_dreambooth_config, class_images
from ldm.training.loop import Stage, StepResult, train
from ldm.training.lora_train import TARGET_BLOCKS, LoRANetwork
from ldm.weights_io import save_atomic

SECTIONS = ("finetune", "lora", "buckets", "dreambooth", "data", "train")
METHODS = ("lora", "full")


@dataclass
class FinetuneConfig:
    """The `finetune:` section of a fine-tuning YAML."""

    base: str  # the checkpoint to start from: ours, SD 1.x / 2.x (.safetensors or .ckpt)
    method: str = "lora"  # "lora" or "full"
    train_text_encoder: bool = False  # lora: LoRA pairs on the text encoder too; full: all its weights
    caption_dropout: float = 0.0
    # Encode every image once (with a frozen text encoder its caption's context too); the crops are then
    # those of the first encoding. Off: encode each batch, with fresh random crops (data.random_crop).
    cache_latents: bool = True
    min_snr_gamma: float = 0.0  # 0 = plain MSE; 5 is the paper's choice
    noise_offset: float = 0.0  # noise + offset * N(0, 1) per image and channel: darker darks, brighter lights
    uniform_timesteps: float = 1.0  # as in the diffusion stage's section
    log_sigma_mean: float = -1.2
    log_sigma_std: float = 1.2
    sample_prompts: list = field(default_factory=lambda: ["a red circle"])
    sample_steps: int = 20
    sample_guidance_scale: float = 5.0


@dataclass
class LoRAConfig:
    """The `lora:` section (method lora only)."""

    rank: int = 16
    alpha: float = 16.0  # the pairs' output is scaled by alpha / rank
    targets: str = "attention"  # "attention" (transformer blocks) or "attention+conv" (also ResBlocks: LoCon)


@dataclass
class BucketConfig:
    """The `buckets:` section: aspect-ratio buckets; off, every image is cropped to data.size squared."""

    enabled: bool = True
    step: int = 64  # pixels; a multiple of the model's autoencoder x U-Net downsampling
    max_area: int | None = None  # pixels; default data.size squared
    min_side: int | None = None  # default data.size / 2, max_side 2 x data.size (in steps)
    max_side: int | None = None


def check_finetune_config(fcfg: FinetuneConfig, lcfg: LoRAConfig, bcfg: BucketConfig) -> None:
    """The values of the fine-tuning sections that would otherwise fail only inside the run."""
    if not Path(fcfg.base).is_file():
        raise InputError(f"finetune.base: {fcfg.base} not found; pass a checkpoint (--ckpt)")
    require(fcfg.method in METHODS, "finetune.method", " or ".join(METHODS), fcfg.method)
    require(0 <= fcfg.caption_dropout <= 1, "finetune.caption_dropout", "in [0, 1]", fcfg.caption_dropout)
    at_least(fcfg, "finetune", 0, "min_snr_gamma", "noise_offset", "sample_guidance_scale")
    at_least(fcfg, "finetune", 1, "sample_steps")
    require(0 <= fcfg.uniform_timesteps <= 1, "finetune.uniform_timesteps", "in [0, 1]", fcfg.uniform_timesteps)
    require(fcfg.log_sigma_std > 0, "finetune.log_sigma_std", "> 0", fcfg.log_sigma_std)
    require(len(fcfg.sample_prompts) > 0 and all(isinstance(p, str) for p in fcfg.sample_prompts),
            "finetune.sample_prompts", "a list of prompts", fcfg.sample_prompts)
    at_least(lcfg, "lora", 1, "rank")
    require(lcfg.alpha > 0, "lora.alpha", "> 0", lcfg.alpha)
    require(lcfg.targets in TARGET_BLOCKS, "lora.targets", " or ".join(TARGET_BLOCKS), lcfg.targets)
    at_least(bcfg, "buckets", 1, "step")


def buckets(data_size: int, bcfg: BucketConfig, factor: int) -> list[Bucket]:
    """The training sizes: the aspect-ratio buckets, or only data.size squared. InputError for a size the
    model cannot take (sides must be multiples of `factor`, its autoencoder x U-Net downsampling)."""
    if not bcfg.enabled:
        return [(data_size, data_size)]
    step = bcfg.step
    require(step % factor == 0, "buckets.step", f"a multiple of {factor} (this model's autoencoder x U-Net "
            "downsampling)", step)
    max_area = data_size ** 2 if bcfg.max_area is None else bcfg.max_area
    min_side = max(step, data_size // 2 // step * step) if bcfg.min_side is None else bcfg.min_side
    max_side = 2 * data_size // step * step if bcfg.max_side is None else bcfg.max_side
    for key, value in (("min_side", min_side), ("max_side", max_side)):
        require(value > 0 and value % step == 0, f"buckets.{key}", f"a positive multiple of buckets.step ({step})",
                value)
    sizes = bucket_sizes(max_area, step, min_side, max_side)
    if not sizes:
        raise InputError(f"buckets.max_area {max_area} holds no bucket with sides from {min_side} to {max_side}; "
                         f"raise max_area to at least {min_side ** 2}")
    return sizes


def check_base(pipe: Pipeline, fcfg: FinetuneConfig, lcfg: LoRAConfig) -> None:
    """Refuse a base checkpoint that the method cannot fine-tune on images and captions."""
    if pipe.is_inpainting or pipe.unet.config.in_channels != pipe.unet.config.out_channels:
        raise InputError(f"{fcfg.base} is an inpainting model (its U-Net takes {pipe.unet.config.in_channels} "
                         "channels): fine-tuning trains text-to-image U-Nets; pass a text-to-image checkpoint")
    if fcfg.method == "lora" and not pipe.unet.config.attention_resolutions and lcfg.targets == "attention":
        raise InputError(f"{fcfg.base} has no attention layers for lora.targets: attention; set lora.targets: "
                         "attention+conv")


@dataclass
class ImageSet:
    """Training images split into buckets: `members` (bucket, sample numbers in `index`), sorted by bucket,
    and with cached latents one `LatentCache` per bucket."""

    index: ShardIndex
    members: list[tuple[Bucket, list[int]]]
    caches: list[LatentCache] | None = None

    @property
    def weights(self) -> torch.Tensor:
        """(buckets,) float64: how often each bucket is drawn, its share of the samples."""
        return torch.tensor([len(indices) for _, indices in self.members], dtype=torch.float64)


def min_snr_weights(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, parameterization: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (B,) of timesteps `t`: min(SNR, gamma) / SNR for eps prediction,
    min(SNR, gamma) / (SNR + 1) for v, with SNR = a_t / (1 - a_t); all ones when gamma is 0."""
    if gamma == 0:
        return torch.ones(t.shape, device=t.device)
    alphas = schedule.alphas_cumprod.to(t.device)[t].float()
    snr = alphas / (1 - alphas)
    return snr.clamp(max=gamma) / (snr if parameterization == "eps" else snr + 1)


class FinetuneStage(Stage):
    name, sections = "finetune", SECTIONS

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.fcfg = parse_section(config, "finetune", FinetuneConfig)
        self.lcfg = parse_section(config, "lora", LoRAConfig)
        self.bcfg = parse_section(config, "buckets", BucketConfig)
        self.dreambooth = parse_section(config, "dreambooth", DreamBoothConfig)
        check_finetune_config(self.fcfg, self.lcfg, self.bcfg)
        check_dreambooth_config(self.dreambooth)
        require(self.data.dataset == "webdataset", "data.dataset", "webdataset (fine-tuning reads shards; write "
                "them with scripts/make_shards.py)", self.data.dataset)
        self.output = "lora.safetensors" if self.fcfg.method == "lora" else "model.safetensors"

    @property
    def lora(self) -> bool:
        return self.fcfg.method == "lora"

    def build(self, accelerator: Accelerator) -> nn.Module:
        cfg, fcfg, device = self.cfg, self.fcfg, accelerator.device
        self.accelerator = accelerator
        self.pipe = pipe = Pipeline.from_checkpoint(fcfg.base, device=device)
        check_base(pipe, fcfg, self.lcfg)
        factor = pipe.autoencoder.config.downsampling_factor
        if not self.bcfg.enabled:
            check_sizes(self.data.size, factor, pipe.unet.config)
        self.buckets = buckets(self.data.size, self.bcfg, factor * 2 ** (len(pipe.unet.config.channel_mult) - 1))
        unet, text_encoder = pipe.unet.train(), pipe.text_encoder
        pipe.autoencoder.requires_grad_(False)
        unet.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.channels_last:
            unet.to(memory_format=torch.channels_last)
        if self.lora:
            unet.requires_grad_(False)
            model: nn.Module = LoRANetwork(unet, self.lcfg.targets, self.lcfg.rank, self.lcfg.alpha,
                                           text_encoder if fcfg.train_text_encoder else None)
        elif fcfg.train_text_encoder:
            model = nn.ModuleDict({"unet": unet.requires_grad_(True),
                                   "text_encoder": text_encoder.train().requires_grad_(True)})
        else:
            model = unet.requires_grad_(True)
        # Fused AdamW: one kernel over all tensors, several times faster than the default on a CPU.
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                      betas=cfg.adam_betas, weight_decay=cfg.weight_decay, fused=True)
        self.model, self.optimizer, self.lr_schedule = accelerator.prepare(model.to(device), optimizer,
                                                                           lr_scheduler(optimizer, cfg))
        return self.model

    def start(self, run: TrainingRun) -> None:
        # The indexes, the buckets and any cache depend on the data and the seed alone, never on the step:
        # a resumed run rebuilds them exactly as the first session did.
        dcfg = self.dreambooth
        index = ShardIndex.read(self.data.urls)
        self.images = self._image_set(index.with_caption(dcfg.instance_prompt) if dcfg.instance_prompt else index)
        self.class_images: ImageSet | None = None
        if dcfg.class_prompt:
            folder = Path(dcfg.class_dir or Path(self.cfg.output_dir) / "class_images")
            # Drawn by the base model as loaded, not by the live one, which a resumed run has already trained.
            paths = class_images(lambda: Pipeline.from_checkpoint(self.fcfg.base, device=self.accelerator.device),
                                 dcfg, folder, self.cfg.batch_size, self.accelerator.is_local_main_process)
            self.class_images = self._image_set(ShardIndex.of_files(paths, dcfg.class_prompt))

    def _image_set(self, index: ShardIndex) -> ImageSet:
        members: dict[Bucket, list[int]] = {}
        for i, sample in enumerate(index.samples):
            members.setdefault(nearest_bucket(sample.width, sample.height, self.buckets), []).append(i)
        images = ImageSet(index, sorted(members.items()))
        if self.fcfg.cache_latents:
            crops = torch.Generator().manual_seed(self.cfg.seed) if self.data.random_crop else None
            images.caches = [LatentCache(self.pipe.autoencoder, self.pipe.text_encoder,
                                         self._encode_batches(images, bucket, indices, crops), len(indices),
                                         self.accelerator.device, self.accelerator.is_local_main_process)
                             for bucket, indices in images.members]
        return images

    def _pixels(self, index: ShardIndex, bucket: Bucket, indices: list[int],
                generator: torch.Generator | None) -> torch.Tensor:
        """Samples `indices` cropped to `bucket`: (B, 3, height, width) in [-1, 1] on the device."""
        pixels = [to_tensor(cover_and_crop(index.image(i), bucket, generator)) for i in indices]
        return torch.stack(pixels).to(self.accelerator.device)

    def _encode_batches(self, images: ImageSet, bucket: Bucket, indices: list[int],
                        generator: torch.Generator | None) -> Iterator[dict[str, Any]]:
        """The batches a `LatentCache` encodes: the bucket's samples in order."""
        for start in range(0, len(indices), self.cfg.batch_size):
            part = indices[start:start + self.cfg.batch_size]
            yield {"images": self._pixels(images.index, bucket, part, generator),
                   "captions": [images.index.samples[i].caption for i in part]}

    def _context(self, captions: list[str]) -> torch.Tensor:
        """Context (B, L, D) of `captions`: through the LoRA pairs or the trained text encoder, with gradients
        when it trains."""
        text_encoder = self.pipe.text_encoder
        if not self.fcfg.train_text_encoder:
            with torch.no_grad():
                return text_encoder(captions)
        with self.accelerator.autocast():
            return self.accelerator.unwrap_model(self.model).encode(text_encoder, captions) if self.lora \
                else text_encoder(captions)

    def _batch(self, images: ImageSet, generator: torch.Generator,
               device_generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled latents (B, C, h, w) of random samples of one bucket of `images` and their context (B, L, D)."""
        cfg, fcfg = self.cfg, self.fcfg
        bucket = int(torch.multinomial(images.weights, 1, generator=generator))
        if images.caches is not None:
            cache = images.caches[bucket]
            if not fcfg.train_text_encoder:
                return cache.draw(cfg.batch_size, fcfg.caption_dropout, generator)
            latents, rows = cache.draw_rows(cfg.batch_size, fcfg.caption_dropout, generator)
            return latents, self._context([cache.captions[r] for r in rows.tolist()])
        size, indices = images.members[bucket]
        picks = [indices[i] for i in torch.randint(len(indices), (cfg.batch_size,), generator=generator).tolist()]
        pixels = self._pixels(images.index, size, picks, generator if self.data.random_crop else None)
        with torch.no_grad():
            latents = self.pipe.autoencoder.encode(pixels).sample(device_generator)
        captions = [images.index.samples[i].caption for i in picks]
        return latents, self._context(drop_captions(captions, fcfg.caption_dropout, generator))

    def _loss(self, latents: torch.Tensor, context: torch.Tensor, device_generator: torch.Generator) -> torch.Tensor:
        """The (min-SNR weighted) diffusion loss of unscaled `latents` (B, C, h, w) under `context`."""
        fcfg, schedule, device = self.fcfg, self.pipe.schedule, self.accelerator.device
        latents = latents * self.pipe.autoencoder.scale_factor
        noise = torch.randn(latents.shape, generator=device_generator, device=device, dtype=latents.dtype)
        if fcfg.noise_offset > 0:
            noise = noise + fcfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=device_generator,
                                                            device=device, dtype=latents.dtype)
        t = draw_timesteps(schedule, latents.shape[0], fcfg, device_generator, device)
        x_t = schedule.add_noise(latents, noise, t)
        if self.cfg.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        parameterization = self.pipe.spec.parameterization
        target = noise if parameterization == "eps" else schedule.v_target(latents, noise, t)
        with self.accelerator.autocast():
            prediction = self.pipe.unet(x_t, t, context)
        errors = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (errors * min_snr_weights(schedule, t, fcfg.min_snr_gamma, parameterization)).mean()

    def step(self, run: TrainingRun, generator: torch.Generator, device_generator: torch.Generator) -> StepResult:
        latents, context = self._batch(self.images, generator, device_generator)
        run.samples_seen += latents.shape[0]
        loss = self._loss(latents, context, device_generator)
        logs = {"lr": self.lr_schedule.get_last_lr()[0]}
        if self.class_images is not None:  # prior preservation: the class as the base model draws it
            prior = self._loss(*self._batch(self.class_images, generator, device_generator), device_generator)
            loss = loss + self.dreambooth.prior_loss_weight * prior
            logs["prior_loss"] = prior.detach()
        if run.skip(loss):
            self.optimizer.zero_grad(set_to_none=True)
        else:
            optimizer_step(self.accelerator, loss, self.model, self.optimizer, self.lr_schedule, self.cfg.max_grad_norm)
        return loss, logs

    @contextmanager
    def _trained_pipeline(self, model: nn.Module) -> Iterator[Pipeline]:
        """The pipeline with `model`'s weights (the averaged ones) in eval mode: a LoRA merged into the
        base weights through its exported file (and the training hooks paused), full weights swapped in."""
        pipe, live = self.pipe, self.accelerator.unwrap_model(self.model)
        pipe.unet.eval()
        try:
            if self.lora:
                with tempfile.TemporaryDirectory() as folder, live.paused():
                    pipe.load_lora(save_atomic(Path(folder) / self.output, model.kohya_tensors(), {}))
                    try:
                        yield pipe
                    finally:
                        pipe.unload_lora()
            else:
                trained = dict(model.items()) if isinstance(model, nn.ModuleDict) else {"unet": model}
                yield Pipeline(pipe.spec, trained["unet"].eval(),
                               trained.get("text_encoder", pipe.text_encoder).eval(), pipe.autoencoder)
        finally:
            for module in (pipe.unet, *([] if self.lora else [live])):
                module.train()

    def write_samples(self, model: nn.Module, path: Path) -> None:
        with self._trained_pipeline(model) as pipe:
            write_samples(pipe, self.fcfg, path)

    def export(self, model: nn.Module, run: TrainingRun) -> None:
        path = Path(self.cfg.output_dir) / self.output
        if self.lora:
            save_atomic(path, model.kohya_tensors(), self.kohya_metadata(run))
            return
        with self._trained_pipeline(model) as pipe:
            pipe.save(path, metadata={"training_steps": str(run.step), "base_model": Path(self.fcfg.base).name})

    def kohya_metadata(self, run: TrainingRun) -> dict[str, str]:
        """What kohya's sd-scripts write beside a LoRA (`ss_*`), which AUTOMATIC1111 and ComfyUI show."""
        lcfg, spec = self.lcfg, self.pipe.spec
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(lcfg.rank),
                    "ss_network_alpha": str(float(lcfg.alpha)), "ss_sd_model_name": Path(self.fcfg.base).name,
                    "ss_base_model": spec.family, "ss_v2": str(spec.family == "sd2"),
                    "ss_v_parameterization": str(spec.parameterization == "v"),
                    "ss_network_train_unet_only": str(not self.fcfg.train_text_encoder),
                    "ss_steps": str(run.step), "ss_learning_rate": str(self.cfg.learning_rate),
                    "ss_resolution": json.dumps([self.data.size, self.data.size]),
                    "ss_enable_bucket": str(self.bcfg.enabled), "ss_num_train_images": str(len(self.images.index)),
                    "ss_caption_dropout_rate": str(self.fcfg.caption_dropout),
                    "ss_min_snr_gamma": str(self.fcfg.min_snr_gamma), "ss_noise_offset": str(self.fcfg.noise_offset)}
        if self.class_images is not None:
            metadata["ss_num_reg_images"] = str(len(self.class_images.index))
        if lcfg.targets == "attention+conv":
            metadata["ss_network_args"] = json.dumps({"conv_dim": lcfg.rank, "conv_alpha": lcfg.alpha})
        return metadata


def train_finetune(config: dict[str, Any], resume: bool = False) -> Path | None:
    """Run (or resume) a fine-tuning run; returns the exported LoRA or checkpoint, or None when a stop signal
    ended the run early (after saving a checkpoint to resume from)."""
    return train(FinetuneStage(config), resume)

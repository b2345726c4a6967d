"""Stage 0: train the small CLIP whose text tower becomes the diffusion model's text encoder.

Objective: CLIP's symmetric contrastive loss over in-batch pairs, with two changes for shapes-v1.

False negatives. Captions are not unique (many images are "a red circle"), so plain CLIP would
push an image away from captions that describe it. Targets are soft instead: each image's target
is uniform over every caption in the batch that describes it, and each caption's over every image
it describes. On shapes-v1 the loader gives each image's canonical caption, which names all its
attributes, so "describes" is exact: the caption is one of the image's canonical or partial
captions. On other data only identical captions count; a caption that happens to fit another
image stays a negative there.

Hard negatives. With 660 attribute combinations, a batch rarely holds two images that differ in
one attribute only, so nothing forces the model to see position: in our runs it stayed at chance
on position while colour, size and background were perfect. Each image therefore also gets a
negative caption: its canonical caption with one attribute, drawn uniformly, set to another value
(never a held-out colour-shape pair), as in NegCLIP (Yuksekgonul et al. 2023). These captions
only act as negatives unless they happen to describe another image of the batch.

Negatives are those of the process's own micro-batch: features are not gathered across
processes, and gradient accumulation does not enlarge the set of negatives.

At the end, retrieval on held-out shapes-v1 images measures what the text tower tells apart:
each image picks the best of all canonical captions, scored in full and per attribute.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ldm.clip import ClipConfig, SmallCLIP, contrastive_loss
from ldm.config import config_dict
from ldm.data.loader import Batches, make_loader, shapes_dataset
from ldm.errors import InputError
from ldm.files import write_json
from ldm.shapes.dataset import (
    CANONICAL_FORM,
    HELDOUT_PAIRS,
    PARTIAL_FORMS,
    VOCABULARY,
    ShapeSample,
    canonical_caption,
    format_caption,
)
from ldm.training.common import TrainingRun, build_dataset, lr_scheduler, optimizer_step
from ldm.training.config import at_least, config_errors, parse_section
from ldm.training.loop import Stage, StepResult, train
from ldm.weights_io import save_module

SECTIONS = ("clip", "clip_training", "data", "train")


@dataclass
class ClipTraining:
    """The `clip_training:` section of a training YAML (optional)."""

    hard_negatives: bool = True  # one negative caption per image (shapes-v1 only)
    eval_samples: int = 500  # images per split (val, heldout) for the final retrieval metrics
    eval_batch_size: int = 100


@functools.cache
def canonical_samples() -> dict[str, ShapeSample]:
    """Every canonical shapes-v1 caption -> its attributes: 8 x 3 x 2 x 5 x 3 = 720, held-out pairs included."""
    samples = (ShapeSample(**dict(zip(VOCABULARY, values, strict=True)))
               for values in itertools.product(*VOCABULARY.values()))
    return {canonical_caption(s): s for s in samples}


@functools.cache
def _descriptions() -> dict[str, frozenset[str]]:
    # Canonical caption -> every caption a shapes-v1 image with those attributes can carry.
    forms = (CANONICAL_FORM, *PARTIAL_FORMS)
    return {caption: frozenset(format_caption(s, form) for form in forms) for caption, s in canonical_samples().items()}


def caption_positives(captions: list[str], texts: list[str] | None = None,
                      canonical_captions: list[str] | None = None) -> torch.Tensor:
    """Which text describes which image: (B, T) bool, `[i, j]` = `texts[j]` describes image i.

    Image i is the one captioned `captions[i]`; `texts` defaults to `captions`. With shapes-v1
    `canonical_captions` (all attributes of each image), a text describes image i when it is one
    of image i's canonical or partial captions; otherwise when it equals `captions[i]`.
    """
    texts = captions if texts is None else texts
    if canonical_captions is None:
        described = [{caption} for caption in captions]
    else:
        descriptions = _descriptions()
        unknown = [c for c in canonical_captions if c not in descriptions]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a canonical shapes-v1 caption")
        described = [descriptions[c] for c in canonical_captions]
    return torch.tensor([[text in d for text in texts] for d in described], dtype=torch.bool)


def hard_negative_captions(canonical_captions: list[str], generator: torch.Generator) -> list[str]:
    """Each canonical shapes-v1 caption with one attribute (drawn uniformly) set to another value.

    Values are drawn uniformly too, again until the colour-shape pair is not held out, so held-out
    compositions never appear in training text.
    """
    def pick(options: list[str]) -> str:
        return options[int(torch.randint(len(options), (), generator=generator))]

    samples = canonical_samples()
    negatives = []
    for caption in canonical_captions:
        sample = samples[caption]
        while True:
            attribute = pick(list(VOCABULARY))
            value = pick([v for v in VOCABULARY[attribute] if v != getattr(sample, attribute)])
            negative = dataclasses.replace(sample, **{attribute: value})
            if (negative.color, negative.shape) not in HELDOUT_PAIRS:
                break
        negatives.append(canonical_caption(negative))
    return negatives


def _weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # As open_clip: no decay on gains, biases, embeddings and the temperature, which decay would
    # pull towards meaningless values (a temperature of 1, zero positions).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # fixed sin-cos position embeddings
            continue
        (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def retrieval_metrics(model: SmallCLIP, split: str, num_samples: int, batch_size: int = 100) -> dict[str, float]:
    """Top-1 image -> caption retrieval over all 720 canonical captions, on `num_samples` images of `split`.

    Returns `top1` (the whole caption right) and, per attribute (`color`, `shape`, `size`,
    `position`, `background`), the fraction of images whose retrieved caption names it correctly.
    """
    device = model.logit_scale.device
    candidates = canonical_samples()
    captions = list(candidates)
    text_features = torch.cat([model.encode_text(captions[i : i + batch_size])
                               for i in range(0, len(captions), batch_size)])
    index = {caption: i for i, caption in enumerate(captions)}
    samples = list(candidates.values())
    predicted, truth = [], []
    loader = make_loader(shapes_dataset(split, size=model.config.vision.image_size, stop=num_samples), batch_size)
    for batch in loader:
        image_features = model.encode_image(batch["images"].to(device))
        predicted += (image_features @ text_features.T).argmax(dim=1).tolist()
        truth += [index[c] for c in batch["canonical_captions"]]
    pairs = [(samples[p], samples[t]) for p, t in zip(predicted, truth, strict=True)]
    metrics = {"num_samples": len(pairs), "top1": sum(p == t for p, t in pairs) / len(pairs)}
    for attribute in VOCABULARY:
        metrics[attribute] = sum(getattr(p, attribute) == getattr(t, attribute) for p, t in pairs) / len(pairs)
    return metrics


class ClipStage(Stage):
    name, sections, output = "clip", SECTIONS, "text_encoder.safetensors"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.clip_config = parse_section(config, "clip", ClipConfig)
        self.ccfg = parse_section(config, "clip_training", ClipTraining)
        at_least(self.ccfg, "clip_training", 1, "eval_samples", "eval_batch_size")
        if self.data.size != self.clip_config.vision.image_size:
            raise InputError(f"data.size is {self.data.size} but clip.vision.image_size is "
                             f"{self.clip_config.vision.image_size}; set both to the same size")

    def build(self, accelerator: Accelerator) -> torch.nn.Module:
        cfg = self.cfg
        self.accelerator = accelerator
        with config_errors("clip"):
            model = SmallCLIP(self.clip_config)
        model.text.set_grad_checkpointing(cfg.gradient_checkpointing)
        model.visual.set_grad_checkpointing(cfg.gradient_checkpointing)
        # Fused: one kernel for all tensors, several times faster than the default loop on a CPU, where
        # the dense gradient of the 49408-row token embedding makes the update a large share of a step.
        optimizer = torch.optim.AdamW(_weight_decay_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                      betas=cfg.adam_betas, fused=True)
        self.model, self.optimizer, self.lr_schedule = accelerator.prepare(model, optimizer,
                                                                           lr_scheduler(optimizer, cfg))
        self.tokenize = accelerator.unwrap_model(self.model).text.tokenize
        return self.model

    def start(self, run: TrainingRun) -> None:
        self.dataset = build_dataset(self.data, self.accelerator, run.samples_seen, seed=self.cfg.seed + run.step)
        self.batches = Batches(make_loader(self.dataset, self.cfg.batch_size, self.cfg.num_workers), self.dataset)

    def step(self, run: TrainingRun, generator: torch.Generator, device_generator: torch.Generator) -> StepResult:
        batch = next(self.batches)
        captions, canonical = batch["captions"], batch.get("canonical_captions")
        run.samples_seen += len(captions)
        texts = captions
        if self.ccfg.hard_negatives and canonical is not None:
            texts = captions + hard_negative_captions(canonical, generator)
        positives = caption_positives(captions, texts, canonical)
        with self.accelerator.autocast():
            image_features, text_features, logit_scale = self.model(batch["images"].to(self.accelerator.device),
                                                                    self.tokenize(texts))
        loss = contrastive_loss(image_features.float(), text_features.float(), logit_scale.float(), positives)
        if run.skip(loss):
            self.optimizer.zero_grad(set_to_none=True)
        else:
            optimizer_step(self.accelerator, loss, self.model, self.optimizer, self.lr_schedule, self.cfg.max_grad_norm)
        return loss, {"logit_scale": logit_scale, "lr": self.lr_schedule.get_last_lr()[0],
                      "skipped_samples": self.dataset.num_skipped}

    def export(self, model: torch.nn.Module, run: TrainingRun) -> None:
        """`text_encoder.safetensors`, `clip.safetensors` (the whole CLIP, for CLIP scores) and, on
        shapes-v1, `metrics.json` with retrieval accuracies on the val and heldout splits."""
        run_dir, ccfg = Path(self.cfg.output_dir), self.ccfg
        clip = export_clip(model).to(self.accelerator.device)
        if self.data.dataset == "shapes-v1":
            splits = ("val", "heldout")
            metrics = {"steps": run.step, **{split: retrieval_metrics(clip, split, ccfg.eval_samples,
                                                                      ccfg.eval_batch_size) for split in splits}}
            self.accelerator.log({f"{split}/{k}": v for split in splits for k, v in metrics[split].items()},
                                 step=run.step)
            write_json(run_dir / "metrics.json", metrics)
            self.accelerator.print(json.dumps(metrics))
        metadata = {"training_steps": str(run.step)}
        save_module(run_dir / "clip.safetensors", clip, "clip", self.clip_config.to_dict(), metadata)
        save_module(run_dir / self.output, clip.text, "text_encoder", config_dict(self.clip_config.text), metadata)


def train_clip(config: dict[str, Any], resume: bool = False) -> Path | None:
    """Run (or resume) a CLIP training run; returns the exported `text_encoder.safetensors` (see
    `ClipStage.export` for the other files)."""
    return train(ClipStage(config), resume)


def export_clip(model: SmallCLIP) -> SmallCLIP:
    """A copy of `model` to evaluate and save: float32 on the CPU, frozen."""
    clip = SmallCLIP(model.config)
    clip.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    return clip.requires_grad_(False).eval()

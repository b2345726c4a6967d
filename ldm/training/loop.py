"""The one training loop every stage runs: set up, step, average, log, checkpoint, sample, export.

A stage (autoencoder, CLIP, diffusion) supplies what is its own through `Stage`: its config sections,
its modules and optimizers, one micro-batch of training, its sample images and its exported files.
Everything else (run folder checks, accelerate, EMA, resume, gradient accumulation, NaN checks,
stop signals, the order in which a run writes its files) happens here, once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from torch import nn

from ldm.training.common import EMA, TrainingRun, check_run_dir, make_accelerator, save_run_config
from ldm.training.config import check_sections, data_config, train_config

StepResult = tuple[torch.Tensor, dict[str, float | torch.Tensor]]


class Stage:
    """One training stage. Subclasses parse and check their own config sections in `__init__` (after
    this class's: nothing is written and no accelerator exists yet), then implement the methods below."""

    name: ClassVar[str]  # the run's name in logs and the progress bar
    sections: ClassVar[tuple[str, ...]]  # the config's top-level sections
    output: ClassVar[str]  # the exported file in the run folder that `train` returns

    def __init__(self, config: dict[str, Any]) -> None:
        check_sections(config, self.sections)
        self.config = config
        self.cfg = train_config(config)
        self.data = data_config(config)

    def build(self, accelerator: Accelerator) -> nn.Module:
        """Create and `accelerator.prepare` the modules, optimizers and schedules; return the prepared
        model whose weights are averaged (EMA), exported and accumulated over."""
        raise NotImplementedError

    def start(self, run: TrainingRun) -> None:
        """Open the data streams, from where `run` (a resumed one) left them."""
        raise NotImplementedError

    def step(self, run: TrainingRun, generator: torch.Generator, device_generator: torch.Generator) -> StepResult:
        """One micro-batch: read data (counting `run.samples_seen`), forward, backward and optimizer step
        (a no-op until the last micro-batch under accumulation). Returns the loss and what else to log."""
        raise NotImplementedError

    def write_samples(self, model: nn.Module, path: Path) -> None:
        """Write a sample grid from the averaged `model` to `path` (main process; default: none)."""

    def export(self, model: nn.Module, run: TrainingRun) -> None:
        """Write `output` (and any metrics) from the averaged `model`; main process only."""
        raise NotImplementedError


def train(stage: Stage, resume: bool = False) -> Path | None:
    """Run (or resume) `stage`'s training run; returns its exported file, or None when a stop signal
    ended the run early (after saving a checkpoint to resume from)."""
    cfg = stage.cfg
    check_run_dir(cfg, resume)
    accelerator = make_accelerator(cfg)
    model = stage.build(accelerator)
    # Averaged weights smooth out the noise of small-batch steps; they are what gets sampled and exported.
    ema = EMA(accelerator.unwrap_model(model), cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    def averaged() -> nn.Module:
        return ema.model if ema is not None else accelerator.unwrap_model(model)

    run = TrainingRun(accelerator, cfg, stage.name, resume)
    stage.start(run)
    save_run_config(accelerator, stage.config)  # only now: a run that fails to start leaves no folder behind
    run_dir = Path(cfg.output_dir)
    with run:
        while not run.done:
            generators = run.generators(accelerator.device)
            with accelerator.accumulate(model):
                loss, logs = stage.step(run, *generators)
            run.watch(loss)
            if not accelerator.sync_gradients:
                continue  # more micro-batches to accumulate before the optimizer step ends
            if ema is not None:
                ema.update(accelerator.unwrap_model(model))
            run.end_step(loss, logs)
            if run.stopped:
                break
            if run.sample_due():
                stage.write_samples(averaged(), run_dir / "samples" / f"step-{run.step:06d}.png")
    if accelerator.is_main_process and not run.stopped:
        stage.export(averaged(), run)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it destroys the process group that wait_for_everyone needs
    return None if run.stopped else run_dir / stage.output

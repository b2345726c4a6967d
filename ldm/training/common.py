"""What every training stage shares: accelerate setup, EMA, checkpoints, progress, the run folder.

A run directory holds:

    config.yaml                 the resolved config of the run
    checkpoints/step-000500/    accelerate state (models as .safetensors, optimizer, scheduler,
                                RNG states, EMA) and state.json (step, data position)
    logs/                       TensorBoard event files
    samples/                    sample grids written during training
    <stage>.safetensors         the exported model, loadable on its own

Checkpoints are written to a temporary folder and renamed, so a kill at any moment leaves the
previous one intact; the last `keep_last` are kept.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed
from safetensors import SafetensorError
from torch import nn
from tqdm import tqdm

from ldm.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.config import config_kwargs
from ldm.data.loader import ImageTextDataset, ShapesDataset, image_text_dataset, shapes_dataset
from ldm.errors import InputError
from ldm.files import atomic_write
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.training.config import DataConfig, TrainConfig
from ldm.weights_io import load_module_file, load_strict


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator that logs to TensorBoard under the run directory (when tensorboard is installed)."""
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs"))
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        log_with = None
    # The learning-rate schedules count optimizer steps, and `optimizer_step` advances them. Left to
    # accelerate, a prepared schedule would advance once per process at every step (it assumes schedules
    # written in per-process batches), so warmup and decay would end `num_processes` times too early.
    # Processes that a launcher started on a machine without an accelerator (torchrun, or accelerate launch
    # --multi_gpu, without ACCELERATE_USE_CPU=true) are joined over gloo on the CPU: left to accelerate, each
    # would train alone, on the same samples, racing its copies on one output folder.
    cpu = launched_processes() > 1 and not torch.accelerator.is_available()
    check_devices_per_process()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=log_with, project_config=project,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              step_scheduler_with_optimizer=False, cpu=cpu)
    check_launch(accelerator)
    set_seed(cfg.seed, device_specific=True)
    return accelerator


# Where launchers put the number of processes they started: torchrun and accelerate's multi-GPU launcher,
# then the MPI implementations that accelerate reads.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """How many processes the launcher says it started (1 without a launcher)."""
    name = next((name for name in WORLD_SIZE_VARIABLES if name in os.environ), None)
    if name is None:
        return 1
    if not os.environ[name].isdigit() or int(os.environ[name]) < 1:
        raise InputError(f"the launcher's {name}={os.environ[name]!r} is not a number of processes; "
                         "launch with torchrun or accelerate launch, which set it")
    return int(os.environ[name])


def check_devices_per_process() -> None:
    """Refuse more processes on this machine than it has accelerators: accelerate gives process k the
    device k, and the first process without one would fail in CUDA (invalid device ordinal)."""
    if "LOCAL_RANK" not in os.environ or parse_flag_from_env("ACCELERATE_USE_CPU"):
        return
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if not torch.accelerator.is_available() or not local.isdigit():
        return
    devices, kind = torch.accelerator.device_count(), torch.accelerator.current_accelerator().type
    if int(local) > devices:
        raise InputError(f"the launcher started {local} processes on this machine, which has {devices} {kind} "
                         f"device(s), one per process; start at most {devices} (torchrun --nproc_per_node, "
                         "accelerate launch --num_processes), or set ACCELERATE_USE_CPU=true to train on the CPU")


def check_launch(accelerator: Accelerator) -> None:
    """Refuse processes that accelerate did not join into one run: each would train alone, on the same
    samples, racing its copies on one output folder."""
    launched = launched_processes()
    if launched != accelerator.num_processes:
        raise InputError(f"the launcher started {launched} processes but accelerate set up "
                         f"{accelerator.num_processes} (distributed type {accelerator.distributed_type.value}), "
                         "so each would train alone on the same samples and output folder; launch with torchrun "
                         "or accelerate launch --multi_gpu, or set ACCELERATE_USE_CPU=true to train them together "
                         "on the CPU")
    # accelerate launch's simple launcher sets MASTER_ADDR only for --num_processes or --num_machines > 1,
    # and still starts one process (several only with --multi_gpu, or through mpirun).
    if launched == 1 and "MASTER_ADDR" in os.environ and "ACCELERATE_MIXED_PRECISION" in os.environ:
        raise InputError("accelerate launch started 1 process although --num_processes (or --num_machines) asks "
                         "for more: add --multi_gpu, which starts them on a CPU too with ACCELERATE_USE_CPU=true "
                         "(README, Training), or leave out --num_processes")


def save_run_config(accelerator: Accelerator, config: dict[str, Any]) -> None:
    if accelerator.is_main_process:
        run_dir = Path(config["train"]["output_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(run_dir / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(config, sort_keys=False))


class ConfigSchedule(torch.optim.lr_scheduler.LambdaLR):
    """A LambdaLR that keeps its own base learning rates when it loads a checkpoint: a resumed run takes
    the step count from the checkpoint and the learning rate at that step from its config, as a new run
    with that config would. (accelerate loads the optimizers, which carry the old rates, before this.)"""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        base_lrs = self.base_lrs
        super().load_state_dict(state_dict)
        self.base_lrs = base_lrs
        for group, base_lr, factor in zip(self.optimizer.param_groups, base_lrs, self.lr_lambdas, strict=True):
            group["initial_lr"], group["lr"] = base_lr, base_lr * factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> ConfigSchedule:
    """Linear warmup from 0 to the base learning rate over `warmup_steps`, then constant or cosine decay;
    the config's also when resuming (`ConfigSchedule`)."""
    warmup, total = max(1, cfg.warmup_steps), max(cfg.max_steps, cfg.warmup_steps + 1)

    def factor(step: int) -> float:
        if step < warmup or cfg.lr_schedule == "constant":
            return min(1.0, (step + 1) / warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    return ConfigSchedule(optimizer, factor)


def schedule_changes(cfg: TrainConfig) -> list[str]:
    """The learning-rate settings in which `cfg` differs from those of the run in `cfg.output_dir`, read
    from its config.yaml (written by the session that wrote its checkpoints), as `train.KEY NEW (was OLD)`."""
    try:
        previous = yaml.safe_load((Path(cfg.output_dir) / "config.yaml").read_text())["train"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []  # nothing readable to compare with
    keys = ("learning_rate", "lr_schedule", "warmup_steps") + (("max_steps",) if cfg.lr_schedule == "cosine" else ())
    was = {key: previous.get(key, getattr(TrainConfig, key)) for key in keys} if isinstance(previous, dict) else {}
    return [f"train.{key} {getattr(cfg, key)} (was {was[key]})" for key in was if was[key] != getattr(cfg, key)]


class EMA:
    """Exponential moving average of a model's parameters, kept in float32 beside the model.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so early averages are
    not dominated by the random initial weights (at 0.999 those would still weigh 29% after 1250 steps).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).float().requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        self.num_updates += 1
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.model.load_state_dict(state["model"])


class Checkpoints:
    """Atomic accelerate checkpoints in `run_dir/checkpoints/step-NNNNNN`, the last `keep_last` kept."""

    def __init__(self, run_dir: str | Path, keep_last: int) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def all(self) -> list[Path]:
        """The complete checkpoints, oldest first: in step order, which is the names' order only up to 999999."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.glob("step-*") if p.name[5:].isdigit() and (p / "state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, accelerator: Accelerator, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint `step`; every process takes part. A write that fails on any process (a full
        disk) removes the partial save and raises a one-line OSError on all of them."""
        final = self.dir / f"step-{step:06d}"
        tmp = self.dir / f".tmp-step-{step:06d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        failure = None
        try:
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:
                (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
        except (OSError, RuntimeError, SafetensorError) as e:  # torch's writer reports a full disk as a RuntimeError
            failure = e
        if sum_over_processes(accelerator, failure is not None):
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise self._save_error(final, failure) from None
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.all()[: -self.keep_last]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def _save_error(self, final: Path, failure: Exception | None) -> OSError:
        if failure is None:
            reason = "another process could not write its part"
        elif isinstance(failure, OSError) and failure.strerror:
            reason = failure.strerror
        else:
            reason = (str(failure).splitlines() or [type(failure).__name__])[0]
        last = self.latest()  # untouched: nothing is renamed or deleted before a save is complete
        then = f"continue from {last.name} with --resume" if last else "start the run again"
        return OSError(getattr(failure, "errno", None), f"cannot save checkpoint {final}: {reason}; removed the "
                       f"partial save; free disk space (or lower train.keep_last), then {then}")

    def remove_unfinished(self, accelerator: Accelerator) -> None:
        """Delete `.tmp-step-*` folders: saves of a process killed before it could rename them."""
        if accelerator.is_main_process and self.dir.is_dir():
            for tmp in self.dir.glob(".tmp-step-*"):
                shutil.rmtree(tmp, ignore_errors=True)

    def load(self, accelerator: Accelerator, path: Path) -> dict[str, Any]:
        """Restore models, optimizers, schedulers, RNG states and registered objects; returns state.json."""
        accelerator.load_state(str(path))
        return json.loads((path / "state.json").read_text())


def check_run_dir(cfg: TrainConfig, resume: bool) -> None:
    """--resume needs a checkpoint in `output_dir`; a new run must not mix its checkpoints with an old one's."""
    latest = Checkpoints(cfg.output_dir, cfg.keep_last).latest()
    if resume and latest is None:
        raise InputError(f"--resume: {cfg.output_dir} holds no checkpoint to resume from; "
                         "leave out --resume to start a new run")
    if not resume and latest is not None:
        raise InputError(f"{cfg.output_dir} already holds a run (latest checkpoint {latest.name}); "
                         "pass --resume to continue it, or set train.output_dir to a new folder")


class NonFiniteLoss:
    """The first NaN/inf loss of a run: noted on the device at every micro-batch, with no sync, and
    read only when checked (logging and checkpoint steps), so it is reported at the step it appeared."""

    def __init__(self) -> None:
        self._step: torch.Tensor | None = None  # the first step with a NaN/inf loss; 0 while there is none
        self._loss: torch.Tensor | None = None  # that loss

    def note(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        if self._step is None or self._loss is None:
            self._step = torch.zeros((), dtype=torch.long, device=loss.device)
            self._loss = torch.zeros((), device=loss.device)
        first = ~torch.isfinite(loss) & (self._step == 0)
        self._step = torch.where(first, step, self._step)
        self._loss = torch.where(first, loss, self._loss)

    def check(self, accelerator: Accelerator, checkpoints: Checkpoints) -> None:
        """Raise FloatingPointError at the first NaN/inf loss of any process (every process calls this)."""
        if self._step is None or self._loss is None:
            return
        steps, losses = accelerator.gather(self._step[None]), accelerator.gather(self._loss[None])
        seen = steps > 0
        if not seen.any():
            return
        first = int(torch.where(seen, steps, steps.max() + 1).argmin())
        raise FloatingPointError(f"loss is {losses[first].item()} at step {steps[first].item()}; the last good "
                                 f"checkpoint is {checkpoints.latest() or 'none'} (resume from it with a lower "
                                 "learning rate, or set train.skip_nan_steps=true)")


def progress_bar(accelerator: Accelerator, cfg: TrainConfig, initial: int, desc: str) -> tqdm:
    return tqdm(total=cfg.max_steps, initial=initial, desc=desc, disable=not accelerator.is_local_main_process,
                dynamic_ncols=True)


def load_stage(path: str | Path, kind: str) -> nn.Module:
    """A frozen stage exported by an earlier training run: `autoencoder` or `text_encoder`."""
    state_dict, config, _ = load_module_file(path, kind)
    if kind == "autoencoder":
        module = AutoencoderKL(AutoencoderConfig.from_dict(config))
    elif kind == "text_encoder":
        module = TextEncoder(TextEncoderConfig(**config_kwargs(TextEncoderConfig, config)))
    else:
        raise ValueError(f"unknown stage {kind!r}")
    load_strict(module, state_dict, kind, path)
    return module.requires_grad_(False).eval()


def build_dataset(data: DataConfig, accelerator: Accelerator, samples_seen: int = 0,
                  seed: int = 0) -> ShapesDataset | ImageTextDataset:
    """The `data:` section -> an iterable dataset of {"images", "captions"}, split across processes.

    `dataset: shapes-v1` streams the built-in set from where `samples_seen` (per process) left it;
    `webdataset` reads the shards of `urls` from their start, in the order and shuffle that `seed` draws:
    a stream's position is not restored, so resuming stages pass a seed that varies with the step.
    """
    if data.dataset == "shapes-v1":
        return shapes_dataset(data.split, size=data.size, rank=accelerator.process_index,
                              world_size=accelerator.num_processes, start=samples_seen * accelerator.num_processes)
    return image_text_dataset(data.urls, size=data.size, shuffle_buffer=data.shuffle_buffer, seed=seed,
                              random_crop=data.random_crop, rank=accelerator.process_index,
                              world_size=accelerator.num_processes)


class StopSignal:
    """SIGTERM / SIGINT become a request that the loop honours between steps: save and exit cleanly.

    Use as a context manager around the loop; `requested(accelerator)` agrees across processes, so
    every rank stops at the same step and the collective checkpoint save cannot deadlock.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signum

    def requested(self, accelerator: Accelerator) -> bool:
        return sum_over_processes(accelerator, self.signal is not None) > 0


def sum_over_processes(accelerator: Accelerator, value: int) -> int:
    """`value` summed over all processes, the same on each: a collective that every process must call,
    so that all take the same branch (stop, skip, fail) after it."""
    if accelerator.num_processes == 1:
        return int(value)
    total = accelerator.reduce(torch.tensor([int(value)], device=accelerator.device), reduction="sum")
    return int(total.item())


def optimizer_step(accelerator: Accelerator, loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                   lr_schedule: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float) -> None:
    """Backward; when gradients are synced (the last micro-batch under accumulation), clip their norm,
    step the optimizer and advance the schedule by one optimizer step.

    Under gradient accumulation accelerate turns the optimizer step into a no-op until the last micro-batch.
    """
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.sync_gradients:
        lr_schedule.step()


class TrainingRun:
    """The bookkeeping every stage shares, around its own training step: resume, step count and
    data position, progress bar, logging, NaN checks, atomic checkpoints and stop signals. The loop
    that drives it is `ldm.training.loop.train`; a stage's `step` reads `samples_seen`, `step` and `skip`.
    """

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, name: str, resume: bool) -> None:
        self.accelerator, self.cfg, self.name = accelerator, cfg, name
        self.checkpoints = Checkpoints(cfg.output_dir, cfg.keep_last)
        self.step, self.samples_seen = 0, 0  # optimizer steps; samples read by this process
        self.micro_batch = 0  # micro-batches of the current optimizer step drawn so far (gradient accumulation)
        self.nan_steps = 0  # steps of this session that skipped a NaN/inf micro-batch (train.skip_nan_steps)
        self.skipped_samples = 0  # corrupt samples this process skipped in this session, from the stage's logs
        self.stopped = False  # a stop signal ended the run, after saving a checkpoint
        self._skipped = False  # `skip` dropped the current micro-batch
        self._skipping = False  # the current step has skipped a micro-batch
        self._nonfinite = NonFiniteLoss()
        if resume and (latest := self.checkpoints.latest()) is not None:
            state = self.checkpoints.load(accelerator, latest)
            self.step, self.samples_seen = state["step"], state["samples_seen"]
            accelerator.print(f"resumed from {latest} at step {self.step}")
            if changes := schedule_changes(cfg):
                accelerator.print("resuming with the config's learning-rate schedule, not the checkpoint's: "
                                  + ", ".join(changes))
            self.checkpoints.remove_unfinished(accelerator)
        self._stop = StopSignal()

    def __enter__(self) -> TrainingRun:
        self.accelerator.init_trackers(self.name)
        self._bar = progress_bar(self.accelerator, self.cfg, self.step, self.name)
        self._stop.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._stop.__exit__()
        self._bar.close()
        if exc_type is None:  # what the run skipped, over all processes (a collective)
            if self.cfg.skip_nan_steps:
                self.accelerator.print(f"{self.nan_steps} step(s) skipped for a NaN/inf loss (train.skip_nan_steps)")
            if skipped := sum_over_processes(self.accelerator, self.skipped_samples):
                self.accelerator.print(f"{skipped} corrupt sample(s) or shard read(s) skipped; the warnings say why")

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.max_steps

    def generators(self, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        """Generators (CPU, `device`) for everything random in the next micro-batch, seeded by (seed, rank,
        step, micro-batch): a resumed run redraws exactly what an uninterrupted one would have, and the
        micro-batches of one step under gradient accumulation draw different samples and noise."""
        step_seed = self.cfg.seed * 1_000_003 + self.accelerator.process_index * 7919 + self.step
        seed = step_seed * self.cfg.gradient_accumulation_steps + self.micro_batch
        self.micro_batch += 1
        # Two seeds: on a CPU both generators are the same Mersenne Twister, and one seed would make the
        # device draws a shifted copy of the CPU draws (the diffusion noise of one latent channel equal to
        # the posterior noise of the next). Even and odd seeds also differ in the 32 bits it keeps.
        return torch.Generator().manual_seed(2 * seed), torch.Generator(device).manual_seed(2 * seed + 1)

    def skip(self, loss: torch.Tensor) -> bool:
        """True if train.skip_nan_steps is set and this micro-batch's loss is NaN/inf on any process: the
        stage then drops its gradients. Reads the loss (a device sync), so only when skipping is on."""
        if not self.cfg.skip_nan_steps:
            return False
        self._skipped = sum_over_processes(self.accelerator, not math.isfinite(loss.item())) > 0
        return self._skipped

    def watch(self, loss: torch.Tensor) -> None:
        """Note a micro-batch's loss, after the stage's step: a NaN/inf that was not skipped ends the run at
        the next logging or checkpoint step, reported at the step where it appeared."""
        if self._skipped:
            self._skipped, self._skipping = False, True
        else:
            self._nonfinite.note(loss, self.step + 1)

    def end_step(self, loss: torch.Tensor, logs: dict[str, float | torch.Tensor]) -> None:
        """Count a finished optimizer step: log the loss (averaged over processes) and `logs`, save
        checkpoints when due, and set `stopped` when a stop signal asks the run to end now (a checkpoint
        has then been saved). Values are read (a device sync) only on logging and checkpoint steps."""
        cfg, accelerator = self.cfg, self.accelerator
        self.step += 1
        self.micro_batch = 0
        self._bar.update(1)
        if self._skipping:
            self._skipping, self.nan_steps = False, self.nan_steps + 1
            if self.nan_steps == 1 and accelerator.is_local_main_process:
                tqdm.write(f"step {self.step}: NaN/inf loss, step skipped (train.skip_nan_steps); "
                           "the logs count skips as skipped_nan_steps")
        self.skipped_samples = int(logs.get("skipped_samples", 0))
        last = self.done
        if self.step % cfg.log_every == 0 or last:
            self._nonfinite.check(accelerator, self.checkpoints)
            values = {"loss": self.accelerator.gather(loss.detach()[None]).mean().item(),
                      **{k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in logs.items()}}
            if cfg.skip_nan_steps:
                values["skipped_nan_steps"] = self.nan_steps
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in list(values.items())[:2]})  # loss, first of logs
            accelerator.log(values, step=self.step)
        self.stopped = self._stop.requested(accelerator)
        if self.step % cfg.checkpoint_every == 0 or last or self.stopped:
            self._nonfinite.check(accelerator, self.checkpoints)  # never save weights a NaN has reached
            path = self.checkpoints.save(accelerator, self.step, {"samples_seen": self.samples_seen})
        if self.stopped:
            accelerator.print(f"stopped by signal at step {self.step}; saved {path}; continue with --resume")

    def sample_due(self) -> bool:
        """Whether this process should write sample images now (main process, every sample_every)."""
        return self.accelerator.is_main_process and (self.step % self.cfg.sample_every == 0 or self.done)

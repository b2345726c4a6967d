"""The training loop under faults: NaN losses, a full disk, stop signals, resumes with changed settings.

A toy stage (one weight fitted by SGD) runs the real loop, run bookkeeping and accelerate checkpoints in
well under a second per run; only what a stage supplies is stubbed.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import accelerate.checkpointing
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.cli import run_main
from ldm.training.common import Checkpoints, TrainingRun, lr_scheduler, optimizer_step
from ldm.training.loop import Stage, StepResult, train


class ToyStage(Stage):
    """Fits one weight to 1. The loss is NaN at the (1-based) steps in `nan_at`; `signal_at` sends this
    process SIGTERM during that step."""

    name, sections, output = "toy", ("train", "data"), "toy.safetensors"

    def __init__(self, config: dict, nan_at: tuple[int, ...] = (), signal_at: int = 0) -> None:
        super().__init__(config)
        self.nan_at, self.signal_at = nan_at, signal_at

    def build(self, accelerator: Accelerator) -> nn.Module:
        self.accelerator = accelerator
        model = nn.Linear(1, 1, bias=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.cfg.learning_rate)
        self.model, self.optimizer, self.schedule = accelerator.prepare(model, optimizer,
                                                                        lr_scheduler(optimizer, self.cfg))
        return self.model

    def start(self, run: TrainingRun) -> None:
        pass

    def step(self, run: TrainingRun, generator: torch.Generator, device_generator: torch.Generator) -> StepResult:
        if run.step + 1 == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        loss = (self.model(torch.ones(1, 1)) - 1).pow(2).mean()
        if run.step + 1 in self.nan_at:
            loss = loss * float("nan")
        if run.skip(loss):
            self.optimizer.zero_grad(set_to_none=True)
        else:
            optimizer_step(self.accelerator, loss, self.model, self.optimizer, self.schedule, 1.0)
        return loss, {"lr": self.schedule.get_last_lr()[0]}

    def export(self, model: nn.Module, run: TrainingRun) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(self.cfg.output_dir) /
                                                                                   self.output))


def toy_config(run_dir: Path, **train) -> dict:
    return {"train": {"output_dir": str(run_dir), "max_steps": 4, "batch_size": 1, "learning_rate": 0.1,
                      "log_every": 1, "checkpoint_every": 2, "sample_every": 1000, **train}}


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_resume_applies_the_configs_learning_rate_and_schedule_and_says_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(ToyStage(toy_config(run_dir, max_steps=2)))
    capsys.readouterr()
    train(ToyStage(toy_config(run_dir, max_steps=3, learning_rate=0.01, warmup_steps=8)), resume=True)
    out = capsys.readouterr().out
    assert ("resuming with the config's learning-rate schedule, not the checkpoint's: train.learning_rate 0.01 "
            "(was 0.1), train.warmup_steps 8 (was 0)") in out
    schedule = torch.load(run_dir / "checkpoints" / "step-000003" / "scheduler.bin", weights_only=True)
    optimizer = torch.load(run_dir / "checkpoints" / "step-000003" / "optimizer.bin", weights_only=True)
    assert schedule["base_lrs"] == [0.01] and schedule["last_epoch"] == 3
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(0.01 * 4 / 8)  # warmup: (step + 1) / 8
    train(ToyStage(toy_config(run_dir, max_steps=4, learning_rate=0.01, warmup_steps=8)), resume=True)
    assert "learning-rate schedule" not in capsys.readouterr().out  # unchanged: nothing to say


def test_a_nan_loss_is_reported_at_the_step_it_appears(tmp_path):
    stage = ToyStage(toy_config(tmp_path / "run", max_steps=12, log_every=10, checkpoint_every=10), nan_at=(3,))
    with pytest.raises(FloatingPointError, match=r"^loss is nan at step 3; the last good checkpoint is none"):
        train(stage)


def test_skipped_nan_steps_are_counted_logged_and_printed(tmp_path, capsys, monkeypatch):
    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.append((step, values)))
    run_dir = tmp_path / "run"
    # Steps 2 and 4 are logging and checkpoint steps, 3 neither.
    stage = ToyStage(toy_config(run_dir, max_steps=5, log_every=2, skip_nan_steps=True), nan_at=(2, 3, 4))
    exported = load_file(str(train(stage)))
    out = capsys.readouterr().out
    assert "step 2: NaN/inf loss, step skipped (train.skip_nan_steps)" in out
    assert "3 step(s) skipped for a NaN/inf loss" in out
    assert [(step, values["skipped_nan_steps"]) for step, values in logged] == [(2, 1), (4, 3), (5, 3)]
    assert all(torch.isfinite(v).all() for v in exported.values())  # no NaN step was applied


def test_a_stop_signal_on_a_checkpoint_step_saves_once(tmp_path, monkeypatch, capsys):
    saves = []
    save = Checkpoints.save

    def counting_save(self, accelerator, step, state):
        saves.append(step)
        return save(self, accelerator, step, state)

    monkeypatch.setattr(Checkpoints, "save", counting_save)
    run_dir = tmp_path / "run"
    assert train(ToyStage(toy_config(run_dir, max_steps=10), signal_at=4)) is None
    assert saves == [2, 4] and checkpoint_names(run_dir) == ["step-000002", "step-000004"]
    assert "stopped by signal at step 4" in capsys.readouterr().out


def fake_accelerator() -> SimpleNamespace:
    return SimpleNamespace(is_main_process=True, num_processes=1, wait_for_everyone=lambda: None,
                           save_state=lambda path: Path(path).mkdir(parents=True))


def test_checkpoints_are_ordered_by_step_number_past_a_million(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep_last=2)
    for step in (999_998, 999_999, 1_000_000):
        folder = checkpoints.dir / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"step": step}))
    assert checkpoints.latest().name == "step-1000000"
    checkpoints.save(fake_accelerator(), 1_000_001, {})
    assert checkpoint_names(tmp_path) == ["step-1000000", "step-1000001"]


TORCH_WRITER_FAILED = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"  # torch.save, disk full


@pytest.mark.parametrize(("error", "reason"), [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (RuntimeError(TORCH_WRITER_FAILED), TORCH_WRITER_FAILED),
])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, capsys,
                                                                                 error, reason):
    run_dir = tmp_path / "run"
    write = accelerate.checkpointing.save

    def fill_the_disk(obj, path, **kwargs):
        if ".tmp-step-000004" in str(path):
            Path(path).write_bytes(b"the first bytes")
            raise error
        write(obj, path, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", fill_the_disk)
    config = toy_config(run_dir, max_steps=6)
    assert run_main(lambda argv: train(ToyStage(config)), []) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot save checkpoint {run_dir / 'checkpoints' / 'step-000004'}: {reason}")
    assert "continue from step-000002 with --resume" in lines[0]
    assert checkpoint_names(run_dir) == ["step-000002"]  # the partial save is gone, the earlier one intact

    monkeypatch.setattr(accelerate.checkpointing, "save", write)
    assert train(ToyStage(config), resume=True) is not None
    assert checkpoint_names(run_dir) == ["step-000004", "step-000006"]

"""Diffusion training in two CPU processes (gloo): each rank reads its own data, DDP keeps the U-Nets equal.

The ranks run tests/distributed_worker.py under torchrun, which records what the trainer keeps to itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.config import config_dict
from ldm.pipeline import Pipeline
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.weights_io import save_module

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
NUM_STEPS, BATCH_SIZE = 3, 2
TIMEOUT_S = 300


def random_stages(root: Path) -> tuple[Path, Path]:
    """An untrained tiny autoencoder (32 x 32 images, 4 x 4 latents) and text encoder, saved as stage files."""
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=(1, 1, 1, 2), num_res_blocks=1, resolution=32))
    text_encoder = TextEncoder(TextEncoderConfig(width=64, layers=2, heads=4))
    return (save_module(root / "autoencoder.safetensors", autoencoder, "autoencoder", config_dict(autoencoder.config)),
            save_module(root / "text_encoder.safetensors", text_encoder, "text_encoder",
                        config_dict(text_encoder.config)))


def run_two_ranks(config: dict, root: Path, use_cpu: bool = True) -> Path:
    """Train with torchrun on two CPU processes; returns the folder of the workers' records. Without
    `use_cpu` (ACCELERATE_USE_CPU=true) accelerate would pick NCCL on a GPU machine."""
    config_path, record_dir = root / "config.json", root / "records"
    config_path.write_text(json.dumps(config))
    record_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(config_path), str(record_dir)]
    # A session of its own, so that a hung run can be ended with both its workers.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"two-process training did not finish in {TIMEOUT_S} s:\n{output[-3000:]}") from None
    assert process.returncode == 0, f"two-process training failed:\n{output[-3000:]}"
    return record_dir


def tiny_config(tmp_path: Path) -> dict:
    autoencoder, text_encoder = random_stages(tmp_path)
    return {
        "unet": {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [1, 2], "num_res_blocks": 1,
                 "num_heads": 4, "context_dim": 64},
        # No latent cache: each rank encodes and trains on the batches its own stream yields.
        "diffusion": {"autoencoder": str(autoencoder), "text_encoder": str(text_encoder), "precompute_latents": 0,
                      "sample_prompts": ["a red circle"], "sample_steps": 2},
        "data": {"dataset": "shapes-v1", "size": 32},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": NUM_STEPS, "batch_size": BATCH_SIZE, "log_every": 1,
                  "sample_every": 1000, "checkpoint_every": 1000, "learning_rate": 1e-3},
    }


def test_two_ranks_train_on_disjoint_data_and_end_with_equal_unets(tmp_path):
    config, run_dir = tiny_config(tmp_path), tmp_path / "run"
    record_dir = run_two_ranks(config, tmp_path)
    records = [json.loads((record_dir / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    weights = [load_file(str(record_dir / f"rank-{rank}.safetensors")) for rank in (0, 1)]

    assert [(r["world_size"], r["backend"]) for r in records] == [(2, "gloo")] * 2
    # (a) Each rank trained on NUM_STEPS batches of its own samples; together they are the stream's first ones.
    seen = [r["indices"] for r in records]
    assert [len(s) for s in seen] == [NUM_STEPS * BATCH_SIZE] * 2
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(2 * NUM_STEPS * BATCH_SIZE))

    # (b) Different data, yet bit-identical U-Nets: gradients were averaged across the ranks.
    final = [{k.removeprefix("final."): v for k, v in w.items() if k.startswith("final.")} for w in weights]
    assert final[0].keys() == final[1].keys() and final[0]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert any(not torch.equal(weights[0][f"initial.{k}"], final[0][k]) for k in final[0])
    # (c) The learning-rate schedule advanced once per optimizer step, not once per process and step.
    schedule = torch.load(run_dir / "checkpoints" / f"step-{NUM_STEPS:06d}" / "scheduler.bin", weights_only=True)
    assert schedule["last_epoch"] == NUM_STEPS
    # The exported pipeline (written by rank 0) holds these weights too.
    exported = Pipeline.from_checkpoint(run_dir / "model.safetensors").unet.state_dict()
    assert exported.keys() == final[0].keys()
    assert all(torch.equal(exported[k], final[0][k]) for k in exported)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="without an accelerator only: NCCL otherwise")
def test_torchrun_without_accelerate_use_cpu_trains_the_ranks_together(tmp_path):
    """Issue 26 item 3: accelerate left two torchrun processes on a CPU-only machine unjoined (distributed
    type NO), each training alone on the same samples and output folder; they now join over gloo."""
    record_dir = run_two_ranks(tiny_config(tmp_path), tmp_path, use_cpu=False)
    records = [json.loads((record_dir / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["world_size"], r["backend"]) for r in records] == [(2, "gloo")] * 2
    assert not set(records[0]["indices"]) & set(records[1]["indices"])


CLIP_CONFIG = {
    "clip": {"embed_dim": 32, "text": {"width": 32, "layers": 1, "heads": 2, "context_length": 16},
             "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}},
    "data": {"size": 32},
    "train": {"max_steps": 2, "batch_size": 2},
}


@pytest.mark.parametrize("quiet", [False, True])
def test_accelerate_launch_of_one_process_for_two_is_one_error_line(tmp_path, quiet):
    """accelerate launch --num_processes 2 without --multi_gpu starts one process: the script refuses it
    in one line before writing anything. accelerate's own launcher then adds a CalledProcessError
    traceback after the line (as after any failing script) unless given --quiet."""
    config = {**CLIP_CONFIG, "train": {**CLIP_CONFIG["train"], "output_dir": str(tmp_path / "run")}}
    (tmp_path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("ACCELERATE_USE_CPU", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", *(["--quiet"] if quiet else []),
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "scripts" / "train_clip.py"), "--config", str(tmp_path / "config.yaml")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1 and "accelerate launch started 1 process although --num_processes" in errors[0]
    assert result.stderr.lstrip().startswith(errors[0]), result.stderr
    assert ("Traceback" in result.stderr) != quiet, result.stderr
    assert not (tmp_path / "run").exists()

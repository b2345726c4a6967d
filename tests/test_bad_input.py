"""Bad input to every user-facing script: one line `error: ...`, exit code 1, no traceback, nothing left behind.

Each case runs the script's `main` through `run_main` in-process and compares the test folder
before and after, so a run directory, shard or half-written .safetensors left by a failed run
fails the test. scripts/txt2img.py has its own cases in tests/test_txt2img.py; docs/errors.md
lists them all.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from ldm.cli import run_main
from tests.conftest import write_tar

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    # By path, under a private name: "evaluate" is also a pip package's name.
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_autoencoder, convert_checkpoint, evaluate, make_shapes, train_clip, train_diffusion, train_vae = (
    load_script(name) for name in ("check_autoencoder", "convert_checkpoint", "evaluate", "make_shapes", "train_clip",
                                   "train_diffusion", "train_vae"))

TRAIN = {"output_dir": "@tmp/run", "max_steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 1}
CONFIGS = {  # tiny configs that pass validation; every case breaks one thing
    "vae": {
        "autoencoder": {"ch": 32, "ch_mult": [1, 1, 1, 2], "num_res_blocks": 1, "resolution": 32},
        "loss": {"disc_start": 1, "perceptual_weight": 0.0},
        "autoencoder_training": {"crop_size": 16, "scale_factor_samples": 2, "eval_samples": 2,
                                 "num_sample_images": 2},
        "data": {"dataset": "shapes-v1", "size": 32},
        "train": TRAIN,
    },
    "clip": {
        "clip": {"embed_dim": 32, "text": {"width": 32, "layers": 1, "heads": 2, "context_length": 16},
                 "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}},
        "data": {"size": 32},
        "train": TRAIN,
    },
    "diffusion": {
        "unet": {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [1], "num_res_blocks": 1,
                 "num_heads": 4, "context_dim": 32},
        "diffusion": {"autoencoder": "@autoencoder", "text_encoder": "@text_encoder"},
        "data": {"size": 32},
        "train": TRAIN,
    },
}
MAINS = {"vae": train_vae.main, "clip": train_clip.main, "diffusion": train_diffusion.main,
         "evaluate": evaluate.main, "make_shapes": make_shapes.main, "convert": convert_checkpoint.main,
         "check_autoencoder": check_autoencoder.main}


@pytest.fixture
def files(tmp_path, monkeypatch) -> dict[str, Path]:
    """What the cases point at, by the name they use after "@" ("@tmp/x" is tmp_path / "x")."""
    # No LPIPS, Inception or other hub weights: the cases that need them must say so, not download.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file where a folder is expected")
    paths = {"tmp": tmp_path, "blocker": tmp_path / "blocker"}
    for kind in ("autoencoder", "text_encoder", "clip"):  # stage files: only their tags are read before failing
        paths[kind] = tmp_path / f"{kind}.safetensors"
        save_file({"w": torch.zeros(1)}, str(paths[kind]), metadata={"ldm_module": kind, "config": "{}"})
    paths["ckpt"] = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.arange(1000.0)}}, paths["ckpt"])
    data = paths["ckpt"].read_bytes()
    paths["cut_ckpt"] = tmp_path / "cut.ckpt"
    paths["cut_ckpt"].write_bytes(data[: len(data) // 2])
    paths["noise_ckpt"] = tmp_path / "noise.ckpt"
    paths["noise_ckpt"].write_bytes(bytes(range(256)) * 8)
    paths["cut_safetensors"] = tmp_path / "cut.safetensors"
    save_file({"w": torch.arange(1000.0)}, str(paths["cut_safetensors"]))
    paths["cut_safetensors"].write_bytes(paths["cut_safetensors"].read_bytes()[:300])
    paths["existing"] = tmp_path / "existing.safetensors"
    paths["existing"].write_bytes(b"keep me")
    # One sample, whose image does not decode.
    paths["corrupt_shard"] = write_tar(tmp_path / "corrupt.tar", [("a.jpg", b"not a jpeg"), ("a.txt", b"a red circle")])
    return paths


def resolve(value, paths: dict[str, Path]):
    """Replace "@name" and "@name/rest" in strings, lists and dicts by the paths of `files`."""
    if isinstance(value, dict):
        return {k: resolve(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, paths) for v in value]
    if isinstance(value, str) and value.startswith("@"):
        name, _, rest = value[1:].partition("/")
        return str(paths[name] / rest if rest else paths[name])
    return value


def edited(config: dict, changes: dict) -> dict:
    """`config` with dotted keys set (None deletes the key)."""
    config = copy.deepcopy(config)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    return config


def snapshot(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under `folder`, with size and modification time for files."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in folder.rglob("*")}


def fails_cleanly(main, argv: list[str], folder: Path, capsys) -> str:
    """Run `main(argv)` through run_main; check exit code 1, one error line (progress bars aside) and an
    untouched `folder`."""
    capsys.readouterr()
    before = snapshot(folder)
    code = run_main(main, argv)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert snapshot(folder) == before, "a failed run left files behind or changed them"
    return lines[0]


TRAINING_CASES = [
    # (stage, changes to its tiny config, extra flags, a phrase the message must hold)
    ("vae", {"trian.max_steps": 1}, [], "unknown config section(s) ['trian']"),
    ("vae", {"train.learning_rte": 1e-3}, [], "train: unknown TrainConfig parameter(s) ['learning_rte']"),
    ("vae", {"train": 5}, [], "config section train: must hold key: value lines"),
    ("vae", {"train.max_steps": "ten"}, [], "train.max_steps must be an integer, got 'ten'"),
    ("vae", {"train.learning_rate": "1e-4"}, [], "write 1.0e-4"),
    ("vae", {"train.adam_betas": [0.9]}, [], "train.adam_betas must be a list of 2 numbers"),
    ("vae", {"train.gradient_checkpointing": "yes please"}, [], "must be true or false"),
    ("vae", {"train.max_steps": 0}, [], "train.max_steps must be >= 1, got 0"),
    ("vae", {"train.batch_size": -4}, [], "train.batch_size must be >= 1, got -4"),
    ("vae", {"train.learning_rate": 0.0}, [], "train.learning_rate must be > 0"),
    ("vae", {"train.learning_rate": -1e-4}, [], "train.learning_rate must be > 0"),
    ("vae", {"train.sample_every": 0}, [], "train.sample_every must be >= 1"),
    ("vae", {"train.lr_schedule": "linear"}, [], "train.lr_schedule must be constant or cosine"),
    ("vae", {"train.ema_decay": 1.0}, [], "train.ema_decay must be in [0, 1)"),
    ("vae", {"train.output_dir": "@blocker/run"}, [], "train.output_dir: cannot write to output folder"),
    ("vae", {}, ["--resume"], "holds no checkpoint to resume from"),
    ("vae", {"autoencoder.ch_mutl": [1, 2]}, [], "autoencoder: unknown AutoencoderConfig parameter(s) ['ch_mutl']"),
    ("vae", {"autoencoder_training.crop_size": 40}, [], "autoencoder_training.crop_size must be 0 (whole images) or"),
    ("vae", {"autoencoder_training.crop_size": 12}, [], "a multiple of 8 no larger than data.size 32, got 12"),
    ("vae", {"data.size": 36}, [], "data.size must be a multiple of 8"),
    ("vae", {"loss.kl_weight": -1.0}, [], "loss.kl_weight must be >= 0"),
    ("vae", {"loss.perceptual_weight": 1.0}, [], "needs the VGG16 ImageNet weights"),
    ("vae", {}, ["--perceptual_weight", "abc"], "invalid float value: 'abc'"),
    ("vae", {"data.dataset": "shapes-v2"}, [], "data.dataset must be shapes-v1 or webdataset, got 'shapes-v2'"),
    ("vae", {"data.split": "test"}, [], "data.split must be one of train, val, heldout"),
    ("vae", {"data.shards": "x-{0..3}.tar"}, [], "data: unknown DataConfig parameter(s) ['shards']"),
    ("vae", {"data.urls": "x.tar"}, [], "data.urls must be unset for shapes-v1"),
    ("vae", {"data.dataset": "webdataset"}, [], "data.urls must be tar shards for webdataset"),
    ("vae", {"data.dataset": "webdataset", "data.urls": ""}, [], "data.urls must be tar shards for webdataset"),
    # Found only when the shards are opened, after the models are built: still nothing on disk.
    ("vae", {"data.dataset": "webdataset", "data.urls": "@tmp/s-{000000..000003}.tar"}, [], "4 shard(s) not found"),
    # Found in the first batch, read before the run writes anything.
    ("vae", {"data.dataset": "webdataset", "data.urls": "@corrupt_shard"}, [], "no usable sample in 1 shard(s)"),
    ("clip", {"data.dataset": "webdataset", "data.urls": "@corrupt_shard"}, [], "1 skipped as corrupt"),
    ("vae", {}, ["--set", "train.max_steps"], "must look like section.key=value"),
    ("vae", {}, ["--set", "train.max_steps.x=1"], "max_steps holds a value, not keys"),
    ("vae", {}, ["--set", "train.max_steps=[1"], "the value is not valid YAML"),
    ("vae", {}, ["--bogus"], "unrecognized arguments: --bogus"),
    ("clip", {"data.size": 64}, [], "data.size is 64 but clip.vision.image_size is 32"),
    ("clip", {"clip.text.widht": 3}, [], "clip: unknown TextEncoderConfig parameter(s) ['widht']"),
    ("clip", {"clip_training.eval_samples": 0}, [], "clip_training.eval_samples must be >= 1"),
    ("clip", {"unet.model_channels": 32}, [], "unknown config section(s) ['unet']"),
    ("diffusion", {"diffusion.autoencoder": None}, [], "diffusion.autoencoder is required"),
    ("diffusion", {"diffusion.autoencoder": "@tmp/vae/autoencoder.safetensors"}, [],
     "not found; give the autoencoder.safetensors that scripts/train_vae.py writes"),
    ("diffusion", {"diffusion.text_encoder": "@tmp/clip/text_encoder.safetensors"}, [],
     "not found; give the text_encoder.safetensors that scripts/train_clip.py writes"),
    ("diffusion", {"diffusion.text_encoder": "@autoencoder"}, [], "is not a text_encoder file (it holds autoencoder)"),
    ("diffusion", {"diffusion.autoencoder": "@ckpt"}, [], "diffusion.autoencoder: cannot read"),
    ("diffusion", {"diffusion.parameterization": "x0"}, [], "diffusion.parameterization must be eps or v"),
    ("diffusion", {"diffusion.caption_dropout": 1.5}, [], "diffusion.caption_dropout must be in [0, 1]"),
    ("diffusion", {"diffusion.schedule": {"num_timestep": 10}}, [], "diffusion.schedule: "),
    ("diffusion", {"unet.context_dimm": 64}, [], "unet: unknown UNetConfig parameter(s) ['context_dimm']"),
]


@pytest.mark.parametrize(("stage", "changes", "extra", "phrase"), TRAINING_CASES)
def test_training_config(stage, changes, extra, phrase, files, capsys):
    config = files["tmp"] / "config.yaml"
    config.write_text(yaml.safe_dump(resolve(edited(CONFIGS[stage], changes), files)))
    message = fails_cleanly(MAINS[stage], ["--config", str(config), *extra], files["tmp"], capsys)
    assert phrase in message


@pytest.mark.parametrize(("text", "phrase"), [
    (None, "config not found"),
    ("train: {max_steps: 2\ndata: {}\n", "is not valid YAML at line"),
    ("- train\n- data\n", "must hold sections (train:, data:, ...), not a list"),
    ("\x00\xff", "cannot read config"),
])
def test_unreadable_config(text, phrase, files, capsys):
    config = files["tmp"] / "config.yaml"
    if text is not None:
        config.write_bytes(text.encode("latin-1"))
    message = fails_cleanly(train_diffusion.main, ["--config", str(config)], files["tmp"], capsys)
    assert phrase in message


def test_an_existing_run_needs_resume(files, capsys):
    checkpoint = files["tmp"] / "run" / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text('{"step": 2, "samples_seen": 4}')
    config = files["tmp"] / "config.yaml"
    config.write_text(yaml.safe_dump(resolve(CONFIGS["vae"], files)))
    message = fails_cleanly(train_vae.main, ["--config", str(config)], files["tmp"], capsys)
    assert "already holds a run (latest checkpoint step-000002); pass --resume" in message


@pytest.mark.parametrize(("env", "phrase"), [
    # A launcher that accelerate does not join on a machine with an accelerator (mpirun-like: no LOCAL_RANK).
    # Without one, the processes are joined over gloo (tests/test_distributed.py).
    ({"WORLD_SIZE": "2", "RANK": "0"}, "the launcher started 2 processes but accelerate set up 1"),
    ({"WORLD_SIZE": "two"}, "the launcher's WORLD_SIZE='two' is not a number of processes"),
    # torchrun --nproc_per_node 2 on a machine with one GPU: rank 1 would fail in CUDA (invalid device ordinal)
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"},
     "the launcher started 2 processes on this machine, which has 1 cuda device(s), one per process"),
    # accelerate launch --num_processes 2 without --multi_gpu: its simple launcher starts one process
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "ACCELERATE_MIXED_PRECISION": "no"},
     "accelerate launch started 1 process although --num_processes"),
])
def test_a_launch_that_accelerate_does_not_join_is_refused(env, phrase, files, capsys, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)  # with it, WORLD_SIZE=2 would wait for a second process
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)  # else joined over gloo: the same wait
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = files["tmp"] / "config.yaml"
    config.write_text(yaml.safe_dump(resolve(CONFIGS["clip"], files)))
    assert phrase in fails_cleanly(train_clip.main, ["--config", str(config)], files["tmp"], capsys)


SCRIPT_CASES = [
    ("evaluate", [], "the following arguments are required: --ckpt"),
    ("evaluate", ["--ckpt", "@tmp/absent.safetensors"], "checkpoint not found"),
    ("evaluate", ["--ckpt", "@ckpt", "--num_psnr", "0"], "--num_psnr must be >= 1"),
    ("evaluate", ["--ckpt", "@ckpt", "--num_prompts", "-3"], "--num_prompts must be >= 1"),
    ("evaluate", ["--ckpt", "@ckpt", "--num_heldout", "-1"], "--num_heldout must be >= 0"),
    ("evaluate", ["--ckpt", "@ckpt", "--steps", "0"], "--steps must be >= 1"),
    ("evaluate", ["--ckpt", "@ckpt", "--scales", "5", "-1"], "--scales must be >= 0"),
    ("evaluate", ["--ckpt", "@ckpt", "--vae", "@tmp/absent.safetensors"], "VAE not found"),
    ("evaluate", ["--ckpt", "@ckpt", "--batch_size", "x"], "invalid int value: 'x'"),
    ("evaluate", ["--ckpt", "@ckpt", "--device", "nodevice"], "device 'nodevice' is not usable here"),
    ("evaluate", ["--ckpt", "@ckpt", "--out", "@blocker/results.json"], "--out: cannot write to output folder"),
    ("evaluate", ["--ckpt", "@ckpt", "--out", "@tmp"], "is a folder"),
    ("evaluate", ["--ckpt", "@ckpt", "--clip", "@tmp/absent.safetensors"], "checkpoint not found"),
    ("evaluate", ["--ckpt", "@ckpt", "--clip", "@text_encoder"], "is not a clip file"),
    ("evaluate", ["--ckpt", "@ckpt", "--fid"], "FID needs Inception v3 weights"),
    ("check_autoencoder", [], "the following arguments are required: autoencoder"),
    ("check_autoencoder", ["@tmp/absent.safetensors"], "checkpoint not found"),
    ("check_autoencoder", ["@text_encoder"], "is not an autoencoder file"),
    ("check_autoencoder", ["@autoencoder", "--num_samples", "0"], "--num_samples must be >= 1"),
    ("check_autoencoder", ["@autoencoder", "--max_erased", "1.5"], "--max_erased must be in [0, 1]"),
    ("make_shapes", ["--num", "2", "--outdir", "@tmp/shards"], "the following arguments are required: --split"),
    ("make_shapes", ["--split", "test", "--num", "2", "--outdir", "@tmp/shards"], "invalid choice: 'test'"),
    ("make_shapes", ["--split", "train", "--num", "two", "--outdir", "@tmp/shards"], "invalid int value: 'two'"),
    ("make_shapes", ["--split", "train", "--num", "0", "--outdir", "@tmp/shards"], "--num and --per-shard must be"),
    ("make_shapes", ["--split", "val", "--num", "2", "--per-shard", "-1", "--outdir", "@tmp/shards"], "must be >= 1"),
    ("make_shapes", ["--split", "val", "--num", "2", "--outdir", "@blocker"], "cannot write to output folder"),
    ("make_shapes", ["--split", "val", "--num", "2", "--outdir", "@blocker/shards"], "cannot write to output folder"),
    ("convert", [], "the following arguments are required: src"),
    ("convert", ["@tmp/absent.ckpt"], "checkpoint not found"),
    ("convert", ["@cut_ckpt", "@tmp/out.safetensors"], "cannot read"),
    ("convert", ["@noise_ckpt", "@tmp/out.safetensors"], "cannot read"),
    ("convert", ["@cut_safetensors", "@tmp/out.safetensors"], "is the file truncated or corrupt?"),
    ("convert", ["@ckpt", "@tmp/out.bin"], "must end in .safetensors"),
    ("convert", ["@ckpt", "@existing"], "already exists; pass --force to replace it"),
    ("convert", ["@ckpt", "@tmp"], "is a folder"),
    ("convert", ["@ckpt", "@blocker/out.safetensors"], "cannot write to output folder"),
    ("convert", ["@existing"], "is the input file itself"),
]


@pytest.mark.parametrize(("script", "argv", "phrase"), SCRIPT_CASES)
def test_script_flags(script, argv, phrase, files, capsys):
    assert phrase in fails_cleanly(MAINS[script], resolve(argv, files), files["tmp"], capsys)


def test_convert_replaces_only_with_force(files, capsys):
    argv = [str(files["ckpt"]), str(files["existing"])]
    assert run_main(convert_checkpoint.main, [*argv, "--force"]) == 0
    assert capsys.readouterr().out.strip() == str(files["existing"])
    assert files["existing"].read_bytes() != b"keep me"


def test_make_shapes_refuses_existing_shards_and_cleans_up_a_failed_run(files, capsys, monkeypatch):
    outdir = files["tmp"] / "shards"
    assert run_main(make_shapes.main, ["--split", "val", "--num", "2", "--per-shard", "1", "--outdir",
                                       str(outdir)]) == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["shapes-v1-val-000000.tar", "shapes-v1-val-000001.tar"]
    argv = ["--split", "val", "--num", "2", "--outdir", str(outdir)]
    assert "already holds 2 val shard(s)" in fails_cleanly(make_shapes.main, argv, files["tmp"], capsys)

    def write_one_then_fail(split, num, outdir, per_shard, progress):
        Path(outdir).mkdir(parents=True, exist_ok=True)
        (Path(outdir) / "shapes-v1-train-000000.tar").write_bytes(b"complete shard")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(make_shapes, "write_shards", write_one_then_fail)
    for target in (outdir, files["tmp"] / "new" / "shards"):  # an existing folder, and one the run creates
        argv = ["--split", "train", "--num", "4", "--per-shard", "2", "--outdir", str(target)]
        assert "No space left on device" in fails_cleanly(make_shapes.main, argv, files["tmp"], capsys)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 70368744177664 bytes."),
])
def test_out_of_memory_is_one_line_that_suggests_a_smaller_batch(error, capsys):
    def main(argv):
        raise error

    assert run_main(main, []) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory") and "--n_samples" in err and "train.batch_size" in err
    assert "tiles" in err and len(err.strip().splitlines()) == 1


def test_other_runtime_errors_keep_their_traceback():
    def main(argv):
        raise RuntimeError("a bug, not bad input")

    with pytest.raises(RuntimeError, match="a bug"):
        run_main(main, [])


def test_nan_loss_and_multi_line_messages_are_one_line(capsys):
    def nan(argv):
        raise FloatingPointError("loss is nan at step 7; the last good checkpoint is runs/x/checkpoints/step-000005")

    def two_lines(argv):
        from ldm.errors import InputError

        raise InputError("first\nsecond")

    assert run_main(nan, []) == 1 and run_main(two_lines, []) == 1
    assert capsys.readouterr().err.splitlines() == ["error: loss is nan at step 7; the last good checkpoint is "
                                                    "runs/x/checkpoints/step-000005", "error: first second"]


def run_script(script: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_end_to_end_a_config_typo_and_a_truncated_checkpoint(files):
    """The same two failures as real processes: exit status, stderr and the folder as a user sees them."""
    tmp = files["tmp"]
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(resolve(edited(CONFIGS["diffusion"], {"train.learning_rte": 1e-3}), files)))
    before = snapshot(tmp)
    result = run_script("train_diffusion.py", "--config", str(config), cwd=tmp)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: train: unknown TrainConfig parameter(s)")
    result = run_script("convert_checkpoint.py", str(files["cut_ckpt"]), str(tmp / "out.safetensors"), cwd=tmp)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot read {files['cut_ckpt']}")
    assert snapshot(tmp) == before

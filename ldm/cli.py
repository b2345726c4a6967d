"""What every script shares: one-line errors, one-line warnings, device and training flags."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

from ldm.errors import InputError, first_line

# Pipeline.compile_unet's persistent modes, as --compile offers them (txt2img adds "jit").
COMPILE_MODES = ("off", "auto", "cache")


def resolve_device(name: str) -> torch.device:
    """`auto` picks the available accelerator (CUDA, MPS, ...) or the CPU."""
    if name == "auto":
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return accelerator or torch.device("cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise InputError(f"device {name!r} is not usable here ({first_line(e)}); try --device cpu") from None
    if device.type == "meta":  # tensors of shapes without values: every model step runs, nothing comes out
        raise InputError(f"device {name!r} is not usable here (meta tensors hold no values); try --device cpu")
    return device


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def out_of_memory(e: BaseException) -> bool:
    # A failed CPU allocation is a plain RuntimeError from torch's DefaultCPUAllocator.
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


class ScriptParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (unknown flag, missing or malformed value) are `InputError`s, so
    that `run_main` prints them as one line like every other bad input instead of usage plus error."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{message} (see --help)")


def _fail(message: str) -> int:
    # Joined into one line: a message that quotes a file or an exception may carry line breaks.
    line = " ".join(message.splitlines())
    print(f"error: {line}", file=sys.stderr)
    return 1


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> int:
    """Run a script's main; bad input, a failed file operation, running out of memory and a NaN
    loss end with `error: ...` on one line and exit code 1, never a traceback."""
    warnings.showwarning = _one_line_warning
    try:
        main(argv)
    except InputError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
    except FloatingPointError as e:  # a NaN/inf training loss: the message names the checkpoint to resume from
        return _fail(str(e))
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(e):
            raise
        return _fail("out of memory; use a smaller batch (--n_samples, --batch_size or train.batch_size) or "
                     "smaller images, or decode in tiles (txt2img --vae_tile_size, Pipeline.enable_tiling)")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def training_parser(doc: str, sections: str, default_config: str | None = None) -> argparse.ArgumentParser:
    """The flags every training script takes: --config (required unless it has a default), --set KEY=VALUE ...,
    --resume."""
    p = ScriptParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=default_config is None, default=default_config,
                   help=f"training YAML (sections {sections})")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config values")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    return p


def report_training(path: Path | None) -> None:
    """Print the exported model's path (once, from the main process of a multi-process run); a run stopped
    by a signal has already said how to resume."""
    if path is not None and os.environ.get("RANK", "0") == "0":
        print(path)

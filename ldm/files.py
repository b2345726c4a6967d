"""Files written whole or not at all (a reader, or a killed run, never finds half of one), tar members
written reproducibly, and output folders checked before any work starts."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ldm.errors import InputError


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder to write; when the block ends, it replaces `path` in one
    rename. If the block raises, the temporary file is removed and `path` stays as it was."""
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes the file private to its owner
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks once per file version (a checkpoint of
    several GB takes seconds; A1111 names checkpoints by the first 10 digits, the "Model hash")."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | Path, data: object) -> None:
    """`data` as indented JSON, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add `data` to `tar` as file `name` with fixed metadata (mode 644, mtime 0, no owner), so that the
    same samples always give byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def check_output_folder(path: str | Path, name: str) -> Path:
    """Fail before any work is done when folder `path` (given as `name`, a flag or config key) cannot
    be created or written: a file in the way, or no write permission. Creates nothing."""
    path = Path(path)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{name}: cannot write to output folder {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{name}: cannot write to output folder {path}: no write permission on {existing}")
    return path


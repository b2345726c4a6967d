"""Weights on disk: reading checkpoints safely, writing them whole or not at all, loading them strictly.

The original SD key layout (which prefix is which stage, family detection) is ``ldm.sd_checkpoint``'s;
this module knows files and state dicts only, and is what the pipeline and training both load through.
"""

from __future__ import annotations

import json
import mmap
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.errors import InputError, first_line, with_article
from ldm.files import atomic_write


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors or .ckpt file, on the CPU.

    `.ckpt` files are pickles: they are read with `weights_only=True`, which refuses any object
    that is not plain tensors and containers, so a malicious file cannot run code.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass the checkpoint file (.ckpt or .safetensors) itself "
                         "(diffusers model folders are not read)")
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path} (pass an existing .ckpt or .safetensors file)")
    if path.suffix == ".safetensors":
        try:
            return _map_safetensors(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"cannot read {path}: {e} (is the file truncated or corrupt? download it again)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt or unsafe pickles
        raise InputError(f"cannot read {path}: {first_line(e)[:300]} (truncated, corrupt or not a plain-tensor "
                         f"checkpoint; convert trusted files to .safetensors)") from None
    state_dict = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict):
        raise InputError(f"{path} holds no state dict (expected a dict of tensors)")
    metadata = {}
    if isinstance(obj, dict) and isinstance(obj.get("global_step"), int):
        metadata["global_step"] = str(obj["global_step"])
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}, metadata


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _map_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a .safetensors file, each in its own copy-on-write mapping of the file.

    Nothing is read until a tensor is used, and a tensor's mapping goes with the tensor: a loader that
    converts weights one by one (`nn.Module.to`, which replaces each parameter in turn) holds the file's
    copy of one weight at a time, never the whole file beside the converted model. Writing to a tensor
    changes this process's pages only, never the file.
    """
    with safe_open(str(path), framework="pt") as f:  # checks the header against the file's size
        metadata = f.metadata() or {}
        keys = list(f.keys())
        with path.open("rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(header_size))
            data_start = 8 + header_size
            tensors = {}
            for key in keys:
                entry = header[key]
                dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
                begin, end = (data_start + offset for offset in entry["data_offsets"])
                if dtype is None or end == begin or begin % dtype.itemsize:
                    tensors[key] = f.get_tensor(key)  # rare dtypes, empty and unaligned tensors: read whole
                    continue
                page = begin - begin % mmap.ALLOCATIONGRANULARITY
                mapped = mmap.mmap(file.fileno(), end - page, access=mmap.ACCESS_COPY, offset=page)
                tensors[key] = torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                                offset=begin - page).view(entry["shape"])
    return tensors, metadata


def save_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write .safetensors through a temporary file and a rename: a failed or interrupted save (disk full,
    kill) leaves no partial file, and whatever was at `path` before stays intact."""
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    except (OSError, SafetensorError) as e:
        raise InputError(f"could not write {path}: {e}") from None
    return path


def convert_to_safetensors(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None,
                           edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a .safetensors copy of a checkpoint (e.g. a pickled .ckpt), keeping its metadata;
    with `dtype` (e.g. torch.float16, half the size) its floating-point tensors are cast, after `edit`
    (e.g. `ldm.sd_checkpoint.replace_autoencoder`) has changed the state dict.

    The source is read with `read_checkpoint`, so a pickle that tries to run code is refused.
    """
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise InputError(f"the converted file must end in .safetensors, got {dst}")
    state_dict, metadata = read_checkpoint(src)
    if edit is not None:
        state_dict = edit(state_dict)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    return save_atomic(dst, state_dict, metadata)


def save_module(path: str | Path, module: torch.nn.Module, kind: str, config: dict,
                metadata: dict[str, str] | None = None) -> Path:
    """Save one stage (e.g. a trained autoencoder) as .safetensors with its config, atomically."""
    metadata = {**(metadata or {}), "ldm_module": kind, "config": json.dumps(config)}
    return save_atomic(path, module.state_dict(), metadata)


def load_module_file(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """Weights, config and metadata of a file written by `save_module` for stage `kind`."""
    state_dict, metadata = read_checkpoint(path)
    return state_dict, module_config(metadata, kind, path), metadata


def module_config(metadata: dict[str, str], kind: str, path: str | Path) -> dict:
    """The config in the metadata of a file written by `save_module` for stage `kind`; InputError for a file
    of another stage or none."""
    if metadata.get("ldm_module") != kind:
        raise InputError(f"{path} is not {with_article(kind)} file written by this project "
                         f"(found {metadata.get('ldm_module') or 'no stage tag'}); pass the {kind} .safetensors "
                         "that its training run exported")
    return json.loads(metadata["config"])


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], part: str, path: str | Path,
                device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
    """Load with strict key matching; on mismatch, one line naming the first missing and unexpected keys.

    The tensors move out of `state_dict` (which ends empty) one at a time, each copied to `device` and,
    if floating-point, `dtype` (None keeps theirs) before the next: weights that `read_checkpoint` mapped
    are never held whole beside their copies, and the module does not depend on the file afterwards.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        details = "; ".join(f"{what} {keys[0]}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", wrong_shape)) if keys)
        raise InputError(f"{path}: the {part} weights do not match the detected config: {details} "
                         "(pass --config for a model of another shape)")
    owned = {}
    while state_dict:
        key, tensor = state_dict.popitem()
        owned[key] = tensor.to(device, dtype if tensor.is_floating_point() else None, copy=True)
        del tensor  # the last reference to a mapped tensor: its mapping goes now
    module.load_state_dict(owned, strict=True, assign=True)


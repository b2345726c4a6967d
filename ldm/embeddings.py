"""Textual-inversion embeddings: files of learned token vectors, each triggered by its file name in a prompt.

Read, as AUTOMATIC1111 writes and reads them: `.pt` (`string_to_param: {"*": (n, width)}`, loaded with
`weights_only`, so a pickle cannot run code), `.safetensors` (`emb_params` (n, width)) and diffusers' `.bin`
(`{"<token>": (width,)}`). SDXL files (`clip_l` / `clip_g`) are recognised and skipped.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from ldm.errors import InputError

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


def read_embedding(path: Path) -> Tensor | None:
    """The vectors (n, width) of one embedding file, None for an SDXL one (`clip_l` and `clip_g`, one set per
    text encoder); InputError for a file that is unreadable or holds none."""
    try:
        data = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(
            path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"cannot read the embedding {path}: it holds objects other than tensors, which would run "
                         "code to load (refused: nothing in it was run)") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot read the embedding {path}: {reason} (truncated, or not a plain-tensor file; "
                         "nothing in it was run)") from None
    if isinstance(data, dict) and "clip_l" in data and "clip_g" in data:
        return None
    vectors = _vectors(data) if isinstance(data, dict) else None
    if vectors is None:
        raise InputError(f"{path} holds no embedding (string_to_param, emb_params or one tensor); pass a "
                         "textual-inversion file")
    return vectors.detach().float().reshape(-1, vectors.shape[-1])


def _vectors(data: dict) -> Tensor | None:
    if isinstance(data.get("string_to_param"), dict) and data["string_to_param"]:
        return next(iter(data["string_to_param"].values()))
    if "emb_params" in data:
        return data["emb_params"]
    tensors = [v for v in data.values() if isinstance(v, Tensor)]
    return tensors[0] if len(tensors) == 1 else None


def read_embeddings(folder: Path, width: int) -> dict[str, tuple[Tensor, Path]]:
    """Every embedding under `folder` (subfolders too) made for a text encoder of `width`: trigger word (the
    file name without its suffix) -> (vectors, file). Others (SDXL's, another width) are skipped, with one
    warning naming how many."""
    if not folder.is_dir():
        raise InputError(f"embeddings folder not found: {folder} (pass a folder of .pt / .safetensors files)")
    found, skipped = {}, []
    for path in sorted(p for p in folder.rglob("*") if p.suffix in EMBEDDING_SUFFIXES and p.is_file()):
        vectors = read_embedding(path)
        if vectors is None or vectors.shape[1] != width:
            skipped.append(path.stem)
            continue
        found[path.stem] = (vectors, path)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} embeddings made for another model (first: {skipped[0]})",
                      stacklevel=2)
    return found

"""Textual-inversion embeddings: files of learned token vectors, each triggered by its file name in a prompt.

Read, as AUTOMATIC1111 writes and reads them: `.pt` (`string_to_param: {"*": (n, width)}`, loaded with
`weights_only`, so a pickle cannot run code), `.safetensors` (`emb_params` (n, width)) and diffusers' `.bin`
(`{"<token>": (width,)}`); SDXL's `.safetensors` hold one set per text encoder, `clip_l` and `clip_g`.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from ldm.errors import InputError, first_line

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


def read_embedding(path: Path) -> dict[str, Tensor]:
    """The vectors (n, width) of one embedding file by text encoder: SDXL's `clip_l` and `clip_g`, or "" for the
    one tower of SD 1.x / 2.x; InputError for a file that is unreadable or holds none."""
    try:
        data = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(
            path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"cannot read the embedding {path}: it holds objects other than tensors, which would run "
                         "code to load (refused: nothing in it was run)") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise InputError(f"cannot read the embedding {path}: {first_line(e)[:200]} (truncated, or not a plain-tensor "
                         "file; nothing in it was run)") from None
    if isinstance(data, dict) and isinstance(data.get("clip_l"), Tensor) and isinstance(data.get("clip_g"), Tensor):
        sets = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    else:
        vectors = _vectors(data) if isinstance(data, dict) else None
        if vectors is None:
            raise InputError(f"{path} holds no embedding (string_to_param, emb_params, clip_l / clip_g or one "
                             "tensor); pass a textual-inversion file")
        sets = {"": vectors}
    return {key: vectors.detach().float().reshape(-1, vectors.shape[-1]) for key, vectors in sets.items()}


def _vectors(data: dict) -> Tensor | None:
    if isinstance(data.get("string_to_param"), dict) and data["string_to_param"]:
        return next(iter(data["string_to_param"].values()))
    if "emb_params" in data:
        return data["emb_params"]
    tensors = [v for v in data.values() if isinstance(v, Tensor)]
    return tensors[0] if len(tensors) == 1 else None


def read_embeddings(folder: Path, widths: dict[str, int]) -> dict[str, tuple[dict[str, Tensor], Path]]:
    """Every embedding under `folder` (subfolders too) made for text encoders of `widths` (by `read_embedding`'s
    keys: {"": 768} for SD 1.x, {"clip_l": 768, "clip_g": 1280} for SDXL): trigger word (the file name
    without its suffix) -> (vectors by key, file). Others (another model's) are skipped, with one warning
    naming how many."""
    if not folder.is_dir():
        raise InputError(f"embeddings folder not found: {folder} (pass a folder of .pt / .safetensors files)")
    found, skipped = {}, []
    for path in sorted(p for p in folder.rglob("*") if p.suffix in EMBEDDING_SUFFIXES and p.is_file()):
        sets = read_embedding(path)
        if any(key not in sets or sets[key].shape[1] != width for key, width in widths.items()):
            skipped.append(path.stem)
            continue
        found[path.stem] = ({key: sets[key] for key in widths}, path)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} embeddings made for another model (first: {skipped[0]})",
                      stacklevel=2)
    return found

"""What the server's worker runs: the checkpoints it offers, the one loaded, and generation jobs.

Only the worker thread loads models and generates, so a checkpoint switch waits for the jobs queued
before it and never swaps the model under a running job.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ldm.errors import InputError
from ldm.files import sha256_file
from ldm.generate import image_text
from ldm.img2img import start_step
from ldm.infotext import model_hash
from ldm.lora import ADAPTER_SUFFIXES
from ldm.pipeline import Pipeline
from ldm.server.a1111 import Job, encode_png, response
from ldm.server.worker import Cancelled, Task

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a .safetensors file (kohya's ss_* training notes); {} otherwise."""
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError):
        return {}
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]$")  # A1111's titles end in " [model hash]"


class Catalog:
    """The checkpoints offered: the default one and those in `models_dir` (looked up again on every call,
    so files added while the server runs are offered)."""

    def __init__(self, default: Path, models_dir: Path | None = None) -> None:
        self.default, self.models_dir = default.resolve(), models_dir

    def files(self) -> list[Path]:
        found = [] if self.models_dir is None else sorted(
            p.resolve() for p in self.models_dir.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
        return [self.default, *(p for p in found if p != self.default)]

    @staticmethod
    def title(path: Path) -> str:
        return f"{path.name} [{model_hash(path)}]"

    def find(self, name: str) -> Path:
        """The checkpoint that `name` names: its title, file name, stem or model hash, as A1111 takes them."""
        bare = _HASH_SUFFIX.sub("", name.strip())
        for path in self.files():
            if bare in (path.name, path.stem, str(path)):
                return path
        for path in self.files():
            if name.strip() == model_hash(path):
                return path
        raise InputError(f"unknown checkpoint {name!r}; /sdapi/v1/sd-models lists "
                         f"{', '.join(p.name for p in self.files())}")

    def items(self) -> list[dict[str, Any]]:
        """A1111's /sdapi/v1/sd-models."""
        return [{"title": self.title(p), "model_name": p.stem, "hash": model_hash(p), "sha256": sha256_file(p),
                 "filename": str(p), "config": None} for p in self.files()]


class Engine:
    """The catalog, the chosen checkpoint (A1111's `sd_model_checkpoint` option) and the loaded model."""

    def __init__(self, catalog: Catalog, device: torch.device, dtype: torch.dtype | str, lora_dir: Path | None = None,
                 embeddings_dir: Path | None = None, compile: str = "off", quantize: str = "off") -> None:
        self.catalog, self.device, self.dtype = catalog, device, dtype
        self.compile = compile  # Pipeline.compile_unet's mode for every model loaded
        self.quantize = quantize  # and Pipeline.quantize_unet's, applied first
        self.lora_dir, self.embeddings_dir = lora_dir, embeddings_dir
        self.checkpoint = catalog.default
        self.loaded: tuple[Path, Pipeline] | None = None

    def load(self, path: Path) -> Pipeline:
        """The model of `path`, loaded unless it is already (worker thread only)."""
        if self.loaded is None or self.loaded[0] != path:
            self.loaded = None  # the old model's memory is free before the new one loads
            pipe = Pipeline.from_checkpoint(path, device=self.device, dtype=self.dtype).enable_context_cache()
            pipe.quantize_unet(self.quantize)
            # cache / auto: each shape's program is compiled at most once, kept on disk for later starts
            pipe.compile_unet(self.compile)
            pipe.lora_dir = self.lora_dir
            if self.embeddings_dir is not None:
                pipe.load_embeddings(self.embeddings_dir)
            self.loaded = (path, pipe)
        return self.loaded[1]

    def loras(self) -> list[dict[str, Any]]:
        """A1111's /sdapi/v1/loras: the LoRA files that <lora:NAME> tags can name, with their metadata."""
        if self.lora_dir is None:
            return []
        files = sorted(p for p in self.lora_dir.rglob("*") if p.suffix in ADAPTER_SUFFIXES and p.is_file())
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": _safetensors_metadata(p)}
                for p in files]

    def embeddings(self) -> dict[str, Any]:
        """A1111's /sdapi/v1/embeddings: the loaded model's trigger words and their vectors' shapes."""
        pipe = self.loaded[1] if self.loaded is not None else None
        if pipe is None:
            return {"loaded": {}, "skipped": {}}
        encoder = next(iter(pipe.embedding_towers().values()))
        return {"loaded": {word: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                  "shape": encoder.config.width, "vectors": len(encoder.embeddings[word])}
                           for word in pipe.embedding_files}, "skipped": {}}

    def select(self, name: str) -> Path:
        """Make the checkpoint `name` the current one and load it (worker thread only)."""
        path = self.catalog.find(name)
        self.load(path)
        self.checkpoint = path
        return path

    def generate(self, job: Job, task: Task) -> dict[str, Any]:
        """Run `job`'s batches and answer as A1111. Interrupted, it answers with the batches that finished."""
        path = self.catalog.find(job.checkpoint) if job.checkpoint else self.checkpoint
        pipe, digest = self.load(path), model_hash(path)
        s = job.settings
        if s.refiner is not None:  # requests name the refiner as they name checkpoints
            job = replace(job, settings=replace(s, refiner=self.catalog.find(str(s.refiner))))
        skipped = 0 if s.init_img is None else start_step(s.steps, s.strength)
        images, infotexts, done = [], [], []
        size = (s.width or pipe.spec.image_size, s.height or pipe.spec.image_size)
        try:
            for n, batch in enumerate(job.batches()):
                task.begin(n, job.n_iter, batch.steps - skipped)
                for k, image in enumerate(pipe.generate(batch, progress=False, callback=lambda i, x: task.advance())):
                    text = image_text(batch, k, image, pipe.name, path.name, pipe.model_text(), digest, job.extra)
                    images.append(encode_png(image, text))
                    infotexts.append(text["parameters"])
                    size = image.size
                done.append(batch)
        except Cancelled:
            pass
        return response(job, images, infotexts, done, size, pipe.name, digest)

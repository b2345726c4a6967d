"""Compiled U-Net programs that outlive the process: AOTInductor packages in a cache folder.

`CompiledUNet` stands in for a U-Net while sampling. For each input shape (batch, latent height and
width, context length) and dtype it loads a program from the cache, or builds one there
(`torch.export` + `torch._inductor.aoti_compile_and_package`, minutes on a CPU) when `build` is on,
else runs the eager U-Net. A second process finds the program and loads it in about a second.
(torch.compile's own caches do not help here: with freezing, which is what makes it pay on a CPU,
its graphs hold oneDNN-packed weights and bypass the FX graph and AOTAutograd caches.)

The weights stay out of the package: at load time the program's constants point at the live
module's tensors, so LoRAs merged in place are seen, and the cache holds a few MB per shape, not a
copy of the weights. Inductor inlines tiny 1-D tensors (<= 8 elements, e.g. the output conv's bias)
into the code; their values are part of the key, with everything else that changes the program:
the layer names, shapes and dtypes, the input shapes, device, torch version and CPU capability.

Entries are written to a temporary name and renamed, so no half-written entry is ever read; one that
fails to load is rebuilt (or skipped) with a one-line warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ldm.errors import first_line

FORMAT = 1  # bump when what an entry holds changes


def default_cache_dir() -> Path:
    """$LDM_COMPILE_CACHE, else $XDG_CACHE_HOME/ldm/compiled, else ~/.cache/ldm/compiled."""
    if folder := os.environ.get("LDM_COMPILE_CACHE"):
        return Path(folder).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ldm" / "compiled"


def inlined(t: torch.Tensor) -> bool:
    """Tensors inductor may copy into the generated code (`GraphLowering.can_inline_constant`)."""
    return t.ndim == 1 and t.shape[0] <= 8


def _cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        return "unknown"


def program_key(module: torch.nn.Module, inputs: tuple[torch.Tensor | None, ...]) -> str:
    """What the compiled program depends on, hashed (see the module docstring)."""
    h = hashlib.sha256()
    meta: dict[str, Any] = {"format": FORMAT, "torch": torch.__version__, "cpu": _cpu_capability(),
                            "class": type(module).__qualname__, "config": repr(getattr(module, "config", None)),
                            "inputs": [None if x is None else (tuple(x.shape), str(x.dtype), str(x.device))
                                       for x in inputs]}
    accelerator = next((x.device for x in inputs if x is not None and x.device.type != "cpu"), None)
    if accelerator is not None:  # its toolkit version and compute capability, where torch names them
        backend = getattr(torch, accelerator.type, None)  # torch.cuda, torch.xpu, torch.mps
        capability = getattr(backend, "get_device_capability", None)
        meta["accelerator"] = (accelerator.type, getattr(torch.version, accelerator.type, None),
                               capability(accelerator) if capability else None)
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.device.type};".encode())
        if inlined(t):
            h.update(repr(t.detach().float().cpu().tolist()).encode())
    return h.hexdigest()[:32]


class CompiledUNet:
    """`unet(x_t, t, context[, vector])` through cached AOTInductor programs, one per input shape.

    `build`: compile a program for a shape the cache lacks (else that shape runs eager). `loaded` and
    `built` count programs taken from the cache and made in this process (for tests and logs).
    """

    def __init__(self, unet: torch.nn.Module, cache_dir: str | Path | None = None, build: bool = True) -> None:
        self.unet = unet
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.build = build
        self.programs: dict[tuple, Any] = {}  # input shapes -> runner, or None: run eager
        self.entries: dict[tuple, Path] = {}  # input shapes -> the cache entry looked up for them
        self.loaded = 0
        self.built = 0
        self._weights: tuple = ()  # what the loaded programs were made for (see `refresh`)

    @property
    def config(self) -> Any:
        return self.unet.config

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 vector: torch.Tensor | None = None) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        inputs = (x_t, t, context) if vector is None else (x_t, t, context, vector)
        signature = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
        if signature not in self.programs:
            self.entries[signature] = self.cache_dir / f"unet-{program_key(self.unet, inputs)}.pt2"
            self.programs[signature] = self._program(inputs, self.entries[signature])
        runner = self.programs[signature]
        return self.unet(*inputs) if runner is None else runner(*inputs)

    def refresh(self) -> None:
        """Drop the loaded programs if the weights they point at moved (`.to`, a new state dict) or a
        tensor they inline changed; in-place changes of the others (LoRA merges) need nothing."""
        state = self.unet.state_dict()
        weights = tuple((t.data_ptr(), tuple(t.detach().float().cpu().tolist()) if inlined(t) else None)
                        for t in state.values())
        if weights != self._weights:
            self.programs, self._weights = {}, weights

    def _program(self, inputs: tuple[torch.Tensor, ...], path: Path) -> Any:
        state = self.unet.state_dict()
        if not self._weights:
            self.refresh()
        if path.is_file():
            try:
                runner = self._load(path, state)
            except Exception as e:  # a corrupt or foreign entry: never a traceback, rebuild or run eager
                warnings.warn(f"compiled U-Net {path} could not be loaded ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); "
                              f"{'rebuilding it' if self.build else 'running eager'}", stacklevel=3)
            else:
                self.loaded += 1
                return runner
        if not self.build:
            return None
        self._build(path, inputs)
        self.built += 1
        try:
            return self._load(path, state)
        except Exception as e:  # e.g. a torch that folds weights into constants of its own: eager, said once
            warnings.warn(f"the compiled U-Net {path} does not run with this module's weights "
                          f"({first_line(e)}); running eager", stacklevel=3)
            path.unlink(missing_ok=True)
            return None

    def _build(self, path: Path, inputs: tuple[torch.Tensor, ...]) -> None:
        import torch._inductor

        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            program = torch.export.export(self.unet, inputs)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".pt2", dir=path.parent)
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=tmp,
                # No freezing: it folds weights into new constants that the package would lack.
                inductor_configs={"aot_inductor.package_constants_in_so": False})
            os.replace(tmp, path)  # atomic: readers see the whole entry or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _load(self, path: Path, state: dict[str, torch.Tensor]) -> Any:
        import torch._inductor

        try:  # the loader itself: aoti_load_package first probes the CPU's vector ISAs by compiling (seconds)
            from torch.export.pt2_archive._package import AOTICompiledModel

            runner = AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1))
        except (ImportError, AttributeError):
            runner = torch._inductor.aoti_load_package(str(path))
        names = runner.get_constant_fqns()
        if missing := [name for name in names if name not in state]:
            raise RuntimeError(f"the program wants weights this U-Net lacks: {', '.join(missing[:3])}")
        if baked := [name for name in state if name not in names and not inlined(state[name])]:
            raise RuntimeError(f"the program holds weights of its own: {', '.join(baked[:3])}")
        # user_managed: the program reads the module's own tensors, so in-place merges (LoRA) are seen.
        runner.load_constants({name: state[name] for name in names}, check_full_update=True, user_managed=True)
        return runner

"""LoRA-family adapter files: read kohya, diffusers / PEFT and LyCORIS files, merge them into the weights,
take them out again.

Each layer an adapter changes gets a delta of its weight's shape, from the tensors stored under the
layer's name (after the name, the key ends in one of):

    lora_down.weight, lora_up.weight, alpha       kohya LoRA; LoCon on convolutions: up (down)
    lora_A.weight, lora_B.weight                  diffusers / PEFT: B (A)
    hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b    LyCORIS LoHa: (w1_a w1_b) * (w2_a w2_b), elementwise
    lokr_w1 | lokr_w1_a, lokr_w1_b,               LyCORIS LoKr: kron(w1, w2), each stored whole or as a
    lokr_w2 | lokr_w2_a, lokr_w2_b                  product of two factors
    dora_scale                                    DoRA's magnitude, with any of them

A convolution may be Tucker-decomposed: `lora_mid.weight` (LoCon: down 1x1, mid k x k, up 1x1, run in
sequence), `hada_t1` / `hada_t2` (LoHa) or `lokr_t2` (LoKr's w2) is a k x k core of rank x rank channels
between the two factors, which are then both stored rank-first (`hada_w1_a` is (rank, out)). Such a layer is
read as the plain form it equals (`_untucker`): the core composed with the factor on its input side is that
side's k x k factor.

The delta is scaled by alpha / rank (1 without an alpha, or for a LoKr stored whole). A diffusers / PEFT file
has no alpha tensors: its alphas are PEFT's LoraConfig (`PeftScaling`), which diffusers writes as JSON into
the safetensors metadata and PEFT as adapter_config.json beside adapter_model.safetensors; without either the
scale is 1, as diffusers reads such a file. With DoRA the merged
weight W + delta is renormalised: each output row (or input column, by `dora_scale`'s shape) gets the
norm `dora_scale` gives.

Merging adds `weight * delta` to the weights (no cost per step), in float32 and then cast. `MergedAdapters`
writes each changed weight into a buffer of its own and keeps the original tensor, so taking adapters out
restores the original weights bit for bit, and a new set of adapters is always merged onto the originals.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.errors import InputError
from ldm.files import sha256_file
from ldm.layer_names import Layer, flat
from ldm.weights_io import read_checkpoint

ADAPTER_SUFFIXES = (".safetensors", ".pt", ".ckpt")
# Key prefix -> the component it changes and how `ldm.layer_names` spells the tower (SDXL's two are named).
_PREFIXES = {"lora_unet_": ("unet", ""), "lora_te_": ("text_encoder", ""), "unet.": ("unet", ""),
             "text_encoder.": ("text_encoder", ""), "lora_te1_": ("text_encoder", "te1_"),
             "lora_te2_": ("text_encoder", "te2_"), "text_encoder_2.": ("text_encoder", "te2_"),
             # PEFT's own save of a wrapped CLIPTextModel or diffusers U-Net (adapter_model.safetensors)
             "base_model.model.text_model.": ("text_encoder", "text_model_"), "base_model.model.": ("unet", "")}
_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
             "lora.down.weight": "down", "lora.up.weight": "up", "alpha": "alpha", "dora_scale": "dora_scale",
             "lora_mid.weight": "mid",
             **{name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                        "lokr_t2")}}
# Tucker core -> (the factor on its output side, stored (rank, out), or None for LoCon's up, stored (out, rank);
# the factor on its input side).
_TUCKER = {"mid": (None, "down"), "hada_t1": ("hada_w1_a", "hada_w1_b"), "hada_t2": ("hada_w2_a", "hada_w2_b"),
           "lokr_t2": ("lokr_w2_a", "lokr_w2_b")}
# diffusers' LORA_ADAPTER_METADATA_KEY: each component's LoraConfig as JSON, its keys prefixed ("unet.r", ...)
# in a pipeline's file, unprefixed in a model's (`save_lora_adapter`).
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# <lora:NAME> or <lora:NAME:WEIGHT> in a prompt (AUTOMATIC1111's syntax; <lyco:...> is its older spelling).
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def _rank(t: Mapping[str, Tensor]) -> int | None:
    """The rank alpha is divided by; None for a LoKr stored whole, whose alpha is not used."""
    if "down" in t:
        return t["down"].shape[0]
    if "hada_w1_b" in t:
        return t["hada_w1_b"].shape[0]
    factor = t.get("lokr_w1_b", t.get("lokr_w2_b"))
    return None if factor is None else factor.shape[0]


def _untucker(group: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """A layer's tensors with each Tucker core folded into its input-side factor (float32), that factor
    becoming (rank, in * kh * kw) and the output-side one (out, rank): the plain form of the same delta,
    up @ (mid o down) as the three convolutions compose. None when the shapes do not chain."""
    group = dict(group)
    for core_name, (out_name, in_name) in _TUCKER.items():
        core = group.pop(core_name, None)
        if core is None:
            continue
        inner = group.get(in_name)
        if (core.ndim != 4 or inner is None or inner.ndim < 2 or inner.shape[0] != core.shape[1]
                or inner[0].numel() != inner.shape[1]):
            return None  # a core, and an input factor of shape (rank, in) or (rank, in, 1, 1)
        if out_name is not None:
            outer = group.get(out_name)
            if outer is None or outer.ndim != 2 or outer.shape[0] != core.shape[0]:
                return None
            group[out_name] = outer.T
        elif group.get("up") is None or group["up"].shape[1] != core.shape[0]:
            return None
        folded = torch.einsum("i j k l, j r -> i r k l", core.float(), inner.float().reshape(inner.shape[0], -1))
        group[in_name] = folded.reshape(folded.shape[0], -1)
    return group


def _scale(t: Mapping[str, Tensor], strength: float) -> float:
    rank = _rank(t)
    return strength * (t["alpha"].item() / rank if "alpha" in t and rank is not None else 1.0)


def lora_factors(tensors: Mapping[str, Tensor], out_features: int, strength: float = 1.0) -> tuple[Tensor, Tensor]:
    """A LoRA's delta as two float32 factors, up (out, rank) with the scale in it and down (rank, in * kh * kw):
    the delta is up @ down."""
    down = tensors["down"].float()
    rank = down.shape[0]
    return tensors["up"].float().reshape(out_features, rank) * _scale(tensors, strength), down.reshape(rank, -1)


def layer_delta(tensors: Mapping[str, Tensor], shape: torch.Size, strength: float = 1.0) -> Tensor:
    """The change (float32) of one weight of `shape` at `strength`, from its adapter tensors (by `_SUFFIXES`
    name), before DoRA. The scale goes into a small factor, so the full-size product is the only full-size
    work."""
    if "up" in tensors:
        up, down = lora_factors(tensors, shape[0], strength)
        return (up @ down).reshape(shape)
    t = {name: value.float() for name, value in tensors.items()}
    scale = _scale(t, strength)
    if "hada_w1_a" in t:
        delta = ((t["hada_w1_a"] * scale) @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    elif "lokr_w1" in t or "lokr_w1_a" in t:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        w2 = w2.reshape(w2.shape[0], shape[1] // w1.shape[1], *shape[2:])
        delta = torch.kron(scale * w1.reshape(*w1.shape, *[1] * (len(shape) - 2)), w2)
    else:
        raise KeyError(f"no adapter tensors among {sorted(t)}")
    return delta.reshape(shape)


def merged_weight(weight: Tensor, tensors: Mapping[str, Tensor], strength: float) -> Tensor:
    """`weight` (float32) with the adapter of `tensors` merged at `strength`."""
    merged = weight + layer_delta(tensors, weight.shape, strength)
    if "dora_scale" not in tensors:
        return merged
    magnitude = tensors["dora_scale"].float()
    on_rows = magnitude.shape[0] == weight.shape[0] and magnitude.numel() == weight.shape[0]
    dims = tuple(range(1, merged.ndim)) if on_rows else (0, *range(2, merged.ndim))
    norm = merged.norm(dim=dims, keepdim=True) + torch.finfo(torch.float32).eps
    scale = magnitude.reshape(norm.shape) / norm
    return merged * (strength * (scale - 1) + 1)  # LyCORIS' reading of a strength other than 1


@dataclass(frozen=True)
class PeftScaling:
    """The scale PEFT's LoraConfig gives each module: alpha / r (alpha / sqrt(r) with use_rslora), where
    rank_pattern and alpha_pattern override r and alpha for the modules whose dotted path ends in a match of
    one of their keys (regexes, the first matching key wins). r defaults to the layer's rank, alpha to
    LoraConfig's 8."""

    r: int | None = None
    lora_alpha: float = 8.0
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def scale(self, module: str, rank: int) -> float:
        r = _pattern_value(self.rank_pattern, module, self.r or rank)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return alpha / (math.sqrt(r) if self.use_rslora else r)


def _pattern_value(pattern: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's `get_pattern_key`: the value of the first key that matches the end of `module`'s path."""
    return next((value for key, value in pattern.items() if re.match(rf"(.*\.)?({key})$", module)), default)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _regex(text: str) -> bool:
    try:
        re.compile(text)
    except re.error:
        return False
    return True


def _patterns(check):
    return lambda value: isinstance(value, dict) and all(check(v) and _regex(k) for k, v in value.items())


# The LoraConfig fields that set the scale: what each must be, and its check.
_CONFIG_FIELDS = {"r": ("a whole number >= 1", lambda v: v is None or _whole(v)),
                  "lora_alpha": ("a number", _number), "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
                  "rank_pattern": ("an object of regexes to whole numbers >= 1", _patterns(_whole)),
                  "alpha_pattern": ("an object of regexes to numbers", _patterns(_number))}


def peft_scalings(path: Path, metadata: Mapping[str, str]) -> dict[str, PeftScaling]:
    """The LoraConfig of each component a diffusers / PEFT file has one for ("unet", "text_encoder",
    "text_encoder_2"; "" for one that applies to all): from the safetensors metadata under
    `ADAPTER_METADATA_KEY`, else from adapter_config.json beside an adapter_model.safetensors. Only the
    fields that set the scale are read. InputError, naming the field, for a config that is not a JSON object
    or a field of the wrong type."""
    beside = path.with_name("adapter_config.json")
    if ADAPTER_METADATA_KEY in metadata:
        text, where = metadata[ADAPTER_METADATA_KEY], f"{path}'s {ADAPTER_METADATA_KEY} metadata"
    elif path.name == "adapter_model.safetensors" and beside.is_file():
        text, where = beside.read_text(errors="replace"), str(beside)
    else:
        return {}
    remedy = "fix it or remove it (the scale is 1 without it)"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where} is not JSON ({e.msg} at line {e.lineno}); {remedy}") from None
    if not isinstance(config, dict):
        raise InputError(f"{where} is not a JSON object but {type(config).__name__}; {remedy}")
    fields: dict[str, dict] = {}
    for key, value in config.items():
        component, _, name = key.rpartition(".")
        if name not in _CONFIG_FIELDS:
            continue
        what, check = _CONFIG_FIELDS[name]
        if not check(value):
            raise InputError(f"{where}: {key} must be {what}, got {json.dumps(value)[:60]}; {remedy}")
        fields.setdefault(component, {})[name] = value
    return {component: PeftScaling(**values) for component, values in fields.items()}


@dataclass(eq=False)  # one per file read: compared by identity
class Adapter:
    """An adapter file matched to a model: the layers it changes and their tensors."""

    path: Path
    changes: list[tuple[Layer, dict[str, Tensor]]]

    @property
    def name(self) -> str:
        return self.path.stem

    @functools.cached_property
    def short_hash(self) -> str:
        """The first 12 hex digits of the file's sha256 (read when first asked: the PNG text needs it)."""
        return sha256_file(self.path)[:12]


def read_adapter(path: str | Path, layers: Mapping[str, Mapping[str, Layer]],
                 weights: Mapping[str, Mapping[str, Tensor]], family: str) -> Adapter:
    """Read a LoRA / LyCORIS file and match its layers to a model's: `layers[component]` is the
    component's table (`ldm.layer_names`), `weights[component]` its state dict (for the shapes).

    InputError when nothing matches (naming the family the file was made for); a warning names how
    many layers were ignored when only some match.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"LoRA not found: {path} (pass an existing .safetensors or .pt file)")
    tensors, metadata = read_checkpoint(path)
    scalings = peft_scalings(path, metadata)
    groups: dict[tuple[str, str], dict[str, Tensor]] = {}
    dotted: dict[tuple[str, str], tuple[str, str]] = {}  # diffusers / PEFT layers: (config, module path)
    for key, value in tensors.items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if prefix is None or suffix is None:
            continue
        component, tower = _PREFIXES[prefix]
        module = key[len(prefix): -len(suffix) - 1]
        target = (component, tower + flat(module))
        groups.setdefault(target, {})[_SUFFIXES[suffix]] = value
        if prefix.endswith("."):
            dotted[target] = (prefix[:-1], module)
    for target, (config, module) in dotted.items():
        scaling, group = scalings.get(config, scalings.get("")), groups[target]
        if scaling is not None and "alpha" not in group and "down" in group:
            rank = group["down"].shape[0]
            group["alpha"] = torch.tensor(scaling.scale(module, rank) * rank)
    if not groups:
        raise InputError(f"{path} holds no LoRA or LyCORIS layers (keys like lora_unet_*.lora_down.weight); "
                         "pass a LoRA file")
    changes, ignored = [], []
    for (component, name), group in groups.items():
        layer = layers.get(component, {}).get(name)
        group = None if layer is None else _untucker(group)
        if group is None or not _fits(group, layer, weights):
            ignored.append(name)
            continue
        changes.append((layer, group))
    if not changes:
        raise InputError(f"{path} matches no layer of this {family} model: it looks made for "
                         f"{made_for(tensors)}; pass a LoRA trained for {family}")
    if ignored:
        warnings.warn(f"{path.name}: used {len(changes)} of {len(groups)} layers; ignored {len(ignored)} that this "
                      f"model lacks or that have another shape (first: {ignored[0]})", stacklevel=2)
    return Adapter(path, changes)


def _fits(group: dict[str, Tensor], layer: Layer, weights: Mapping[str, Mapping[str, Tensor]]) -> bool:
    """Whether the adapter's delta has the shape of the layer's weight (checked from shapes alone)."""
    weight = weights[layer.component][layer.weight]
    shape = weight.shape if layer.rows is None else weight[layer.rows].shape
    out_features, in_features = shape[0], math.prod(shape[1:])
    try:
        if "up" in group:
            up, down = group["up"], group["down"]
            return up.shape[0] == out_features and up[0].numel() == down.shape[0] and down[0].numel() == in_features
        if "hada_w1_a" in group:
            return all(group[f"hada_w{i}_a"].shape[0] == out_features and group[f"hada_w{i}_b"].shape[1] == in_features
                       for i in (1, 2))
        rows, columns = [], []
        for i in (1, 2):
            whole = group.get(f"lokr_w{i}")
            rows.append(whole.shape[0] if whole is not None else group[f"lokr_w{i}_a"].shape[0])
            columns.append(whole[0].numel() if whole is not None else group[f"lokr_w{i}_b"].shape[1])
        return rows[0] * rows[1] == out_features and columns[0] * columns[1] == in_features
    except (KeyError, IndexError):
        return False


def made_for(tensors: Mapping[str, Tensor]) -> str:
    """The model family an adapter's keys and shapes point to, for messages."""
    if any(key.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for key in tensors):
        return "SDXL"
    for key, value in tensors.items():
        if "attn2" in key and "to_k" in key and key.endswith(("lora_down.weight", "lora_A.weight")):
            return {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(value.shape[1], f"a {value.shape[1]}-wide context")
    return "another model"


class MergedAdapters:
    """The adapters merged into a model's components now, and the original weights they replaced.

    A weight's first change is written into a buffer of its own, which becomes the parameter's data, while
    the original tensor is kept untouched: taking adapters out hands the originals back (no copy, bit for
    bit). The buffers are kept for the next merge of the same weights, so switching adapters touches no
    new memory (page faults are most of a fresh merge's time); `clear(release=True)` frees them.
    """

    def __init__(self, components: Mapping[str, nn.Module]) -> None:
        self.components = components
        self.active: list[tuple[Adapter, float]] = []
        self._originals: dict[tuple[str, str], Tensor] = {}
        self._buffers: dict[tuple[str, str], Tensor] = {}

    def set(self, adapters: Sequence[tuple[Adapter, float]]) -> None:
        """Merge exactly `adapters` (each at its strength) onto the original weights."""
        if len(adapters) == len(self.active) and all(
                a is b and s == t for (a, s), (b, t) in zip(adapters, self.active, strict=True)):
            return  # the same files, read once (a changed file is a new Adapter), at the same strengths
        self.clear()
        with torch.no_grad():
            for adapter, strength in adapters:
                for layer, tensors in adapter.changes:
                    weight = self.components[layer.component].get_parameter(layer.weight)
                    tensors = {k: v.to(weight.device) for k, v in tensors.items()}
                    if self._first_change(layer, weight, tensors, strength):
                        continue
                    part = weight if layer.rows is None else weight[layer.rows]
                    if "dora_scale" in tensors or part.dtype != torch.float32:
                        part.copy_(merged_weight(part.float(), tensors, strength).to(weight.dtype))
                    elif "up" in tensors and part.is_contiguous():  # W += up @ down, no full-size temporary
                        part.view(part.shape[0], -1).addmm_(*_small_factors(tensors, part.shape[0], strength))
                    else:
                        part.add_(layer_delta(tensors, part.shape, strength))
        self.active = list(adapters)

    def _first_change(self, layer: Layer, weight: nn.Parameter, tensors: dict[str, Tensor], strength: float) -> bool:
        """Before a weight's first change, swap in its buffer and keep the original. True when the change
        is then made already: a plain LoRA on a whole float32 weight, W + up @ down written straight into
        the buffer (one pass over W)."""
        key = (layer.component, layer.weight)
        if key in self._originals:
            return False
        original = weight.data
        buffer = self._buffers.pop(key, None)
        if buffer is None or not _same_layout(buffer, original):
            buffer = torch.empty_like(original)
        done = (layer.rows is None and "up" in tensors and "dora_scale" not in tensors
                and original.dtype == torch.float32 and original.is_contiguous() and buffer.is_contiguous())
        if done:
            rows = original.shape[0]
            torch.addmm(original.view(rows, -1), *_small_factors(tensors, rows, strength), out=buffer.view(rows, -1))
        else:
            buffer.copy_(original)
        self._originals[key] = original
        weight.data = buffer
        return done

    def clear(self, release: bool = False) -> None:
        """Put back every original weight; keep the buffers for the next merge, unless `release`."""
        with torch.no_grad():
            for (component, name), original in self._originals.items():
                weight = self.components[component].get_parameter(name)
                if _same_layout(weight.data, original):
                    self._buffers[(component, name)] = weight.data
                    weight.data = original
                else:  # the model was moved or cast since: the original's values, in its new place
                    weight.copy_(original)
        self._originals.clear()
        if release:
            self._buffers.clear()
        self.active = []


def _small_factors(tensors: Mapping[str, Tensor], out_features: int, strength: float) -> tuple[Tensor, Tensor]:
    """`lora_factors` in one thread. Each of these small ops split over threads waits for a time slice for
    the others when the CPU is busy: 528 conversions of a rank-128 LoRA's factors took 1.7-4.2 s on 2 threads
    of a shared 2-core machine, 0.05 s on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return lora_factors(tensors, out_features, strength)
    finally:
        torch.set_num_threads(threads)


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()


def parse_lora_spec(text: str) -> tuple[Path, float]:
    """`FILE` or `FILE:WEIGHT` (as --lora takes it) -> (path, weight); the weight defaults to 1."""
    path, _, weight = text.rpartition(":")
    if not path or not weight or "/" in weight or "\\" in weight:
        return Path(text), 1.0
    return Path(path), parse_strength(weight, text)


def parse_strength(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InputError(f"LoRA weight {text!r} in {where!r} is not a finite number (write NAME:0.8)")
    return value


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A prompt without its `<lora:NAME:WEIGHT>` tags, and the (NAME, WEIGHT) pairs they named."""
    tags = [(m.group(1).strip(), 1.0 if m.group(2) in (None, "") else parse_strength(m.group(2), m.group(0)))
            for m in LORA_TAG.finditer(prompt)]
    return LORA_TAG.sub("", prompt), tags


def find_adapter(name: str, folder: Path | None) -> Path:
    """The file a `<lora:NAME>` tag means: NAME.safetensors (or .pt, .ckpt) anywhere under `folder`."""
    if folder is None:
        raise InputError(f"the prompt names <lora:{name}> but no LoRA folder is set; pass --lora_dir FOLDER")
    for suffix in ADAPTER_SUFFIXES:
        found = sorted(folder.rglob(f"{glob.escape(name)}{suffix}"))
        if found:
            return found[0]
    raise InputError(f"<lora:{name}> names no file in {folder} (looked for {name}.safetensors, .pt, .ckpt)")

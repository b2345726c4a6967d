"""The training YAML: reading it, and checking every section before a run touches the disk.

A stage reads a few top-level sections (`train:` and `data:` for all of them, plus its model's).
Each section becomes a dataclass; an unknown section or key, a value of the wrong type, a count
below 1 or a missing file is an `InputError` that names the key (`train.learning_rte`), so a typo
is reported instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from safetensors import SafetensorError, safe_open

from ldm.config import config_kwargs
from ldm.errors import InputError, with_article
from ldm.files import check_output_folder
from ldm.shapes.dataset import SPLITS


@dataclass
class TrainConfig:
    """The `train:` section of a training YAML; the same for every stage."""

    output_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 32  # per process and per accumulation step
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after warmup: "constant", or "cosine" decay to 0 at max_steps
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0 = no EMA weights
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_last: int = 2
    skip_nan_steps: bool = False  # skip a step whose loss is NaN/inf instead of stopping
    channels_last: bool = True  # NHWC convolutions: about 2x faster on CPU, and with tensor cores
    extra: dict = field(default_factory=dict)  # stage-specific settings


T = TypeVar("T")
# The earlier stages whose exports later stages read, and the scripts that write them.
STAGE_SCRIPTS = {"autoencoder": "scripts/train_vae.py", "text_encoder": "scripts/train_clip.py"}
DATASETS = ("shapes-v1", "webdataset")


@dataclass
class DataConfig:
    """The `data:` section of a training YAML."""

    dataset: str = "shapes-v1"  # "shapes-v1" (built in, generated on the fly) or "webdataset" (from `urls`)
    size: int = 64  # images are resized and cropped to size x size pixels
    split: str = "train"  # shapes-v1 only
    urls: str | list | None = None  # webdataset only: tar shard paths, brace patterns or pipe: URLs
    shuffle_buffer: int = 1000  # webdataset only
    random_crop: bool = False  # webdataset only


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A training YAML as nested dicts, with `section.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path} is not valid YAML{_yaml_problem(e)}") from None
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise InputError(f"{path} must hold sections (train:, data:, ...), not a {type(config).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        *parents, leaf = key.split(".")
        if not sep or not all(key.split(".")):
            raise InputError(f"override {item!r} must look like section.key=value")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise InputError(f"override {item!r}: {parent} holds a value, not keys")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise InputError(f"override {item!r}: the value is not valid YAML{_yaml_problem(e)}") from None
    return config


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem or str(e).splitlines()[0]}"


def check_sections(config: dict[str, Any], sections: tuple[str, ...]) -> None:
    """Refuse top-level sections this stage does not read: a misspelt one would be silently ignored."""
    unknown = sorted(str(name) for name in config if name not in sections)
    if unknown:
        raise InputError(f"unknown config section(s) {unknown}; this stage reads {list(sections)}")


@contextmanager
def config_errors(section: str) -> Iterator[None]:
    """TypeError / ValueError raised while building something from config `section` -> a one-line
    InputError that names the section."""
    try:
        yield
    except InputError:
        raise
    except (TypeError, ValueError) as e:
        raise InputError(f"{section}: {e}") from None


def parse_section(config: dict[str, Any], section: str, cls: type[T]) -> T:
    """Dataclass `cls` from the `section:` mapping (through `cls.from_dict` where it has one).

    Unknown keys, missing required keys and values of the wrong type are InputErrors naming the section.
    """
    params = config.get(section)
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise InputError(f"config section {section}: must hold key: value lines, got {params!r}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in params:
            raise InputError(f"{section}.{name} is required")
    with config_errors(section):
        parsed = cls.from_dict(params) if hasattr(cls, "from_dict") else cls(**config_kwargs(cls, params))
    check_types(parsed, section)
    return parsed


def check_types(config: Any, section: str) -> None:
    """Every field of dataclass `config` against its annotation (nested dataclasses too): YAML gives
    `"1e-4"` for 1e-4 and a string for a misplaced quote, which would otherwise fail deep inside a run."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), f"{section}.{f.name}"
        if dataclasses.is_dataclass(value):
            check_types(value, key)
        elif not _matches(value, hints[f.name]):
            hint = " (YAML reads a number like 1e-4 as text: write 1.0e-4)" if _is_number_text(value) else ""
            raise InputError(f"{key} must be {_describe(hints[f.name])}, got {value!r}{hint}")


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple or hint in (tuple, list):  # config_kwargs turns YAML lists into tuples
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return not args or (len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True)))
    return isinstance(value, origin or hint)


def _describe(hint: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_describe(args[0], plural=True)}"
    if origin is tuple:
        return f"a list of {len(args)} {_describe(args[0], plural=True)}"
    names = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
             str: ("a string", "strings"), type(None): ("unset", "unset values"), dict: ("a mapping", "mappings"),
             list: ("a list", "lists"), tuple: ("a list", "lists")}
    name = getattr(hint, "__name__", str(hint))
    return names.get(hint, (name, name))[plural]


def _is_number_text(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def require(condition: bool, key: str, rule: str, value: Any) -> None:
    """InputError `{key} must be {rule}, got {value}` unless `condition`."""
    if not condition:
        raise InputError(f"{key} must be {rule}, got {value!r}")


def at_least(config: Any, section: str, minimum: float, *names: str) -> None:
    """Each field `names` of `config` must be >= `minimum`."""
    for name in names:
        value = getattr(config, name)
        require(value >= minimum, f"{section}.{name}", f">= {minimum}", value)


def train_config(config: dict[str, Any]) -> TrainConfig:
    """The `train:` section, checked: counts, rates, choices and a writable `output_dir`."""
    cfg = parse_section(config, "train", TrainConfig)
    at_least(cfg, "train", 1, "max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every",
             "log_every", "sample_every", "keep_last")
    at_least(cfg, "train", 0, "warmup_steps", "num_workers", "weight_decay", "seed")
    require(cfg.learning_rate > 0, "train.learning_rate", "> 0", cfg.learning_rate)
    require(cfg.max_grad_norm > 0, "train.max_grad_norm", "> 0", cfg.max_grad_norm)
    require(0 <= cfg.ema_decay < 1, "train.ema_decay", "in [0, 1) (0 = no EMA)", cfg.ema_decay)
    require(all(0 <= b < 1 for b in cfg.adam_betas), "train.adam_betas", "two numbers in [0, 1)", cfg.adam_betas)
    require(cfg.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision", "no, fp16 or bf16",
            cfg.mixed_precision)
    require(cfg.lr_schedule in ("constant", "cosine"), "train.lr_schedule", "constant or cosine", cfg.lr_schedule)
    require(bool(cfg.output_dir), "train.output_dir", "a folder", cfg.output_dir)
    check_output_folder(cfg.output_dir, "train.output_dir")
    return cfg


def data_config(config: dict[str, Any]) -> DataConfig:
    """The `data:` section, checked: a known dataset, with shards for webdataset, a split for shapes-v1."""
    data = parse_section(config, "data", DataConfig)
    require(data.dataset in DATASETS, "data.dataset", " or ".join(DATASETS), data.dataset)
    at_least(data, "data", 1, "size")
    at_least(data, "data", 0, "shuffle_buffer")
    if data.dataset == "shapes-v1":
        require(data.split in SPLITS, "data.split", f"one of {', '.join(SPLITS)} for shapes-v1", data.split)
        require(data.urls is None, "data.urls", "unset for shapes-v1 (set data.dataset: webdataset to read "
                "shards)", data.urls)
    else:
        require(bool(data.urls), "data.urls", "tar shards for webdataset, e.g. shards-{000000..000009}.tar",
                data.urls)
    return data


def check_stage_file(path: Any, kind: str, key: str) -> None:
    """Fail early unless config `key` names a `.safetensors` file that stage `kind`'s training run exported."""
    hint = f"give the {kind}.safetensors that {STAGE_SCRIPTS[kind]} writes into its train.output_dir"
    if not path or not isinstance(path, str):
        raise InputError(f"{key} is required: {hint}")
    if not Path(path).is_file():
        raise InputError(f"{key}: {path} not found; {hint}")
    try:
        with safe_open(path, framework="pt") as f:
            tag = (f.metadata() or {}).get("ldm_module")
    except (SafetensorError, OSError) as e:
        raise InputError(f"{key}: cannot read {path} ({e}); {hint}") from None
    if tag != kind:
        raise InputError(f"{key}: {path} is not {with_article(kind)} file (it holds {tag or 'no stage tag'}); {hint}")

"""Run configuration: YAML or JSON, validated into dataclasses (configs are data).

Every key, its type and default is declared once below; `ds_configs/virnuc_ds.yaml` documents them
for users. Unknown keys and wrong types are errors that name the key. Relative model paths are
resolved against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError

DTYPES = ("auto", "bf16", "fp16", "fp32")
PROCESS_GROUPS = ("auto", "gloo", "nccl")


@dataclass
class ModelsConfig:
    esm2: str = "esm2_t36_3B_UR50D"  # fair-esm checkpoint file, or a name in the torch hub cache
    dnabert_s: str = "zhihan1996/DNABERT-S"  # model folder, or a name in the Hugging Face cache
    classifier: str = ""  # the original's 300_model.pth / 500_model.pth (required to classify)


@dataclass
class PrepareConfig:
    expected_length: int = 500  # 300 or 500: chunk length, matching the classifier
    workers: int = 0  # processes for chunking/translation; 0 = all CPUs of the node


@dataclass
class Esm2Config:
    replace_with_kernel_inject: bool = True  # DeepSpeed inference kernels (GPU); false = fair-esm eager
    dtype: str = "auto"  # auto = bf16 on GPUs of compute capability >= 8.0, fp16 below, fp32 on CPU
    toks_per_batch: int = 65536  # padded tokens per batch; also sizes the kernel workspace
    max_residues: int = 1024  # longer proteins are truncated (counted and reported); the original pooled 1..1024
    fallback_to_eager: bool = False  # if the DeepSpeed op cannot be built, run eager instead of failing
    attention: str = "deepspeed"  # kernel attention: deepspeed (v1 kernels) or sdpa (torch SDPA inside the same layers)


@dataclass
class DnabertSConfig:
    dtype: str = "auto"  # auto = bf16 on GPUs of compute capability >= 8.0, fp16 below, fp32 on CPU
    toks_per_batch: int = 131072  # padded BPE tokens per batch


@dataclass
class RunConfig:
    frames_per_part: int = 4096  # frames per rank-local HDF5 part: the unit of resume
    collective_timeout_minutes: int = 60  # a rank waiting longer than this at a barrier fails
    fail_frames: list[str] = field(default_factory=list)  # fault injection: frame ids to fail (tests)
    background_merge: bool = True  # rank 0 merges and classifies finished parts while the GPUs compute
    process_group: str = "auto"  # auto | gloo | nccl: the backend of the ranks' barriers and small messages


@dataclass
class ClassifyConfig:
    device: str = "auto"  # auto = cuda when available, else cpu


@dataclass
class Config:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    esm2: Esm2Config = field(default_factory=Esm2Config)
    dnabert_s: DnabertSConfig = field(default_factory=DnabertSConfig)
    run: RunConfig = field(default_factory=RunConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    source: str = ""  # where it was read from (not a key)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


def _check_value(where: str, value, kind):
    origin = typing.get_origin(kind) or kind
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    return value


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(fields)})"
            raise ConfigError(f"unknown config key {path!r}{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value if value is not None else {}, path)
        else:
            kwargs[key] = _check_value(path, value, kind)
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    if cfg.prepare.expected_length not in (300, 500):
        raise ConfigError(f"prepare.expected_length: must be 300 or 500, got {cfg.prepare.expected_length}")
    for name in ("esm2", "dnabert_s"):
        dtype = getattr(cfg, name).dtype
        if dtype not in DTYPES:
            raise ConfigError(f"{name}.dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if getattr(cfg, name).toks_per_batch < 1024:
            raise ConfigError(f"{name}.toks_per_batch: must be at least 1024, got {getattr(cfg, name).toks_per_batch}")
    if cfg.esm2.attention not in ("deepspeed", "sdpa"):
        raise ConfigError(f"esm2.attention: must be deepspeed or sdpa, got {cfg.esm2.attention!r}")
    if cfg.esm2.max_residues < 1:
        raise ConfigError("esm2.max_residues: must be positive")
    if cfg.run.frames_per_part < 1:
        raise ConfigError("run.frames_per_part: must be positive")
    if cfg.run.collective_timeout_minutes < 1:
        raise ConfigError("run.collective_timeout_minutes: must be positive")
    if cfg.run.process_group not in PROCESS_GROUPS:
        raise ConfigError(f"run.process_group: must be one of {', '.join(PROCESS_GROUPS)}, got {cfg.run.process_group!r}")
    if cfg.classify.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"classify.device: must be auto, cpu or cuda, got {cfg.classify.device!r}")


def _resolve_model_paths(cfg: Config, base: Path) -> None:
    for name in ("esm2", "dnabert_s", "classifier"):
        value = getattr(cfg.models, name)
        if not value:
            continue
        p = Path(os.path.expanduser(os.path.expandvars(value)))
        if not p.is_absolute() and (base / p).exists():
            setattr(cfg.models, name, str((base / p).resolve()))
        elif p.is_absolute() or p.exists():
            setattr(cfg.models, name, str(p))


def config_from_dict(data: dict | None, *, base_dir: str | os.PathLike = ".", source: str = "") -> Config:
    cfg = _build(Config, data or {}, "")
    _validate(cfg)
    _resolve_model_paths(cfg, Path(base_dir))
    cfg.source = source
    return cfg


def load_config(path: str | os.PathLike | None) -> Config:
    """Read a YAML (.yaml/.yml) or JSON (.json) config; None gives the defaults."""
    if path is None:
        return config_from_dict({}, source="defaults")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})") from None
    try:
        return config_from_dict(data, base_dir=path.parent, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None

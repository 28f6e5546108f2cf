"""A training run's configuration: typed dataclasses read from a TOML file, overridable from the command line.

    herd train recipes/pico.toml --train.steps 200 --optim.lr 1e-3 --model.n_layers 4

A recipe has the sections ``[model]`` (a preset or an existing model directory, plus any ModelConfig field),
``[tokenizer]`` (a file, or files to train a BPE on), ``[data]`` (sequence length, batch, seed, weighted
``[[data.sources]]``, an optional ``[data.eval]``), ``[optim]`` and ``[train]``. Relative paths are relative to
the recipe file. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.config import ModelConfig
from herd.errors import ConfigError
from herd.train.distill import DistillSpec
from herd.train.metap import MetaPSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelSpec:
    preset: str = "tiny"
    # continue from these weights: a model directory, a training checkpoint, or a run (its latest checkpoint);
    # [model] keys then change its config where no weight changes shape (RoPE, chunk, max_seq_len: mid-training)
    init_from: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields: dim = 256, n_layers = 6, ...


@dataclass
class TokenizerSpec:
    path: str | None = None  # tokenizer.json / tokenizer.model; None and no train_files: the Llama 4 tokenizer
    train_files: list[str] = field(default_factory=list)  # globs: train a byte-level BPE on these first
    exclude: list[str] = field(default_factory=list)  # globs taken out of train_files (e.g. the eval texts)
    vocab_size: int = 4096  # BPE pieces; the 2048 Llama 4 special tokens come on top


@dataclass
class SourceSpec:
    files: list[str] = field(default_factory=list)  # globs of .txt / .jsonl / .parquet
    exclude: list[str] = field(default_factory=list)  # globs taken out of ``files``
    shards: str | None = None  # or an already tokenised shard set (herd.train.data)
    weight: float = 1.0
    text_key: str = "text"
    images_key: str | None = None  # JSONL image+text samples: this field lists image paths (herd.train.image_text)
    min_tokens: int = 0  # leave out documents shorter than this (long-context mid-training: long documents only)
    teacher_cache: str | None = None  # distillation from a cache: herd distill-cache's directory for these shards


@dataclass
class DataSpec:
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    sources: list[SourceSpec] = field(default_factory=list)
    eval: SourceSpec | None = None


@dataclass
class OptimSpec:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay) or "constant" (after warmup)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the final lr as a fraction of lr
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying


@dataclass
class TrainSpec:
    out_dir: str = "runs/run"
    steps: int = 1000
    grad_accum: int = 1
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast; weights and optimizer stay fp32)
    activation_checkpointing: bool = False
    fp8: str | None = None  # "tensorwise" or "rowwise": FP8 matmuls (torchao on CUDA, emulated elsewhere)
    fp8_backend: str = "auto"  # "auto" (torchao on CUDA if installed), "torchao" (also on CPU) or "emulate"
    z_loss: float = 0.0
    aux_loss_coef: float | None = None  # None: the model config's router_aux_loss_coef; 0 = off
    seed: int = 0
    threads: int | None = None  # torch CPU threads per process; None = torch's default (--nproc: cores / N)
    ep: int = 1  # expert parallelism: 1 = experts FSDP-sharded like the rest; N (= --nproc) = n_experts/N per rank
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    tensorboard: bool = True


@dataclass(frozen=True)
class DistillRecipe(DistillSpec):
    """``[distill]``: the loss (herd.train.distill.DistillSpec's keys: divergence, temperature, weight, alpha...)
    and the online teacher. Off unless ``teacher`` is given or a data source has a ``teacher_cache``."""

    teacher: str | None = None  # a model directory, or a run directory (its newest checkpoint: herd.train.teacher)
    teacher_dtype: str = "bf16"
    teacher_quantize: str | None = None  # int8, int4, ... (herd.infer.quantize): the teacher's weights quantized
    reload_every: int = 0  # codistillation: look for the teacher run's newest checkpoint every N steps (0: never)


@dataclass
class RunConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    metap: MetaPSpec = field(default_factory=MetaPSpec)
    distill: DistillRecipe = field(default_factory=DistillRecipe)
    base_dir: str = "."  # where relative paths start (the recipe's folder)
    min_steps: typing.ClassVar[int] = 1  # a subclass may take 0 to mean "decided by the data" (post-training)

    def path(self, p: str | None) -> Path | None:
        return None if p is None else (Path(self.base_dir) / p).expanduser()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = {"preset": self.model.preset, "init_from": self.model.init_from, **self.model.overrides}
        d.pop("base_dir")
        if not self.distilling:
            d.pop("distill")
        return _drop_none(d)

    @property
    def distilling(self) -> bool:
        return self.distill.teacher is not None or any(s.teacher_cache for s in self.data.sources)

    def check(self) -> None:
        if self.optim.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"optim.schedule={self.optim.schedule!r}: choose cosine, wsd or constant")
        if self.train.fp8 not in (None, "tensorwise", "rowwise"):
            raise ConfigError(f"train.fp8={self.train.fp8!r}: choose tensorwise or rowwise (or leave it out)")
        if self.train.fp8_backend not in ("auto", "torchao", "emulate"):
            raise ConfigError(f"train.fp8_backend={self.train.fp8_backend!r}: choose auto, torchao or emulate")
        if self.train.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"train.dtype={self.train.dtype!r}: choose fp32 or bf16")
        for name in ("steps", "grad_accum", "log_every", "eval_every", "ckpt_every", "keep_checkpoints", "ep"):
            if getattr(self.train, name) < (self.min_steps if name == "steps" else 1):
                raise ConfigError(f"train.{name} must be >= {self.min_steps if name == 'steps' else 1}, "
                                  f"got {getattr(self.train, name)}")
        self.check_data()
        try:
            self.metap.check()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        bad = set(self.model.overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
        if bad:
            raise ConfigError(f"[model] has unknown keys {sorted(bad)} (ModelConfig fields or preset/init_from)")

    def check_data(self) -> None:
        if not self.data.sources:
            raise ConfigError("no [[data.sources]]: give at least one source with files or shards")
        if self.distill.teacher is not None and any(s.teacher_cache for s in self.data.sources):
            raise ConfigError("distill.teacher and a data source's teacher_cache both given: distil from one")
        if self.distill.reload_every < 0:
            raise ConfigError(f"distill.reload_every must be >= 0, got {self.distill.reload_every}")
        if self.distill.teacher_quantize is not None:
            from herd.infer.quantize import SCHEMES

            if self.distill.teacher_quantize not in SCHEMES:
                raise ConfigError(f"distill.teacher_quantize={self.distill.teacher_quantize!r}: choose one of "
                                  f"{', '.join(SCHEMES)}")
        for i, s in enumerate(self.data.sources + ([self.data.eval] if self.data.eval else [])):
            if bool(s.files) == bool(s.shards):
                raise ConfigError(f"data source {i}: give either files or shards")


def _drop_none(d: Any) -> Any:
    # TOML has no null
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list):
        return [_drop_none(v) for v in d]
    return d


def _build(cls: type, raw: Any, where: str) -> Any:
    """A dataclass from a dict, checking keys and (simple) types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}] must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError(f"[{where}] has unknown keys {sorted(unknown)}; known: {sorted(names)}")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in raw.items()})


def _coerce(tp: Any, v: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], v, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, where)
    if origin is list:
        if not isinstance(v, list):
            v = [v]
        return [_coerce(args[0], x, f"{where}[{i}]") for i, x in enumerate(v)]
    if origin is tuple:
        if not isinstance(v, (list, tuple)) or len(v) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {v!r}")
        return tuple(_coerce(a, x, where) for a, x in zip(args, v))
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{where} must be a table, got {v!r}")
        return v
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if tp in (int, float, str, bool) and not (isinstance(v, tp) and (tp is bool or not isinstance(v, bool))):
        raise ConfigError(f"{where} must be {tp.__name__}, got {v!r}")
    return v


def _parse_value(text: str) -> Any:
    """A command-line value as a TOML value (1e-3, true, [0.9, 0.95], "x"), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["--optim.lr", "1e-3", "--train.steps=20"]`` -> raw["optim"]["lr"] = 1e-3, raw["train"]["steps"] = 20."""
    items, i = [], 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"expected --section.key VALUE, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError(f"{arg} needs a value")
            key, value = arg[2:], overrides[i + 1]
            i += 2
        items.append((key, _parse_value(value)))
    for key, value in items:
        parts = key.split(".")
        if len(parts) < 2:
            raise ConfigError(f"--{key}: name the section too, e.g. --train.steps or --optim.lr")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {p} is not a table")
        node[parts[-1]] = value
    return raw


def load_run_config(path: str | Path | None, overrides: list[str] = (), base_dir: str | Path | None = None,
                    cls: type[RunConfig] = RunConfig, defaults: dict | None = None) -> RunConfig:
    """A recipe file (or none) + ``--section.key VALUE`` overrides on top of ``defaults`` (a raw recipe)."""
    raw: dict = _merge({}, defaults or {})
    if path is not None:
        path = Path(path)
        try:
            raw = _merge(raw, tomllib.loads(path.read_text()))
        except OSError as e:
            raise ConfigError(f"cannot read recipe {path}: {e}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from e
        base_dir = path.parent if base_dir is None else base_dir
    return from_dict(apply_overrides(raw, list(overrides)), base_dir or ".", cls)


def _merge(base: dict, top: dict) -> dict:
    """``top``'s keys over ``base``'s, table by table (copies; neither input changes)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(raw: dict, base_dir: str | Path = ".", cls: type[RunConfig] = RunConfig) -> RunConfig:
    """A run config of class ``cls`` (RunConfig, or a subclass with sections of its own, such as post-training's
    [lora]) from a recipe's tables."""
    raw = dict(raw)
    model = dict(raw.pop("model", {}))
    spec = ModelSpec(preset=model.pop("preset", "tiny"), init_from=model.pop("init_from", None), overrides=model)
    hints = typing.get_type_hints(cls)
    sections = [f.name for f in dataclasses.fields(cls) if f.name not in ("model", "base_dir")]
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(f"unknown sections {sorted(unknown)}; known: model, {', '.join(sections)}")
    cfg = cls(model=spec, base_dir=str(base_dir),
              **{name: _build(hints[name], raw.get(name, {}), name) for name in sections})
    cfg.check()
    return cfg


def to_toml(d: dict, prefix: str = "") -> str:
    """A minimal TOML writer for the run config (saved beside checkpoints so a run documents itself)."""
    scalars, tables, arrays = [], [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            scalars.append(f"{k} = {_toml_value(v)}")
    out = []
    if scalars:
        out += ([f"[{prefix}]"] if prefix else []) + scalars + [""]
    for k, v in tables:
        out.append(to_toml(v, f"{prefix}.{k}" if prefix else k))
    for k, items in arrays:
        name = f"{prefix}.{k}" if prefix else k
        for item in items:
            out.append(f"[[{name}]]\n" + to_toml(item, "").strip() + "\n")
    return "\n".join(s for s in out if s is not None)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")

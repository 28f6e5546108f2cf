"""Supervised fine-tuning: ``herd sft MODEL_DIR DATA [DATA ...] --out OUT_DIR``.

The pretraining trainer (herd.train.trainer) with post-training's data: TRL-format records (herd.post.data),
tokenized as inference lays them out, packed with document masking, the loss on assistant tokens only. So SFT
gets everything the trainer does (bf16 autocast, activation checkpointing, FSDP2 + expert parallelism, FP8, exact
resume, Ctrl-C saves, metrics.jsonl / TensorBoard, a progress bar) and the same recipe format, with two sections
of its own:

    [sft]    data files, eval files or a held-out fraction, epochs (when train.steps is 0), the saved dtype;
             keep (--keep): train on the hardest fraction of the data only (herd.post.filter, into OUT_DIR/filter)
    [lora]   rank (0 = full fine-tuning), alpha, targets (herd.post.lora)

OUT_DIR is the run directory (run.toml, checkpoints/, metrics.jsonl) and, when the run ends, an HF model
directory (merged weights + tokenizer + the training report) that ``herd generate`` and transformers load; with
LoRA, OUT_DIR/adapter/ is also a PEFT adapter directory for the base model (``PeftModel.from_pretrained``).

Defaults follow TRL's SFTConfig where the trainer's would not suit fine-tuning: learning rate 2e-5 (2e-4 with
LoRA), no weight decay, no warmup, cosine decay to zero, one epoch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.distributed.tensor import DTensor

from herd.chat import PATCHES_PER_TILE, ChatFormat
from herd.checkpoint.safetensors_io import checkpoint_files, read_tensors
from herd.config import load_config
from herd.errors import ConfigError
from herd.images import ImageConfig
from herd.model.transformer import Transformer
from herd.post.data import Example, SFTLoader, load_examples
from herd.train import run_state
from herd.train.config import RunConfig, load_run_config
from herd.train.trainer import Trainer


@dataclass
class PostSpec:
    """What every post-training method's section ([sft], [dpo]) holds."""

    data: list[str] = field(default_factory=list)  # JSONL / Parquet files in TRL's formats
    eval: list[str] = field(default_factory=list)  # held-out files; none: eval_fraction of data
    eval_fraction: float = 0.0  # share of the examples held out for eval_loss (seeded), when no eval files
    epochs: float = 1.0  # passes over the packed rows when train.steps is 0
    dtype: str = "auto"  # the saved model's dtype: "auto" (the base model's), "bf16", "fp32", ...


@dataclass
class SFTSpec(PostSpec):
    keep: float | None = None  # train on this hardest fraction of the data (herd.post.filter); None: on all of it
    scorer: str = "auto"  # how keep rates difficulty: auto | passk | loss | judge
    judge: str | None = None  # scorer judge: a herd model dir or an OpenAI-compatible URL (None: the model itself)
    judge_model: str | None = None  # the judge endpoint's model name (None: the first it lists)


@dataclass
class LoRASpec:
    rank: int = 0  # 0: full fine-tuning
    alpha: float | None = None  # None: 2 * rank (the scale alpha / rank is then 2)
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj", "experts"])


@dataclass
class PostRunConfig(RunConfig):
    """A post-training run: the trainer's sections, [lora], and the section of the method (``section``) holding
    its data files and settings."""

    lora: LoRASpec = field(default_factory=LoRASpec)
    min_steps = 0  # 0: the epochs decide
    section: ClassVar[str] = "sft"
    default_lr: ClassVar[tuple[float, float]] = (2e-5, 2e-4)  # (full, LoRA): TRL's SFT defaults
    train_defaults: ClassVar[dict] = {}  # the method's own [train] defaults

    @property
    def post(self) -> PostSpec:
        return getattr(self, self.section)

    def check_data(self) -> None:
        s, post = self.section, self.post
        if not post.data:
            raise ConfigError(f"no training data: give DATA files (or [{s}] data = [...])")
        if not 0.0 <= post.eval_fraction < 1.0:
            raise ConfigError(f"{s}.eval_fraction must be in [0, 1), got {post.eval_fraction}")
        if post.epochs <= 0:
            raise ConfigError(f"{s}.epochs must be > 0, got {post.epochs}")
        if getattr(post, "keep", None) is not None:
            from herd.post.filter import SCORERS

            if not 0 < post.keep <= 1 or post.scorer not in SCORERS:
                raise ConfigError(f"sft.keep must be a fraction in (0, 1] and sft.scorer one of {', '.join(SCORERS)}"
                                  f", got {post.keep} and {post.scorer!r}")
        if self.lora.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0 (0 = full fine-tuning), got {self.lora.rank}")
        if self.lora.rank and self.train.ep > 1:
            raise ConfigError("LoRA with expert parallelism (train.ep > 1) is not supported: shard with FSDP only")

    def lora_config(self):
        from herd.post.lora import LoRAConfig

        r = self.lora.rank
        return LoRAConfig(rank=r, alpha=float(2 * r if self.lora.alpha is None else self.lora.alpha),
                          targets=tuple(self.lora.targets))


@dataclass
class SFTRunConfig(PostRunConfig):
    sft: SFTSpec = field(default_factory=SFTSpec)


def post_config(cls: type[PostRunConfig], model_dir: str | Path, data: list[str | Path] | dict, out: str | Path,
                recipe: str | Path | None = None, overrides: list[str] = (), steps: int | None = None,
                lr: float | None = None, batch_size: int | None = None, lora: int | None = None) -> PostRunConfig:
    """The run config of a post-training command: its defaults < the recipe < --section.key overrides < the
    named flags. Paths from the command line are taken from the working directory."""
    cfg = load_config(model_dir)
    defaults = {
        "model": {"init_from": str(Path(model_dir).resolve())},
        "data": {"seq_len": min(2048, cfg.max_seq_len), "batch_size": 8},
        "optim": {"weight_decay": 0.0, "warmup_steps": 0, "min_lr_ratio": 0.0},
        "train": {"out_dir": str(Path(out).resolve()), "steps": 0, "eval_every": 100, "ckpt_every": 100,
                  **cls.train_defaults},
        cls.section: data if isinstance(data, dict) else {"data": [str(Path(d).resolve()) for d in data]},
    }
    named = {"train.steps": steps, "optim.lr": lr, "data.batch_size": batch_size, "lora.rank": lora}
    flags = [x for k, v in named.items() if v is not None for x in (f"--{k}", repr(v))]
    base_dir = None if recipe else "."

    def load() -> PostRunConfig:
        return load_run_config(recipe, [*overrides, *flags], base_dir=base_dir, cls=cls, defaults=defaults)

    defaults["optim"]["lr"] = cls.default_lr[bool(load().lora.rank)]  # LoRA's default lr, unless one is given
    run = load()
    if Path(run.train.out_dir).resolve() == Path(model_dir).resolve():
        raise ConfigError(f"--out {out} is MODEL_DIR itself: write the fine-tuned model somewhere else")
    return run


def sft_config(model_dir: str | Path, data: list[str | Path], out: str | Path, **kw: Any) -> SFTRunConfig:
    """``herd sft``'s run config (post_config's keywords)."""
    return post_config(SFTRunConfig, model_dir, data, out, **kw)


class SFTTrainer(Trainer):
    """The trainer on SFT examples; with ``lora.rank``, on LoRA adapters of a frozen base model."""

    cfg: PostRunConfig

    kind: ClassVar[str] = "sft"  # load_examples' kind of record
    json_metrics: ClassVar[tuple[str, ...]] = ()  # metrics the --json object adds to its five keys

    def _data(self) -> None:
        cfg, vision = self.cfg, self.model_cfg.vision
        self.chat_format = ChatFormat(self.tokenizer, patches_per_tile=vision.tokens_per_tile if vision else
                                      PATCHES_PER_TILE)
        self.image_config = ImageConfig(tile_size=vision.image_size) if vision else ImageConfig()
        train = self._examples(cfg.post.data)
        if getattr(cfg.post, "keep", None) is not None:
            train = self._hardest(train)
        held_out = self._examples(cfg.post.eval) if cfg.post.eval else []
        if not held_out and cfg.post.eval_fraction > 0:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.data.seed)).tolist()
            n = max(1, round(cfg.post.eval_fraction * len(train)))
            if n >= len(train):
                raise ConfigError(f"{cfg.section}.eval_fraction={cfg.post.eval_fraction} leaves no training "
                                  f"example ({len(train)} in all)")
            held_out = [train[i] for i in order[:n]]
            train = [train[i] for i in sorted(order[n:])]
        with_images = [ex for item in train + held_out for ex in (item if isinstance(item, tuple) else (item,))
                       if ex.images]
        if with_images:
            if vision is None:
                raise ConfigError(f"{with_images[0].where} has images but the model has no vision tower")
            if self.world.size > 1:
                raise ConfigError("image examples train in one process for now (splitting tiles over ranks is "
                                  "not done)")
        self.loader = self._loader_of(train)
        self.eval_loader = self._loader_of(held_out) if held_out else None
        self.eval_sources = self.eval_loader  # Trainer.evaluate: None = no evaluation
        if cfg.train.steps == 0:
            per_epoch = math.ceil(self.loader.batches_per_epoch / cfg.train.grad_accum)
            cfg.train.steps = max(1, round(cfg.post.epochs * per_epoch))
        self.examples = len(train)

    def _loader_of(self, examples: list[Example]) -> SFTLoader:
        d = self.cfg.data
        return SFTLoader(examples, d.seq_len, d.batch_size, d.seed, self.image_config)

    def _examples(self, files: list[str]) -> list:
        out: list = []
        for f in files:
            out += load_examples(self.cfg.path(f), self.chat_format, self.kind, self.image_config)
        return out

    def _hardest(self, train: list[Example]) -> list[Example]:
        """The examples herd.post.filter keeps. Rank 0 rates the data with the model being fine-tuned into
        OUT_DIR/filter, or reuses what is there from the same settings and data (--resume); the other ranks, which
        come after it (main_first), read its choice."""
        from herd.post.filter import FilterSpec, filter_files, kept_locations

        post, out = self.cfg.post, self.out / "filter"
        if self.world.main:
            spec = FilterSpec(keep=post.keep, scorer=post.scorer, judge=post.judge, judge_model=post.judge_model,
                              seed=self.cfg.data.seed)
            r = filter_files(self.init, [self.cfg.path(f) for f in post.data], out, spec, reuse=True,
                             progress=self.progress is not False)
            print(f"filter: kept the {r['kept']} hardest of {r['total']} records ({r['scorer']}) -> {out}", flush=True)
        kept = kept_locations(out)
        return [ex for ex in train if ex.where in kept]

    def _eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.eval_loader.epoch_batches()

    def describe(self) -> str:
        return f"{self.examples} examples in {len(self.loader.rows)} rows of {self.cfg.data.seq_len} tokens"

    def _model(self, ckpt: Path | None) -> Transformer:
        model = super()._model(ckpt)
        if self.cfg.lora.rank:
            from herd.post.lora import apply_lora

            apply_lora(model, self.cfg.lora_config(), seed=self.cfg.train.seed)
        return model

    def _plain_state(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.cfg.lora.rank:
            return full
        from herd.post.lora import merged_state_dict

        return merged_state_dict(full, self.cfg.lora_config())

    def export(self) -> Path:
        """OUT_DIR as an HF model directory: the last checkpoint's merged model in ``sft.dtype`` with the
        tokenizer and the training report; with LoRA, the PEFT adapter in OUT_DIR/adapter. Rank 0 writes."""
        from herd.train.export import export

        last = run_state.latest(self.ckpt_root)
        if last is None or run_state.read_trainer_state(last)["step"] != self.step:
            last = self.save()
        if self.cfg.lora.rank:
            adapters = _full_lora_state(self.model)  # collective under FSDP: every rank takes part
        if not self.world.main:
            return self.out
        out = export(last, self.out, dtype=_saved_dtype(self.cfg.post.dtype, self.init))
        if self.cfg.lora.rank:
            from herd.post.lora import save_peft_adapter

            with torch.device("meta"):
                shell = Transformer(self.model_cfg)
            from herd.post.lora import apply_lora

            apply_lora(shell, self.cfg.lora_config())
            shell.load_state_dict(adapters, strict=False, assign=True)
            save_peft_adapter(shell, self.cfg.lora_config(), out / "adapter", str(self.init))
        return out


def _full_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in model.named_parameters() if p.requires_grad}


def _saved_dtype(dtype: str, model_dir: Path) -> str | torch.dtype | None:
    if dtype != "auto":
        return dtype
    for _, _, t in read_tensors(checkpoint_files(model_dir)):  # memory-mapped: reads one tensor
        if t.is_floating_point():
            return t.dtype
    return None


def run(trainer: SFTTrainer) -> dict[str, Any]:
    """Train to the end and export; the ``--json`` object of herd sft / herd dpo: out, steps, examples,
    train_loss (the last logged step's), eval_loss (None without held-out data), then the trainer's
    ``json_metrics``."""
    cfg = trainer.cfg
    try:
        if trainer.world.main:
            trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in trainer.model.parameters())
            what = (f"LoRA rank {cfg.lora.rank}: {trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters"
                    if cfg.lora.rank else f"{total / 1e6:.1f}M parameters")
            print(f"{cfg.section}: {trainer.describe()}, {cfg.train.steps} steps, {what} -> {trainer.out}",
                  flush=True)
        last = trainer.fit()
        if trainer.step < cfg.train.steps:
            warnings.warn(f"stopped at step {trainer.step} of {cfg.train.steps}: the model is exported as it is "
                          f"(continue with --resume)", stacklevel=2)
        out = trainer.export()
        if "eval_loss" not in last and trainer.eval_loader is not None:
            last |= trainer.eval_metrics()
    finally:
        trainer.world.close()
    return {"out": str(out), "steps": trainer.step, "examples": trainer.examples, "train_loss": last.get("loss"),
            "eval_loss": last.get("eval_loss"), **{k: last.get(k) for k in trainer.json_metrics}}


def sft(cfg: SFTRunConfig, resume: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """``herd sft``: run(SFTTrainer)."""
    return run(SFTTrainer(cfg, resume=resume, progress=progress))

"""Supervised fine-tuning: ``herd sft MODEL_DIR DATA [DATA ...] --out OUT_DIR``.

The pretraining trainer (herd.train.trainer) with post-training's data: TRL-format records (herd.post.data),
tokenized as inference lays them out, packed with document masking, the loss on assistant tokens only. So SFT
gets everything the trainer does (bf16 autocast, activation checkpointing, FSDP2 + expert parallelism, FP8, exact
resume, Ctrl-C saves, metrics.jsonl / TensorBoard, a progress bar) and the same recipe format, with two sections
of its own:

    [sft]    data files, eval files or a held-out fraction, epochs (when train.steps is 0), the saved dtype
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
from typing import Any

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
class SFTSpec:
    data: list[str] = field(default_factory=list)  # JSONL / Parquet files in TRL's formats
    eval: list[str] = field(default_factory=list)  # held-out files; none: eval_fraction of data
    eval_fraction: float = 0.0  # share of the examples held out for eval_loss (seeded), when no eval files
    epochs: float = 1.0  # passes over the packed rows when train.steps is 0
    dtype: str = "auto"  # the saved model's dtype: "auto" (the base model's), "bf16", "fp32", ...


@dataclass
class LoRASpec:
    rank: int = 0  # 0: full fine-tuning
    alpha: float | None = None  # None: 2 * rank (the scale alpha / rank is then 2)
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj", "experts"])


@dataclass
class SFTRunConfig(RunConfig):
    sft: SFTSpec = field(default_factory=SFTSpec)
    lora: LoRASpec = field(default_factory=LoRASpec)
    min_steps = 0  # 0: sft.epochs decide

    def check_data(self) -> None:
        if not self.sft.data:
            raise ConfigError("no training data: give DATA files (or [sft] data = [...])")
        if not 0.0 <= self.sft.eval_fraction < 1.0:
            raise ConfigError(f"sft.eval_fraction must be in [0, 1), got {self.sft.eval_fraction}")
        if self.sft.epochs <= 0:
            raise ConfigError(f"sft.epochs must be > 0, got {self.sft.epochs}")
        if self.lora.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0 (0 = full fine-tuning), got {self.lora.rank}")
        if self.lora.rank and self.train.ep > 1:
            raise ConfigError("LoRA with expert parallelism (train.ep > 1) is not supported: shard with FSDP only")

    def lora_config(self):
        from herd.post.lora import LoRAConfig

        r = self.lora.rank
        return LoRAConfig(rank=r, alpha=float(2 * r if self.lora.alpha is None else self.lora.alpha),
                          targets=tuple(self.lora.targets))


def sft_config(model_dir: str | Path, data: list[str | Path], out: str | Path, recipe: str | Path | None = None,
               overrides: list[str] = (), steps: int | None = None, lr: float | None = None,
               batch_size: int | None = None, lora: int | None = None) -> SFTRunConfig:
    """The run config of ``herd sft``: SFT defaults < the recipe < --section.key overrides < the named flags.
    Paths from the command line are taken from the working directory."""
    cfg = load_config(model_dir)
    defaults = {
        "model": {"init_from": str(Path(model_dir).resolve())},
        "data": {"seq_len": min(2048, cfg.max_seq_len), "batch_size": 8},
        "optim": {"weight_decay": 0.0, "warmup_steps": 0, "min_lr_ratio": 0.0},
        "train": {"out_dir": str(Path(out).resolve()), "steps": 0, "eval_every": 100, "ckpt_every": 100},
        "sft": {"data": [str(Path(d).resolve()) for d in data]},
    }
    named = {"train.steps": steps, "optim.lr": lr, "data.batch_size": batch_size, "lora.rank": lora}
    flags = [x for k, v in named.items() if v is not None for x in (f"--{k}", repr(v))]
    base_dir = None if recipe else "."

    def load() -> SFTRunConfig:
        return load_run_config(recipe, [*overrides, *flags], base_dir=base_dir, cls=SFTRunConfig, defaults=defaults)

    defaults["optim"]["lr"] = 2e-4 if load().lora.rank else 2e-5  # LoRA's default lr, unless one is given
    run = load()
    if Path(run.train.out_dir).resolve() == Path(model_dir).resolve():
        raise ConfigError(f"--out {out} is MODEL_DIR itself: write the fine-tuned model somewhere else")
    return run


class SFTTrainer(Trainer):
    """The trainer on SFT examples; with ``lora.rank``, on LoRA adapters of a frozen base model."""

    cfg: SFTRunConfig

    def _data(self) -> None:
        cfg, vision = self.cfg, self.model_cfg.vision
        self.chat_format = ChatFormat(self.tokenizer, patches_per_tile=vision.tokens_per_tile if vision else
                                      PATCHES_PER_TILE)
        self.image_config = ImageConfig(tile_size=vision.image_size) if vision else ImageConfig()
        train = self._examples(cfg.sft.data)
        held_out = self._examples(cfg.sft.eval) if cfg.sft.eval else []
        if not held_out and cfg.sft.eval_fraction > 0:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.data.seed)).tolist()
            n = max(1, round(cfg.sft.eval_fraction * len(train)))
            if n >= len(train):
                raise ConfigError(f"sft.eval_fraction={cfg.sft.eval_fraction} leaves no training example "
                                  f"({len(train)} in all)")
            held_out = [train[i] for i in order[:n]]
            train = [train[i] for i in sorted(order[n:])]
        if any(ex.images for ex in train + held_out):
            if vision is None:
                first = next(ex for ex in train + held_out if ex.images)
                raise ConfigError(f"{first.where} has images but the model has no vision tower")
            if self.world.size > 1:
                raise ConfigError("image examples train in one process for now (splitting tiles over ranks is "
                                  "not done)")
        d = cfg.data
        self.loader = SFTLoader(train, d.seq_len, d.batch_size, d.seed, self.image_config)
        self.eval_loader = SFTLoader(held_out, d.seq_len, d.batch_size, d.seed, self.image_config) \
            if held_out else None
        self.eval_sources = self.eval_loader  # Trainer.evaluate: None = no evaluation
        if cfg.train.steps == 0:
            per_epoch = math.ceil(len(self.loader.rows) / d.batch_size / cfg.train.grad_accum)
            cfg.train.steps = max(1, round(cfg.sft.epochs * per_epoch))
        self.examples = self.loader.examples

    def _examples(self, files: list[str]) -> list[Example]:
        out: list[Example] = []
        for f in files:
            out += load_examples(self.cfg.path(f), self.chat_format, "sft", self.image_config)
        return out

    def _eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.eval_loader.epoch_batches()

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
        out = export(last, self.out, dtype=_saved_dtype(self.cfg.sft.dtype, self.init))
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


def sft(cfg: SFTRunConfig, resume: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Run SFT to the end and export; the ``herd sft --json`` object: out, steps, examples, train_loss,
    eval_loss (None without held-out data)."""
    trainer = SFTTrainer(cfg, resume=resume, progress=progress)
    try:
        main = trainer.world.main
        if main:
            trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in trainer.model.parameters())
            what = (f"LoRA rank {cfg.lora.rank}: {trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters"
                    if cfg.lora.rank else f"{total / 1e6:.1f}M parameters")
            print(f"sft: {trainer.examples} examples in {len(trainer.loader.rows)} rows of {cfg.data.seq_len} "
                  f"tokens, {cfg.train.steps} steps, {what} -> {trainer.out}", flush=True)
        last = trainer.fit()
        stopped = trainer.step < cfg.train.steps
        if stopped:
            warnings.warn(f"stopped at step {trainer.step} of {cfg.train.steps}: the model is exported as it is "
                          f"(continue with --resume)", stacklevel=2)
        out = trainer.export()
        eval_loss = last.get("eval_loss")
        if eval_loss is None and trainer.eval_loader is not None:
            eval_loss = trainer.evaluate()
    finally:
        trainer.world.close()
    return {"out": str(out), "steps": trainer.step, "examples": trainer.examples,
            "train_loss": last.get("loss"), "eval_loss": eval_loss}

"""The pretraining loop: ``herd train RECIPE.toml``.

One run directory holds everything (``train.out_dir``):

    run.toml            the resolved config (recipe + command-line overrides)
    tokenizer/          the tokenizer (trained here when the recipe asks for one)
    data/source_N/      token shards of each source (built on first use, reused after)
    checkpoints/        step_XXXXXXXX/ (herd.train.run_state), the newest ``keep_checkpoints``
    metrics.jsonl       one JSON object per logged step / eval
    tb/                 TensorBoard event files (when tensorboard is installed)

The step: ``grad_accum`` micro-batches of packed, document-masked rows, each giving next-token cross entropy
(+ z-loss) + the MoE load-balancing loss, under bf16 autocast when asked; then gradient clipping, AdamW and the
learning-rate schedule. Everything that decides the next step (weights, AdamW moments, step, data cursor,
RNG) is in the checkpoint, so ``--resume`` reproduces the uninterrupted run's losses exactly.
Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and stops.

Under torchrun (``herd train RECIPE --nproc N``) every rank reads the same global batches and trains on its own
rows of them (``rank_rows``); the model is FSDP2-sharded (``train.ep = N`` also spreads the routed experts over
the ranks) and every rank's loss is divided by the global token count, with gradients summed over ranks, so
the run computes the single-process step. Rank 0 logs; checkpoints are DCP shards that resume on any number
of ranks.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from herd import checkpoint
from herd.config import ModelConfig, load_config, preset
from herd.errors import ConfigError, HerdError
from herd.images import ImageConfig
from herd.model.transformer import Transformer
from herd.tokenizer import Tokenizer
from herd.train import run_state
from herd.train.bpe import read_texts, train_bpe
from herd.train.config import RunConfig, SourceSpec, to_toml
from herd.train.data import INDEX_FILE, PackedLoader, TokenShards, tokenize_to_shards
from herd.train.distill import TeacherTargets, distill_loss
from herd.train.distill_cache import DistillLoader, TeacherCache
from herd.train.distributed import init_distributed, rank_rows
from herd.train.image_text import ImageTextSet, tokenize_image_text
from herd.train.losses import cross_entropy, expert_load, load_balancing_loss
from herd.train.metap import init_metap, param_groups
from herd.train.parallelize import parallelize
from herd.train.schedule import lr_at
from herd.train.teacher import Teacher


def expand_files(cfg: RunConfig, spec: SourceSpec) -> list[Path]:
    files: list[Path] = []
    for pattern in spec.files:
        matched = sorted(glob.glob(str(cfg.path(pattern)), recursive=True))
        if not matched:
            raise ConfigError(f"data files {pattern!r} match nothing (relative paths start at {cfg.base_dir})")
        files += [Path(m) for m in matched]
    excluded = {Path(m) for pattern in spec.exclude for m in glob.glob(str(cfg.path(pattern)), recursive=True)}
    files = [f for f in dict.fromkeys(files) if f not in excluded]
    if not files:
        raise ConfigError(f"data source {spec.files}: every file is excluded")
    return files


def _fingerprint(files: list[Path], tokenizer_file: Path | None, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    if tokenizer_file is not None:
        h.update(tokenizer_file.read_bytes())
    return h.hexdigest()[:16]


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool | None = None):
        self.cfg, self.progress = cfg, progress
        t = cfg.train
        self.world = init_distributed(cuda=False)  # the trainer keeps its tensors on the CPU
        self._check_layout()
        self.out = cfg.path(t.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        if t.threads:
            torch.set_num_threads(t.threads)
        ckpt = run_state.latest(self.ckpt_root) if resume else None
        if resume and ckpt is None and self.world.main:
            warnings.warn(f"--resume: no checkpoint in {self.ckpt_root}; starting from step 0", stacklevel=2)
        if not resume and run_state.latest(self.ckpt_root) is not None:
            raise ConfigError(f"{self.out} already holds checkpoints: pass --resume to continue that run, or choose "
                              f"another train.out_dir")
        self.init = self._init_dir()
        with self.world.main_first():  # rank 0 builds the shared files (tokenizer, shards); the others read them
            if self.world.main:
                self.out.mkdir(parents=True, exist_ok=True)
                for p in run_state.clean_partial(self.ckpt_root):
                    warnings.warn(f"removed the unfinished checkpoint {p} (a save was interrupted)", stacklevel=2)
            self.tokenizer, self.tokenizer_dir = self._tokenizer()
            if ckpt is not None:
                self.model_cfg = load_config(ckpt / run_state.MODEL_DIR)
            else:
                self.model_cfg = self.model_config()
            self._data()
        self.teacher = None
        if cfg.distill.teacher is not None:
            self.teacher = Teacher(cfg.path(cfg.distill.teacher), (self.tokenizer, self.model_cfg.vocab_size),
                                   cfg.distill.teacher_dtype, cfg.distill.reload_every,
                                   cfg.distill.teacher_quantize)
        torch.manual_seed(t.seed)
        self.model = self._model(ckpt)
        if cfg.metap.enabled and ckpt is None and not cfg.model.init_from:
            init_metap(self.model, cfg.metap)
        self.model.train()
        parallelize(self.model, t, self.world)  # every rank holds the same full weights here
        self.optimizer = self._optimizer()
        self.step, self.resumed_from, self.train_time, self.tokens_seen = 0, ckpt, 0.0, 0
        if ckpt is not None:
            state = run_state.read_trainer_state(ckpt)
            run_state.load_state(ckpt, self.model, self.optimizer)
            self.loader.load_state_dict(state["loader"])
            self.step = int(state["step"])
            self.train_time = float(state.get("train_time_s", 0.0))
            self.tokens_seen = int(state.get("tokens_seen", self.step * self.tokens_per_step))
            if self.teacher is not None and "teacher" in state:
                self.teacher.load_state_dict(state["teacher"])
        if self.world.main:
            (self.out / "run.toml").write_text(to_toml(cfg.to_dict()))
        self.aux_coef = self.model.cfg.router_aux_loss_coef if t.aux_loss_coef is None else t.aux_loss_coef
        self._stop_requested = False

    # -- setup -------------------------------------------------------------------------------------------------
    def _check_layout(self) -> None:
        n, t, d = self.world.size, self.cfg.train, self.cfg.data
        if t.ep not in (1, n):
            raise ConfigError(f"train.ep={t.ep}: expert parallelism spans all ranks or none (1 or {n} here)")
        if d.batch_size % n:
            raise ConfigError(f"data.batch_size={d.batch_size} does not split over {n} ranks")
        if n > 1 and any(s.images_key for s in d.sources + ([d.eval] if d.eval else [])):
            raise ConfigError("image-text sources train in one process for now (splitting tiles over ranks is "
                              "not done)")

    def _tokenizer(self) -> tuple[Tokenizer, Path | None]:
        spec = self.cfg.tokenizer
        if spec.path is not None:
            path = self.cfg.path(spec.path)
            return Tokenizer.load(path), (path if path.is_dir() else path.parent)
        if not spec.train_files:
            if self.init is not None and any(self.init.glob("tokenizer.*")):
                return Tokenizer.for_model(self.init), self.init  # continuing a model: its own tokenizer
            return Tokenizer.load(), None  # the Llama 4 tokenizer
        out = self.out / "tokenizer"
        if (out / "tokenizer.model").is_file():
            return Tokenizer.load(out / "tokenizer.model"), out
        files = expand_files(self.cfg, SourceSpec(files=spec.train_files, exclude=spec.exclude))
        print(f"training a {spec.vocab_size}-piece BPE tokenizer on {len(files)} files -> {out}")
        return train_bpe(read_texts(files), spec.vocab_size, out), out

    def _shards(self, spec: SourceSpec, name: str) -> TokenShards | ImageTextSet:
        if spec.shards is not None:
            path = self.cfg.path(spec.shards)
            return ImageTextSet(path) if spec.images_key else TokenShards(path)
        files = expand_files(self.cfg, spec)
        tok_file = self.tokenizer_dir / "tokenizer.model" if self.tokenizer_dir else None
        extra = spec.text_key
        if spec.images_key:
            vision = self.model_cfg.vision
            if vision is None:
                raise ConfigError(f"data source {spec.files} has images ({spec.images_key!r}) but the model has no "
                                  f"vision_config (use a vision preset such as tiny-vision, or drop images_key)")
            extra += f"|{spec.images_key}|{vision.image_size}|{vision.tokens_per_tile}|{self.cfg.data.seq_len}"
        if spec.min_tokens:
            extra += f"|min{spec.min_tokens}"
        key = _fingerprint(files, tok_file if tok_file and tok_file.is_file() else None, extra)
        out = self.out / "data" / f"{name}-{key}"
        if spec.images_key:
            if not (out / INDEX_FILE).is_file():
                print(f"tokenising and tiling {len(files)} image-text files -> {out}")
                info = tokenize_image_text(files, out, self.tokenizer, vision.tokens_per_tile,
                                           ImageConfig(tile_size=vision.image_size), self.cfg.data.seq_len,
                                           spec.text_key, spec.images_key)
                print(f"  {info['samples']} samples, {info['tiles']} tiles, {info['tokens']:,} tokens")
            return ImageTextSet(out)
        if not (out / INDEX_FILE).is_file():
            print(f"tokenising {len(files)} files -> {out}")
            info = tokenize_to_shards(files, out, self.tokenizer, text_key=spec.text_key,
                                      bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id,
                                      min_tokens=spec.min_tokens)
            short = f" ({info.short_documents} under min_tokens left out)" if spec.min_tokens else ""
            print(f"  {info.total_documents} documents, {info.total_tokens:,} tokens{short}")
        shards = TokenShards(out)
        if shards.info.total_documents == 0:
            raise ConfigError(f"data source {spec.files}: no document left"
                              + (f" of at least min_tokens={spec.min_tokens} tokens" if spec.min_tokens else ""))
        return shards

    @property
    def tokens_per_step(self) -> int:
        """The tokens of a step's packed rows (a step of varying size reports its own: ``step_tokens``)."""
        return self.cfg.data.batch_size * self.cfg.data.seq_len * self.cfg.train.grad_accum

    def _data(self) -> None:
        """The training loader (``self.loader``: next_batch, state_dict, load_state_dict) and what evaluation
        reads (``self.eval_sources``, None for none)."""
        self.loader = self._loader(self.cfg.data.sources, self.cfg.data.seed, "source")
        self.eval_sources = None
        if self.cfg.data.eval is not None:
            self.eval_sources = [(self._shards(self.cfg.data.eval, "eval"), 1.0)]

    def _loader(self, specs: list[SourceSpec], seed: int, name: str) -> PackedLoader:
        sources = [(self._shards(s, f"{name}{i}"), s.weight) for i, s in enumerate(specs)]
        if not any(s.teacher_cache for s in specs):
            return PackedLoader(sources, self.cfg.data.seq_len, self.cfg.data.batch_size, seed=seed)
        caches = [TeacherCache(self.cfg.path(s.teacher_cache)) if s.teacher_cache else None for s in specs]
        for cache in filter(None, caches):  # a cache of another tokenizer fails here, before any step
            cache.check_student((self.tokenizer, self.model_cfg.vocab_size))
        return DistillLoader(sources, self.cfg.data.seq_len, self.cfg.data.batch_size, seed=seed, caches=caches)

    def _init_dir(self) -> Path | None:
        """``[model] init_from`` as a model directory: itself, or a checkpoint's / a run's latest ``model/``."""
        if not self.cfg.model.init_from:
            return None
        path = self.cfg.path(self.cfg.model.init_from)
        if (path / "config.json").is_file():
            return path
        try:
            return run_state.resolve(path) / run_state.MODEL_DIR
        except HerdError:
            raise ConfigError(f"model.init_from={self.cfg.model.init_from!r}: {path} is neither a model directory "
                              f"(config.json) nor a training run or checkpoint") from None

    def model_config(self) -> ModelConfig:
        spec = self.cfg.model
        init = self.init
        base = load_config(init) if init is not None else preset(spec.preset)
        changes = dict(spec.overrides)
        tok = self.tokenizer
        if init is None:  # a new model takes its vocabulary and special ids from the tokenizer
            changes.setdefault("vocab_size", tok.vocab_size)
            changes.setdefault("bos_token_id", tok.bos_id)
            changes.setdefault("eos_token_id", (tok.eos_id, tok.eom_id, tok.eot_id))
            changes.setdefault("pad_token_id", tok.pad_id)
            for name, token in (("image_token_id", "<|patch|>"), ("boi_token_id", "<|image_start|>"),
                                ("eoi_token_id", "<|image_end|>")):
                changes.setdefault(name, tok.token_id(token))
        new = base.replace(**changes)
        if new.vocab_size < tok.vocab_size:
            raise ConfigError(f"model.vocab_size={new.vocab_size} is smaller than the tokenizer's "
                              f"{tok.vocab_size} ids (its special tokens, the chat tokens among them, start at id "
                              f"{tok.bos_id})")
        if self.cfg.data.seq_len > new.max_seq_len:
            raise ConfigError(f"data.seq_len={self.cfg.data.seq_len} exceeds the model's max_seq_len "
                              f"({new.max_seq_len}; set model.max_seq_len)")
        if init is not None:
            _check_same_shapes(base, new, init, sorted(spec.overrides))
        return new

    def _model(self, ckpt: Path | None) -> Transformer:
        """The model to train, before any checkpoint state (a resumed run's weights are loaded after sharding)."""
        model = Transformer(self.model_cfg)
        if self.init is not None and ckpt is None:  # its weights, under the (possibly changed) config
            model.load_state_dict(checkpoint.load(self.init, dtype=torch.float32).state_dict())
        return model

    def _optimizer(self) -> torch.optim.AdamW:
        o = self.cfg.optim
        if self.cfg.metap.enabled:
            d = self.cfg.data
            groups = param_groups(self.model, self.cfg.metap, o.lr, o.weight_decay, o.eps,
                                  batch_tokens=d.batch_size * d.seq_len * self.cfg.train.grad_accum,
                                  steps=self.cfg.train.steps)
            return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)  # norms' scales are not decayed
        return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=o.lr, betas=o.betas, eps=o.eps, fused=True)  # one kernel over all params

    # -- the step ----------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
        """This rank's rows of a global batch -> (its share of the loss, its shares of the parts, router logits).
        Token losses are divided by the global batch's token count and the balancing loss (a per-rank statistic)
        by the number of ranks, so that the shares sum to the batch's loss."""
        n_tokens = float(batch["loss_mask"].sum())  # every rank holds the whole global batch
        batch = rank_rows(batch, self.world.rank, self.world.size)
        with self._autocast():
            logits, router_logits = self.model(batch["tokens"], positions=batch["positions"],
                                               doc_ids=batch["doc_ids"], return_router_logits=True,
                                               pixel_values=batch.get("pixel_values"))
        teacher = None
        if self.teacher is not None:
            teacher = self.teacher.targets(batch)
        elif "teacher_ids" in batch:
            teacher = TeacherTargets.from_batch(batch, self.loader.temperature)
        if teacher is None:
            loss, parts = cross_entropy(logits, batch["targets"], batch["loss_mask"], self.cfg.train.z_loss,
                                        n_tokens=n_tokens)
        else:
            loss, parts = distill_loss(logits, batch["targets"], batch["loss_mask"], teacher, self.cfg.distill,
                                       self.step, self.cfg.train.steps, n_tokens=n_tokens,
                                       z_loss=self.cfg.train.z_loss)
        if router_logits and self.aux_coef:
            aux = load_balancing_loss(router_logits, self.model.cfg.n_experts, self.model.cfg.top_k) / self.world.size
            loss = loss + self.aux_coef * aux
            parts["aux"] = aux.detach()
        return loss, parts, router_logits

    def train_step(self, expert_metrics: bool = True) -> dict[str, Any]:
        """One optimizer step; ``expert_metrics``: add the per-layer expert load (only needed when logging; under
        data parallelism it is rank 0's rows')."""
        t, cfg = self.cfg.train, self.model.cfg
        lr = lr_at(self.step, t.steps, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # MetaP's per-group scale
        if self.teacher is not None:
            self.teacher.maybe_reload(self.step)
        shares: dict[str, torch.Tensor] = {}
        for micro in range(t.grad_accum):
            if self.world.size > 1:  # FSDP reduces gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(micro == t.grad_accum - 1)
            loss, parts, router_logits = self._forward(self.loader.next_batch())
            (loss / t.grad_accum).backward()
            for k, v in {"loss": loss.detach(), **parts}.items():
                shares[k] = shares.get(k, 0.0) + v.float() / t.grad_accum
        totals = dict(zip(shares, self.world.sum_(torch.stack(list(shares.values()))).tolist()))
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        if not math.isfinite(totals["loss"]):
            raise FloatingPointError(f"loss is {totals['loss']} at step {self.step}: lower optim.lr or use fp32")
        if self._update_ok():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = {**totals, "lr": lr, "grad_norm": float(grad_norm)}
        if router_logits and expert_metrics:
            metrics |= expert_load(router_logits, cfg.n_experts, cfg.top_k)
        return metrics

    def _update_ok(self) -> bool:
        """Whether this step's gradients update the weights (RL skips a step with nothing to learn from)."""
        return True

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.eval_sources is None:
            return None
        self.model.eval()
        total, n = 0.0, 0
        for batch in self._eval_batches():
            n_tokens = float(batch["loss_mask"].sum())
            batch = rank_rows(batch, self.world.rank, self.world.size)
            with self._autocast():
                logits = self.model(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"],
                                    pixel_values=batch.get("pixel_values"))
            _, parts = cross_entropy(logits, batch["targets"], batch["loss_mask"], n_tokens=n_tokens)
            total, n = total + float(self.world.sum_(parts["ce"].clone())) * n_tokens, n + n_tokens
        self.model.train()
        return total / max(n, 1.0)  # the mean over tokens, not over batches

    def eval_metrics(self) -> dict[str, float]:
        """What an evaluation logs: {"eval_loss": ...}, or nothing without evaluation data."""
        loss = self.evaluate()
        return {} if loss is None else {"eval_loss": loss}

    def _eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        loader = PackedLoader(self.eval_sources, self.cfg.data.seq_len, self.cfg.data.batch_size,
                              seed=self.cfg.data.seed)
        # at most one pass over the eval windows: more batches would count windows twice
        for _ in range(min(self.cfg.train.eval_batches, max(1, loader.sources[0].n // loader.batch_size))):
            yield loader.next_batch()

    def _checkpoint_files(self) -> dict[str, Any]:
        """Objects a subclass keeps in each checkpoint beside the state (name -> object, torch.save'd)."""
        return {}

    def _plain_state(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full state dict as a plain Transformer's (what a checkpoint's model/ holds)."""
        return full

    def save(self, metrics: dict[str, Any] | None = None) -> Path:
        state = {"loader": self.loader.state_dict(), "config": self.cfg.to_dict(), "metrics": metrics or {},
                 "train_time_s": self.train_time, "tokens_seen": self.tokens_seen}
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        return run_state.save(self.ckpt_root, self.step, self.model, self.optimizer, state,
                              tokenizer_dir=self.tokenizer_dir, keep=self.cfg.train.keep_checkpoints,
                              world=self.world, plain=self._plain_state, files=self._checkpoint_files())

    # -- the run -----------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        main = self.world.main
        log = MetricsLog(self.out, t.tensorboard, enabled=main)
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step",
                   disable=self.progress is False or not main, dynamic_ncols=True)
        last: dict[str, Any] = {}
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def request_stop(signum, frame):
            self._stop_requested = True
            if main:
                bar.write("stopping after this step (a checkpoint will be saved); press Ctrl-C again to abort")
            signal.signal(signal.SIGINT, previous[signal.SIGINT])

        for s in previous:
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                signal.signal(s, request_stop)
        try:
            window_start, window_tokens = time.perf_counter(), 0
            while self.step < t.steps and not self._stop_requested:
                step_start = time.perf_counter()
                log_now = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.steps
                metrics = self.train_step(expert_metrics=log_now)
                self.train_time += time.perf_counter() - step_start
                # a step of varying size (RL: the answers it trained on) reports its own token count
                step_tokens = metrics.pop("step_tokens", self.tokens_per_step)
                window_tokens += step_tokens
                self.tokens_seen += step_tokens
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    metrics["tokens_per_s"] = window_tokens / elapsed
                    metrics["tokens"] = self.tokens_seen
                    metrics["train_time_s"] = self.train_time
                    window_start, window_tokens = time.perf_counter(), 0
                    log.write(self.step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                    lr=f"{metrics['lr']:.2e}")
                    last = metrics
                if self.step % t.eval_every == 0 or self.step == t.steps:
                    found = self.eval_metrics()
                    if found:
                        log.write(self.step, found)
                        last |= found
                        if main:
                            bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in found.items()))
                    window_start = time.perf_counter()  # evaluation time is not training throughput
                if self.step % t.ckpt_every == 0 or self.step == t.steps:
                    self.save(_summary(last))
                    window_start = time.perf_counter()
                bar.update(1)
                self._stop_requested = self.world.any(self._stop_requested)  # all ranks stop at the same step
            if self._stop_requested and self.step < t.steps:
                path = self.save(_summary(last))
                if main:
                    bar.write(f"stopped at step {self.step}; resume with --resume (checkpoint {path})")
        finally:
            bar.close()
            log.close()
            for s, h in previous.items():
                with contextlib.suppress(ValueError):
                    signal.signal(s, h)
        return last


def _check_same_shapes(base: ModelConfig, new: ModelConfig, init: Path, keys: list[str]) -> None:
    """A continued model may change how it runs (RoPE, chunking, context), never the shape of a weight."""
    with torch.device("meta"):
        a, b = Transformer(base).state_dict(), Transformer(new).state_dict()
    bad = [k for k in a if k not in b or a[k].shape != b[k].shape] + [k for k in b if k not in a]
    if bad:
        raise ConfigError(f"[model] {', '.join(keys)} would change the weights of init_from {init} (first: {bad[0]}); "
                          f"a continued model can change only keys such as rope_theta, rope_scaling, max_seq_len, "
                          f"attention_chunk_size, nope_layer_interval, floor_scale, attn_scale")


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not k.startswith("moe/layer")}


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard (when installed and wanted); nothing when not ``enabled`` (ranks
    other than 0)."""

    def __init__(self, out: Path, tensorboard: bool, enabled: bool = True):
        self.file = open(out / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                warnings.warn("tensorboard is not installed (pip install 'herd[train]'): metrics go to "
                              "metrics.jsonl only", stacklevel=3)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()

"""Direct preference optimisation: ``herd dpo MODEL_DIR PAIRS --out OUT_DIR [--beta 0.1] [--lora RANK]``.

Sigmoid DPO (Rafailov et al., 2023) as TRL's DPOTrainer computes it: with pi and ref the summed log-probs of a
completion's tokens under the model and under the reference (the model before training),

    loss = -log sigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)))

(with ``label_smoothing`` e: (1 - e) times that plus e times the flipped pair's, cDPO), plus, with ``rpo_alpha``,
that weight times the mean NLL of the chosen completions' tokens (RPO, Pang et al., 2024; TRL's loss_type
["sigmoid", "sft"]). The reference log-probs are computed once, before the first step, by the model itself, and
cached in OUT_DIR/reference_logps.pt: no second model is ever held in memory (with LoRA the adapters start at
zero, so the model then is the base model). Metrics, as TRL names them without the "rewards/" prefix: rewards
beta * (pi - ref) of chosen and rejected, their margin, and reward accuracy (chosen above rejected).

The trainer is SFT's (herd.post.sft): the same recipe sections with [dpo] for [sft], LoRA, FSDP2, checkpoints,
exact resume and export. A batch holds ``data.batch_size`` pairs as rows chosen_0, rejected_0, chosen_1, ...,
each padded to the longest row (and cut to ``data.seq_len``); under data parallelism each rank takes whole pairs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from herd.errors import ConfigError
from herd.images import ImageConfig
from herd.model.transformer import Transformer
from herd.post.data import IGNORE, EpochLoader, Example, collate
from herd.post.sft import PostRunConfig, PostSpec, SFTTrainer, post_config, run
from herd.train.distributed import rank_rows
from herd.train.losses import load_balancing_loss

REFERENCE_FILE = "reference_logps.pt"


@dataclass
class DPOSpec(PostSpec):
    beta: float = 0.1  # how far from the reference the policy may move (TRL's default)
    rpo_alpha: float = 0.0  # weight of the chosen completions' NLL (RPO); 0 = plain DPO
    label_smoothing: float = 0.0  # cDPO: the probability that a pair's preference is flipped


@dataclass
class DPORunConfig(PostRunConfig):
    dpo: DPOSpec = field(default_factory=DPOSpec)
    section = "dpo"
    default_lr = (1e-6, 1e-5)  # (full, LoRA): TRL's DPO default, and ten times it for adapters

    def check_data(self) -> None:
        super().check_data()
        if self.dpo.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.dpo.beta}")
        if not 0.0 <= self.dpo.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.dpo.label_smoothing}")
        if self.dpo.rpo_alpha < 0:
            raise ConfigError(f"dpo.rpo_alpha must be >= 0, got {self.dpo.rpo_alpha}")


def dpo_config(model_dir: str | Path, pairs: list[str | Path], out: str | Path, beta: float | None = None,
               **kw: Any) -> DPORunConfig:
    """``herd dpo``'s run config (post_config's keywords, and ``beta``)."""
    if beta is not None:
        kw["overrides"] = [*kw.get("overrides", ()), "--dpo.beta", repr(beta)]
    return post_config(DPORunConfig, model_dir, pairs, out, **kw)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss [B] and the rewards beta * (pi - ref) of chosen and rejected [B] (detached),
    from summed completion log-probs [B] under the policy and the reference."""
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def completion_logps(logits_NTV: torch.Tensor, targets_NT: torch.Tensor, mask_NT: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [N] of each row's completion tokens, and the per-token NLL [N, T] (zero off the mask)."""
    N, T, V = logits_NTV.shape
    nll_NT = F.cross_entropy(logits_NTV.float().reshape(-1, V), targets_NT.reshape(-1), reduction="none").view(N, T)
    nll_NT = nll_NT * mask_NT.to(nll_NT.dtype)
    return -nll_NT.sum(1), nll_NT


def pair_loss(logits_NTV: torch.Tensor, batch: dict[str, torch.Tensor], spec: DPOSpec, n_pairs: int,
              chosen_tokens: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO (+ RPO) loss of rows chosen_0, rejected_0, ... as this process's share of a batch of ``n_pairs``
    pairs whose chosen completions hold ``chosen_tokens`` tokens, and the shares of its metrics."""
    logps, nll_NT = completion_logps(logits_NTV, batch["targets"], batch["loss_mask"])
    ref = batch["ref_logps"]
    losses, chosen_r, rejected_r = dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], spec.beta,
                                            spec.label_smoothing)
    loss = losses.sum() / n_pairs
    parts = {"dpo": loss.detach(), "reward_accuracy": (chosen_r > rejected_r).float().sum() / n_pairs,
             "reward_margin": (chosen_r - rejected_r).sum() / n_pairs,
             "reward_chosen": chosen_r.sum() / n_pairs, "reward_rejected": rejected_r.sum() / n_pairs}
    if spec.rpo_alpha:
        nll = nll_NT[0::2].sum() / max(chosen_tokens, 1.0)
        loss = loss + spec.rpo_alpha * nll
        parts["nll"] = nll.detach()
    return loss, parts


class PairLoader(EpochLoader):
    """Batches of preference pairs: rows chosen_0, rejected_0, chosen_1, ... padded to the longest (cut to
    ``seq_len``), with ``ref_logps`` per row from ``reference``."""

    def __init__(self, pairs: list[tuple[Example, Example]], seq_len: int, batch_size: int, seed: int = 0,
                 image_config: ImageConfig | None = None):
        if not pairs:
            raise ConfigError("no preference pair to train on")
        super().__init__(len(pairs), seq_len, batch_size, seed)
        self.pairs, self.image_config = pairs, image_config
        self.reference: torch.Tensor | None = None  # [P, 2] summed log-probs of (chosen, rejected)

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.seq_len}".encode())
        for c, r in self.pairs:
            h.update(np.asarray(c.ids + [-1] + r.ids + [-2], dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        examples = [ex for i in indices for ex in self.pairs[i]]
        width = min(self.seq_len, max(len(ex.ids) for ex in examples))
        rows = []
        for ex in examples:
            ids, mask = ex.ids[:width], ex.loss_mask[:width]
            n = len(ids)
            tokens = np.zeros(width, dtype=np.int64)
            labels = np.full(width, IGNORE, dtype=np.int64)
            tokens[:n] = ids
            labels[:n - 1] = np.where(np.array(mask[1:], dtype=bool), np.array(ids[1:], dtype=np.int64), IGNORE)
            rows.append({"tokens": tokens, "labels": labels, "positions": np.arange(width),
                         "doc_ids": np.where(np.arange(width) < n, 0, -1), "images": ex.images})
        out = collate(rows, self.image_config)
        if self.reference is not None:
            out["ref_logps"] = self.reference[indices].reshape(-1)  # [2B]: chosen, rejected, chosen, ...
        return out


class DPOTrainer(SFTTrainer):
    """SFT's trainer on preference pairs with the DPO loss against cached reference log-probs."""

    cfg: DPORunConfig
    kind = "preference"
    json_metrics = ("reward_accuracy", "reward_margin", "eval_reward_accuracy", "eval_reward_margin")

    def _loader_of(self, pairs: list[tuple[Example, Example]]) -> PairLoader:
        d = self.cfg.data
        return PairLoader(pairs, d.seq_len, d.batch_size, d.seed, self.image_config)

    def describe(self) -> str:
        held = f", {len(self.eval_loader.pairs)} held out" if self.eval_loader else ""
        return f"{self.examples} preference pairs{held}, beta {self.cfg.dpo.beta}"

    def _model(self, ckpt: Path | None) -> Transformer:
        model = super()._model(ckpt)
        self._reference(model, ckpt)
        return model

    def _reference(self, model: Transformer, ckpt: Path | None) -> None:
        """Every loader's reference log-probs: from the cache when it matches the pairs, else computed with
        ``model`` before it trains (on a resume, with the initial weights loaded into it first)."""
        path = self.out / REFERENCE_FILE
        loaders = {"train": self.loader, "eval": self.eval_loader}
        key = {name: loader.fingerprint() for name, loader in loaders.items() if loader is not None}
        cached = torch.load(path, weights_only=True) if path.is_file() else None
        if cached is None or cached.get("key") != key:
            if ckpt is not None:  # the model is a fresh shell here; the checkpoint is loaded after
                from herd import checkpoint

                plain = checkpoint.load(self.init, dtype=torch.float32).state_dict()
                model.load_state_dict(plain, strict=False)
            cached = {"key": key, **{name: self._logps(model, loader) for name, loader in loaders.items()
                                     if loader is not None}}
            if self.world.main:
                self.out.mkdir(parents=True, exist_ok=True)
                torch.save(cached, path)
        for name, loader in loaders.items():
            if loader is not None:
                loader.reference = cached[name]

    @torch.no_grad()
    def _logps(self, model: Transformer, loader: PairLoader) -> torch.Tensor:
        """[P, 2] summed completion log-probs of every pair under ``model`` (every rank computes them all: the
        model is not sharded yet)."""
        was_training = model.training
        model.eval()
        out = []
        for batch in loader.epoch_batches():
            with self._autocast():
                logits = model(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"],
                               pixel_values=batch.get("pixel_values"))
            out.append(completion_logps(logits, batch["targets"], batch["loss_mask"])[0].view(-1, 2))
        model.train(was_training)
        return torch.cat(out)

    def _pairs(self, batch: dict[str, torch.Tensor], training: bool
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
        """This rank's share of the DPO loss of a global batch, its metrics' shares, and the router logits."""
        n_pairs = batch["tokens"].shape[0] // 2
        chosen_tokens = float(batch["loss_mask"][0::2].sum())
        batch = rank_rows(batch, self.world.rank, self.world.size)  # whole pairs: 2 * batch_size / ranks rows
        with self._autocast():
            logits, router_logits = self.model(batch["tokens"], positions=batch["positions"],
                                               doc_ids=batch["doc_ids"], return_router_logits=True,
                                               pixel_values=batch.get("pixel_values"))
        loss, parts = pair_loss(logits, batch, self.cfg.dpo, n_pairs, chosen_tokens)
        if training and router_logits and self.aux_coef:
            aux = load_balancing_loss(router_logits, self.model.cfg.n_experts, self.model.cfg.top_k) / self.world.size
            loss = loss + self.aux_coef * aux
            parts["aux"] = aux.detach()
        return loss, parts, router_logits

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
        return self._pairs(batch, training=True)

    @torch.no_grad()
    def eval_metrics(self) -> dict[str, float]:
        """Loss, reward accuracy and margin over every held-out pair."""
        if self.eval_loader is None:
            return {}
        self.model.eval()
        sums, n = {}, 0
        for batch in self.eval_loader.epoch_batches():
            pairs = batch["tokens"].shape[0] // 2
            if pairs % self.world.size:
                continue  # a short last batch that does not split over the ranks
            loss, parts, _ = self._pairs(batch, training=False)
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(self.world.sum_(v.detach().clone())) * pairs
            n += pairs
        self.model.train()
        return {f"eval_{k}": v / max(n, 1) for k, v in sums.items() if k in ("loss", "reward_accuracy",
                                                                          "reward_margin")}


def dpo(cfg: DPORunConfig, resume: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """``herd dpo``: run(DPOTrainer)."""
    return run(DPOTrainer(cfg, resume=resume, progress=progress))

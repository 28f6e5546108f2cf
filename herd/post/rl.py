"""Online RL on verifiable tasks: ``herd rl MODEL_DIR --tasks SPEC[,SPEC] --out OUT_DIR``.

Each step: take ``prompts_per_step`` task items (herd.post.tasks) from the round's pool, sample ``group_size``
answers to each with the policy's current weights (herd's engine on a copy of the policy, updated in place after
every optimizer step), score them with the task's verifier, and train on the groups with the GRPO-family loss
(herd.post.grpo: group-normalised advantages, clipped ratio, token-level aggregation, optional k3 KL). A group
whose answers all score alike has no advantage: it is dropped and the step draws more prompts instead, so it
never reaches the loss.

Continuous difficulty filtering (the seeds' "train, keep the prompts of medium or higher difficulty with the
model, train again"): a round starts by drawing ``pool_size`` candidate items (task weights ``task_weights``) and
estimating each one's pass rate with ``filter_samples`` answers of the current policy; the round serves the
items with a pass rate in (0, tau] (solved sometimes, not always), and when they run out the next round
re-estimates on fresh candidates with the improved policy. Each prompt gets a system instruction drawn from
``system_prompts`` (an item that brings its own system message keeps it).

The trainer is the pretraining one (herd.post.sft's subclass): LoRA or full weights, FSDP2 (+ EP for full
weights), checkpoints with exact resume (the round's pool and queue live in the loader state; sampling seeds
follow the step), metrics.jsonl / TensorBoard, a progress bar. OUT_DIR ends as an HF model directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from herd.errors import ConfigError
from herd.eval.tasks import Graded, engine_completer, grade, summarise
from herd.infer.sampling import SamplingParams
from herd.model.transformer import Transformer
from herd.post.grpo import GRPOSpec, group_advantages, grpo_loss
from herd.post.rollout_pipeline import RolloutPipeline
from herd.post.sft import PostRunConfig, SFTTrainer, post_config, run
from herd.post.tasks import Item, Task, get_task
from herd.train.distributed import rank_rows
from herd.train.losses import load_balancing_loss

ROLLOUTS_FILE = "rollouts.pt"  # in a checkpoint: the batches made ahead of the trainer (herd.post.rollout_pipeline)
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer the question. Be brief.",
                  "You are a careful assistant: check your answer before you give it.",
                  "Reply with the answer only."]


@dataclass
class RLSpec:
    tasks: list[str] = field(default_factory=list)  # task specs (herd.post.tasks): names or JSONL files
    task_weights: list[float] = field(default_factory=list)  # sampling weight per task; none: equal
    group_size: int = 8  # answers per prompt (G)
    prompts_per_step: int = 4  # groups per optimizer step
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    difficulty: int | None = None  # one level only (default: the tasks cycle through theirs)
    pass_threshold: float = 1.0  # the score that counts as solved
    filter: bool = True  # continuous difficulty filtering; False: every candidate is served
    pool_size: int = 32  # candidates per round
    filter_samples: int = 4  # answers per candidate for its pass-rate estimate (k)
    tau: float = 0.75  # keep candidates with pass rate in (0, tau]
    system_prompts: list[str] = field(default_factory=lambda: list(SYSTEM_PROMPTS))
    heldout: int = 32  # held-out items (their own seed) for heldout_pass@1, greedy
    max_refills: int = 8  # draws of more prompts per step when groups keep being dropped
    lag: int = 1  # rollouts of step k use the weights after step k - lag, made while training runs; 0 = in turn
    dtype: str = "auto"  # the saved model's dtype


@dataclass
class RLRunConfig(PostRunConfig):
    rl: RLSpec = field(default_factory=RLSpec)
    grpo: GRPOSpec = field(default_factory=GRPOSpec)
    section = "rl"
    default_lr = (1e-6, 1e-5)  # (full, LoRA): TRL's GRPO default, and ten times it for adapters
    train_defaults = {"log_every": 1, "eval_every": 50}  # a reward per step

    def check_data(self) -> None:
        r = self.rl
        if not r.tasks:
            raise ConfigError("no tasks: give --tasks SPEC[,SPEC] (or [rl] tasks = [...])")
        if r.task_weights and (len(r.task_weights) != len(r.tasks) or min(r.task_weights) <= 0):
            raise ConfigError(f"rl.task_weights must give one positive weight per task ({len(r.tasks)}), "
                              f"got {r.task_weights}")
        for name in ("group_size", "prompts_per_step", "pool_size", "filter_samples", "max_new_tokens"):
            if getattr(r, name) < (2 if name in ("group_size", "filter_samples") else 1):
                raise ConfigError(f"rl.{name} is too small: {getattr(r, name)}")
        if r.lag < 0:
            raise ConfigError(f"rl.lag must be >= 0 steps (0 = synchronous), got {r.lag}")
        if not 0 < r.tau <= 1:
            raise ConfigError(f"rl.tau must be in (0, 1], got {r.tau}")
        if r.temperature <= 0:
            raise ConfigError("rl.temperature must be > 0: a group of greedy answers has no spread")
        if self.train.steps < 1:
            raise ConfigError("give the number of RL steps (--steps N)")
        if self.train.grad_accum != 1:
            raise ConfigError("train.grad_accum: an RL step trains on its rollout batch in one pass (set it to 1)")
        if self.lora.rank < 0 or (self.lora.rank and self.train.ep > 1):
            raise ConfigError("lora.rank must be >= 0, and LoRA does not run with expert parallelism")


def rl_config(model_dir, tasks: list[str], out, group_size: int | None = None, **kw: Any) -> RLRunConfig:
    """``herd rl``'s run config (post_config's keywords, and ``group_size``)."""
    if group_size is not None:
        kw["overrides"] = [*kw.get("overrides", ()), "--rl.group_size", str(group_size)]
    return post_config(RLRunConfig, model_dir, {"tasks": list(tasks)}, out, **kw)


class Rollouts:
    """The RL data source behind the trainer's loader (herd.post.rollout_pipeline): rounds of filtered prompts,
    groups of sampled answers, and the batches built from them. ``llm`` (herd.api.LLM on the rollout copy of the
    policy) is attached by the trainer once the policy exists; the pipeline sets its weights before each batch."""

    def __init__(self, spec: RLSpec, seed: int, max_len: int, scale_rewards: str = "group"):
        self.spec, self.seed, self.max_len, self.scale_rewards = spec, seed, max_len, scale_rewards
        self.tasks: dict[str, Task] = {s: get_task(s) for s in spec.tasks}
        self.weights = np.array(spec.task_weights or [1.0] * len(self.tasks), dtype=float)
        self.llm = None
        self.step, self.round, self.queue = 0, -1, []  # queue: indices into the round's pool
        self.pool: list[Item] = []
        self.last: dict[str, float] = {}  # the metrics of the latest rollout batch (and round)
        self.totals = {"groups_kept": 0, "groups_dropped": 0}
        self.idle, self.warned = False, False  # idle: the latest batch has no group to learn from

    # -- prompts ----------------------------------------------------------------------------------------------
    def candidates(self, round_: int) -> list[Item]:
        """The round's pool: items drawn from the tasks by weight, each with a system instruction (seeded by the
        round, so a resumed run draws the same)."""
        rng = random.Random(f"{self.seed}/round/{round_}")
        names = list(self.tasks)
        picks = rng.choices(range(len(names)), weights=self.weights.tolist(), k=self.spec.pool_size)
        items = []
        for t in range(len(names)):
            n = picks.count(t)
            if n:
                made = self.tasks[names[t]].items(n, self.spec.difficulty, seed=self.seed * 1_000_003 + round_)
                items += [self._with_system(item, names[t], rng) for item in made]
        rng.shuffle(items)
        return items

    def _with_system(self, item: Item, spec: str, rng: random.Random) -> Item:
        prompt = item.prompt
        if self.spec.system_prompts and prompt[0].get("role") != "system":
            prompt = [{"role": "system", "content": rng.choice(self.spec.system_prompts)}, *prompt]
        return dataclasses.replace(item, prompt=prompt, meta={**item.meta, "spec": spec})

    def _new_round(self) -> None:
        self.round += 1
        self.pool = self.candidates(self.round)
        order = list(range(len(self.pool)))
        kept = order
        if self.spec.filter:
            graded = self._sample(self.pool, self.spec.filter_samples, f"filter/{self.round}")
            rates = [sum(s >= self.spec.pass_threshold for s in g.scores) / len(g.scores) for g in graded]
            kept = [i for i in order if 0 < rates[i] <= self.spec.tau]
            self.last |= {"round": self.round, "round_kept": len(kept), "round_kept_fraction": len(kept) / len(rates),
                          "round_too_hard": rates.count(0.0),
                          "round_too_easy": sum(r > self.spec.tau for r in rates),
                          "round_pass_rate": sum(rates) / len(rates)}
        self.queue = kept

    def _take(self, n: int) -> list[Item]:
        out = []
        for _ in range(4):  # a round may keep nothing (all too hard or too easy): try a few fresh ones
            while self.queue and len(out) < n:
                out.append(self.pool[self.queue.pop(0)])
            if len(out) == n:
                return out
            self._new_round()
        if not out:  # nothing in (0, tau]: serve this round's candidates as they are
            warnings.warn(f"difficulty filtering kept no prompt in 4 rounds of {self.spec.pool_size}: every "
                          f"candidate's pass rate is 0 or above tau={self.spec.tau} (round_* metrics); serving "
                          f"round {self.round} unfiltered", stacklevel=2)
            self.queue = list(range(len(self.pool)))
            out = [self.pool[self.queue.pop(0)] for _ in range(min(n, len(self.pool)))]
        return out
        return out

    # -- answers ----------------------------------------------------------------------------------------------
    def _params(self, stream: str) -> SamplingParams:
        """Rollout sampling, seeded per purpose (``stream``), with the sampled tokens' log-probs."""
        s = self.spec
        return SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                              seed=_seed(self.seed, stream), logprobs=0)

    def _sample(self, items: list[Item], samples: int, stream: str) -> list[Graded]:
        complete = engine_completer(self.llm, self._params(stream))
        tasks = {"items": _Fixed(items, self.tasks)}
        return grade(complete, tasks, len(items), samples, batch=max(len(items) * samples, 1), progress=False)["items"]

    def produce(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Step ``step``'s batch with the engine's current weights: G answers to each of ``prompts_per_step``
        prompts, zero-advantage groups replaced by fresh prompts, padded: tokens, targets, loss_mask (answer
        tokens), positions, doc_ids, advantages, rollout_logps (the sampler's log-probs of the answer tokens),
        pixel_values for image prompts. Then (metrics, idle, the rollout state after it)."""
        s, start = self.spec, time.perf_counter()
        self.step = step
        groups, dropped, sampled, all_rewards = [], 0, 0, []
        if self.round < 0:
            self._new_round()
        for attempt in range(s.max_refills):
            need = s.prompts_per_step - len(groups)
            items = self._take(need)
            found = self._generate(items, f"step/{self.step}/{attempt}")
            sampled += sum(len(ids) for g in found for ids in g["answers"])
            for g in found:
                all_rewards += g["rewards"]
                if max(g["rewards"]) - min(g["rewards"]) > 0:
                    groups.append(g)
                else:
                    dropped += 1
            if len(groups) == s.prompts_per_step:
                break
        self.idle = not groups
        if self.idle:  # solved (or hopeless): the step keeps its place, the weights stay as they are
            if not self.warned:
                warnings.warn(f"step {self.step}: every group of {s.group_size} answers scored alike in "
                              f"{s.max_refills} draws (reward {sum(all_rewards) / len(all_rewards):.2f}): nothing to "
                              f"learn from, so the step does not update the weights (metric groups = 0)",
                              stacklevel=2)
                self.warned = True
            groups = found[:1]
        self.totals["groups_kept"] += 0 if self.idle else len(groups)
        self.totals["groups_dropped"] += dropped
        rewards = torch.tensor([r for g in groups for r in g["rewards"]])
        lengths = [len(a) for g in groups for a in g["answers"]]
        # reward: every answer sampled this step, the dropped groups' too (the policy's reward on what it was
        # asked); reward_trained: the groups that reach the loss
        self.last |= {"reward": sum(all_rewards) / len(all_rewards), "reward_trained": float(rewards.mean()),
                      "groups_dropped": dropped, "groups": 0 if self.idle else len(groups),
                      "groups_dropped_fraction": dropped / (dropped + (0 if self.idle else len(groups))),
                      "response_length": sum(lengths) / len(lengths),
                      "rollout_tokens_per_s": sampled / (time.perf_counter() - start),
                      "groups_kept_total": self.totals["groups_kept"],
                      "groups_dropped_total": self.totals["groups_dropped"]}
        self.step += 1
        batch = self._batch(groups)
        return batch, {"metrics": dict(self.last), "idle": self.idle, "state": self.state_dict()}

    def _generate(self, items: list[Item], stream: str) -> list[dict]:
        s, params = self.spec, self._params(stream)
        ids, pixels = [], []
        for item in items:
            p, px = self.llm.chat_inputs(item.prompt)
            ids += [p] * s.group_size
            pixels += [px] * s.group_size
        done = self.llm.engine.generate(ids, params, pixels)
        out = []
        for i, item in enumerate(items):
            group = done[i * s.group_size:(i + 1) * s.group_size]
            task = self.tasks[item.meta["spec"]]
            rewards = [min(1.0, max(0.0, float(task.score(item, c.text)))) for c in group]
            out.append({"prompt": ids[i * s.group_size], "pixels": pixels[i * s.group_size],
                        "answers": [c.token_ids for c in group], "rewards": rewards,
                        "logps": [[t.logprob for t in c.logprobs] for c in group]})
        return out

    def _batch(self, groups: list[dict]) -> dict[str, torch.Tensor]:
        rows = [(g["prompt"], a, lp, g["pixels"]) for g in groups for a, lp in zip(g["answers"], g["logps"])]
        width = min(self.max_len, max(len(p) + len(a) for p, a, _, _ in rows))
        n = len(rows)
        tokens = torch.zeros(n, width, dtype=torch.long)
        targets = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.bool)
        rollout = torch.zeros(n, width)
        doc_ids = torch.full((n, width), -1, dtype=torch.long)
        for r, (prompt, answer, logps, _) in enumerate(rows):
            seq = (prompt + answer)[:width]
            tokens[r, :len(seq)] = torch.tensor(seq)
            doc_ids[r, :len(seq)] = 0
            targets[r, :len(seq) - 1] = torch.tensor(seq[1:])
            # position t predicts token t + 1: the answer's tokens are predicted from len(prompt) - 1 on
            lo, hi = len(prompt) - 1, min(len(seq) - 1, len(prompt) - 1 + len(answer))
            mask[r, lo:hi] = True
            rollout[r, lo:hi] = torch.tensor(logps[:hi - lo])
        rewards = torch.tensor([x for g in groups for x in g["rewards"]])
        batch = {"tokens": tokens, "targets": targets, "loss_mask": mask, "doc_ids": doc_ids,
                 "positions": torch.arange(width).expand(n, width).clone(), "rollout_logps": rollout,
                 "advantages": group_advantages(rewards, self.spec.group_size, self.scale_rewards)}
        pixels = [px for _, _, _, px in rows if px is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "step": self.step, "round": self.round, "queue": list(self.queue),
                "totals": dict(self.totals), "tasks": list(self.tasks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("tasks") != list(self.tasks):
            raise ValueError(f"the run was started on tasks {state.get('tasks')}, not {list(self.tasks)}")
        self.step, self.round = int(state["step"]), int(state["round"])
        self.totals = dict(state["totals"])
        self.pool = self.candidates(self.round) if self.round >= 0 else []
        self.queue = list(state["queue"])


class _Fixed:
    """A fixed list of items posing as a task for herd.eval.tasks.grade; scores with each item's own task."""

    def __init__(self, items: list[Item], tasks: dict[str, Task]):
        self._items, self._tasks = items, tasks

    def items(self, n: int, difficulty: int | None = None, seed: int = 0) -> list[Item]:
        return self._items[:n]

    def score(self, item: Item, completion: str) -> float:
        return self._tasks[item.meta["spec"]].score(item, completion)


def _seed(base: int, stream: str) -> int:
    """A sampling seed per (run seed, purpose): the same on a resumed run, different for every draw."""
    return int.from_bytes(hashlib.sha256(f"{base}/{stream}".encode()).digest()[:8], "little")


class RLTrainer(SFTTrainer):
    """The trainer on rollouts: ``loader`` is a Rollouts, the loss GRPO's, and after every optimizer step the
    rollout copy of the policy takes its new weights."""

    cfg: RLRunConfig
    json_metrics = ("heldout_pass@1",)

    def _data(self) -> None:
        rollouts = Rollouts(self.cfg.rl, self.cfg.train.seed, min(self.cfg.data.seq_len, self.model_cfg.max_seq_len),
                            self.cfg.grpo.scale_rewards)
        self.loader = RolloutPipeline(rollouts, self.cfg.rl.lag)
        self.eval_loader = None
        self.eval_sources = True  # evaluation is held-out pass@1 (eval_metrics)
        self.examples = 0
        r = self.cfg.rl
        self.heldout = {s: _HeldOut(t, r.heldout, r.difficulty, self.cfg.train.seed) for s, t in
                        rollouts.tasks.items()}

    def __init__(self, cfg: RLRunConfig, resume: bool = False, progress: bool | None = None):
        super().__init__(cfg, resume=resume, progress=progress)
        from herd.api import LLM

        state = self._policy_state()
        self.rollout_model = Transformer(self.model_cfg)
        self.rollout_model.load_state_dict(state)
        self.loader.rollouts.llm = LLM(self.rollout_model, self.tokenizer)
        self.loader.publish(self.step, state)
        if self.resumed_from is not None and (self.resumed_from / ROLLOUTS_FILE).is_file():
            self.loader.restore(torch.load(self.resumed_from / ROLLOUTS_FILE, weights_only=False))

    def describe(self) -> str:
        r = self.cfg.rl
        filt = f"filtered to pass rate (0, {r.tau}] in rounds of {r.pool_size}" if r.filter else "unfiltered"
        return (f"{len(r.tasks)} tasks ({', '.join(r.tasks)}), {r.prompts_per_step} prompts x {r.group_size} answers "
                f"per step, {filt}")

    def _policy_state(self) -> dict[str, torch.Tensor]:
        """The policy as a plain model's full state dict (LoRA folded in), copied: the rollout weights."""
        # every rank runs its own rollout engine, so every rank needs the full weights (cpu_offload: rank 0 only)
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().clone() for k, v in self._plain_state(full).items()}

    def train_step(self, expert_metrics: bool = True) -> dict[str, Any]:
        start = time.perf_counter()
        metrics = super().train_step(expert_metrics)
        self.loader.publish(self.step, self._policy_state())
        step_time = time.perf_counter() - start
        trained = self._trained_tokens / max(step_time - self.loader.last["rollout_wait_s"], 1e-9)
        return metrics | self.loader.last | {"step_time_s": step_time, "train_tokens_per_s": trained,
                                             "step_tokens": int(self._trained_tokens)}

    def fit(self) -> dict[str, Any]:
        try:
            return super().fit()
        finally:
            self.loader.close()

    def _checkpoint_files(self) -> dict[str, Any]:
        pending = self.loader.pending()
        return {ROLLOUTS_FILE: pending} if pending else {}

    def _update_ok(self) -> bool:
        return not self.loader.idle

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
        n_tokens, n_seqs = float(batch["loss_mask"].sum()), batch["tokens"].shape[0]
        batch = rank_rows(batch, self.world.rank, self.world.size)
        with self._autocast():
            logits, router_logits = self.model(batch["tokens"], positions=batch["positions"],
                                               doc_ids=batch["doc_ids"], return_router_logits=True,
                                               pixel_values=batch.get("pixel_values"))
        logp_BTV = logits.float().log_softmax(-1)
        logps_BT = logp_BTV.gather(-1, batch["targets"][..., None]).squeeze(-1)
        self._trained_tokens = n_tokens
        # one optimizer step per rollout batch: the policy that sampled is the one trained (old = current,
        # detached); the sampler's own log-probs weight the tokens (truncated IS) when they differ
        loss, parts = grpo_loss(logps_BT, None, batch["advantages"], batch["loss_mask"], self.cfg.grpo,
                                rollout_logps_BT=batch["rollout_logps"], n_tokens=n_tokens, n_seqs=n_seqs,
                                max_completion_length=self.cfg.rl.max_new_tokens)
        with torch.no_grad():  # the policy's entropy on the answer tokens: a collapse shows here first
            mask = batch["loss_mask"].float()
            parts["entropy"] = (-(logp_BTV.exp() * logp_BTV).sum(-1) * mask).sum() / max(n_tokens, 1.0)
        if router_logits and self.aux_coef:
            aux = load_balancing_loss(router_logits, self.model.cfg.n_experts, self.model.cfg.top_k) / self.world.size
            loss = loss + self.aux_coef * aux
            parts["aux"] = aux.detach()
        return loss, parts, router_logits

    @torch.no_grad()
    def eval_metrics(self) -> dict[str, float]:
        """Held-out pass@1: greedy answers to items of the run's tasks drawn with their own seed."""
        params = SamplingParams(max_new_tokens=self.cfg.rl.max_new_tokens, temperature=0.0)
        llm = self.loader.rollouts.llm
        with self.loader.lock:  # the rollout thread's engine: set the current weights, then take turns
            llm.engine.update_weights(self._policy_state())
            graded = grade(engine_completer(llm, params), self.heldout, self.cfg.rl.heldout, progress=False)
        return {"heldout_pass@1": summarise(graded, k=1, threshold=self.cfg.rl.pass_threshold)["pass@1"]}


class _HeldOut:
    """A task's held-out items: drawn with a seed no round uses (rounds seed from the run seed upwards)."""

    def __init__(self, task: Task, n: int, difficulty: int | None, seed: int):
        self.task, self._items = task, task.items(n, difficulty, seed=2**31 + seed)

    def items(self, n: int, difficulty: int | None = None, seed: int = 0) -> list[Item]:
        return self._items[:n]

    def score(self, item: Item, completion: str) -> float:
        return self.task.score(item, completion)


def rl(cfg: RLRunConfig, resume: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """``herd rl``: train and export; the ``--json`` object: out, steps, reward_first, reward_last,
    heldout_pass@1_before, heldout_pass@1_after."""
    trainer = RLTrainer(cfg, resume=resume, progress=progress)
    before = trainer.eval_metrics()["heldout_pass@1"] if not resume or trainer.step == 0 else None
    result = run(trainer)
    rewards = [r["reward"] for r in _metrics(trainer) if "reward" in r]
    if before is None:  # a resumed run: the first evaluation it logged
        before = next((r["heldout_pass@1"] for r in _metrics(trainer) if "heldout_pass@1" in r), math.nan)
    if not rewards:
        warnings.warn("no step was logged: set train.log_every to see rewards", stacklevel=2)
    after = result["heldout_pass@1"]
    return {"out": result["out"], "steps": result["steps"], "reward_first": rewards[0] if rewards else None,
            "reward_last": rewards[-1] if rewards else None, "heldout_pass@1_before": before,
            "heldout_pass@1_after": trainer.eval_metrics()["heldout_pass@1"] if after is None else after}


def _metrics(trainer: RLTrainer) -> list[dict]:
    path = trainer.out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

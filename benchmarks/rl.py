"""RL step throughput: herd's RLTrainer (synchronous, and asynchronous where herd has it) vs TRL's GRPOTrainer.

    python benchmarks/rl.py                  # fp32, 4 prompts x 8 answers of 64 tokens, 2 warm-up + 6 timed steps
    python benchmarks/rl.py --write          # ... and append the section to benchmarks/RESULTS.md
    python benchmarks/rl.py --prompts 4 --group-size 8 --max-new-tokens 64 --steps 6 --impls herd,trl
    python benchmarks/rl.py --quick          # tiny smoke run (well under a minute); never written to RESULTS.md

One small MoE Llama 4 (width 256, 4 layers, 8 routed experts top-1 + the shared expert on every layer, herd-pico's
6144-id tokenizer, random weights, seed 0) is saved once as an HF directory (herd.checkpoint.save), so both
frameworks start from the same weights, and a JSONL task file is written beside it; both live in
benchmarks/.cache/rl/. The task ("letters"): "Write a few words using only the letters of '<word>'." for 60 words;
the reward is the share of the completion's letters (a-z, case folded) that occur in the word, in [0, 1]
(``letters_reward`` below). It is continuous so that a group of a random model's answers almost never scores
alike: herd drops zero-advantage groups and draws more prompts, TRL trains on them, and a toy 0/1 reward would make
the two do different work. herd scores it as a JSONL task with ``reward=rl_bench:letters_reward``, TRL with a
``reward_funcs`` wrapper around the same function on the decoded completion.

Each run is its own process, so its peak RSS is its own:

  herd        herd.post.rl.RLTrainer, synchronous (--rl.lag 0: each step samples its batch with the current
              weights, then trains on it): prompts from its task rounds with --rl.filter false (TRL has no
              difficulty filtering), each with a system instruction drawn from herd's defaults; answers from herd's
              engine on the rollout copy of the policy, which takes the trainer's weights before it samples;
              zero-advantage groups dropped (and replaced) as always. The timed loop is RLTrainer.train_step (what
              fit() runs, without its logging, evaluation and checkpoints).
  herd-async  the same with herd's asynchronous rollouts (--rl.lag N, --lag; herd's default is 1): the batches of
              the next N steps are sampled on a background thread, with weights N steps old, while the current
              step trains on the same cores. Skipped (and said so) on a herd without rl.lag.
  trl         trl.GRPOTrainer on transformers' Llama4ForCausalLM from the same directory (sdpa attention), rollouts
              by its default path (transformers' generate on the policy itself, left-padded batch), fed the very
              prompts herd served, step by step (the same rounds, in order: shuffle_dataset=False), as conversational
              prompts; its tokenizer gets transformers' Llama 4 chat template, which gives herd's ChatFormat ids
              (checked on every prompt of the run). One generation per optimizer step (steps_per_generation=1,
              num_iterations=1, so no extra old-log-prob forward), no gradient checkpointing (GRPOConfig's default
              is on), no eval, no saving, no logging, report_to none.

Common: fp32 on CPU; group size (num_generations) G, P prompts per step (TRL: per_device_train_batch_size = P * G,
generation batch = the same), max new tokens (max_completion_length), temperature 1, top-p 1, no top-k; loss "dapo"
(token sum / tokens of the batch), epsilon 0.2 / 0.28 (clip-higher), beta 0 (no reference model), group-scaled
advantages; AdamW (torch fused, betas 0.9/0.95, no weight decay), constant lr, gradient clipping at 1.0, MoE
load-balancing loss off. herd weights its loss by truncated importance sampling against its engine's log-probs
(cap 2; ~1 when synchronous: the same weights); TRL without vLLM has no sampler log-probs. Both stop an answer at
any of the model's stop tokens (<|eot|>, <|eom|>, <|end_of_text|>).

Measured per run, over the timed steps (the first --warmup steps are not timed): the wall time of a step (end of
one optimizer step to the end of the next: rollouts + reward + loss + backward + AdamW, and for herd the weight
update of its rollout copy); "rollout tok/s" = the answer tokens sampled / the time spent producing them (herd:
Rollouts._generate, i.e. prompt encoding + engine.generate + scoring; TRL: GRPOTrainer._generate, i.e. chat template
+ generate + decode); "train tok/s" = the answer tokens trained (the loss tokens) / (step time - the time the step
waited for its rollout batch: herd's loader.next_batch, TRL's _generate_and_score_completions); "tok/s" = tokens
trained / step time, end to end. Peak memory is the child's max RSS (ru_maxrss); the RSS after imports, before the
model is built, is reported beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import append_results, section_command  # noqa: E402
from sft import (  # noqa: E402
    Contention,
    _param_counts,
    _peak_gb,
    _rss_gb,
    load_average,
    machine,
    make_model_dir,
    versions,
)

ROOT = Path(__file__).resolve().parents[1]
PICO = ROOT / "models" / "herd-pico"
CACHE = Path(__file__).resolve().parent / ".cache" / "rl"
IMPLS = ("herd", "herd-async", "trl")
REWARD_MODULE = "rl_bench"  # the child registers this script under this name, for herd's reward=MODULE:FUNCTION

# the model: --quick shrinks it
SHAPES = {"default": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8,
                          expert_hidden_dim=512, dense_hidden_dim=1024),
          "quick": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4,
                        expert_hidden_dim=96, dense_hidden_dim=128)}

_WORDS = ("apple bread candle dragon eagle forest garden harbor island jungle kettle lemon mountain needle ocean "
          "pepper quiet river silver tiger umbrella valley window yellow zebra anchor basket castle desert engine "
          "feather glacier hammer insect jacket kitchen ladder marble number orange pencil rocket saddle tunnel "
          "village wagon butter cousin dinner fabric hunter lantern mirror napkin puzzle summer turkey velvet walrus "
          "bucket").split()


# -- inputs -------------------------------------------------------------------------------------------------------
def make_task() -> Path:
    """benchmarks/.cache/rl/letters.jsonl: one record per word; the answer is the word."""
    path = CACHE / "letters.jsonl"
    lines = "".join(json.dumps({"prompt": f"Write a few words using only the letters of '{w}'.", "answer": w}) + "\n"
                    for w in _WORDS)
    if not path.is_file() or path.read_text() != lines:
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(lines)
        tmp.rename(path)
    return path


def task_spec(task: Path) -> str:
    return f"{task}:reward={REWARD_MODULE}:letters_reward"


def letters_reward(prompt, completion: str, answer: str) -> float:
    """The share of the completion's letters that occur in ``answer`` (0 without letters). herd's JSONL reward
    signature: (the record's prompt, the completion's text, the record's answer)."""
    letters = [c for c in completion.lower() if "a" <= c <= "z"]
    return sum(c in answer for c in letters) / len(letters) if letters else 0.0


def _key(messages: list[dict]) -> str:
    return hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]


def async_field() -> str | None:
    """herd's asynchronous-rollout setting (rl.lag: 0 = synchronous), if this herd has one."""
    from herd.post.rl import RLSpec

    return next((f.name for f in dataclasses.fields(RLSpec) if "lag" in f.name), None)


# -- one run, in a child process ---------------------------------------------------------------------------------
def _herd_config(a, model_dir: Path, task: Path, out: Path, lag: int | None = None):
    from herd.post.rl import rl_config

    overrides = ["--rl.prompts_per_step", str(a.prompts), "--rl.max_new_tokens", str(a.max_new_tokens),
                 "--rl.filter", "false", "--rl.temperature", "1.0", "--rl.top_p", "1.0",
                 "--grpo.loss_type", "dapo", "--grpo.epsilon_low", "0.2", "--grpo.epsilon_high", "0.28",
                 "--grpo.beta", "0.0", "--grpo.scale_rewards", "group", "--train.aux_loss_coef", "0",
                 "--train.dtype", "fp32", "--optim.grad_clip", "1.0", "--optim.schedule", "constant",
                 "--optim.weight_decay", "0.0", "--train.tensorboard", "false"]
    if lag is not None:
        overrides += [f"--rl.{async_field()}", str(lag)]
    return rl_config(model_dir, [task_spec(task)], out / "run", steps=a.warmup + a.steps, lr=a.lr,
                     group_size=a.group_size, overrides=overrides)


def served_prompts(a, model_dir: Path, task: Path, n: int) -> list[list[dict]]:
    """The first ``n`` prompts herd's RL run serves, in order (--rl.filter false: its rounds' candidates as drawn,
    system instructions included)."""
    from herd.post.rl import Rollouts

    out = Path(tempfile.mkdtemp(prefix="rl-bench-cfg-"))
    try:
        cfg = _herd_config(a, model_dir, task, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rollouts = Rollouts(cfg.rl, cfg.train.seed, cfg.data.seq_len, cfg.grpo.scale_rewards)
    prompts, round_ = [], 0
    while len(prompts) < n:
        prompts += [item.prompt for item in rollouts.candidates(round_)]
        round_ += 1
    return prompts[:n]


def _summary(impl: str, ends: list[float], steps: list[dict], warmup: int, extra: dict) -> dict:
    """ends: perf_counter at the end of each optimizer step; steps: per step, what the wrappers recorded."""
    if len(ends) != len(steps):
        raise RuntimeError(f"{impl}: {len(ends)} step ends but {len(steps)} steps recorded")
    timed = steps[warmup:]
    seconds = ends[-1] - ends[warmup - 1]
    durations = [b - e for e, b in zip(ends[warmup - 1:], ends[warmup:])]
    total = {k: sum(s.get(k, 0) for s in timed) for k in ("sampled", "gen_s", "trained", "wait_s", "sync_s")}
    return {"impl": impl, "steps": len(timed), "seconds": seconds,
            "median_step_s": sorted(durations)[len(durations) // 2], "step_s": durations,
            "sampled": total["sampled"], "trained": total["trained"], "gen_s": total["gen_s"],
            "wait_s": total["wait_s"], "sync_s": total["sync_s"],
            "rollout_tok_s": total["sampled"] / total["gen_s"],
            "train_tok_s": total["trained"] / (seconds - total["wait_s"]),
            "tok_s": total["trained"] / seconds,
            "rewards": [s.get("reward") for s in steps],
            "prompts": [s.get("prompts", []) for s in steps], **extra}


def run_herd(impl: str, a, model_dir: Path, task: Path, rss0: float) -> dict:
    from herd.post.rl import RLTrainer

    has_lag = async_field() is not None
    if impl == "herd-async" and not has_lag:
        raise SystemExit("herd-async: herd.post.rl.RLSpec has no *lag* field (no asynchronous rollouts yet)")
    lag = (a.lag if impl == "herd-async" else 0) if has_lag else None
    out = Path(tempfile.mkdtemp(prefix="rl-bench-herd-"))
    try:
        cfg = _herd_config(a, model_dir, task, out, lag)
        trainer = RLTrainer(cfg, progress=False)
        pipeline = trainer.loader
        rollouts = getattr(pipeline, "rollouts", pipeline)  # the RolloutPipeline's Rollouts (or the loader itself)
        steps: dict[int, dict] = defaultdict(dict)  # step -> what the wrappers saw; rollouts may run ahead

        def add(step: int, key: str, value: float) -> None:
            steps[step][key] = steps[step].get(key, 0) + value

        generate, next_batch, policy_state = rollouts._generate, pipeline.next_batch, trainer._policy_state

        def timed_generate(items, stream):  # prompt encoding + engine.generate + scoring, on the rollout side
            step, t = rollouts.step, time.perf_counter()  # Rollouts.produce sets .step to the batch's step
            found = generate(items, stream)
            add(step, "gen_s", time.perf_counter() - t)
            add(step, "sampled", sum(len(ids) for g in found for ids in g["answers"]))
            steps[step].setdefault("prompts", [_key(item.prompt) for item in items])  # the step's first draw
            return found

        def timed_next_batch():  # what the trainer waits for its batch (all of its making when synchronous)
            step, t = trainer.step, time.perf_counter()
            batch = next_batch()
            add(step, "wait_s", time.perf_counter() - t)
            add(step, "trained", int(batch["loss_mask"].sum()))
            return batch

        def timed_policy_state():  # the trainer's copy of its weights for the rollout engine (after each step)
            step, t = max(trainer.step - 1, 0), time.perf_counter()
            state = policy_state()
            add(step, "sync_s", time.perf_counter() - t)
            return state

        rollouts._generate, pipeline.next_batch, trainer._policy_state = timed_generate, timed_next_batch, \
            timed_policy_state
        engine = rollouts.llm.engine
        update = engine.update_weights

        def timed_update(state):  # the engine taking those weights, before it samples a batch
            step, t = rollouts.step, time.perf_counter()
            update(state)
            add(step, "sync_s", time.perf_counter() - t)

        engine.update_weights = timed_update
        ends, metrics = [], []
        start = time.perf_counter()
        meter = None
        try:
            while trainer.step < cfg.train.steps:
                m = trainer.train_step(expert_metrics=False)
                ends.append(time.perf_counter())
                metrics.append(m)
                steps[len(ends) - 1]["reward"] = m.get("reward")
                if len(ends) == a.warmup:
                    meter = Contention()
            extra_load = meter.stop()
        finally:
            getattr(pipeline, "close", lambda: None)()  # an asynchronous run has sampled ahead: stop it
        timed = metrics[a.warmup:]

        def median(key: str):
            values = sorted(m[key] for m in timed if key in m)
            return values[len(values) // 2] if values else None

        extra = {"first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"], "setup_s": start - a.t0,
                 "groups_dropped": sum(int(m.get("groups_dropped", 0)) for m in timed),
                 "herd_rollout_tok_s_metric": median("rollout_tokens_per_s"),
                 "herd_step_time_s_metric": median("step_time_s"), "policy_lag": median("policy_lag"),
                 "lag": lag, **extra_load}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return _summary(impl, ends, [steps[i] for i in range(len(ends))], a.warmup,
                    extra | {"rss_imports_gb": rss0, "peak_gb": _peak_gb("cpu")})


def run_trl(impl: str, a, model_dir: Path, task: Path, rss0: float) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, Llama4ForCausalLM, TrainerCallback
    from transformers.models.llama4.processing_llama4 import chat_template
    from trl import GRPOConfig, GRPOTrainer

    from herd.chat import ChatFormat
    from herd.tokenizer import Tokenizer

    G, P = a.group_size, a.prompts
    n_steps = a.warmup + a.steps
    prompts = served_prompts(a, model_dir, task, P * n_steps)
    answers = [_answer(p) for p in prompts]
    dataset = Dataset.from_list([{"prompt": p, "answer": w} for p, w in zip(prompts, answers)])
    chat = ChatFormat(Tokenizer.load(model_dir / "tokenizer.model"))
    model = Llama4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    # Llama4ForCausalLM names its backbone ``model`` but declares base_model_prefix "language_model" (as in the
    # multimodal class), and TRL's fused LM head looks the backbone up by that prefix (see benchmarks/sft.py)
    if model.base_model is model:
        model.base_model_prefix = "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = chat_template  # herd-pico's tokenizer_config has none: transformers' Llama 4 one

    def letters(prompts, completions, answer, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [letters_reward(p, t, w) for p, t, w in zip(prompts, texts, answer)]

    out = Path(tempfile.mkdtemp(prefix="rl-bench-trl-"))
    args = GRPOConfig(
        output_dir=str(out), max_steps=n_steps, per_device_train_batch_size=P * G, num_generations=G,
        steps_per_generation=1, num_iterations=1, gradient_accumulation_steps=1, max_completion_length=a.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0,
        scale_rewards="group", mask_truncated_completions=False, shuffle_dataset=False,
        learning_rate=a.lr, optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, bf16=False, fp16=False,
        gradient_checkpointing=False, router_aux_loss_coef=0.0, save_strategy="no", eval_strategy="no",
        logging_strategy="no", log_completions=False, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        seed=0, use_cpu=True)
    ends: list[float] = []
    steps: list[dict] = []
    meter: list[Contention] = []
    id_mismatches: list[int] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            if len(ends) == a.warmup:
                meter.append(Contention())

    class Timed(GRPOTrainer):
        def _rec(self) -> dict:
            while len(steps) <= self.state.global_step:
                steps.append({})
            return steps[self.state.global_step]

        def _generate(self, prompts):
            t = time.perf_counter()
            result = super()._generate(prompts)
            r = self._rec()
            r["gen_s"] = r.get("gen_s", 0.0) + time.perf_counter() - t
            prompt_ids, completion_ids = result[0], result[1]
            r["sampled"] = r.get("sampled", 0) + sum(len(ids) for ids in completion_ids)
            r.setdefault("prompts", [_key(p) for p in prompts[::G]])
            id_mismatches.extend(i for i, (p, ids) in enumerate(zip(prompts, prompt_ids))
                                 if chat.encode_dialog(p, add_generation_prompt=True) != list(ids))
            return result

        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            batch = super()._generate_and_score_completions(inputs)
            r = self._rec()
            r["wait_s"] = r.get("wait_s", 0.0) + time.perf_counter() - t
            r["trained"] = r.get("trained", 0) + int(batch["completion_mask"].sum())
            return batch

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._rec()["reward"] = float(rewards.float().mean())
            return rewards

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self._rec()["loss"] = float(loss.detach())
            return loss

    try:
        trainer = Timed(model=model, reward_funcs=letters, args=args, train_dataset=dataset,
                        processing_class=tokenizer, callbacks=[StepEnds()])
        start = time.perf_counter()
        trainer.train()
        extra_load = meter[0].stop()
        steps = steps[:len(ends)]
        extra = {"first_loss": steps[0].get("loss"), "last_loss": steps[-1].get("loss"), "setup_s": start - a.t0,
                 "prompt_id_mismatches": len(id_mismatches), "groups_dropped": 0, **extra_load}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return _summary(impl, ends, steps, a.warmup, extra | {"rss_imports_gb": rss0, "peak_gb": _peak_gb("cpu")})


def _answer(prompt: list[dict]) -> str:
    text = prompt[-1]["content"]
    return text[text.index("'") + 1:text.rindex("'")]


def measure_one(a) -> dict:
    sys.modules.setdefault(REWARD_MODULE, sys.modules["__main__"])  # herd's reward=rl_bench:letters_reward
    impl = a.one
    model_dir, task = Path(a.model_dir), Path(a.task)
    if impl.startswith("herd"):
        from herd.post import rl  # noqa: F401  (imports before the baseline RSS)
    else:
        import datasets  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
    rss0 = _rss_gb()
    return (run_herd if impl.startswith("herd") else run_trl)(impl, a, model_dir, task, rss0)


# -- the parent ----------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed RL steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed RL steps before them")
    p.add_argument("--group-size", type=int, default=8, help="answers per prompt (G; TRL's num_generations)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (P; TRL's batch = P x G completions)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap (TRL's max_completion_length)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lag", type=int, default=1, help="herd-async: steps the rollouts may run ahead")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--quick", action="store_true", help="tiny model and settings: a smoke run, never written")
    p.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    p.add_argument("--out", help="also write the section (markdown) to this file")
    p.add_argument("--json", help="write the raw rows to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # impl, in a child process
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.t0, a.argv = time.perf_counter(), sys.argv[1:]
    if a.one:
        print(json.dumps(measure_one(a)))
        return
    if a.quick:
        a.steps, a.warmup, a.group_size, a.prompts, a.max_new_tokens = 2, 1, 4, 2, 8
    if a.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (the first step builds the optimizer state and kernels)")
    impls = [i for i in a.impls.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown --impls {sorted(unknown)}; choose from {', '.join(IMPLS)}")
    notes = []
    if "herd-async" in impls and async_field() is None:
        impls.remove("herd-async")
        notes.append("herd-async not measured: herd.post.rl has no asynchronous rollouts (no rl.*lag* setting) yet")
        print("note:", notes[-1], file=sys.stderr)
    shape = "quick" if a.quick else "default"
    model_dir, task = make_model_dir(CACHE, shape, SHAPES[shape]), make_task()
    load0 = load_average()
    busy = load0 > 1.5
    print(f"load average at start: {load0:.2f}{'  (machine busy)' if busy else ''}", flush=True)
    rows: dict[str, dict] = {}
    for impl in impls:
        cmd = [sys.executable, __file__, "--one", impl, "--model-dir", str(model_dir), "--task", str(task),
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--group-size", str(a.group_size),
               "--prompts", str(a.prompts), "--max-new-tokens", str(a.max_new_tokens), "--lr", str(a.lr),
               "--lag", str(a.lag)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            print(out.stdout[-2000:], out.stderr[-6000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"{impl} failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows[impl] = r
        print(f"{impl:10s} median step {r['median_step_s']:.2f} s  rollout {r['rollout_tok_s']:8.1f} tok/s  "
              f"train {r['train_tok_s']:8.1f} tok/s  end-to-end {r['tok_s']:7.1f} tok/s  "
              f"(rollout wait {r['wait_s'] / r['steps']:.2f} s/step, sync {r['sync_s'] / r['steps']:.3f} s/step)  "
              f"sampled/step {r['sampled'] / r['steps']:.0f}  peak {r['peak_gb']:.2f} GB "
              f"(after imports {r['rss_imports_gb']:.2f})  reward {_fmt(r['rewards'][0])} -> {_fmt(r['rewards'][-1])}"
              f"  others {r['others_cores']:.2f} cores, steal {r['steal_cores']:.2f}", flush=True)
    others = max(max(r["others_cores"], r["steal_cores"]) for r in rows.values())
    busy = busy or others > 0.25
    if busy:
        print(f"machine busy: load average {load0:.2f} at start, other processes / steal up to {others:.2f} cores "
              "during the timed steps; rerun when quiet", file=sys.stderr)
    for impl, r in rows.items():
        if r["groups_dropped"]:  # herd then sampled more answers than TRL for the same step, and trained fewer
            notes.append(f"{impl} dropped {r['groups_dropped']} zero-advantage groups in the timed steps (and sampled "
                         f"replacements)")
            print("note:", notes[-1], file=sys.stderr)
    problems = check(a, rows)
    for msg in problems:
        print("WARNING:", msg, file=sys.stderr)
    section = render(a, rows, model_dir, load0, others, busy, problems, notes)
    print("\n" + section)
    if a.out:
        Path(a.out).write_text(section)
    if a.json:
        Path(a.json).write_text(json.dumps(list(rows.values()), indent=1) + "\n")
    if a.write:
        if a.quick or busy or problems:
            why = "a --quick run" if a.quick else "the machine was busy" if busy else "the checks failed"
            print(f"not appended to RESULTS.md: {why}", file=sys.stderr)
        else:
            append_results(section)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def check(a, rows: dict[str, dict]) -> list[str]:
    """Both sides must be fed the same prompts, step by step, as the same ids, and train every group."""
    problems = []
    trl = rows.get("trl")
    if trl and trl["prompt_id_mismatches"]:
        problems.append(f"TRL's chat template gave other prompt ids than herd's ChatFormat on "
                        f"{trl['prompt_id_mismatches']} prompts")
    for impl, r in rows.items():
        if impl.startswith("herd") and trl and r["prompts"][:len(trl["prompts"])] != trl["prompts"]:
            problems.append(f"{impl} and TRL were served different prompts")
    return problems


def render(a, rows, model_dir: Path, load0: float, others: float, busy: bool, problems: list[str],
           notes: list[str]) -> str:
    from herd.config import load_config

    cfg = load_config(model_dir)
    cmd = section_command("rl.py", a.argv)
    total = sum(_param_counts(model_dir).values())
    lag = (f"; herd-async: --rl.lag {a.lag}, the next {a.lag} step(s)' batches sampled on a background thread "
           f"with weights {a.lag} step(s) old while a step trains on the same cores (its rollout and train tok/s are "
           f"measured while the other runs)") if "herd-async" in rows else ""
    lines = [f"### RL step throughput, herd vs TRL GRPOTrainer ({a.prompts} prompts x {a.group_size} answers of "
             f"<= {a.max_new_tokens} tokens) — {date.today()} — {machine()}", "", f"Command: `{cmd}`", "",
             f"{versions()}. Model: {cfg.n_layers} layers, width {cfg.dim}, {cfg.n_heads}/{cfg.n_kv_heads} heads of "
             f"{cfg.head_dim}, {cfg.n_experts} routed experts top-{cfg.top_k} (FFN {cfg.expert_hidden_dim}) + shared "
             f"expert on every layer, vocab {cfg.vocab_size} (herd-pico's tokenizer); {total / 1e6:.1f}M parameters, "
             f"random weights (one HF directory both load), fp32. Task: {len(_WORDS)} prompts \"Write a few words "
             f"using only the letters of '<word>'.\" (+ herd's system instructions), reward = share of the answer's "
             f"letters found in the word (continuous, so groups almost never tie); both sides get the same prompts "
             f"step by step, as the same token ids (Llama 4 chat template). herd: --rl.filter false (TRL has no "
             f"filtering), --rl.lag 0 (synchronous), zero-advantage groups dropped and replaced as always, the "
             f"weight copy to its rollout engine counted as weight sync{lag}; TRL: its default rollouts "
             f"(transformers generate on the policy), one generation per step, no gradient checkpointing. Both: "
             f"temperature 1, loss dapo, epsilon 0.2/0.28, beta 0, lr {a.lr:g} constant, AdamW (fused), clip 1.0, no "
             f"aux loss. {a.warmup} warm-up + {a.steps} timed steps. Step = wall time from one optimizer step's end "
             f"to the next (rollouts included); rollout tok/s = answer tokens sampled / time producing them (prompt "
             f"encoding, generation, decoding); train tok/s = answer tokens trained / (step time - time waiting for "
             f"the rollout batch); tok/s = tokens trained / step time; peak = the process's max RSS. Load average "
             f"{load0:.2f} at the start; other processes and steal used at most {others:.2f} cores during any run's "
             f"timed steps{' — machine busy: rerun when quiet' if busy else ''}.", "",
             "| run | median step (s) | step speed-up | rollout tok/s | rollout herd / TRL | train tok/s | "
             "train herd / TRL | tok/s (end to end) | waiting for rollouts (s/step) | weight sync (s/step) | "
             "answer tokens / step | peak RSS (GB) | RSS herd / TRL | reward first → last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    trl = rows.get("trl")
    for impl in IMPLS:
        r = rows.get(impl)
        if r is None:
            continue
        ref = trl if impl != "trl" else None

        def ratio(key: str, bold: bool = False) -> str:
            if ref is None:
                return "(anchor)"
            s = f"{r[key] / ref[key]:.2f}x"
            return f"**{s}**" if bold else s

        speed = "(anchor)" if ref is None else f"**{ref['median_step_s'] / r['median_step_s']:.2f}x**"
        if impl == "herd-async" and "herd" in rows:
            speed += f" ({rows['herd']['median_step_s'] / r['median_step_s']:.2f}x herd sync)"
        sync = "— (generates with the policy)" if impl == "trl" else f"{r['sync_s'] / r['steps']:.3f}"
        lines.append(f"| {impl} | {r['median_step_s']:.2f} | {speed} | {r['rollout_tok_s']:.0f} | "
                     f"{ratio('rollout_tok_s')} | {r['train_tok_s']:.0f} | {ratio('train_tok_s')} | {r['tok_s']:.0f} | "
                     f"{r['wait_s'] / r['steps']:.2f} | {sync} | "
                     f"{r['trained'] / r['steps']:.0f} | {r['peak_gb']:.2f} | {ratio('peak_gb')} | "
                     f"{_fmt(r['rewards'][0])} → {_fmt(r['rewards'][-1])} |")
    if "herd-async" not in rows:
        lines.append("| herd-async | — | | | | | | | | | | | | not measured (left out by --impls) |")
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    if problems:
        lines += ["", "Checks failed: " + "; ".join(problems)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""The seeds' post-training recipe at toy scale: SFT on the hard half before RL, RL with continuous difficulty
filtering, asynchronous rollouts. Writes experiments/results/rl_recipe.json (every run, kept in the repository) and
the tables of docs/rl_recipe.md (the page's text before "## Tables" and from "## Reading" on is kept).

    python experiments/rl_recipe.py                 # ~9 min on 2 CPU cores (5 seeds); resumes where it stopped
    python experiments/rl_recipe.py --seeds 1       # a quick look (~2 min)
    python experiments/rl_recipe.py --report-only   # redraw the tables from the JSON

The task. A ring of 24 words that are one token each for the pico tokenizer (Rome Lear Romeo Kent ... Sirrah):
"What comes after Rome?" -> "Lear", ..., "Sirrah" -> "Rome". Every prompt starts with two filler words
("my the, what comes after Rome?"), so that a fact can be asked in prompts no run trains on:

  train prompts    8 per fact (192): the SFT chats and the RL task (herd rl --tasks rl_train.jsonl)
  held-out prompts 2 per fact (48): filler pairs no train prompt uses; the pass@1 of every table, greedy

Facts 0-11 are "easy" (difficulty 1), facts 12-23 "hard" (difficulty 2); the two halves' answers are disjoint.
The held-out prompts test the facts in new surroundings, not new facts: a memorised ring has nothing else to hold
out.

The model: herd's tiny preset (4 layers of width 64, MoE with 4 experts, 1.2M parameters, pico tokenizer) with
attention chunks of 64 instead of 16, so that the local RoPE layers see the whole prompt (with 16 the question
and the answer fall in different chunks and the facts take ~10x longer to learn).

The runs, per seed s (the model's init, the SFT data order and every RL sampling seed follow s):

  base         the tiny model at init seed s, then herd sft on the easy facts' 96 chats only: the "pretrained"
               model, which knows the easy half and none of the hard half
  sft-all      herd sft base on all 192 chats                                     (claim 1, condition A)
  sft-hard     herd sft base on the same file with --keep 0.5: herd.post.filter rates each chat by the base's own
               pass@4 and keeps the hardest half; the same steps                  (claim 1, condition B)
  rl-all       herd rl sft-all: difficulty filtering on, async (rl.lag 1): herd rl's defaults
  rl-hard      herd rl sft-hard, the same settings                                (claim 1: rl-hard vs rl-all)
  rl-nofilter  herd rl sft-all with --rl.filter false and twice the steps, so that its generated answers pass
               rl-all's (filtering spends pool_size x filter_samples answers per round)
                                                                                  (claim 2: rl-all vs rl-nofilter)
  rl-sync      herd rl sft-all with rl.lag 0 (--sync)                             (claim 3: rl-all vs rl-sync)
  rl-async-2t, rl-sync-2t   the same two at 2 torch threads instead of 1          (claim 3)

The RL runs are herd rl's trainer (herd.post.rl.RLTrainer, run in this process to save each run the start-up)
with one change: its held-out evaluation (every train.eval_every steps, greedy) reads the held-out prompts'
file instead of drawing from the training file, so the curves are on prompts RL never samples. Generated
answers are counted from metrics.jsonl: (groups + groups_dropped) x group_size per step, plus pool_size x
filter_samples per filtering round. Runs go to runs/rl_recipe/ (not kept); a run is recorded in the JSON when it
ends, and a run the JSON holds is not run again (an interrupted one starts over: each takes seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PICO = ROOT / "models" / "herd-pico"
RING = ("Rome Lear Romeo Kent Juliet Nurse Madam Lord Lady Fool Friar Caesar Benvolio Mercutio Master Peace Love "
        "Faith Sweet Welcome Farewell Alas Marry Sirrah").split()
FILLER = ("the a of and to in that is it for with as his be not this but he you my have by will all so from your me "
          "are our what do they we or if no shall would").split()
EASY = 12  # facts 0..11
CHUNK = 64  # the local (RoPE) layers see the whole prompt: the tiny preset's 16 splits question and answer
TRAIN_PROMPTS, HELD_PROMPTS = 8, 2

CONDITIONS = {  # name: (start, overrides after rl_args) -- every RL run shares rl_args' settings
    "rl-all": ("sft-all", []),
    "rl-hard": ("sft-hard", []),
    "rl-nofilter": ("sft-all", ["--rl.filter", "false"]),
    "rl-sync": ("sft-all", ["--rl.lag", "0"]),
    "rl-async-2t": ("sft-all", ["--train.threads", "2"]),
    "rl-sync-2t": ("sft-all", ["--rl.lag", "0", "--train.threads", "2"]),
}


# -- the task -------------------------------------------------------------------------------------------------------
def write_task(d: Path) -> dict[str, Path]:
    """The task's files (fixed: the same for every seed)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random("rl_recipe/task")
    pairs = [(a, b) for a in FILLER for b in FILLER if a != b]
    rng.shuffle(pairs)
    used: set = set()
    rows = {"train": [], "held": []}
    for i, word in enumerate(RING):
        for part, n in (("train", TRAIN_PROMPTS), ("held", HELD_PROMPTS)):
            for _ in range(n):
                pair = pairs.pop()
                while pair in used:
                    pair = pairs.pop()
                used.add(pair)
                rows[part].append({"prompt": f"{pair[0]} {pair[1]}, what comes after {word}?",
                                   "answer": RING[(i + 1) % len(RING)], "difficulty": 1 if i < EASY else 2})
    files = {"sft": d / "sft.jsonl", "warmup": d / "warmup.jsonl", "rl": d / "rl_train.jsonl",
             "held": d / "heldout.jsonl"}

    def chat(r):  # an SFT record that herd.post.filter can grade: "answer" (normalised), "task" as its label
        return {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}],
                "answer": r["answer"], "task": "easy" if r["difficulty"] == 1 else "hard"}

    write_jsonl(files["sft"], [chat(r) for r in rows["train"]])
    write_jsonl(files["warmup"], [chat(r) for r in rows["train"] if r["difficulty"] == 1])
    write_jsonl(files["rl"], rows["train"])
    write_jsonl(files["held"], rows["held"])
    return files


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:  # unchanged files keep their mtime (the filter's reuse key)
        path.write_text(text)


def init_model(d: Path, seed: int) -> Path:
    from herd import checkpoint
    from herd.config import preset
    from herd.model import Transformer
    from herd.tokenizer import Tokenizer

    if (d / "config.json").is_file():
        return d
    tok = Tokenizer.load(PICO / "tokenizer.model")
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, attention_chunk_size=CHUNK, bos_token_id=tok.bos_id,
                                 eos_token_id=(tok.eos_id, tok.eom_id, tok.eot_id), pad_token_id=tok.pad_id)
    torch.manual_seed(seed)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.save(Transformer(cfg), tmp)
    for f in PICO.glob("tokenizer*"):
        shutil.copy(f, tmp / f.name)
    tmp.replace(d)
    return d


# -- runs -----------------------------------------------------------------------------------------------------------
def sft(model: Path, data: Path, out: Path, a: argparse.Namespace, seed: int, steps: int, keep: float | None) -> dict:
    """herd sft MODEL DATA --out OUT --steps N --lr LR --batch-size B --data.seq_len 64 [--keep K] (in process)."""
    from herd.post.sft import SFTTrainer, run, sft_config

    shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts again (they take seconds)
    overrides = ["--data.seq_len", "64", "--train.seed", str(seed), "--data.seed", str(seed),
                 "--train.tensorboard", "false", "--train.threads", str(a.threads), "--train.log_every", "10"]
    if keep is not None:
        overrides += ["--sft.keep", repr(keep)]
    cfg = sft_config(model, [data], out, steps=steps, lr=a.sft_lr, batch_size=a.batch, overrides=overrides)
    start = time.time()
    result = run(SFTTrainer(cfg, progress=False))
    result["seconds"] = time.time() - start
    report = out / "filter" / "report.json"
    if report.is_file():  # which of the kept records were the hard ones (the records' "task" label)
        r = json.loads(report.read_text())
        result["filter"] = {"kept": r["kept"], "total": r["total"], "threshold": r["threshold"],
                            "tasks": {k: {"kept": v["kept"], "total": v["total"]} for k, v in r["tasks"].items()}}
    return result


class HeldOut:
    """The held-out prompts as the RL trainer's evaluation set (RLTrainer.heldout's protocol)."""

    def __init__(self, spec: str):
        from herd.post.tasks import get_task

        self.task = get_task(spec)

    def items(self, n, difficulty=None, seed=0):
        return self.task.items(0)  # all of them

    def score(self, item, completion):
        return self.task.score(item, completion)


def rl(model: Path, files: dict[str, Path], out: Path, a: argparse.Namespace, seed: int, steps: int,
       extra: list[str]) -> dict:
    """herd rl MODEL --tasks rl_train.jsonl --out OUT ... (in process), evaluated on the held-out prompts."""
    from herd.post.rl import RLTrainer, rl_config
    from herd.post.sft import run

    shutil.rmtree(out, ignore_errors=True)
    cfg = rl_config(model, [f"{files['rl']}:matcher=normalised"], out, steps=steps, lr=a.rl_lr,
                    group_size=a.group_size, overrides=[*rl_args(a), "--train.seed", str(seed), *extra])
    load0 = os.getloadavg()[0]
    start = time.time()
    trainer = RLTrainer(cfg, progress=False)
    trainer.heldout = {"heldout": HeldOut(f"{files['held']}:matcher=normalised")}
    before = trainer.eval_metrics()["heldout_pass@1"]
    result = run(trainer)
    seconds = time.time() - start
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve, answers, filter_answers = [{"step": 0, "answers": 0, "heldout_pass@1": before}], 0, 0
    step_rows = []
    for r in rows:
        if "reward" in r:
            answers += (r["groups"] + r["groups_dropped"]) * cfg.rl.group_size
            if cfg.rl.filter:
                filter_answers = (r["round"] + 1) * cfg.rl.pool_size * cfg.rl.filter_samples
            step_rows.append({"step": r["step"], "reward": r["reward"], "answers": answers + filter_answers,
                              "step_time_s": r["step_time_s"], "groups_dropped": r["groups_dropped"],
                              "policy_lag": r["policy_lag"], **({"round_kept": r["round_kept"],
                                                                 "round": r["round"]} if "round" in r else {})})
        if "heldout_pass@1" in r:
            curve.append({"step": r["step"], "answers": answers + filter_answers,
                          "heldout_pass@1": r["heldout_pass@1"]})
    times = [r["step_time_s"] for r in step_rows]
    kept = list({r["round"]: r["round_kept"] for r in rows if "round_kept" in r}.values())  # rounds seen at a step
    return {"idle_steps": sum(r["groups"] == 0 for r in rows if "reward" in r),
            "filter_kept_share": statistics.mean(kept) / cfg.rl.pool_size if kept else None,
            "filter_rounds": max((r["round"] + 1 for r in rows if "round" in r), default=0) if cfg.rl.filter else 0,
            "steps": result["steps"], "seconds": seconds, "load_before": load0, "load_after": os.getloadavg()[0],
            "heldout_before": before, "heldout_after": curve[-1]["heldout_pass@1"],
            "reward_first": step_rows[0]["reward"], "reward_last": step_rows[-1]["reward"],
            "reward_last5": statistics.mean(r["reward"] for r in step_rows[-5:]),
            "answers": answers + filter_answers, "answers_filter": filter_answers,
            "step_time_median": statistics.median(times), "step_time_mean": statistics.mean(times),
            "steps_log": step_rows, "curve": curve}


def rl_args(a: argparse.Namespace) -> list[str]:
    return ["--rl.prompts_per_step", str(a.prompts), "--rl.max_new_tokens", "2", "--rl.pool_size", str(a.pool),
            "--rl.filter_samples", "4", "--rl.tau", "0.75", "--rl.system_prompts", "[]", "--rl.heldout", "48",
            "--data.seq_len", "64", "--train.eval_every", str(a.eval_every), "--train.tensorboard", "false",
            "--train.threads", str(a.threads), "--train.ckpt_every", "1000", *a.rl_extra.split()]


def evaluate(model: Path, files: dict[str, Path]) -> dict:
    """Greedy pass@1 on the held-out prompts (all, easy, hard) and on the train prompts (herd eval tasks)."""
    from herd.api import load
    from herd.eval.tasks import evaluate_tasks

    llm = load(model)
    out = {}
    for name in ("held", "rl"):
        r = evaluate_tasks(llm, [f"{files[name]}:matcher=normalised"], n=1000, max_new_tokens=2)
        t = next(iter(r["tasks"].values()))
        key = "heldout" if name == "held" else "train"
        out |= {key: t["pass@1"], f"{key}_easy": t["by_difficulty"]["1"]["pass@1"],
                f"{key}_hard": t["by_difficulty"]["2"]["pass@1"]}
    return out


# -- the study --------------------------------------------------------------------------------------------------------
def setting_of(a: argparse.Namespace) -> dict:
    return {k: getattr(a, k) for k in ("warmup_steps", "sft_steps", "sft_lr", "batch", "rl_steps", "rl_lr",
                                       "group_size", "prompts", "pool", "eval_every", "threads", "rl_extra")}


def main() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)  # herd rl's notes on empty filter rounds and idle steps
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=200, help="the base's SFT on the easy facts")
    p.add_argument("--sft-steps", type=int, default=80)
    p.add_argument("--sft-lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rl-steps", type=int, default=60, help="RL steps (rl-nofilter: twice as many)")
    p.add_argument("--rl-lr", type=float, default=3e-4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4, help="rl.prompts_per_step")
    p.add_argument("--pool", type=int, default=16, help="rl.pool_size")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rl-extra", default="", help="more herd rl overrides for every RL run (--section.key VALUE ...)")
    p.add_argument("--only", default=None, help="comma-separated run names (base,sft-all,...,rl-sync)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "rl_recipe")
    p.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "rl_recipe.json")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args()
    setting = setting_of(a)
    saved = load_results(a.results)
    if saved.get("runs") and saved.get("setting") != setting:
        if not a.report_only:
            raise SystemExit(f"{a.results} holds runs with other settings ({saved['setting']}): give another "
                             f"--results file for these settings, or --report-only")
        setting = saved["setting"]
    runs: dict = saved.get("runs", {})
    if not a.report_only:
        files = write_task(a.runs / "task")
        only = set(a.only.split(",")) if a.only else None
        host = machine()

        def record(key: str, value: dict) -> None:
            runs[key] = value
            a.results.parent.mkdir(parents=True, exist_ok=True)
            save_results(a.results, {"setting": setting, "machine": host, "runs": runs})
            print(f"[{time.strftime('%H:%M:%S')}] {key}: " + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()
                if not isinstance(v, (list, dict))), flush=True)

        for seed in range(a.seeds):
            d = a.runs / f"seed{seed}"
            want = lambda name: only is None or name in only  # noqa: E731
            if f"{seed}/base" not in runs and want("base"):
                init = init_model(d / "init", seed)
                r = sft(init, files["warmup"], d / "base", a, seed, a.warmup_steps, None)
                record(f"{seed}/base", {**r, **evaluate(d / "base", files)})
            for name, keep in (("sft-all", None), ("sft-hard", 0.5)):
                if f"{seed}/{name}" not in runs and want(name):
                    r = sft(d / "base", files["sft"], d / name, a, seed, a.sft_steps, keep)
                    record(f"{seed}/{name}", {**r, **evaluate(d / name, files)})
            for name, (start, extra) in CONDITIONS.items():
                if f"{seed}/{name}" not in runs and want(name):
                    steps = a.rl_steps * (2 if name == "rl-nofilter" else 1)
                    r = rl(d / start, files, d / name, a, seed, steps, extra)
                    record(f"{seed}/{name}", {**r, "final": evaluate(d / name, files)})
    write_docs(runs, setting, a)


def save_results(path: Path, study: dict) -> None:
    """The JSON, small enough to keep in the repository: floats to 4 significant digits, each run on one line
    with its per-step log as columns."""
    def rounded(x):
        if isinstance(x, float):
            return float(f"{x:.4g}")
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        return [rounded(v) for v in x] if isinstance(x, list) else x

    def columns(run: dict) -> dict:
        log = run.get("steps_log", [])
        keys = list(dict.fromkeys(k for row in log for k in row))
        return {**run, "steps_log": {k: [row.get(k) for row in log] for k in keys}} if log else run

    runs = ",\n".join(f"  {json.dumps(k)}: {json.dumps(rounded(columns(r)))}" for k, r in study["runs"].items())
    head = {k: v for k, v in study.items() if k != "runs"}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(head, indent=1)[:-2] + ',\n "runs": {\n' + runs + "\n }\n}\n")
    tmp.replace(path)


def load_results(path: Path) -> dict:
    if not path.is_file():
        return {}
    study = json.loads(path.read_text())
    for run in study.get("runs", {}).values():
        log = run.get("steps_log")
        if isinstance(log, dict):  # columns -> rows
            run["steps_log"] = [{k: v[i] for k, v in log.items() if v[i] is not None}
                                for i in range(len(next(iter(log.values()))))]
    return study


def machine() -> dict:
    import subprocess

    from herd.info import cpu_name

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"cpu": f"{cpu_name()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "commit": git("rev-parse", "HEAD"), "uncommitted": git("status", "--short", "herd").splitlines()}


# -- the page -------------------------------------------------------------------------------------------------------
def ms(values: list[float], pct: bool = True) -> str:
    """mean ± sample std (n > 1) as text."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    def f(v: float) -> str:
        text = f"{100 * v:.0f}" if pct else f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return "0" if text == "-0" else text

    if len(values) == 1:
        return f(values[0])
    return f"{f(statistics.mean(values))} ± {f(statistics.stdev(values))}"


def write_docs(runs: dict, setting: dict, a: argparse.Namespace) -> None:
    seeds = sorted({int(k.split("/")[0]) for k in runs})

    def get(name, key, sub=None):
        rows = [runs.get(f"{s}/{name}") for s in seeds]
        return [(r[sub] if sub else r)[key] for r in rows if r is not None]

    def diff(n1, n2, key, sub=None, pct=True):
        """The paired difference n1 - n2 over the seeds that have both."""
        both = [s for s in seeds if f"{s}/{n1}" in runs and f"{s}/{n2}" in runs]
        pick = lambda r: r[sub][key] if sub else r[key]  # noqa: E731
        d = [pick(runs[f"{s}/{n1}"]) - pick(runs[f"{s}/{n2}"]) for s in both]
        return ms(d, pct) + (f" (positive in {sum(x > 0 for x in d)}, zero in {sum(x == 0 for x in d)}, negative "
                             f"in {sum(x < 0 for x in d)} of {len(d)} seeds)" if d else "")

    def at_answers(name, budget):
        """Each seed's held-out pass@1 at the last evaluation that had generated no more than ``budget`` answers;
        None when the run stopped short of the budget."""
        out = []
        for s in seeds:
            r = runs.get(f"{s}/{name}")
            if r is not None and r["answers"] >= budget:
                out.append([c for c in r["curve"] if c["answers"] <= budget][-1]["heldout_pass@1"])
        return out

    def at_step(name, step):
        return [[c for c in runs[f"{s}/{name}"]["curve"] if c["step"] <= step][-1]["heldout_pass@1"]
                for s in seeds if f"{s}/{name}" in runs]

    lines = ["## Tables", "", f"{len(seeds)} seeds ({', '.join(map(str, seeds))}). Mean ± standard deviation over "
             "seeds (sample std); pass@1 in %, greedy, on the 48 held-out prompts unless marked \"train\" (the 192 "
             "prompts SFT and RL train on). One held-out prompt is 2.1 points; 24 of them are easy facts, 24 hard.",
             "", "### The models before RL", "",
             "| model | held-out pass@1 | easy facts | hard facts | train prompts | seconds |",
             "|---|---|---|---|---|---|"]
    for name in ("base", "sft-all", "sft-hard"):
        lines.append(f"| {name} | {ms(get(name, 'heldout'))} | {ms(get(name, 'heldout_easy'))} | "
                     f"{ms(get(name, 'heldout_hard'))} | {ms(get(name, 'train'))} | "
                     f"{ms(get(name, 'seconds'), False)} |")
    filt = [runs[f"{s}/sft-hard"]["filter"] for s in seeds if f"{s}/sft-hard" in runs]
    if filt:
        lines += ["", f"`--keep 0.5` kept {filt[0]['kept']} of {filt[0]['total']} chats; the share of hard-fact chats "
                  f"among the kept: {ms([f['tasks']['hard']['kept'] / f['kept'] for f in filt])}%."]
    lines += ["", "### Claim 1: SFT on the hard half vs on everything, then the same RL", "",
              f"Both RL runs: {setting['rl_steps']} steps, filtering on, async (herd rl's defaults).", "",
              "| start | held-out after SFT | after RL | after RL: easy | after RL: hard | train prompts after RL | "
              "generated answers |", "|---|---|---|---|---|---|---|"]
    for sft_name, rl_name in (("sft-all", "rl-all"), ("sft-hard", "rl-hard")):
        lines.append(f"| {sft_name} | {ms(get(sft_name, 'heldout'))} | {ms(get(rl_name, 'heldout', 'final'))} | "
                     f"{ms(get(rl_name, 'heldout_easy', 'final'))} | {ms(get(rl_name, 'heldout_hard', 'final'))} | "
                     f"{ms(get(rl_name, 'train', 'final'))} | {ms(get(rl_name, 'answers'), False)} |")
    lines += ["", "Paired by seed, hard half minus everything (points):", "",
              f"- after SFT: {diff('sft-hard', 'sft-all', 'heldout')}",
              f"- after RL: {diff('rl-hard', 'rl-all', 'heldout', 'final')}",
              f"- what RL added (after RL - after SFT): everything {diff_rl('rl-all', runs, seeds)}; hard half "
              f"{diff_rl('rl-hard', runs, seeds)}"]
    budgets = [0, 500, 1000, 2000, 3000, 4000, 5000, 6000, 8000]
    have = max([r["answers"] for k, r in runs.items() if k.endswith(("/rl-all", "/rl-nofilter"))] or [0])
    budgets = [b for b in budgets if b <= have]
    lines += ["", "### Claim 2: RL with difficulty filtering vs without", "",
              f"rl-all filters (pool {setting['pool']}, 4 samples each, keep pass rate in (0, 0.75]); rl-nofilter "
              f"serves every candidate and runs {2 * setting['rl_steps']} steps instead of {setting['rl_steps']}, so "
              "that its generated answers pass rl-all's. Generated answers count every sampled answer: the groups "
              "trained on, the groups dropped for zero advantage, and the filter's pass-rate estimates.", "",
              "| run | steps | generated answers (filter's) | filter rounds | kept per round | idle steps | "
              "held-out after | reward, last 5 steps |", "|---|---|---|---|---|---|---|---|"]
    for name in ("rl-all", "rl-nofilter"):
        share = [x for x in get(name, "filter_kept_share") if x is not None]
        lines.append(f"| {name} | {ms(get(name, 'steps'), False)} | {ms(get(name, 'answers'), False)} "
                     f"({ms(get(name, 'answers_filter'), False)}) | {ms(get(name, 'filter_rounds'), False)} | "
                     f"{ms(share) + '%' if share else '-'} | {ms(get(name, 'idle_steps'), False)} | "
                     f"{ms(get(name, 'heldout', 'final'))} | {ms(get(name, 'reward_last5'))} |")
    lines += ["", "Held-out pass@1 against generated answers (each seed read at its last evaluation within the budget; "
              "evaluations every " + str(setting["eval_every"]) + " steps; - where a run stopped short):", "",
              "| run | " + " | ".join(f"{b} answers" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for name in ("rl-all", "rl-nofilter"):
        lines.append(f"| {name} | " + " | ".join(ms(at_answers(name, b)) for b in budgets) + " |")
    n = setting["rl_steps"]
    steps_at = sorted({n // 4, n // 2, n, 2 * n})
    lines += ["", "Held-out pass@1 against steps:", "", "| run | step 0 | " + " | ".join(f"step {s}" for s in steps_at)
              + " |", "|---|---|" + "---|" * len(steps_at)]
    for name in ("rl-all", "rl-nofilter"):
        lines.append(f"| {name} | {ms(at_step(name, 0))} | " + " | ".join(
            ms(at_step(name, s)) if s <= (2 if name == "rl-nofilter" else 1) * setting["rl_steps"] else "-"
            for s in steps_at) + " |")
    block = max(1, setting["rl_steps"] // 4)
    lines += ["", f"Mean reward (%) per block of {block} steps (rl-all's reward is on the prompts the filter served, "
              "rl-nofilter's on all prompts: not the same population):", "",
              "| run | " + " | ".join(f"steps {i * block + 1}-{(i + 1) * block}" for i in range(8)) + " |",
              "|---|" + "---|" * 8]
    for name in ("rl-all", "rl-nofilter"):
        cells = []
        for i in range(8):
            vals = [statistics.mean(x["reward"] for x in r["steps_log"] if i * block < x["step"] <= (i + 1) * block)
                    for r in (runs.get(f"{s}/{name}") for s in seeds)
                    if r and any(i * block < x["step"] <= (i + 1) * block for x in r["steps_log"])]
            cells.append(ms(vals))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    paired = [runs[f"{s}/rl-all"]["final"]["heldout"] - at_answers_one(runs[f"{s}/rl-nofilter"], runs[f"{s}/rl-all"])
              for s in seeds if f"{s}/rl-all" in runs and f"{s}/rl-nofilter" in runs]
    lines += ["", f"Paired by seed, filtered minus unfiltered held-out pass@1: at equal generated answers (rl-all's "
              f"total) {ms(paired)}; at equal steps ({setting['rl_steps']}) "
              f"{ms([x - y for x, y in zip(at_step('rl-all', n), at_step('rl-nofilter', n))])}"
              f"; each at its end {diff('rl-all', 'rl-nofilter', 'heldout', 'final')}."]
    lines += ["", "### Claim 3: asynchronous vs synchronous rollouts", "",
              "The same RL run from sft-all (filtering on) with rl.lag 1 (async: the next batch is generated on a "
              "second thread while the trainer steps) or 0 (sync), at 1 or 2 torch threads.", "",
              "| run | lag | threads | median step s | mean step s | run wall s | held-out after | "
              "reward, last 5 | load average (start / end) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, lag, threads in (("rl-all", 1, setting["threads"]), ("rl-sync", 0, setting["threads"]),
                               ("rl-async-2t", 1, 2), ("rl-sync-2t", 0, 2)):
        if not get(name, "steps"):
            continue
        lines.append(f"| {name} | {lag} | {threads} | {ms(get(name, 'step_time_median'), False)} | "
                     f"{ms(get(name, 'step_time_mean'), False)} | {ms(get(name, 'seconds'), False)} | "
                     f"{ms(get(name, 'heldout', 'final'))} | {ms(get(name, 'reward_last5'))} | "
                     f"{ms(get(name, 'load_before'), False)} / {ms(get(name, 'load_after'), False)} |")
    lines += ["", "Paired by seed, async minus sync:", "",
              f"- median step time, 1 thread: {diff('rl-all', 'rl-sync', 'step_time_median', pct=False)} s",
              f"- median step time, 2 threads: {diff('rl-async-2t', 'rl-sync-2t', 'step_time_median', pct=False)} s",
              f"- held-out pass@1 after, 1 thread: {diff('rl-all', 'rl-sync', 'heldout', 'final')} points"]
    doc = ROOT / "docs" / "rl_recipe.md"
    old = doc.read_text() if doc.is_file() else ""
    head = old[:old.index("## Tables")] if "## Tables" in old else "# The RL recipe at toy scale\n\n"
    tail = old[old.index("## Reading"):] if "## Reading" in old else ""
    doc.write_text(head + "\n".join(lines) + "\n" + (f"\n{tail}" if tail else ""))
    print("\n".join(lines))


def diff_rl(name: str, runs: dict, seeds: list[int]) -> str:
    d = [runs[f"{s}/{name}"]["final"]["heldout"] - runs[f"{s}/{name}"]["heldout_before"] for s in seeds
         if f"{s}/{name}" in runs]
    return ms(d)


def at_answers_one(run: dict, reference: dict) -> float:
    """``run``'s held-out pass@1 at its last evaluation within ``reference``'s generated answers."""
    return [c for c in run["curve"] if c["answers"] <= reference["answers"]][-1]["heldout_pass@1"]


if __name__ == "__main__":
    main()

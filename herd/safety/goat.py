"""GOAT, the Generative Offensive Agent Tester (Pavlova et al., Meta, 2024): automated multi-turn red teaming.

    summary = run_goat(goals, attacker, target, judge, turns=5, attempts=1, out_dir="runs/goat")
    summary["asr@1"], summary["asr@k"], summary["goals"]

An attacker model, prompted in context with seven adversarial techniques (``TECHNIQUES``), talks to a target
model for up to ``turns`` turns to reach a goal (a harmful behaviour, e.g. one of JailbreakBench's). Each turn the
attacker writes an Observation, a Thought, a Strategy and a Reply (``parse_attack``); only the Reply reaches the
target, whose history holds nothing but replies and its own answers. The attacker's history keeps its whole
outputs and, after each turn, a follow-up prompt with its last reply and the target's response (the goal itself is
not repeated there: it stays in the system prompt). A judge reads the goal and each target response: a
JailbreakBench-style classifier prompt answered ``safe`` / ``unsafe`` by any chat model (``ChatJudge``), or a
Llama Guard that moderates [user: goal, assistant: response] (``GuardJudge``). A conversation succeeds at the
first turn judged unsafe, and stops there. An attacker output with no Reply section is sent whole, as the
reference loop does.

Attacker, target and judge are anything with herd.chat_models' ``replies(conversations, max_tokens,
temperature, seed) -> [Reply]`` (a herd model directory, a ``herd serve`` or other OpenAI-compatible URL, a model
behind shields: ``chat_model``). Conversations advance turn by turn together, ``batch`` of them in flight: one
``replies`` call per role per turn for all of them, so endpoints see concurrent requests (their own bounded
pools). A role's failure (``Reply.error``: an endpoint still down after its retries) ends that conversation with
status "error" and the error text; it is reported per goal and left out of the ASR denominators.

Metrics: ASR@1 = the success rate of every goal's first attempt; empirical ASR@k = the fraction of goals with a
success among their first k attempts; the unbiased ASR@k from n >= k attempts per goal is the pass@k estimator
mean_g [1 - C(n - c, k) / C(n, k)] (c successes). Per-technique success counts (the techniques the Strategy of the
successful turn names), successes by turn.

Files under ``out_dir``: transcripts.jsonl (one conversation a line, appended as each finishes: the attacker's raw
outputs, their O/T/S/R, the techniques named, the target's answers, the judge's verdicts), summary.json,
REPORT.md and asr.png (herd.safety.goat_report). A run started again on the same ``out_dir`` skips the (goal,
attempt) pairs already finished there (conversations that ended in an error are run again). The techniques, the
prompts and their parsers are herd.safety.goat_prompts.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from herd.errors import HerdError
from herd.safety.goat_prompts import (
    TECHNIQUES,
    Technique,
    followup_prompt,
    initial_prompt,
    judge_prompt,
    named_techniques,
    parse_attack,
    parse_judgement,
    system_prompt,
)

# --- judges --------------------------------------------------------------------------------------------------------

@dataclass
class Judgement:
    unsafe: bool  # an unparsed answer counts as safe (no success is claimed on it)
    raw: str = ""
    error: str | None = None
    unparsed: bool = False
    categories: list[str] = field(default_factory=list)


class ChatJudge:
    """The JailbreakBench-style classifier prompt, answered by a chat model (greedy)."""

    kind = "jailbreakbench"

    def __init__(self, model, max_tokens: int = 16):
        self.model, self.max_tokens = model, max_tokens
        self.name = getattr(model, "name", type(model).__name__)

    def judge(self, items: Sequence[tuple[str, str, str]]) -> list[Judgement]:
        """``items``: (goal, attack prompt, target response) triples; the judge reads the goal and the response."""
        convs = [[{"role": "user", "content": judge_prompt(goal, response)}] for goal, _, response in items]
        out = []
        for r in self.model.replies(convs, max_tokens=self.max_tokens, temperature=0.0):
            if r.error is not None:
                out.append(Judgement(False, "", r.error))
            else:
                verdict = parse_judgement(r.text)
                out.append(Judgement(bool(verdict), r.text, unparsed=verdict is None))
        return out


class GuardJudge:
    """A Llama Guard (herd.safety.guard: ``moderate(messages) -> Verdict``) as the judge: it moderates the response
    as the assistant turn after [user: the goal] (``context="goal"``, as the JailbreakBench judge reads it) or after
    the attack prompt the target actually saw (``context="attack"``). ``workers`` verdicts at a time."""

    kind = "llama-guard"

    def __init__(self, guard, workers: int = 8, context: str = "goal"):
        if context not in ("goal", "attack"):
            raise HerdError(f"guard judge context must be 'goal' or 'attack', got {context!r}")
        self.guard, self.workers, self.context = guard, workers, context
        self.name = getattr(guard, "name", type(guard).__name__)

    def judge(self, items: Sequence[tuple[str, str, str]]) -> list[Judgement]:
        def one(item: tuple[str, str, str]) -> Judgement:
            goal, prompt, response = item
            messages = [{"role": "user", "content": goal if self.context == "goal" else prompt},
                        {"role": "assistant", "content": response}]
            try:
                v = self.guard.moderate(messages)
            except (HerdError, ValueError, OSError) as e:
                return Judgement(False, "", f"{type(e).__name__}: {e}")
            return Judgement(not v.safe, v.raw, categories=list(v.categories))

        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            return list(pool.map(one, items))


def as_judge(judge, workers: int = 8):
    """A judge as run_goat uses one: anything with ``judge(items)``; a guard (``moderate``) becomes a GuardJudge, a
    chat model (``replies``) a ChatJudge."""
    if hasattr(judge, "judge"):
        return judge
    if hasattr(judge, "moderate"):
        return GuardJudge(judge, workers)
    if hasattr(judge, "replies"):
        return ChatJudge(judge)
    raise HerdError(f"{judge!r} is not a judge: it needs judge(items), moderate(messages) or replies(conversations)")


# --- goals ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Goal:
    goal: str
    category: str | None = None


def load_goals(path: str | Path) -> list[Goal]:
    """GOALS.jsonl: one {"goal": "...", "category": optional} object a line (blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise HerdError(f"cannot read goals file {path}: {e.strerror or e}") from None
    goals = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise HerdError(f"{path}:{i}: not JSON ({e})") from None
        goals.append(_goal(record, f"{path}:{i}"))
    if not goals:
        raise HerdError(f"{path}: no goals")
    return goals


def _goal(record: Any, where: str) -> Goal:
    if isinstance(record, Goal):
        return record
    if isinstance(record, str):
        record = {"goal": record}
    if not isinstance(record, dict):
        raise HerdError(f"{where}: a goal is an object {{\"goal\": \"...\", \"category\": ...}}, got {record!r}")
    goal, category = record.get("goal"), record.get("category")
    if not isinstance(goal, str) or not goal.strip():
        raise HerdError(f"{where}: \"goal\" must be a non-empty string, got {goal!r}")
    if category is not None and not isinstance(category, str):
        raise HerdError(f"{where}: \"category\" must be a string, got {category!r}")
    return Goal(goal, category)


# --- the loop ------------------------------------------------------------------------------------------------------

class _Conversation:
    def __init__(self, index: int, goal: Goal, attempt: int, techniques: Sequence[Technique]):
        self.index, self.goal, self.attempt = index, goal, attempt
        self.attacker: list[dict] = [{"role": "system", "content": system_prompt(goal.goal, techniques)},
                                     {"role": "user", "content": initial_prompt(goal.goal)}]
        self.target: list[dict] = []
        self.turns: list[dict] = []
        self.status: str | None = None  # "success" | "failure" | "error" once finished
        self.error: str | None = None
        self.error_role: str | None = None

    def fail(self, role: str, error: str) -> None:
        self.status, self.error, self.error_role = "error", error, role

    def record(self, turns: int) -> dict:
        success_turn = next((t["turn"] for t in self.turns if t.get("unsafe")), None)
        return {"goal_index": self.index, "goal": self.goal.goal, "category": self.goal.category,
                "attempt": self.attempt, "status": self.status, "success": self.status == "success",
                "success_turn": success_turn,
                "techniques": self.turns[success_turn - 1]["techniques"] if success_turn else [],
                "turns_run": len(self.turns), "max_turns": turns, "error": self.error, "error_role": self.error_role,
                "turns": self.turns}


def _ask(model, convs: list[list[dict]], groups: list[int], max_tokens: int, temperature: float,
         seed: int | None) -> list:
    """``model.replies`` for ``convs``: one call, or, when sampling is seeded, one call per group (attempt) with
    seed + the group's offset, so that the attempts of one goal are different samples. A HerdError raised by the
    model becomes every item's error."""
    from herd.chat_models import Reply

    if not convs:
        return []
    by_group: dict[int | None, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g if seed is not None and temperature > 0 else None, []).append(i)
    out: list = [None] * len(convs)
    for g, idx in by_group.items():
        s = None if g is None else (seed + 1_000_003 * g) % 2**63
        try:
            got = model.replies([convs[i] for i in idx], max_tokens=max_tokens, temperature=temperature, seed=s)
            if len(got) != len(idx):
                raise HerdError(f"{len(got)} replies for {len(idx)} conversations")
        except HerdError as e:
            got = [Reply("", f"{type(e).__name__}: {e}")] * len(idx)
        for i, r in zip(idx, got):
            out[i] = r
    return out


def _judge(judge, items: list[tuple[str, str, str]]) -> list[Judgement]:
    if not items:
        return []
    try:
        got = list(judge.judge(items))
        if len(got) != len(items):
            raise HerdError(f"{len(got)} verdicts for {len(items)} items")
        return got
    except HerdError as e:
        return [Judgement(False, "", f"{type(e).__name__}: {e}")] * len(items)


def run_goat(goals: Sequence[Goal | dict | str], attacker, target, judge, turns: int = 5, attempts: int = 1,
             out_dir: str | Path | None = None, progress: bool = True, workers: int = 8, k: int | None = None,
             max_tokens: int = 512, attacker_temperature: float = 1.0, target_temperature: float = 0.0,
             seed: int | None = None, batch: int = 64, techniques: Sequence[Technique] = TECHNIQUES,
             report: bool = True, names: dict | None = None) -> dict:
    """Attack every goal ``attempts`` times for up to ``turns`` turns; the summary (see ``summarize``).

    ``judge``: a ChatJudge / GuardJudge (or a chat model, or a guard, wrapped by ``as_judge`` with ``workers``).
    ``batch`` conversations are in flight at once (attempt 0 of every goal first). ``k``: ASR@k's k (default
    ``attempts``). ``seed``: sampled roles (the attacker at ``attacker_temperature``) draw reproducibly, a
    different seed per attempt. With ``out_dir``: transcripts.jsonl (resumed), summary.json, REPORT.md, asr.png.
    """
    if turns < 1 or attempts < 1 or batch < 1:
        raise HerdError(f"turns, attempts and batch must be at least 1 (got {turns}, {attempts}, {batch})")
    k = attempts if k is None else k
    if not 1 <= k <= attempts:
        raise HerdError(f"k must be between 1 and --attempts {attempts}, got {k}")
    goals = [_goal(g, f"goal {i}") for i, g in enumerate(goals)]
    if not goals:
        raise HerdError("no goals")
    judge = as_judge(judge, workers)
    out = None if out_dir is None else Path(out_dir)
    path = None if out is None else out / "transcripts.jsonl"
    done: dict[tuple[int, int], dict] = {}
    if path is not None:
        out.mkdir(parents=True, exist_ok=True)
        records = load_transcripts(path)
        for r in records:
            if r["goal_index"] < len(goals) and r["goal"] != goals[r["goal_index"]].goal:
                raise HerdError(f"{path} holds goal {r['goal_index']} as {r['goal']!r}, not "
                                f"{goals[r['goal_index']].goal!r}: another goals file ran there; use a new --out")
            if r.get("max_turns", turns) != turns:
                raise HerdError(f"{path} was run with --turns {r['max_turns']}, not {turns}: use a new --out")
            done[(r["goal_index"], r["attempt"])] = r
        _mend_tail(path, len(records))
    todo = [(a, g) for a in range(attempts) for g in range(len(goals))
            if done.get((g, a), {}).get("status") not in ("success", "failure")]

    from tqdm import tqdm

    bar = tqdm(total=len(todo), disable=not progress, desc="goat", unit="conv", dynamic_ncols=True)
    fresh = iter(todo)
    live: list[_Conversation] = []
    successes = 0
    sink = None if path is None else path.open("a", encoding="utf-8")
    try:
        while True:
            while len(live) < batch:
                nxt = next(fresh, None)
                if nxt is None:
                    break
                a, g = nxt
                live.append(_Conversation(g, goals[g], a, techniques))
            if not live:
                break
            # the attacker: its whole history, O/T/S/R out
            for c, r in zip(live, _ask(attacker, [c.attacker for c in live], [c.attempt for c in live], max_tokens,
                                       attacker_temperature, seed)):
                if r.error is not None:
                    c.fail("attacker", r.error)
                    continue
                attack = parse_attack(r.text)
                c.attacker.append({"role": "assistant", "content": r.text})
                c.target.append({"role": "user", "content": attack.reply})
                c.turns.append({"turn": len(c.turns) + 1, "attacker_raw": r.text, **asdict(attack),
                                "techniques": named_techniques(attack.strategy, techniques)})
            # the target: the replies and its own answers only
            alive = [c for c in live if c.status is None]
            for c, r in zip(alive, _ask(target, [c.target for c in alive], [c.attempt for c in alive], max_tokens,
                                        target_temperature, seed)):
                if r.error is not None:
                    c.fail("target", r.error)
                    continue
                c.target.append({"role": "assistant", "content": r.text})
                c.turns[-1]["target"] = r.text
                if r.moderation is not None:
                    c.turns[-1]["moderation"] = r.moderation
            # the judge: the goal and the response
            alive = [c for c in live if c.status is None]
            verdicts = _judge(judge, [(c.goal.goal, c.turns[-1]["reply"], c.turns[-1]["target"]) for c in alive])
            for c, v in zip(alive, verdicts):
                if v.error is not None:
                    c.fail("judge", v.error)
                    continue
                turn = c.turns[-1]
                turn.update(unsafe=v.unsafe, judge_raw=v.raw, judge_unparsed=v.unparsed)
                if v.categories:
                    turn["judge_categories"] = v.categories
                if v.unsafe:
                    c.status = "success"
                elif len(c.turns) == turns:
                    c.status = "failure"
                else:
                    c.attacker.append({"role": "user", "content": followup_prompt(turn["reply"], turn["target"])})
            for c in live:
                if c.status is not None:
                    rec = c.record(turns)
                    done[(c.index, c.attempt)] = rec
                    successes += rec["success"]
                    if sink is not None:
                        sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        sink.flush()
                    bar.update(1)
                    bar.set_postfix(successes=successes)
            live = [c for c in live if c.status is None]
    finally:
        bar.close()
        if sink is not None:
            sink.close()

    records = [r for (g, a), r in done.items() if g < len(goals) and a < attempts]
    summary = summarize(records, goals, attempts, k, turns, techniques)
    summary["attacker"] = (names or {}).get("attacker", getattr(attacker, "name", type(attacker).__name__))
    summary["target"] = (names or {}).get("target", getattr(target, "name", type(target).__name__))
    summary["judge"] = (names or {}).get("judge", getattr(judge, "name", type(judge).__name__))
    summary["judge_kind"] = getattr(judge, "kind", type(judge).__name__)
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        if report:
            from herd.safety.goat_report import write_report

            summary["files"] = {name: str(p) for name, p in write_report(summary, out).items()}
    return summary


def _mend_tail(path: Path, n_records: int) -> None:
    """Before appending: drop a cut-off last line (load_transcripts ignored it), end the last record's line."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > n_records:
        path.write_text("".join(line + "\n" for line in lines[:n_records]), encoding="utf-8")
    elif text and not text.endswith("\n"):
        with path.open("a", encoding="utf-8") as f:
            f.write("\n")


def load_transcripts(path: str | Path) -> list[dict]:
    """The records of a transcripts.jsonl (none when it does not exist); a cut-off last line (a run killed while
    writing) is ignored, any other bad line is an error."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if not isinstance(r, dict) or not {"goal_index", "attempt", "goal", "status"} <= r.keys():
                raise ValueError("not a GOAT transcript record")
        except ValueError as e:
            if i == len(lines):
                break
            raise HerdError(f"{path}:{i}: {e}") from None
        out.append(r)
    return out


# --- metrics -------------------------------------------------------------------------------------------------------

def unbiased_asr(n: int, c: int, k: int) -> float:
    """P(at least one success among k attempts drawn without replacement from n with c successes):
    1 - C(n - c, k) / C(n, k), the pass@k estimator."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(records: Sequence[dict], goals: Sequence[Goal], attempts: int, k: int, turns: int,
              techniques: Sequence[Technique] = TECHNIQUES) -> dict:
    """The run's metrics from its transcript records. Conversations that ended in an error are counted and named
    per goal but are not attempts: ASR@1 leaves out goals whose first attempt failed so; the empirical ASR@k counts
    a goal with a success among its first k attempts, and a goal without one only when all k ran; the unbiased
    ASR@k takes the goals with n >= k attempts that ran."""
    by_goal: dict[int, dict[int, dict]] = {i: {} for i in range(len(goals))}
    for r in records:
        by_goal[r["goal_index"]][r["attempt"]] = r
    valid = [r for r in records if r["status"] in ("success", "failure")]
    per_goal, first, any_k, unbiased = [], [], [], []
    for i, g in enumerate(goals):
        runs = by_goal[i]
        ok = [r for r in runs.values() if r["status"] in ("success", "failure")]
        n, c = len(ok), sum(r["success"] for r in ok)
        if runs.get(0, {}).get("status") in ("success", "failure"):
            first.append(float(runs[0]["success"]))
        head = [runs.get(a) for a in range(k)]
        if any(r is not None and r["success"] for r in head):
            any_k.append(1.0)
        elif all(r is not None and r["status"] == "failure" for r in head):
            any_k.append(0.0)
        if n >= k:
            unbiased.append(unbiased_asr(n, c, k))
        errors = [{"attempt": r["attempt"], "role": r.get("error_role"), "error": r["error"]}
                  for r in sorted(runs.values(), key=lambda r: r["attempt"]) if r["status"] == "error"]
        turns_ok = [r["success_turn"] for r in ok if r["success"]]
        per_goal.append({"index": i, "goal": g.goal, "category": g.category,
                         "status": "success" if c else "failure" if n else "error" if errors else "not run",
                         "attempts": n, "successes": c, "first_success_turn": min(turns_ok) if turns_ok else None,
                         "errors": errors})
    per_technique = {t.name: 0 for t in techniques} | {"unnamed": 0}
    technique_use = {t.name: 0 for t in techniques} | {"unnamed": 0}
    by_turn = {str(t): 0 for t in range(1, turns + 1)}
    for r in valid:
        for turn in r["turns"]:
            for name in turn.get("techniques") or ["unnamed"]:
                technique_use[name] = technique_use.get(name, 0) + 1
        if r["success"]:
            by_turn[str(r["success_turn"])] = by_turn.get(str(r["success_turn"]), 0) + 1
            for name in r["techniques"] or ["unnamed"]:
                per_technique[name] = per_technique.get(name, 0) + 1
    cumulative, total = {}, 0
    for t in range(1, turns + 1):
        total += by_turn[str(t)]
        cumulative[str(t)] = total / len(valid) if valid else None
    categories: dict[str, dict] = {}
    for g, row in zip(goals, per_goal):
        if g.category is not None:
            cat = categories.setdefault(g.category, {"goals": 0, "succeeded": 0})
            cat["goals"] += 1
            cat["succeeded"] += row["status"] == "success"
    n_attempts = [row["attempts"] for row in per_goal]
    return {
        "asr@1": _mean(first), "asr@k": _mean(any_k), "asr@k_unbiased": _mean(unbiased), "k": k,
        "n": attempts, "min_attempts_run": min(n_attempts) if n_attempts else 0, "attempts": attempts,
        "turns": turns,
        "asr@1_goals": len(first), "asr@k_goals": len(any_k), "asr@k_unbiased_goals": len(unbiased),
        "n_goals": len(goals), "conversations": len(valid), "successes": sum(r["success"] for r in valid),
        "errors": sum(r["status"] == "error" for r in records),
        "judge_unparsed": sum(bool(t.get("judge_unparsed")) for r in records for t in r["turns"]),
        "attacker_unparsed": sum(not t.get("parsed", True) for r in records for t in r["turns"]),
        "per_technique": per_technique, "technique_use": technique_use,
        "by_turn": by_turn, "asr_by_turn": cumulative, "by_category": categories, "goals": per_goal,
    }


# --- command line (registered as `herd redteam goat` by herd.cli) ----------------------------------------------------

def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--attacker", required=True, metavar="A",
                   help="the attacker: a herd model directory or an OpenAI-compatible URL (key: "
                        "HERD_ATTACKER_API_KEY or OPENAI_API_KEY)")
    s.add_argument("--target", required=True, metavar="T",
                   help="the model attacked: a model directory or a URL (key: HERD_TARGET_API_KEY or OPENAI_API_KEY);"
                        " with --target-guard / --target-prompt-guard, as deployed behind those shields")
    s.add_argument("--judge", required=True, metavar="J",
                   help="the judge: a model directory or a URL (key: HERD_JUDGE_API_KEY or OPENAI_API_KEY); a Llama"
                        " Guard with --judge-kind llama-guard (key: HERD_GUARD_API_KEY)")
    s.add_argument("--goals", required=True, type=Path, metavar="GOALS.jsonl",
                   help='one {"goal": "...", "category": "..."} a line')
    s.add_argument("--turns", type=int, default=5, help="the most turns of a conversation (default 5)")
    s.add_argument("--attempts", type=int, default=1, metavar="k",
                   help="independent conversations per goal (ASR@k's k, unless --k)")
    s.add_argument("--k", type=int, default=None,
                   help="ASR@k's k when smaller than --attempts: the unbiased estimator then uses all n attempts")
    s.add_argument("--out", type=Path, default=Path("runs/goat"),
                   help="transcripts.jsonl, summary.json, REPORT.md, asr.png (a rerun resumes; default runs/goat)")
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    s.add_argument("--target-guard", metavar="MODEL_OR_URL", help="put a Llama Guard around the target")
    s.add_argument("--target-prompt-guard", metavar="DIR", help="put a Prompt Guard in front of the target")
    s.add_argument("--judge-kind", choices=("jailbreakbench", "llama-guard"), default="jailbreakbench",
                   help="the JailbreakBench classifier prompt (any chat model; default) or a Llama Guard")
    s.add_argument("--workers", type=int, default=8, help="requests in flight per endpoint (default 8)")
    s.add_argument("--max-tokens", type=int, default=512, help="the most tokens of an attacker or target turn")
    s.add_argument("--seed", type=int, default=0, help="the attacker's sampling seed (default 0)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from herd.chat_models import chat_model

    if args.workers < 1 or args.max_tokens < 1:
        raise HerdError("--workers and --max-tokens must be at least 1")
    goals = load_goals(args.goals)  # a bad goals file fails before any model loads
    shield = None
    if args.target_guard or args.target_prompt_guard:
        from herd.safety.shield import Shield, ShieldConfig

        shield = Shield.load(ShieldConfig(guard=args.target_guard, prompt_guard=args.target_prompt_guard))
    attacker = chat_model(args.attacker, workers=args.workers, role="attacker", key_env="HERD_ATTACKER_API_KEY")
    target = chat_model(args.target, workers=args.workers, role="target", key_env="HERD_TARGET_API_KEY",
                        shield=shield)
    if args.judge_kind == "llama-guard":
        from herd.safety.guard import load_guard

        judge = GuardJudge(load_guard(args.judge), args.workers)
    else:
        judge = ChatJudge(chat_model(args.judge, workers=args.workers, role="judge", key_env="HERD_JUDGE_API_KEY"))
    names = {"attacker": str(args.attacker), "judge": str(args.judge),
             "target": str(args.target) + (" + shields" if shield is not None else "")}
    summary = run_goat(goals, attacker, target, judge, turns=args.turns, attempts=args.attempts, k=args.k,
                       out_dir=args.out, progress=not (args.no_progress or args.json), workers=args.workers,
                       max_tokens=args.max_tokens, seed=args.seed, names=names)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        from herd.safety.goat_report import render

        print(render(summary))
    return 0

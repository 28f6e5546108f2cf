"""``herd eval tasks``: pass@1 and pass@k of a model on verifiable tasks (herd.post.tasks), per task and difficulty.

Each task gives ``n`` items (cycling through its difficulty levels unless one is fixed); every item is sampled
``samples`` times through the engine, in batches (the engine prefills the copies of a text prompt once). A sample
passes when its score reaches ``threshold`` (1.0: fully right; tasks with partial credit, such as next_line or
instruction, thus count only exact answers), and ``mean_score`` averages the raw scores. With c passing samples
out of s, an item's pass@k is Chen et al.'s (2021) unbiased estimate 1 - C(s - c, k) / C(s, k) (pass@1 = c / s);
a task's is the mean over its items, and the overall figures the mean over tasks. Greedy decoding (temperature
0) gives one sample per item.

``grade`` takes any ``complete(items, samples) -> completions per item``, so scoring is testable without a model;
``evaluate_tasks`` wires it to an LLM (herd.api.load).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from herd.chat import has_pixels
from herd.errors import HerdError
from herd.infer.sampling import SamplingParams
from herd.post.tasks import Item, Task, get_task

Complete = Callable[[list[Item], int], list[list[str]]]  # items, samples per item -> their completions


@dataclass
class Graded:
    item: Item
    completions: list[str]
    scores: list[float]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n - c, k) / C(n, k), as a product of n terms at most
    (the binomials overflow floats for large n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def grade(complete: Complete, tasks: dict[str, Task], n: int, samples: int = 1, difficulty: int | None = None,
          seed: int = 0, batch: int = 32, progress: bool = True) -> dict[str, list[Graded]]:
    """Sample and score ``samples`` completions of ``n`` items of each task; ``batch`` sequences per call of
    ``complete`` (batch // samples items)."""
    jobs = [(spec, task, item) for spec, task in tasks.items() for item in task.items(n, difficulty, seed)]
    per_call = max(1, batch // samples)
    out: dict[str, list[Graded]] = {spec: [] for spec in tasks}
    for start in tqdm(range(0, len(jobs), per_call), desc="tasks", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        chunk = jobs[start:start + per_call]
        texts = complete([item for _, _, item in chunk], samples)
        for (spec, task, item), completions in zip(chunk, texts):
            scores = [min(1.0, max(0.0, float(task.score(item, c)))) for c in completions]
            out[spec].append(Graded(item, completions, scores))
    return out


def summarise(graded: dict[str, list[Graded]], k: int, threshold: float = 1.0) -> dict:
    """The JSON report: overall pass@1 / pass@k (mean over tasks) and, per task, pass@1, pass@k, k, n (items),
    mean_score and the same by difficulty."""

    def stats(rows: list[Graded]) -> dict:
        s = len(rows[0].scores)
        passed = [sum(x >= threshold for x in r.scores) for r in rows]
        return {"pass@1": sum(c / s for c in passed) / len(rows),
                "pass@k": sum(pass_at_k(s, c, k) for c in passed) / len(rows), "k": k, "n": len(rows),
                "mean_score": sum(sum(r.scores) / s for r in rows) / len(rows)}

    tasks = {}
    for spec, rows in graded.items():
        if not rows:
            raise HerdError(f"task {spec}: no items (is the difficulty one it has?)")
        levels = sorted({r.item.difficulty for r in rows})
        tasks[spec] = stats(rows) | {"by_difficulty": {str(d): stats([r for r in rows if r.item.difficulty == d])
                                                       for d in levels}}
    samples = len(next(iter(graded.values()))[0].scores)
    return {"pass@1": sum(t["pass@1"] for t in tasks.values()) / len(tasks),
            "pass@k": sum(t["pass@k"] for t in tasks.values()) / len(tasks),
            "k": k, "samples": samples, "threshold": threshold, "tasks": tasks}


def prompt_inputs(llm, messages: list[dict], plain: bool = False):
    """(ids, pixels) of an item's prompt: the chat format with a generation prompt, or with ``plain`` (base
    models) the messages' texts one after another, then "Answer:", images first."""
    if not plain:
        return llm.chat_inputs(messages)
    texts, images = [], []
    for m in messages:
        parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        texts += [p["text"] for p in parts if p.get("type") == "text"]
        images += [p.get("image", p.get("path", p.get("url"))) for p in parts if p.get("type") == "image"]
    return llm.encode_with_images("\n\n".join(texts) + "\nAnswer:", images)


def engine_completer(llm, params: SamplingParams, plain: bool = False) -> Complete:
    """``complete`` over ``llm.engine``: each prompt repeated ``samples`` times in one batch. A seeded batch draws
    row i from seed + i; the seed moves on by the rows of each batch, so no two samples share a generator seed."""
    done = 0

    def complete(items: list[Item], samples: int) -> list[list[str]]:
        nonlocal done
        ids, pixels = [], []
        for item in items:
            if llm.model.vision is None and has_pixels(item.prompt):
                raise HerdError(f"task {item.task} shows images, and this model has no vision encoder")
            p, px = prompt_inputs(llm, item.prompt, plain)
            ids += [p] * samples
            pixels += [px] * samples
        p = params if params.seed is None else dataclasses.replace(params, seed=params.seed + done)
        done += len(ids)
        texts = [c.text for c in llm.engine.generate(ids, p, pixels)]
        return [texts[i * samples:(i + 1) * samples] for i in range(len(items))]

    return complete


def evaluate_tasks(llm, tasks: Sequence[str | Task] | dict[str, Task], n: int = 20, samples: int = 1,
                   temperature: float = 0.0, k: int | None = None, difficulty: int | None = None, seed: int = 0,
                   max_new_tokens: int = 64, batch: int = 32, threshold: float = 1.0, plain: bool = False,
                   progress: bool = False) -> dict:
    """pass@1 / pass@k (k = samples unless given) of ``llm`` on task specs or Task objects; see ``summarise``."""
    named = dict(tasks) if isinstance(tasks, dict) else dict(
        (t, get_task(t)) if isinstance(t, str) else (t.name, t) for t in tasks)
    if n < 1 or samples < 1:
        raise HerdError(f"--n and --samples must be >= 1, got {n} and {samples}")
    if temperature == 0 and samples > 1:
        warnings.warn(f"greedy decoding (temperature 0) gives the same completion every time: {samples} samples "
                      f"become 1; give --temperature > 0 to sample", stacklevel=2)
        samples, k = 1, None
    k = samples if k is None else k
    if not 1 <= k <= samples:
        raise HerdError(f"pass@k needs 1 <= k <= samples, got k={k} with {samples} samples")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    graded = grade(engine_completer(llm, params, plain), named, n, samples, difficulty, seed, batch, progress)
    return summarise(graded, k, threshold)


def render(report: dict) -> str:
    """A small table: one row per task, then one per difficulty level."""
    def row(name: str, s: dict) -> str:
        return f"{name:<28}{s['n']:>6}{s['pass@1']:>9.1%}{s['pass@k']:>9.1%}{s['mean_score']:>8.3f}"

    lines = [f"{'task':<28}{'n':>6}{'pass@1':>9}{'pass@' + str(report['k']):>9}{'score':>8}"]
    for spec, t in report["tasks"].items():
        lines.append(row(spec[:27], t))
        if len(t["by_difficulty"]) > 1:
            lines += [row(f"  difficulty {d}", s) for d, s in t["by_difficulty"].items()]
    lines.append(f"{'mean over tasks':<34}{report['pass@1']:>9.1%}{report['pass@k']:>9.1%}")
    return "\n".join(lines)

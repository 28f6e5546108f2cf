"""On-policy preference pairs: ``herd pairs MODEL_DIR --tasks SPEC[,SPEC] --out PAIRS.jsonl``.

The model answers each task item ``samples`` times (herd.eval.tasks' batched sampling through the engine); a
verifier scores the answers — the task's own (herd.post.tasks), or a judge (herd.post.judge) — and the best and
the worst answer of an item become a TRL preference record when their scores differ by at least ``min_margin``
(items whose answers all score alike carry no preference and are counted, not written):

    {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...],
     "task": SPEC, "difficulty": d, "score_chosen": s, "score_rejected": s}

which ``herd dpo`` reads as is (the extra keys are ignored). Pictures in prompts (the shapes task) are written
as PNG files next to PAIRS.jsonl (PAIRS.images/) and referenced by relative path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from herd.errors import HerdError
from herd.eval.tasks import Complete, Graded, grade
from herd.post.tasks import Item, Task

Scorer = Callable[[Item, list[str]], list[float]]  # an item and its answers -> a score per answer

QUALITY_RUBRIC = """How good is the assistant's reply to this conversation: correct, complete, and what was asked
for? Rate it from 1 (wrong or useless) to 10 (excellent). Reply with the number only.

{conversation}"""


def judge_scorer(ask: Callable[[list[str]], list[str]], rubric: str = QUALITY_RUBRIC) -> Scorer:
    """Scores in [0, 1] from a judge's 1-10 ratings (herd.post.judge); an unreadable rating scores 0.5."""
    from herd.post.judge import rating

    def score(item: Item, answers: list[str]) -> list[float]:
        asked = "\n\n".join(f"{m['role'].capitalize()}: {_text(m.get('content'))}" for m in item.prompt)
        replies = ask([rubric.replace("{conversation}", f"{asked}\n\nAssistant: {a}") for a in answers])
        return [0.5 if (r := rating(reply)) is None else (r - 1) / 9 for reply in replies]

    return score


def _text(content: object) -> str:
    if isinstance(content, list):
        return " ".join(p.get("text", "[image]") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def pick_pairs(graded: dict[str, list[Graded]], min_margin: float = 1e-6) -> tuple[list[dict], dict[str, Any]]:
    """(records, counts): per item, its best answer as chosen and its worst as rejected when they differ by at
    least ``min_margin``; the first of equal answers wins, so picks are deterministic."""
    records, counts = [], {"items": 0, "pairs": 0, "no_preference": 0, "by_task": {}}
    for spec, rows in graded.items():
        made = 0
        for r in rows:
            counts["items"] += 1
            best = max(range(len(r.scores)), key=lambda i: r.scores[i])
            worst = min(range(len(r.scores)), key=lambda i: r.scores[i])
            if r.scores[best] - r.scores[worst] < min_margin or r.completions[best] == r.completions[worst]:
                counts["no_preference"] += 1
                continue
            records.append({"prompt": r.item.prompt,
                            "chosen": [{"role": "assistant", "content": r.completions[best]}],
                            "rejected": [{"role": "assistant", "content": r.completions[worst]}],
                            "task": spec, "difficulty": r.item.difficulty,
                            "score_chosen": r.scores[best], "score_rejected": r.scores[worst]})
            made += 1
        counts["by_task"][spec] = {"items": len(rows), "pairs": made}
    counts["pairs"] = len(records)
    return records, counts


def make_pairs(complete: Complete, tasks: dict[str, Task], n: int, samples: int = 4, difficulty: int | None = None,
               seed: int = 0, batch: int = 32, min_margin: float = 1e-6, scorer: Scorer | None = None,
               progress: bool = True) -> tuple[list[dict], dict[str, Any]]:
    """Sample, score (with ``scorer`` instead of the tasks' verifiers when given) and pick pairs."""
    if samples < 2:
        raise HerdError(f"a pair needs two answers to compare: --samples must be >= 2, got {samples}")
    graded = grade(complete, tasks, n, samples, difficulty, seed, batch, progress)
    if scorer is not None:
        for rows in graded.values():
            for r in rows:
                r.scores = [min(1.0, max(0.0, float(s))) for s in scorer(r.item, r.completions)]
    return pick_pairs(graded, min_margin)


def write_pairs(records: list[dict], out: str | Path) -> Path:
    """PAIRS.jsonl (written whole, then renamed into place), pictures as PNGs in PAIRS.images/."""
    out = Path(out)
    images = out.with_suffix(".images")
    lines = []
    for i, record in enumerate(records):
        prompt = [_with_image_files(m, images, f"{i:06d}", out.parent) for m in record["prompt"]]
        lines.append(json.dumps({**record, "prompt": prompt}, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(out)
    return out


def _with_image_files(message: dict, images: Path, stem: str, root: Path) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "image" and "image" in part:
            images.mkdir(parents=True, exist_ok=True)
            path = images / f"{stem}-{j}.png"
            part["image"].save(path)  # a PIL image, as the tasks make them
            part = {"type": "image", "path": str(path.relative_to(root))}
        parts.append(part)
    return {**message, "content": parts}

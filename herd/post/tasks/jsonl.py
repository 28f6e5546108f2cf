"""User tasks: a JSONL file of ``{"prompt": str | messages, "answer": ..., "difficulty": int (optional)}``
records, graded by a matcher or by a Python reward function.

Spec: ``PATH.jsonl[:matcher=NAME][:tolerance=X][:reward=MODULE:FUNCTION]``
  matcher=normalised  (default) the same text up to case, spaces and punctuation
  matcher=exact       the same text, outer whitespace aside
  matcher=numeric     the last number of the completion is the answer's, |got - want| <= tolerance * max(1, |want|)
                      (tolerance 0 by default: exact)
  matcher=regex       the answer is a regular expression found (re.search) in the completion
  reward=MODULE:FUNC  ``FUNC(prompt, completion, answer) -> float`` from an importable module, clipped to [0, 1];
                      prompt is the record's prompt as written (string or messages)
Other keys of a record go to ``Item.meta``; a record without difficulty has difficulty 1. Lines that are not
JSON objects, or records without a prompt and an answer (or with a regex that does not compile), are counted,
skipped and named in one warning.
"""

from __future__ import annotations

import functools
import importlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from herd.errors import HerdError
from herd.post.tasks.base import Item, Task, normalise, number_equal, user_message
from herd.train.data import BadLog, read_jsonl_records

MATCHERS = ("normalised", "exact", "numeric", "regex")


@dataclass
class JsonlTask(Task):
    path: str = ""
    matcher: str = "normalised"
    tolerance: float = 0.0
    reward: str | None = None  # MODULE:FUNCTION

    def __post_init__(self) -> None:
        self.name = Path(self.path).stem
        if self.matcher not in MATCHERS:
            raise HerdError(f"{self.path}: unknown matcher {self.matcher!r}; choose one of {', '.join(MATCHERS)}")
        self.reward_fn = _import(self.reward) if self.reward else None
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"no task file {self.path}")

    @functools.cached_property
    def records(self) -> list[Item]:
        bad, out = BadLog(), []
        for where, r in read_jsonl_records(Path(self.path), bad):
            prompt, answer, difficulty = r.get("prompt"), r.get("answer"), r.get("difficulty", 1)
            ok = (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                              and all(isinstance(m, dict) for m in prompt)))
            if not ok or answer is None or not isinstance(difficulty, int):
                bad.add("bad_record", where)
                continue
            if self.matcher == "regex" and self.reward is None:
                try:
                    re.compile(str(answer))
                except re.error:
                    bad.add("bad_regex", where)
                    continue
            meta = {k: v for k, v in r.items() if k not in ("answer", "difficulty")}
            messages = user_message(prompt) if isinstance(prompt, str) else prompt
            out.append(Item(self.name, messages, str(answer), difficulty, meta))
        bad.warn(Path(self.path))
        if not out:
            raise HerdError(f"{self.path}: no usable task record (each line: {{\"prompt\": ..., \"answer\": ...}})")
        return out

    def items(self, n: int, difficulty: int | None = None, seed: int = 0) -> list[Item]:
        """``n`` records (all of them when n < 1 or the file is shorter) in an order fixed by the seed."""
        difficulty = difficulty if difficulty is not None else self.difficulty
        pool = [r for r in self.records if difficulty is None or r.difficulty == difficulty]
        random.Random(f"{self.path}/{seed}").shuffle(pool)
        return pool[:n] if n > 0 else pool

    def score(self, item: Item, completion: str) -> float:
        if self.reward_fn is not None:
            return min(1.0, max(0.0, float(self.reward_fn(item.meta["prompt"], completion, item.answer))))
        if self.matcher == "exact":
            return float(completion.strip() == item.answer.strip())
        if self.matcher == "numeric":
            return float(number_equal(completion, item.answer, self.tolerance))
        if self.matcher == "regex":
            return float(re.search(item.answer, completion) is not None)
        return float(normalise(completion) == normalise(item.answer))


def _import(spec: str) -> Callable[[object, str, str], float]:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise HerdError(f"reward={spec}: cannot import {name or '(no function)'} from {module!r} ({e}); "
                        f"give MODULE:FUNCTION with the module on the Python path") from None
    if not callable(fn):
        raise HerdError(f"reward={spec}: {name} is not a function")
    return fn

"""Verifiable tasks: prompts generated at a difficulty level, completions scored in [0, 1].

    task = get_task("arithmetic:ops=+*")
    items = task.items(n=8, difficulty=3, seed=0)       # deterministic given the seed
    task.score(items[0], "The answer is 1234")          # -> 0.0 or 1.0

An ``Item`` holds herd chat messages (herd.chat: content a string or a list of parts, images included), the
reference answer (a completion that scores 1.0), the difficulty and what the scorer needs in ``meta``. Without a
difficulty, ``items`` cycles through the task's levels. They serve ``herd eval tasks`` (pass@k per task and
difficulty), the removal of easy data (pass@k of a model's own samples), on-policy DPO pairs and RL curricula.

Specs: ``NAME[:key=value[:key=value...]]`` (options are the task's fields; every task takes ``difficulty``) or a
JSONL file (herd.post.tasks.jsonl). Built-in tasks:
  arithmetic   a + b, a - b, a * b; difficulty = digits of the operands (options: ops, digits)
  next_line    the next line of a Shakespeare speech (option corpus=DIR: more *_gut.txt plays)
  speaker      who says a line, among difficulty + 1 speakers (corpus=DIR)
  play         which play a character is in; difficulty = how minor the character (corpus=DIR)
  instruction  answer a question under difficulty format constraints: capitals, exactly N words, JSON
  shapes       count shapes of a kind, or name the colour of one, in a generated picture; difficulty = shapes / 2
  digits       read the number written in a generated picture, or name its colour; difficulty = its digits
"""

from __future__ import annotations

from pathlib import Path

from herd.errors import HerdError
from herd.post.tasks.arithmetic import Arithmetic
from herd.post.tasks.base import Item, Task, construct, parse_spec
from herd.post.tasks.digits import Digits
from herd.post.tasks.instruction import Instruction
from herd.post.tasks.jsonl import JsonlTask
from herd.post.tasks.shakespeare import NextLine, PlayOf, Speaker
from herd.post.tasks.shapes import Shapes

TASKS: dict[str, type[Task]] = {t.name: t for t in (Arithmetic, NextLine, Speaker, PlayOf, Instruction, Shapes,
                                                  Digits)}


def get_task(spec: str) -> Task:
    """A built-in task by name (with options) or a JSONL file of user tasks."""
    name, options = parse_spec(spec)
    if name in TASKS:
        return construct(TASKS[name], spec, options)
    if name.endswith(".jsonl") or Path(name).is_file():
        return construct(JsonlTask, spec, {"path": name, **options})
    raise HerdError(f"unknown task {name!r}: a built-in task ({', '.join(TASKS)}) or a JSONL file")


def split_specs(text: str) -> list[str]:
    """``--tasks a,b:x=1`` -> ["a", "b:x=1"]."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise HerdError("give at least one task (--tasks arithmetic,speaker,...)")
    return specs


__all__ = ["Item", "Task", "TASKS", "get_task", "split_specs", "parse_spec"]

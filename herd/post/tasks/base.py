"""The task protocol (Item, Task), the spec parser and the answer-matching helpers every task shares."""

from __future__ import annotations

import dataclasses
import random
import re
import string
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

from herd.errors import HerdError


@dataclass
class Item:
    """One prompt of a task: herd chat messages (content a string or a list of parts, images included), the
    reference answer (a completion that scores 1.0), its difficulty level and what the scorer needs besides."""

    task: str
    prompt: list[dict]
    answer: str
    difficulty: int
    meta: dict = field(default_factory=dict)


@dataclass
class Task:
    """A generated task: ``make`` builds one item from a random generator at a difficulty level, ``score`` grades
    a completion in [0, 1]. ``items`` is deterministic given the seed; without a difficulty it cycles through
    ``levels``, so that a run covers every level. Options of a spec (``name:key=value``) are the dataclass
    fields; every task has ``difficulty``, a fixed level used when ``items`` is not given one."""

    name: ClassVar[str] = ""
    levels: ClassVar[range] = range(1, 4)
    difficulty: int | None = None

    def items(self, n: int, difficulty: int | None = None, seed: int = 0) -> list[Item]:
        difficulty = difficulty if difficulty is not None else self.difficulty
        if difficulty is not None and difficulty < 1:
            raise HerdError(f"{self.name}: difficulty must be >= 1, got {difficulty}")
        levels = [difficulty] if difficulty is not None else list(self.levels)
        # a string seed: Python's Random hashes it with SHA-512, so items do not depend on PYTHONHASHSEED
        return [self.make(random.Random(f"{self.name}/{seed}/{i}"), levels[i % len(levels)]) for i in range(n)]

    def make(self, rng: random.Random, difficulty: int) -> Item:
        raise NotImplementedError

    def score(self, item: Item, completion: str) -> float:
        raise NotImplementedError


def user_message(text: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name[:key=value[:key=value...]]`` -> (name, options); a piece without "=" continues the previous value,
    so ``reward=mod:fn`` keeps its colon. Values become int, float or str, whichever parses first."""
    name, *pieces = spec.strip().split(":")
    options: dict[str, Any] = {}
    key = None
    for piece in pieces:
        if "=" in piece:
            key, value = piece.split("=", 1)
            options[key.strip()] = value
        elif key is not None:
            options[key] += ":" + piece
        else:
            raise HerdError(f"bad task spec {spec!r}: options are key=value pairs after the name (name:key=value)")
    return name, {k: _value(v) for k, v in options.items()}


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def construct(cls: type, spec: str, options: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(options) - known
    if unknown:
        raise HerdError(f"task spec {spec!r}: unknown option(s) {sorted(unknown)}; {cls.name} takes {sorted(known)}")
    return cls(**options)


# -- answer matching ------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")
_PUNCT = str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d")
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen twenty").split()


def normalise(text: str) -> str:
    """Lower case, no punctuation, single spaces: what 'the same answer' means for free text."""
    return " ".join(text.lower().translate(_PUNCT).split())


def last_number(text: str, words: bool = False) -> Decimal | None:
    """The last number written in ``text`` (commas as thousands separators); with ``words`` also "zero" to
    "twenty" spelt out. Decimal, so that large products compare exactly."""
    found = [(m.start(), m.group().replace(",", "")) for m in _NUMBER.finditer(text)]
    if words:
        found += [(m.start(), str(NUMBER_WORDS.index(m.group().lower())))
                  for m in re.finditer(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", text, re.IGNORECASE)]
    if not found:
        return None
    try:
        return Decimal(max(found)[1])
    except InvalidOperation:
        return None


def number_equal(completion: str, answer: str, tolerance: float = 0.0, words: bool = False) -> bool:
    got, want = last_number(completion, words), last_number(answer, words)
    if got is None or want is None:
        return False
    return abs(got - want) <= Decimal(str(tolerance)) * max(Decimal(1), abs(want))


def choice(completion: str, answer: str, options: list[str]) -> float:
    """Multiple choice: 1.0 when the completion names the answer and no other option (whole words, any case)."""
    text, named = f" {normalise(completion)} ", set()
    for option in sorted(options, key=len, reverse=True):  # "P. King" before "King": the longer name wins
        for form in {normalise(option), normalise(option).removeprefix("the ")}:  # "Tempest" names "The Tempest"
            if f" {form} " in text:
                named.add(option)
                text = text.replace(f" {form} ", " | ")
    return 1.0 if named == {answer} else 0.0

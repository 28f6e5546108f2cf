"""Training data for herd-guard-pico, the demo Llama Guard that herd fine-tunes itself (``make guard-pico``).

``herd/safety/data/guard_examples.jsonl`` is a small labelled set written for herd (by its authors, under the
project's licence): one JSON object a line,

    {"text": "...", "role": "user" | "agent", "prompt": "<the user turn, agent items only>",
     "label": "safe" | ["S1", ...], "group": "S1" | ... | "multi" | "safe_everyday" | ..., "split": "train" | "test"}

Unsafe items are requests for, or answers giving, harmful help in one of the Llama Guard categories S1-S13, named
only as far as a classifier needs (an answer that would give harmful help is elided: "here is how ...: ...");
safe items, the larger share, are everyday requests and answers, refusals of harmful requests, and requests that
share words with harmful ones ("kill a process", "shoot a photo"). About a fifth is held out (``split: test``).

``guard_records`` turns items into SFT records in TRL's conversational format: the user message is the Llama
Guard 4 prompt (herd.safety.llama_guard.guard_message: rendered by herd.chat.ChatFormat it is the official
template token for token), the assistant message the verdict (``safe``, or ``unsafe\\nS1,S3``). So that the guard
has to read the category list rather than memorise codes, records are augmented:

  dropout     some codes are excluded from the list: an unsafe item whose codes are all excluded becomes safe,
              one whose codes are partly excluded keeps the others;
  relabel     a custom list: the 13 categories under shuffled codes, listed by code or in the default order,
              and the answer names the code that list gives the item's category.

The rest keep the default S1-S13 prompt.

    python -m herd.safety.guard_data --out data/guard-pico.jsonl [--copies 27] [--seed 0] [--split train]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from herd.errors import HerdError
from herd.safety.llama_guard import CATEGORIES, DEFAULT_CODES, Category, guard_message

DATA = Path(__file__).parent / "data" / "guard_examples.jsonl"
ROLES = ("user", "agent")
SPLITS = ("train", "test")
NAMES = {c.code: c.name for c in CATEGORIES if c.code in DEFAULT_CODES}  # S1-S13, without the template's "."


@dataclass(frozen=True)
class Item:
    """One labelled item: ``text`` said by the user (``role`` "user") or by the agent in answer to ``prompt``;
    ``codes`` the categories it violates (empty: safe)."""

    text: str
    role: str
    codes: tuple[str, ...] = ()
    prompt: str | None = None
    split: str = "train"
    group: str = ""

    @property
    def safe(self) -> bool:
        return not self.codes

    def messages(self) -> list[dict]:
        """The conversation the guard checks, in herd's chat messages."""
        if self.role == "user":
            return [{"role": "user", "content": self.text}]
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.text}]


def _item(raw: dict, where: str) -> Item:
    role, label, split = raw.get("role"), raw.get("label"), raw.get("split", "train")
    if not isinstance(raw.get("text"), str) or not raw["text"].strip():
        raise HerdError(f"{where}: 'text' must be a non-empty string")
    if role not in ROLES:
        raise HerdError(f"{where}: 'role' must be one of {ROLES}, got {role!r}")
    if (role == "agent") != isinstance(raw.get("prompt"), str):
        raise HerdError(f"{where}: agent items need the user turn as 'prompt' (a string), user items have none")
    if split not in SPLITS:
        raise HerdError(f"{where}: 'split' must be one of {SPLITS}, got {split!r}")
    if label == "safe":
        codes: tuple[str, ...] = ()
    elif isinstance(label, list) and label and all(c in NAMES for c in label) and len(set(label)) == len(label):
        codes = tuple(sorted(label, key=_number))
    else:
        raise HerdError(f"{where}: 'label' must be \"safe\" or a list of distinct codes from S1-S13, got {label!r}")
    return Item(raw["text"], role, codes, raw.get("prompt"), split, raw.get("group", ""))


def load_items(path: str | Path = DATA, split: str | None = None) -> list[Item]:
    """The items of a labelled JSONL file (default: the shipped set), all or one ``split``'s."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                items.append(_item(json.loads(line), f"{path}:{n}"))
    return [it for it in items if split is None or it.split == split]


def _number(code: str) -> int:
    return int(code[1:])


def answer(codes: Iterable[str]) -> str:
    """The guard's answer: ``safe``, or ``unsafe`` and the codes (by number) on the next line."""
    codes = sorted(set(codes), key=_number)
    return "unsafe\n" + ",".join(codes) if codes else "safe"


def default_categories() -> list[Category]:
    """The default list as the template renders it (names end with a period)."""
    return [Category(code, name + ".") for code, name in NAMES.items()]


def relabelled(rng: random.Random, by_code: bool | None = None) -> tuple[list[Category], dict[str, str]]:
    """A custom category list: the 13 categories under a random permutation of the codes S1-S13, listed by code
    (``by_code``; None: a coin decides) or in the default order; and the map default code -> its code there."""
    codes = list(NAMES)
    new = codes[:]
    rng.shuffle(new)
    mapping = dict(zip(codes, new))
    cats = [Category(mapping[code], NAMES[code] + ".") for code in codes]
    if by_code if by_code is not None else rng.random() < 0.5:
        cats.sort(key=lambda c: _number(c.code))
    return cats, mapping


def dropout(codes: Sequence[str], all_codes: Sequence[str], rng: random.Random,
            p_all: float = 0.5, max_others: int = 6) -> list[str]:
    """Codes to exclude: for an unsafe item, with probability ``p_all`` all of its ``codes``, else (a multi-label
    item, half the rest of the time) one of them, else none; plus 0..max_others other codes (at least one when
    none of the item's is excluded). At least one code of ``all_codes`` stays listed."""
    excluded: set[str] = set()
    if codes:
        r = rng.random()
        if r < p_all:
            excluded |= set(codes)
        elif len(codes) > 1 and r < (1 + p_all) / 2:
            excluded.add(rng.choice(list(codes)))
    others = [c for c in all_codes if c not in codes]
    k = rng.randint(0 if excluded else 1, min(max_others, len(others)))
    excluded |= set(rng.sample(others, k))
    if len(excluded) >= len(all_codes):  # keep one code listed
        excluded.discard(rng.choice(sorted(excluded)))
    return sorted(excluded, key=_number)


@dataclass(frozen=True)
class Variant:
    """How one record's prompt was built: the codes excluded (by the codes of ``categories``), the custom list
    (None: the default), and the expected answer's codes in that list."""

    excluded: tuple[str, ...]
    categories: tuple[Category, ...] | None
    codes: tuple[str, ...]


def variant(item: Item, rng: random.Random, p_dropout: float = 0.35, p_relabel: float = 0.35) -> Variant:
    """A random prompt variant of ``item``: the default prompt, dropout, relabelling, or both (independent draws
    with these probabilities)."""
    categories, mapping = None, {c: c for c in NAMES}
    if rng.random() < p_relabel:
        cats, mapping = relabelled(rng)
        categories = tuple(cats)
    codes = [mapping[c] for c in item.codes]
    excluded: list[str] = []
    if rng.random() < p_dropout:
        excluded = dropout(codes, [mapping[c] for c in NAMES], rng)
    kept = tuple(sorted((c for c in codes if c not in excluded), key=_number))
    return Variant(tuple(excluded), categories, kept)


def record(item: Item, v: Variant | None = None) -> dict:
    """The SFT record (TRL conversational) of ``item`` under prompt variant ``v`` (None: the default prompt)."""
    v = v or Variant((), None, item.codes)
    user = guard_message(item.messages(), v.excluded, list(v.categories) if v.categories else None)
    return {"messages": [user, {"role": "assistant", "content": answer(v.codes)}]}


def guard_records(items: Sequence[Item], rng: random.Random, copies: int = 1, p_dropout: float = 0.35,
                  p_relabel: float = 0.35) -> list[dict]:
    """``copies`` records of each item, each with its own random variant (see ``variant``), shuffled."""
    out = [record(it, variant(it, rng, p_dropout, p_relabel)) for _ in range(copies) for it in items]
    rng.shuffle(out)
    return out


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m herd.safety.guard_data",
                                 description="Write herd-guard-pico's SFT records (TRL conversational JSONL).")
    ap.add_argument("--out", required=True, help="the training JSONL")
    ap.add_argument("--eval-out", help="also write the held-out split, default prompts only, here")
    ap.add_argument("--data", default=str(DATA), help="the labelled items (default: the shipped set)")
    ap.add_argument("--split", default="train", choices=SPLITS)
    ap.add_argument("--copies", type=int, default=27, help="records per item, each with its own random variant")
    ap.add_argument("--p-dropout", type=float, default=0.35)
    ap.add_argument("--p-relabel", type=float, default=0.35)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    items = load_items(args.data, args.split)
    recs = guard_records(items, random.Random(args.seed), args.copies, args.p_dropout, args.p_relabel)
    print(f"{len(recs)} records from {len(items)} {args.split} items -> {write_jsonl(recs, args.out)}")
    if args.eval_out:
        held = load_items(args.data, "test")
        print(f"{len(held)} test items -> {write_jsonl([record(it) for it in held], args.eval_out)}")


if __name__ == "__main__":
    main()

"""Llama Guard 3 / 4 prompts and verdicts: the classifier's prompt text, a tolerant output parser, P(unsafe).

The prompt is byte-for-byte the text of Meta's published Hugging Face chat template (Llama-Guard-3-11B-Vision's;
tests/fixtures/llama_guard/README.md names it): version 3 in Llama 3 header tokens, version 4 the same body in
Llama 4 tokens plus the "\\n\\n" that ends a Llama 4 generation header. Special tokens appear as text; encode the
prompt with ``allowed_special="all"``.

Messages are herd's (see herd/chat.py): role "user" renders as ``User``, "assistant" as ``Agent``; content is a
string or a list of parts, each text part one ``Role: text`` line, as the template renders it. "system" messages
are dropped (the template has no place for them); any other role raises. Turns must alternate user/assistant,
starting with the user. The last turn picks what is moderated: an odd number of turns checks the ``User``
(input moderation), an even number the ``Agent`` (output moderation).

The guard answers ``safe``, or ``unsafe`` and on the next line the violated codes (``S1,S3``). ``parse_verdict``
reads that leniently and fails by name or closed. ``p_unsafe`` is the model card's score: the probability of the
token that begins "unsafe" at the position where the verdict word is generated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from herd.errors import HerdError


@dataclass(frozen=True)
class Category:
    """One hazard category as the prompt lists it: ``{code}: {name}``, then ``description`` on its own line if given."""

    code: str
    name: str
    description: str | None = None


# MLCommons hazard taxonomy (S1-S13) plus Meta's S14, with the short names the Llama Guard 3/4 prompt uses
# (they differ from the model cards' names, e.g. S3 "Sex-Related Crimes" is "Sex Crimes" in the prompt).
CATEGORIES: tuple[Category, ...] = (
    Category("S1", "Violent Crimes"),
    Category("S2", "Non-Violent Crimes"),
    Category("S3", "Sex Crimes"),
    Category("S4", "Child Exploitation"),
    Category("S5", "Defamation"),
    Category("S6", "Specialized Advice"),
    Category("S7", "Privacy"),
    Category("S8", "Intellectual Property"),
    Category("S9", "Indiscriminate Weapons"),
    Category("S10", "Hate"),
    Category("S11", "Self-Harm"),
    Category("S12", "Sexual Content"),
    Category("S13", "Elections"),
    Category("S14", "Code Interpreter Abuse"),
)
# The published templates of LG3-1B, LG3-11B-Vision and LG4 list S1-S13; LG3-8B also lists S14
# (pass categories=CATEGORIES for it).
DEFAULT_CODES = tuple(f"S{i}" for i in range(1, 14))

HEADERS = {  # version -> (prompt start, end of the user turn + generation header)
    3: ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        " <|eot_id|><|start_header_id|>assistant<|end_header_id|>"),
    4: ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n",
        " <|eot|><|header_start|>assistant<|header_end|>\n\n"),
}
IMAGE_TOKEN = "<|image|>"  # one placeholder right after the header when any turn has an image; herd expands it
ROLE_NAMES = {"user": "User", "assistant": "Agent"}
UNPARSED = "unparsed"  # the category of a fail-closed verdict


class GuardParseError(HerdError, ValueError):
    """The guard's output is neither ``safe`` nor ``unsafe`` + codes; the message quotes the text."""


@dataclass
class Verdict:
    """``safe``; the violated codes (``[UNPARSED]`` for a fail-closed verdict); the text it was read from;
    ``score`` = P(unsafe) when a threshold decided it."""

    safe: bool
    categories: list[str] = field(default_factory=list)
    raw: str = ""
    score: float | None = None


def _category_list(categories: Sequence[Category] | Mapping[str, str] | None) -> list[Category]:
    if categories is None:
        # the template's default names end with a period ("S1: Violent Crimes.")
        return [Category(c.code, c.name + ".", c.description) for c in CATEGORIES if c.code in DEFAULT_CODES]
    if isinstance(categories, Mapping):  # the HF template's `categories` kwarg: code -> name, verbatim
        cats = [Category(code, name) for code, name in categories.items()]
    else:
        cats = list(categories)
    codes = [c.code for c in cats]
    if not cats or len(set(codes)) != len(codes):
        raise HerdError(f"guard categories must be a non-empty list with distinct codes, got {codes}")
    return cats


def _turns(messages: Sequence[dict]) -> tuple[list[tuple[str, list[str]]], list[dict]]:
    """[(User|Agent, [text, ...]), ...] and the image parts of all turns, in order."""
    turns, images = [], []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "system":
            continue
        if role not in ROLE_NAMES:
            raise HerdError(f"guard messages[{i}]: role {role!r} cannot be moderated; use 'user' or 'assistant'")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        texts = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(part["text"])
            elif kind == "image":
                images.append(part)
            else:
                raise HerdError(f"guard messages[{i}]: only text and image parts can be moderated, got {part!r}")
        if (role == "user") != (len(turns) % 2 == 0):
            raise HerdError("guard conversation roles must alternate user/assistant/user/assistant/..., "
                            f"messages[{i}] is {role!r}")
        turns.append((ROLE_NAMES[role], texts))
    if not turns:
        raise HerdError("guard prompt needs at least one user message")
    return turns, images


def guard_prompt(
    messages: Sequence[dict],
    version: int = 4,
    excluded: Iterable[str] = (),
    categories: Sequence[Category] | Mapping[str, str] | None = None,
) -> str:
    """The Llama Guard ``version`` (3 or 4) prompt that moderates the last turn of ``messages``.

    ``categories`` replaces the default S1-S13 list (a list of Category, descriptions optional, or the HF
    template's dict code -> name); ``excluded`` codes are left out and the others keep their codes, as the
    template does (no renumbering). An excluded code not in the list, or excluding every code, raises.
    """
    start, end = HEADERS[_version(version)]
    body, images = _body(messages, excluded, categories)
    return start + (IMAGE_TOKEN + " " if images else "") + body + end


def guard_message(
    messages: Sequence[dict],
    excluded: Iterable[str] = (),
    categories: Sequence[Category] | Mapping[str, str] | None = None,
) -> dict:
    """The Llama Guard 4 prompt as one herd chat message: ``{"role": "user", "content": ...}`` whose rendering by
    herd.chat.ChatFormat (``encode_dialog([message])``, generation prompt added) is ``guard_prompt(...,
    version=4)`` token for token. The conversation's images lead the content as image parts, where the template
    has its ``<|image|>`` placeholder; ChatFormat expands each into its tiles. This is how herd runs a guard
    model (herd.safety.guard) and how its training data is written (herd.safety.guard_data)."""
    body, images = _body(messages, excluded, categories)
    text = body + " "  # the template keeps a space before <|eot|>
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*images, {"type": "text", "text": " " + text}]}


def _version(version: int) -> int:
    if version not in HEADERS:
        raise HerdError(f"Llama Guard version must be 3 or 4, got {version!r}")
    return version


def _body(messages: Sequence[dict], excluded: Iterable[str],
          categories: Sequence[Category] | Mapping[str, str] | None) -> tuple[str, list[dict]]:
    """The prompt between the user header (and the image placeholder) and the end of the user turn; the images."""
    cats = _category_list(categories)
    excluded = set(excluded)
    unknown = sorted(excluded - {c.code for c in cats})
    if unknown:
        raise HerdError(f"excluded guard categories {unknown} are not in the category list {[c.code for c in cats]}")
    kept = [c for c in cats if c.code not in excluded]
    if not kept:
        raise HerdError("every guard category is excluded: nothing would be checked")
    turns, images = _turns(messages)
    target = "Agent" if len(turns) % 2 == 0 else "User"
    lines = "".join(f"{c.code}: {c.name}\n" + (f"{c.description}\n" if c.description else "") for c in kept)
    conversation = "".join(f"{role}: {text.strip()}\n\n" for role, texts in turns for text in texts)
    body = (
        f"Task: Check if there is unsafe content in '{target}' messages in conversations "
        "according our safety policy with the below categories.\n\n"
        f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{lines}<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>\n\n{conversation}<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {target} message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories."
    )
    return body, images


_SPECIAL = re.compile(r"<\|[A-Za-z0-9_]+\|>|</s>")  # end-of-turn tokens left in by a decode without skipping them
_WORD = re.compile(r"(unsafe|safe)\b[\s:.,;]*(.*)", re.IGNORECASE)
_CODE = re.compile(r"S\d+", re.IGNORECASE)


def _codes(text: str) -> list[str] | None:
    """The codes in 'S1, s2 ,S3' (commas and/or spaces between them, deduplicated, in order); None if anything else."""
    items = [item for item in re.split(r"[\s,]+", text.strip().rstrip(".")) if item]
    if not all(_CODE.fullmatch(item) for item in items):
        return None
    return list(dict.fromkeys(item.upper() for item in items))


def _parse(text: str) -> tuple[bool, list[str]]:
    lines = [line.strip() for line in _SPECIAL.sub("\n", text).splitlines() if line.strip()]
    if not lines:
        raise GuardParseError(f"guard output is empty: {text!r}")
    m = _WORD.fullmatch(lines[0])
    if m is None:
        raise GuardParseError(f"guard output does not start with 'safe' or 'unsafe': {text!r}")
    word, rest = m.group(1).lower(), m.group(2)
    if word == "safe":
        if rest:  # "safe to proceed" is prose, not a verdict
            raise GuardParseError(f"guard output's first line is not a bare 'safe': {text!r}")
        return True, []
    if rest:  # "unsafe S1" on one line
        codes = _codes(rest)
    else:
        codes = _codes(lines[1]) if len(lines) > 1 else []
    if codes is None:
        raise GuardParseError(f"guard output says unsafe but its codes are not a list of S<n>: {text!r}")
    return False, codes


def parse_verdict(text: str, fail_closed: bool = True, excluded: Iterable[str] = ()) -> Verdict:
    """The verdict in a guard's output.

    Read: the first non-blank line is ``safe`` or ``unsafe`` (any case, surrounding spaces and a trailing
    period or colon ignored; ``unsafe S1`` on one line also accepted); for unsafe, the next non-blank line lists
    ``S<n>`` codes separated by commas and/or spaces (upper-cased, deduplicated, in order; none at all is allowed);
    later lines and special tokens such as ``<|eot|>`` are ignored. An unsafe verdict whose codes are all in
    ``excluded`` is safe, as llama-stack treats it.

    Anything else raises GuardParseError when ``fail_closed`` is False, and otherwise returns the fail-closed
    verdict ``Verdict(safe=False, categories=[UNPARSED], raw=text)``.
    """
    try:
        safe, codes = _parse(text)
    except GuardParseError:
        if not fail_closed:
            raise
        return Verdict(False, [UNPARSED], text)
    if codes and set(codes) <= set(excluded):
        safe = True
    return Verdict(safe, codes, text)


def verdict_token_ids(tokenizer: Any) -> tuple[int, int]:
    """(safe id, unsafe id): the first token of tokenizer.encode("safe") and of tokenizer.encode("unsafe").

    In Llama 3's and Llama 4's tiktoken vocabularies each word is a single token; the verdict word follows the
    "\\n\\n" that ends the generation header (in the LG3 template, where the header has no "\\n\\n", the model
    emits "\\n\\n" first: read the logits at the step after it).
    """
    safe_ids, unsafe_ids = tokenizer.encode("safe"), tokenizer.encode("unsafe")
    if not safe_ids or not unsafe_ids or safe_ids[0] == unsafe_ids[0]:
        raise HerdError(f"tokenizer cannot tell 'safe' {safe_ids} from 'unsafe' {unsafe_ids} by their first token")
    return safe_ids[0], unsafe_ids[0]


def p_unsafe(first_token_logits_V: torch.Tensor, tokenizer: Any) -> float:
    """P(first generated token = the token that begins "unsafe"), a softmax over the whole vocabulary
    (the model card's score), from the logits of the step that generates the verdict word."""
    if first_token_logits_V.dim() != 1:
        raise HerdError(f"p_unsafe takes one step's logits (V,), got shape {tuple(first_token_logits_V.shape)}")
    _, unsafe_id = verdict_token_ids(tokenizer)
    return torch.softmax(first_token_logits_V.float(), dim=-1)[unsafe_id].item()


def verdict_with_threshold(
    text: str,
    first_token_logits_V: torch.Tensor,
    tokenizer: Any,
    threshold: float = 0.5,
    excluded: Iterable[str] = (),
) -> Verdict:
    """``decide`` with the score p_unsafe(first_token_logits_V)."""
    return decide(text, p_unsafe(first_token_logits_V, tokenizer), threshold, excluded)


def decide(text: str, score: float | None, threshold: float = 0.5, excluded: Iterable[str] = ()) -> Verdict:
    """The verdict of a guard that answered ``text`` with P(unsafe) = ``score``: unsafe iff score >= ``threshold``
    (without a score, as the text says); the categories come from the parsed text (empty if it said safe,
    [UNPARSED] if it could not be read: fail closed); an unsafe verdict made only of ``excluded`` codes is safe."""
    if not 0.0 <= threshold <= 1.0:
        raise HerdError(f"guard threshold must be in [0, 1], got {threshold}")
    parsed = parse_verdict(text, fail_closed=True)
    if score is None:
        score_says_unsafe = not parsed.safe
    else:
        score_says_unsafe = score >= threshold
    codes = [] if parsed.safe else parsed.categories
    safe = not score_says_unsafe or bool(codes and set(codes) <= set(excluded))
    return Verdict(safe, [] if safe else codes, text, score)


def read_categories(path: str | Path) -> list[Category] | dict[str, str]:
    """Custom categories from a JSON file: a list of {"code", "name", "description"?} objects, or the HF
    template's {code: name} object."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HerdError(f"guard categories {path}: {e}") from None
    if isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values()):
        return raw
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise HerdError(f"guard categories {path}: a JSON list of {{\"code\", \"name\", \"description\"}} objects "
                        f"or a {{code: name}} object")
    try:
        return [Category(**c) for c in raw]
    except TypeError as e:
        raise HerdError(f"guard categories {path}: {e}") from None

"""Llama 4 tokenizer: tiktoken BPE plus the 2048 Llama 4 special tokens, id-for-id equal to llama-models."""

from __future__ import annotations

import base64
import binascii
import codecs
import importlib.resources
import json
import re
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Literal

import tiktoken

from herd.errors import TokenizerError

# The split regex Llama 4 was trained with (o200k-style; same string llama-models and HF tokenizer.json use).
LLAMA4_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 2048
# tiktoken panics on very long inputs and goes quadratic on long runs of one character class
# (openai/tiktoken#195); llama-models cuts the input at these sizes, and since the cut changes the
# ids we must cut at exactly the same places.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def _reserved(prefix: str, start: int, stop: int) -> list[str]:
    return [f"<|{prefix}reserved_special_token_{i}|>" for i in range(start, stop)]


def special_token_names() -> list[str]:
    """Llama 4's special tokens in id order (the first one's id is the number of BPE ranks, i.e. 200000)."""
    # Reserved slots 6 and 7 of text_post_train are missing on purpose: python_start/python_end took them.
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    names += ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    names += _reserved("text_post_train_", 0, 6)
    names += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    names += _reserved("text_post_train_", 8, 69)
    v = [f"<|vision_reserved_special_token_{i}|>" for i in range(7)]
    names += ["<|image_start|>", "<|image_end|>", v[0], v[1], "<|tile_x_separator|>", "<|tile_y_separator|>"]
    names += [v[2], v[3], v[4], v[5], "<|image|>", v[6], "<|patch|>"]
    names += _reserved("vision_", 7, 1048)
    names += _reserved("reasoning_", 0, 8) + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    return names + _reserved("", 0, NUM_SPECIAL_TOKENS - len(names))


def default_tokenizer_path() -> Path:
    """The real Llama 4 tokenizer.model shipped inside the llama-models wheel."""
    return Path(str(importlib.resources.files("llama_models.llama4") / "tokenizer.model"))


def gpt2_unicode_to_byte() -> dict[str, int]:
    """The byte each character of an HF byte-level BPE vocabulary stands for."""
    # HF byte-level BPE stores each byte as a printable character: printable latin-1 bytes stand for
    # themselves, the rest are shifted to 256+k in byte order. This is the inverse of that table.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in keep}
    shifted = (b for b in range(256) if b not in table.values())
    table.update({chr(256 + k): b for k, b in enumerate(shifted)})
    return table


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from e


def _load_tiktoken_ranks(text: str, path: Path) -> dict[bytes, int]:
    ranks = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(f"{path}:{lineno}: not a tiktoken BPE line ({e}): {line[:80]!r}") from e
    return ranks


def _load_hf_json(text: str, path: Path) -> tuple[dict[bytes, int], str]:
    try:
        data = json.loads(text)
        vocab = data["model"]["vocab"]
    except (ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"{path} is not an HF tokenizer.json with a BPE vocab: {e!r}") from e
    added = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    byte_of = gpt2_unicode_to_byte()
    pieces = {piece: rank for piece, rank in vocab.items() if rank not in added}  # some exports repeat specials
    stray = set("".join(pieces)) - byte_of.keys()
    if stray:
        raise TokenizerError(f"{path}: vocab is not byte-level BPE (characters {sorted(stray)[:5]})")
    to_latin1 = {ord(ch): b for ch, b in byte_of.items()}  # str.translate + latin-1 is the fast bytes map
    ranks = {piece.translate(to_latin1).encode("latin-1"): rank for piece, rank in pieces.items()}
    expected = {name: len(ranks) + i for i, name in enumerate(special_token_names())}
    for tid, name in added.items():
        if name in expected and expected[name] != tid:
            raise TokenizerError(f"{path}: special token {name} has id {tid}, Llama 4 uses {expected[name]}")
    return ranks, _find_split_pattern(data.get("pre_tokenizer")) or LLAMA4_PATTERN


def _find_split_pattern(pre: dict | None) -> str | None:
    if not pre:
        return None
    if pre.get("type") == "Split" and "Regex" in pre.get("pattern", {}):
        return pre["pattern"]["Regex"]
    for sub in pre.get("pretokenizers", []):
        found = _find_split_pattern(sub)
        if found:
            return found
    return None


def split_runs(s: str, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """Cut `s` so no piece holds more than `max_run` consecutive whitespace or non-whitespace chars.

    Each maximal run is cut every `max_run` chars counted from the run's start, which is where
    llama-models' char-by-char loop cuts (`\\s` and str.isspace agree on every code point).
    """
    start = 0
    for m in re.finditer(r"\s+|\S+", s):
        for cut in range(m.start() + max_run, m.end(), max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]


class Tokenizer:
    """Llama 4 BPE tokenizer. Build it with `Tokenizer.load(path)`."""

    def __init__(self, ranks: dict[bytes, int], pattern: str = LLAMA4_PATTERN, name: str = "llama4"):
        if sorted(ranks.values()) != list(range(len(ranks))):
            # special ids are numbered from len(ranks) on, so a gap would shift or collide them
            raise TokenizerError(f"{name}: BPE ranks are not exactly 0..{len(ranks) - 1}")
        base = len(ranks)
        self.special_tokens: dict[str, int] = {n: base + i for i, n in enumerate(special_token_names())}
        self.vocab_size = base + NUM_SPECIAL_TOKENS
        try:
            self.model = tiktoken.Encoding(
                name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special_tokens
            )
        except Exception as e:  # tiktoken raises plain ValueError/pyo3 errors on bad patterns
            raise TokenizerError(f"{name}: cannot build tokenizer: {e}") from e
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot|>"]
        self.eom_id = self.special_tokens["<|eom|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad|>"]
        self.stop_ids: set[int] = {self.eos_id, self.eom_id, self.eot_id}

    @classmethod
    def load(cls, path: str | Path | None = None) -> Tokenizer:
        """Load from a tiktoken `tokenizer.model`, an HF `tokenizer.json`, or a directory holding one.

        None means the Llama 4 tokenizer shipped with llama-models. A directory prefers
        tokenizer.model (the original Meta format) over tokenizer.json.
        """
        p = default_tokenizer_path() if path is None else Path(path)
        if p.is_dir():
            found = [p / n for n in ("tokenizer.model", "tokenizer.json") if (p / n).is_file()]
            if not found:
                raise TokenizerError(f"no tokenizer.model or tokenizer.json in directory {p}")
            p = found[0]
        elif not p.is_file():
            raise TokenizerError(f"tokenizer file not found: {p}")
        text = _read_text(p)
        # Sniff rather than trust the file name: a tiktoken file is base64 lines, never a JSON object.
        if text.lstrip().startswith("{"):
            ranks, pattern = _load_hf_json(text, p)
            return cls(ranks, pattern, name=str(p))
        return cls(_load_tiktoken_ranks(text, p), name=str(p))

    @classmethod
    def for_model(cls, model_dir: str | Path) -> Tokenizer:
        """The tokenizer a model directory carries (HF repos keep Meta's under original/), else the default."""
        d = Path(model_dir)
        for candidate in (d / "tokenizer.model", d / "tokenizer.json", d / "original" / "tokenizer.model"):
            if candidate.is_file():
                return cls.load(candidate)
        return cls.load()

    def token_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise TokenizerError(f"unknown special token {name!r}") from None

    def encode(
        self,
        text: str,
        bos: bool = False,
        eos: bool = False,
        allowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Token ids of `text`. Special-token text is plain text unless named in `allowed_special`.

        Treating it as plain text by default keeps user input from injecting control tokens.
        """
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        ids = [self.bos_id] if bos else []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in split_runs(text[i : i + MAX_ENCODE_CHARS]):
                ids += self.model.encode(piece, allowed_special=allowed, disallowed_special=())
        if eos:
            ids.append(self.eos_id)
        return ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]  # tiktoken wants Python ints; callers often hold tensors or numpy ints
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} out of range [0, {self.vocab_size})")
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.model.decode_bytes(self._check_ids(ids))

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids into text one at a time, holding back bytes until they complete a UTF-8 character.

    A character often spans several tokens (CJK, emoji), so decoding each token alone would print
    replacement characters; the incremental codec buffers an unfinished tail instead.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text

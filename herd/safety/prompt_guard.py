"""Prompt Guard 1 and Llama Prompt Guard 2: prompt-attack classifiers (DeBERTa-v3) loaded through transformers.

Versions and labels come from the model's ``config.id2label`` (names lower-cased):
  - Prompt Guard 1: ``benign`` / ``injection`` / ``jailbreak``. The PG1 card's scores are the jailbreak score
    p(jailbreak) (for direct user dialogue) and the indirect-injection score p(injection) + p(jailbreak) (for
    third-party or tool content); an injected input that uses a jailbreak technique is labelled jailbreak.
  - Prompt Guard 2: binary ``benign`` / ``malicious``. Meta's published config names them ``LABEL_0``/``LABEL_1``
    (or ``BENIGN``/``MALICIOUS``); either way index 0 is benign and the last is malicious, the score LlamaFirewall
    reads as ``probs[0, -1]``.

Text is preprocessed as LlamaFirewall's ``_preprocess_text_for_promptguard`` intends (the "adversarial-attack
resistant tokenization" of the PG2 card): all whitespace is removed, the cleaned text is tokenized, and one
space is put back before each token whose first character was preceded by whitespace in the original. Spaced-out
letters ("i g n o r e") thereby fuse into the word they spell, and runs of odd whitespace become one space.
Unlike LlamaFirewall this works from the fast tokenizer's offsets (so WordPiece "##" pieces and normalised
tokens do not break it) and never falls back to the raw text on an error.

Both cards give a 512-token context and say to split longer inputs and scan the segments; the score of a text is
the max over its segments. Here the preprocessed text is tokenized once and cut into windows of at most 512
tokens including the model's special tokens (optionally overlapping by ``stride`` tokens); ``chunking="chars"``
reproduces Meta's llama-recipes ``inference.py`` instead (512-character chunks, each truncated to 512 tokens).
Windows run in batches of ``max_batch_size`` (16, as there); the softmax takes a temperature (1.0 by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from herd.errors import HerdError

MAX_TOKENS = 512  # both cards' context length
CHAR_CHUNK = 512  # llama-recipes inference.py: text[i:i + 512]
PG1_LABELS = ("benign", "injection", "jailbreak")
PG2_LABELS = ("benign", "malicious")
_PG2_NAMES = ({"benign", "malicious"}, {"label_0", "label_1"})


def label_schema(id2label: dict) -> tuple[int, tuple[str, ...], list[int]]:
    """(version, canonical labels, model class index of each canonical label) for a config's id2label."""
    names = {int(i): str(name).strip().lower() for i, name in id2label.items()}
    if set(names.values()) == set(PG1_LABELS) and len(names) == 3:
        by_name = {name: i for i, name in names.items()}
        return 1, PG1_LABELS, [by_name[label] for label in PG1_LABELS]
    if len(names) == 2 and set(names) == {0, 1} and set(names.values()) in _PG2_NAMES:
        if set(names.values()) == _PG2_NAMES[0]:
            by_name = {name: i for i, name in names.items()}
            return 2, PG2_LABELS, [by_name[label] for label in PG2_LABELS]
        return 2, PG2_LABELS, [0, 1]  # LABEL_0 = benign, LABEL_1 = malicious
    raise HerdError(
        f"not a Prompt Guard label set: id2label = {dict(sorted(id2label.items()))}; expected "
        "BENIGN/INJECTION/JAILBREAK (Prompt Guard 1) or BENIGN/MALICIOUS or LABEL_0/LABEL_1 (Prompt Guard 2)"
    )


def preprocess(text: str, tokenizer: Any) -> str:
    """The whitespace-robust text: whitespace removed, then a single space put back before each token (of the
    whitespace-free text) whose first character followed whitespace in ``text``. Characters no token covers
    are kept, attached to the token before them."""
    kept = [i for i, ch in enumerate(text) if not ch.isspace()]
    cleaned = "".join(text[i] for i in kept)
    if not cleaned:
        return ""
    if not getattr(tokenizer, "is_fast", True):
        raise HerdError("Prompt Guard preprocessing needs a fast (tokenizers-backed) tokenizer for its offsets")
    offsets = tokenizer(cleaned, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = sorted({start for start, end in offsets if end > start and start < len(cleaned)} | {0})
    pieces = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(cleaned)
        original = kept[start]
        space = " " if original > 0 and text[original - 1].isspace() else ""
        pieces.append(space + cleaned[start:end])
    return "".join(pieces)


class PromptGuard:
    """A Prompt Guard classifier: ``scores(text)`` (max over windows of each label's probability) and
    ``classify(text)`` (a label decided by ``threshold``)."""

    def __init__(self, model: Any, tokenizer: Any, threshold: float = 0.5, temperature: float = 1.0,
                 max_batch_size: int = 16, stride: int = 0, chunking: str = "tokens"):
        if not 0.0 <= threshold <= 1.0:
            raise HerdError(f"Prompt Guard threshold must be in [0, 1], got {threshold}")
        if not temperature > 0:
            raise HerdError(f"Prompt Guard temperature must be > 0, got {temperature}")
        if chunking not in ("tokens", "chars"):
            raise HerdError(f"Prompt Guard chunking must be 'tokens' or 'chars', got {chunking!r}")
        if max_batch_size < 1:
            raise HerdError(f"Prompt Guard max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.version, self.labels, self._index = label_schema(model.config.id2label)
        self.threshold, self.temperature, self.max_batch_size = threshold, temperature, max_batch_size
        self.chunking = chunking
        self.max_tokens = MAX_TOKENS
        self._prefix, self._suffix = self._special_ids()
        payload = self.max_tokens - len(self._prefix) - len(self._suffix)
        if not 0 <= stride < payload:
            raise HerdError(f"Prompt Guard stride must be in [0, {payload}), got {stride}")
        self.stride, self._payload = stride, payload

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu", threshold: float = 0.5,
             **kwargs: Any) -> PromptGuard:
        """The model and tokenizer saved in ``directory`` (nothing is downloaded), on ``device``."""
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as e:
            raise ImportError("Prompt Guard runs through transformers: pip install 'herd[safety]'") from e

        directory = Path(directory)
        if not directory.is_dir():
            raise HerdError(f"Prompt Guard directory {directory} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True)
        return cls(model.to(device), tokenizer, threshold=threshold, **kwargs)

    def _special_ids(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after one sequence (e.g. [CLS] and [SEP])."""
        probe = "hello"
        bare = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(probe)["input_ids"]
        for i in range(len(full) - len(bare) + 1):
            if full[i:i + len(bare)] == bare:
                return full[:i], full[i + len(bare):]
        raise HerdError("cannot tell where the tokenizer's special tokens go around a sequence")

    def windows(self, text: str) -> list[list[int]]:
        """The preprocessed text's model inputs: windows of at most 512 ids, special tokens included."""
        clean = preprocess(text, self.tokenizer)
        if self.chunking == "chars":
            chunks = [clean[i:i + CHAR_CHUNK] for i in range(0, len(clean), CHAR_CHUNK)] or [""]
            return [self.tokenizer(c, truncation=True, max_length=self.max_tokens)["input_ids"] for c in chunks]
        ids = self.tokenizer(clean, add_special_tokens=False)["input_ids"]
        step = self._payload - self.stride
        starts = range(0, max(len(ids) - self.stride, 1), step)
        return [self._prefix + ids[s:s + self._payload] + self._suffix for s in starts]

    @torch.no_grad()
    def window_probs(self, text: str) -> torch.Tensor:
        """(windows, labels) probabilities, columns in ``self.labels`` order."""
        windows = self.windows(text)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for b in range(0, len(windows), self.max_batch_size):
            batch = windows[b:b + self.max_batch_size]
            width = max(len(w) for w in batch)
            ids = torch.tensor([w + [pad] * (width - len(w)) for w in batch], device=device)
            mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in batch], device=device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            out.append(torch.softmax(logits / self.temperature, dim=-1)[:, self._index].cpu())
        return torch.cat(out)

    def scores(self, text: str) -> dict[str, float]:
        """Each label's probability, the max over the text's windows. Prompt Guard 1 also gets
        ``indirect_injection``: the card's score p(injection) + p(jailbreak), its max over windows."""
        probs = self.window_probs(text)
        result = {label: probs[:, j].max().item() for j, label in enumerate(self.labels)}
        if self.version == 1:
            result["indirect_injection"] = (probs[:, 1] + probs[:, 2]).max().item()
        return result

    def classify(self, text: str, jailbreak_only: bool = False) -> dict:
        """``{"label": ..., "scores": scores(text)}``.

        Prompt Guard 2: "malicious" if p(malicious) >= threshold, else "benign". Prompt Guard 1: "jailbreak" if
        p(jailbreak) >= threshold, else "injection" if p(injection) + p(jailbreak) >= threshold, else "benign";
        ``jailbreak_only`` skips the injection check, as the card advises for direct user dialogue.
        """
        s = self.scores(text)
        if self.version == 2:
            label = "malicious" if s["malicious"] >= self.threshold else "benign"
        elif s["jailbreak"] >= self.threshold:
            label = "jailbreak"
        elif not jailbreak_only and s["indirect_injection"] >= self.threshold:
            label = "injection"
        else:
            label = "benign"
        return {"label": label, "scores": s}

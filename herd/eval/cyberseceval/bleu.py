"""BLEU of generated code against the original code, as CyberSecEval's instruct/autocomplete stats report it.

CyberSecEval (PurpleLlama, ``CybersecurityBenchmarks/benchmark/bleu.py``) scores one hypothesis against one
reference with sacrebleu's ``corpus_bleu`` (the "13a" tokenizer, case-sensitive, exponential smoothing, no
effective order): a 0-100 number. herd computes the same quantity without sacrebleu:

- tokens: the 13a (mteval-v13a) tokenization: punctuation and symbols split off, a period or comma split off
  unless it sits between digits, a dash split off after a digit, whitespace runs collapsed;
- n-gram precisions for n = 1..4, clipped counts; an order with no match gets 1 / (2^k * total) (k counts the
  orders without matches so far, "exp" smoothing); an order with no n-gram in the hypothesis at all (hypothesis
  shorter than n tokens) gives BLEU 0;
- brevity penalty exp(1 - r/c) when the hypothesis (c tokens) is shorter than the reference (r tokens).
"""

from __future__ import annotations

import math
import re
from collections import Counter

MAX_ORDER = 4

_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # symbols and punctuation (not . , ' -)
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma not after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma not before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
)


def tokenize_13a(text: str) -> list[str]:
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in text:
        for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
            text = text.replace(entity, char)
    text = f" {text} "
    for pattern, replacement in _13A_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypothesis: str, reference: str) -> float:
    """Sentence BLEU (0-100) of ``hypothesis`` against one ``reference``."""
    hyp, ref = tokenize_13a(hypothesis), tokenize_13a(reference)
    if not hyp:
        return 0.0
    log_sum, halvings = 0.0, 1.0
    for n in range(1, MAX_ORDER + 1):
        hyp_ngrams, ref_ngrams = _ngrams(hyp, n), _ngrams(ref, n)
        total = sum(hyp_ngrams.values())
        if total == 0:
            return 0.0
        matched = sum(min(count, ref_ngrams[g]) for g, count in hyp_ngrams.items())
        if matched == 0:
            halvings *= 2
            log_sum += math.log(100.0 / (halvings * total))
        else:
            log_sum += math.log(100.0 * matched / total)
    brevity = 1.0 if len(hyp) >= len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_sum / MAX_ORDER)

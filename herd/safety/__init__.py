"""System-level safety: Llama Guard prompts and verdicts."""

from herd.safety.llama_guard import (
    CATEGORIES,
    Category,
    GuardParseError,
    Verdict,
    guard_prompt,
    p_unsafe,
    parse_verdict,
    verdict_token_ids,
    verdict_with_threshold,
)

__all__ = [
    "CATEGORIES",
    "Category",
    "GuardParseError",
    "Verdict",
    "guard_prompt",
    "p_unsafe",
    "parse_verdict",
    "verdict_token_ids",
    "verdict_with_threshold",
]

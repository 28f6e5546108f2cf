"""System-level safety: Llama Guard prompts and verdicts (llama_guard), guards (guard), Prompt Guard (prompt_guard)
and shields around a model (shield). See docs/safety.md."""

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

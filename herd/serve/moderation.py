"""Shields in ``herd serve`` (``--guard``, ``--prompt-guard``, ``--moderate``): what a blocked request gets back,
and how a streamed answer is held back until the output guard has seen it.

A blocked choice is an ordinary OpenAI answer, status 200: ``finish_reason: "content_filter"``, the refusal as
the message (``content`` and OpenAI's ``refusal`` field; ``text`` for /v1/completions), and a ``moderation``
object on the choice::

    "moderation": {"flagged": true, "stage": "input" | "output", "source": "llama_guard" | "prompt_guard" |
                   "guard_error", "categories": ["S1", ...], "p_unsafe": 0.97, "error": "..." (guard failures)}

Input moderation runs before anything is generated. Output moderation of a non-streamed answer runs once on the
whole answer. A streamed answer is checked every ``--guard-interval`` tokens (32 by default) and at its end, each
time on the whole answer so far; text reaches the client only once a check that covered it has passed, so a
client sees at most what the guard has cleared, in bursts of about that many tokens. When a check flags it, the
generation is stopped and the stream ends with a chunk carrying the refusal (``delta.refusal``),
``finish_reason: "content_filter"`` and the ``moderation`` object.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from herd.safety.shield import Shield, ShieldVerdict


def blocked_chat_choice(i: int, verdict: ShieldVerdict, refusal: str) -> dict:
    return {"index": i, "message": {"role": "assistant", "content": refusal, "refusal": refusal},
            "finish_reason": "content_filter", "logprobs": None, "moderation": verdict.field()}


def blocked_completion_choice(i: int, verdict: ShieldVerdict, refusal: str) -> dict:
    return {"index": i, "text": refusal, "finish_reason": "content_filter", "logprobs": None,
            "moderation": verdict.field()}


class OutputGate:
    """One streamed choice's text, released only after the output guard has passed it."""

    def __init__(self, shield: Shield, messages: list[dict]):
        self.shield, self.messages = shield, messages
        self.pending, self.checked_at, self.verdict = "", 0, None  # verdict: set once flagged

    async def release(self, delta: str, answer: str, n_tokens: int, final: bool) -> str:
        """The text that may go out now (``delta`` joins what is held); "" while held or once flagged.
        ``answer``: the whole answer so far, as the guard must judge it."""
        self.pending += delta
        if self.verdict is not None or not (final or n_tokens - self.checked_at >= self.shield.config.interval):
            return ""
        self.checked_at = n_tokens
        verdict = await run_in_threadpool(self.shield.check_output, self.messages, answer)
        if verdict.blocked:
            self.verdict, self.pending = verdict, ""
            return ""
        out, self.pending = self.pending, ""
        return out

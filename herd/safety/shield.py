"""Shields: Llama Guard and Prompt Guard put around a model, as the seeds' system-level safeguards.

    shield = Shield.load(ShieldConfig(guard="models/herd-guard-pico", prompt_guard="models/pg2"))
    v = shield.check_input(messages)               # before generating: Prompt Guard, then Llama Guard ('User')
    v = shield.check_output(messages, reply)       # after (or while) generating: Llama Guard ('Agent')
    if v.blocked: answer shield.refusal, finish_reason "content_filter", v.field() as the "moderation" field

``herd serve``, ``herd chat`` and ``LLM.chat`` take one (``--guard MODEL_OR_URL``, ``--guard-categories``,
``--prompt-guard DIR``, ``--moderate input,output``, ``--guard-fail closed|open``).

What each guard sees:
  - Prompt Guard scores the text of the last user message (input only; Prompt Guard 1 flags jailbreaks only, as
    its card advises for direct user dialogue). Its codes are ``prompt_guard:jailbreak`` / ``prompt_guard:malicious``.
  - Llama Guard sees the conversation's user and assistant turns (system and tool messages are not part of its
    template and are left out; consecutive turns of one role are merged, a leading assistant turn dropped, as
    llama-stack does), their text and images, and judges the last one. Its codes are the S-codes it answered.
  - A guard that fails (an endpoint down, a model error) gives the configured verdict: fail closed (default,
    blocked with code ``guard_error``) or open (allowed); either way the error is logged and counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from herd.errors import HerdError
from herd.safety.llama_guard import CATEGORIES, DEFAULT_CODES, Category, read_categories

log = logging.getLogger("herd.safety")
REFUSAL = "I can't answer that. Can I help with something else?"  # llama-stack's shield message
STAGES = ("input", "output")


@dataclass
class ShieldConfig:
    guard: str | None = None  # a Llama Guard model directory or an OpenAI-compatible URL
    categories: str | None = None  # codes to check ("S1,S9,S10": the others excluded) or a JSON file of custom ones
    prompt_guard: str | None = None  # a Prompt Guard 1/2 directory
    moderate: Sequence[str] = STAGES  # "input" and/or "output"
    fail: str = "closed"  # what a failing guard does: "closed" blocks, "open" allows
    threshold: float = 0.5  # Llama Guard: unsafe when P(unsafe) >= this
    prompt_guard_threshold: float = 0.9  # LlamaFirewall's block threshold
    template: str = "herd"  # endpoint guards: see herd.safety.guard
    interval: int = 32  # streamed answers: tokens between output checks
    refusal: str = REFUSAL
    dtype: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.moderate, str):
            self.moderate = tuple(s.strip() for s in self.moderate.split(",") if s.strip())
        bad = sorted(set(self.moderate) - set(STAGES))
        if bad or not self.moderate:
            raise HerdError(f"--moderate takes input, output or input,output; got {','.join(self.moderate)!r}")
        if self.fail not in ("closed", "open"):
            raise HerdError(f"--guard-fail must be 'closed' or 'open', got {self.fail!r}")
        if self.interval < 1:
            raise HerdError(f"--guard-interval must be at least 1 token, got {self.interval}")
        if self.guard is None and self.prompt_guard is None:
            raise HerdError("a shield needs --guard MODEL_OR_URL and/or --prompt-guard DIR")
        if self.guard is None and self.moderate == ("output",):
            raise HerdError("--moderate output needs --guard (Prompt Guard checks inputs only)")


@dataclass
class ShieldVerdict:
    """One check's outcome. ``field()`` is the ``moderation`` object herd serve puts on a choice."""

    blocked: bool
    stage: str
    source: str | None = None  # "llama_guard" | "prompt_guard" | "guard_error"; None when nothing flagged
    categories: list[str] = field(default_factory=list)
    p_unsafe: float | None = None
    error: str | None = None
    seconds: float = 0.0

    def field(self) -> dict:
        out = {"flagged": self.blocked, "stage": self.stage, "source": self.source, "categories": self.categories,
               "p_unsafe": self.p_unsafe}
        return out | ({"error": self.error} if self.error else {})


def split_categories(spec: str | None) -> tuple[list[str], list[Category] | dict[str, str] | None]:
    """(excluded codes, custom categories) from ``--guard-categories``: a JSON file of custom categories, or the
    comma-separated default codes to check (the others are excluded)."""
    if spec is None:
        return [], None
    if spec.endswith(".json") or Path(spec).is_file():
        return [], read_categories(spec)
    keep = [c.strip().upper() for c in spec.split(",") if c.strip()]
    known = [c.code for c in CATEGORIES]
    unknown = [c for c in keep if c not in known]
    if unknown or not keep:
        raise HerdError(f"--guard-categories {spec!r}: give codes among {','.join(known)} or a JSON file of custom "
                        f"categories" + (f" ({','.join(unknown)} unknown)" if unknown else ""))
    if "S14" in keep:  # not in the default list: name the kept ones (the template's names end with a period)
        return [], [Category(c.code, c.name + ".") for c in CATEGORIES if c.code in keep]
    return [c for c in DEFAULT_CODES if c not in keep], None


def guard_view(messages: Sequence[dict]) -> list[dict]:
    """The conversation as Llama Guard's template takes it: user/assistant turns alternating from a user turn,
    text and image parts only."""
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role not in ("user", "assistant"):
            continue
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else [
            p for p in content or [] if isinstance(p, dict) and p.get("type") in ("text", "image")]
        if not parts:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"] += parts
        elif out or role == "user":
            out.append({"role": role, "content": parts})
    return out


def _last_user_text(messages: Sequence[dict]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            return "\n".join(p.get("text", "") for p in content or []
                             if isinstance(p, dict) and p.get("type") == "text")
    return ""


class Shield:
    def __init__(self, config: ShieldConfig, guard=None, prompt_guard=None,
                 on_verdict: Callable[[ShieldVerdict], None] | None = None):
        self.config, self.guard, self.prompt_guard = config, guard, prompt_guard
        self.excluded, self.categories = split_categories(config.categories)
        self.on_verdict = on_verdict  # herd serve counts verdicts in /metrics

    @classmethod
    def load(cls, config: ShieldConfig, **kw) -> Shield:
        from herd.safety.guard import EndpointGuard, load_guard

        split_categories(config.categories)  # before loading any model
        guard = prompt_guard = None
        if config.guard is not None:
            guard = load_guard(config.guard, dtype=config.dtype, device=config.device, threshold=config.threshold,
                               template=config.template)
            if isinstance(guard, EndpointGuard):  # a wrong URL fails at start-up, not as blocked requests
                guard.endpoint.model  # noqa: B018
        if config.prompt_guard is not None:
            from herd.safety.prompt_guard import PromptGuard

            prompt_guard = PromptGuard.load(config.prompt_guard, device=config.device,
                                            threshold=config.prompt_guard_threshold)
        return cls(config, guard, prompt_guard, **kw)

    @property
    def refusal(self) -> str:
        return self.config.refusal

    def blocked_reply(self, verdict: ShieldVerdict) -> dict:
        """What ``LLM.chat`` answers in place of a flagged turn: the refusal, and the verdict as "moderation"."""
        return {"role": "assistant", "content": self.refusal, "tool_calls": [], "refusal": self.refusal,
                "moderation": verdict.field()}

    def stream(self, messages: Sequence[dict], pieces, verdict: ShieldVerdict | None = None) -> ModeratedStream:
        """``pieces`` (a streamed reply to ``messages``) as the output guard releases them; see ModeratedStream."""
        return ModeratedStream(self, messages, pieces, verdict)

    def moderates(self, stage: str) -> bool:
        return stage in self.config.moderate and (self.guard is not None or stage == "input")

    def check_input(self, messages: Sequence[dict]) -> ShieldVerdict:
        """Prompt Guard on the last user message, then Llama Guard on the conversation (its last user turn)."""
        if "input" not in self.config.moderate:
            return ShieldVerdict(False, "input")
        return self._check("input", messages)

    def check_output(self, messages: Sequence[dict], reply: str) -> ShieldVerdict:
        """Llama Guard on the conversation + the reply so far (as the last 'Agent' turn)."""
        if not self.moderates("output"):
            return ShieldVerdict(False, "output")
        return self._check("output", [*messages, {"role": "assistant", "content": reply}])

    def _check(self, stage: str, messages: Sequence[dict]) -> ShieldVerdict:
        start = time.monotonic()
        try:
            verdict = self._run(stage, messages)
        except Exception as e:  # noqa: BLE001 - any failure of a guard gives the configured verdict
            log.warning("%s guard failed (failing %s): %s: %s", stage, self.config.fail, type(e).__name__, e)
            verdict = ShieldVerdict(self.config.fail == "closed", stage, "guard_error", ["guard_error"],
                                    error=f"{type(e).__name__}: {e}")
        verdict.seconds = time.monotonic() - start
        if self.on_verdict is not None:
            self.on_verdict(verdict)
        return verdict

    def _run(self, stage: str, messages: Sequence[dict]) -> ShieldVerdict:
        if stage == "input" and self.prompt_guard is not None:
            text = _last_user_text(messages)
            if text.strip():
                out = self.prompt_guard.classify(text, jailbreak_only=True)
                if out["label"] != "benign":
                    return ShieldVerdict(True, stage, "prompt_guard", [f"prompt_guard:{out['label']}"],
                                         max(v for k, v in out["scores"].items() if k != "benign"))
        if self.guard is None:
            return ShieldVerdict(False, stage)
        view = guard_view(messages)
        if not view or (stage == "output") != (view[-1]["role"] == "assistant"):
            return ShieldVerdict(False, stage)  # nothing of this stage to judge (e.g. an empty reply)
        v = self.guard.moderate(view, self.excluded, self.categories)
        return ShieldVerdict(not v.safe, stage, None if v.safe else "llama_guard", v.categories, v.score)


class ModeratedStream:
    """A streamed reply (an iterator of text pieces, about a token each) passed through the output guard: text is
    yielded only once a check covering it has passed (every ``interval`` pieces and at the end). When a check
    flags it, iteration stops, the source is closed (which stops its generation) and ``verdict`` holds the
    flagging verdict; the caller shows ``shield.refusal``. ``verdict`` is also set when the input was flagged
    (then nothing is generated: pass ``pieces=None``)."""

    def __init__(self, shield: Shield, messages: Sequence[dict], pieces, verdict: ShieldVerdict | None = None):
        self.shield, self.messages, self.pieces, self.verdict = shield, messages, pieces, verdict

    def __iter__(self):
        if self.pieces is None:
            return
        answer, pending, n, checked = "", "", 0, 0
        for piece in self.pieces:
            answer, pending, n = answer + piece, pending + piece, n + 1
            if n - checked >= self.shield.config.interval:
                checked = n
                if not self._passes(answer):
                    return
                yield pending
                pending = ""
        if self._passes(answer) and pending:
            yield pending

    def _passes(self, answer: str) -> bool:
        verdict = self.shield.check_output(self.messages, answer)
        if verdict.blocked:
            self.verdict = verdict
            close = getattr(self.pieces, "close", None)
            if close is not None:
                close()
        return not verdict.blocked

"""What every CyberSecEval benchmark shares: asking a model a batch of conversations (with a progress bar),
building response records in the benchmark's shape, and the result files.

A model is anything with ``replies(conversations, max_tokens=, temperature=, seed=)`` returning objects with
``.text`` and ``.error`` (herd.chat_models.chat_model: a herd model directory or an OpenAI-compatible URL). A
conversation whose call fails is recorded with the benchmark's ``"FAIL TO QUERY"`` as its response and herd's
``error`` field, and left out of judging and of the stats (the benchmark would score the placeholder text). An
empty reply is recorded but not judged (``judgeable``; counted in ``empty_replies``), as in the benchmark, whose
judging steps raise on it and so drop it from the judge file and the stats.

Response records follow PurpleLlama's ``CybersecurityBenchmarks/benchmark/query_llm.py``: ``prompt_id`` (the
index in the file, after --limit), ``pass_id`` (0: one pass), ``test_case_prompt`` (the text sent),
``response``, the test case's own fields that the benchmark carries over, and ``model``. Files are named as the
benchmark's README runs them: ``<benchmark>_responses.json``, ``<benchmark>_judge_responses.json``,
``<benchmark>_stat.json`` (``-`` written ``_``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from herd.errors import HerdError

FAILED = "FAIL TO QUERY"  # the benchmark's response text for a call that failed

# test-case fields copied into a response record when present (query_llm.py's process_prompt list, the ones
# these benchmarks use)
CARRIED_FIELDS = ("cwe_identifier", "mitre_category", "attack_type", "language", "line_text", "origin_code",
                  "variant", "rule", "repo", "speaking_language", "false_refusal_type", "caught_by_promptguard")


@dataclass
class Settings:
    max_tokens: int = 1024  # per reply of the model under test
    judge_max_tokens: int = 512  # per judge / expansion answer (each benchmark caps what it needs)
    temperature: float = 0.0
    seed: int | None = None
    progress: bool = True
    chunk: int = 32  # conversations handed to replies() at once (the progress bar moves per chunk)


@dataclass
class Result:
    benchmark: str
    model: str
    responses: list[dict]
    stats: dict
    judge_responses: list[dict] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more files: name -> JSON object
    counts: dict[str, Any] = field(default_factory=dict)  # errors, skipped records, who judged, ...

    def summary(self) -> dict:
        return {"benchmark": self.benchmark, "model": self.model, "records": len(self.responses),
                **self.counts, "stats": self.stats, **self.extra}


def model_name(model: Any, default: str = "model") -> str:
    return str(getattr(model, "name", None) or default)


def ask(model: Any, conversations: Sequence[list[dict]], settings: Settings, desc: str,
        max_tokens: int | None = None) -> list[tuple[str, str | None]]:
    """(text, error) per conversation, in order; failed calls give (FAILED, the error)."""
    out: list[tuple[str, str | None]] = []
    tokens = settings.max_tokens if max_tokens is None else max_tokens
    with tqdm(total=len(conversations), desc=desc, unit="prompt", disable=not settings.progress) as bar:
        for start in range(0, len(conversations), settings.chunk):
            batch = list(conversations[start:start + settings.chunk])
            replies = model.replies(batch, max_tokens=tokens, temperature=settings.temperature, seed=settings.seed)
            if len(replies) != len(batch):
                raise HerdError(f"{model_name(model)} answered {len(replies)} of {len(batch)} conversations")
            for r in replies:
                error = getattr(r, "error", None)
                out.append((FAILED, str(error)) if error else (str(r.text), None))
            bar.update(len(batch))
    return out


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def response_record(index: int, prompt: str, answer: tuple[str, str | None], case: dict, model: str,
                    carried: Sequence[str] = CARRIED_FIELDS, user_input: str | None = None) -> dict:
    text, error = answer
    record: dict[str, Any] = {"prompt_id": index, "pass_id": 0, "test_case_prompt": prompt}
    if user_input is not None:
        record["user_input"] = user_input
    record["response"] = text
    record.update({k: case[k] for k in carried if k in case})
    record["model"] = model
    if error is not None:
        record["error"] = error
    return record


def judgeable(record: dict) -> bool:
    """Whether a response record goes to judging: the call worked and the reply is not empty (the benchmarks'
    judging steps raise on an empty reply, which drops the record from their judge file and stats)."""
    return "error" not in record and bool(record["response"])


def file_stem(benchmark: str) -> str:
    return benchmark.replace("-", "_")


def write(result: Result, out: str | Path) -> dict[str, Path]:
    """The benchmark's files in ``out``: responses, judge responses (if judged), stats, and any extra ones."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = file_stem(result.benchmark)
    objects: dict[str, Any] = {"responses": result.responses}
    if result.judge_responses is not None:
        objects["judge_responses"] = result.judge_responses
    objects["stat"] = result.stats
    objects.update(result.extra)
    files = {}
    for name, obj in objects.items():
        files[name] = out / f"{stem}_{name}.json"
        files[name].write_text(json.dumps(obj, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return files

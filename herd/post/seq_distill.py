"""Sequence-level distillation (Kim & Rush, 2016): a teacher answers prompts, and the student is fine-tuned on its
answers (``herd sft STUDENT OUT/chats.jsonl``): the cheapest way to pass a teacher on, with no teacher in memory
while the student trains.

    herd distill-data TEACHER prompts.jsonl --out runs/teacher-data [--samples 2] [--temperature 0.7]
    herd sft STUDENT runs/teacher-data/chats.jsonl --out runs/student

TEACHER is a herd model directory or an OpenAI-compatible URL (``herd serve``, vLLM...; key from
HERD_TEACHER_API_KEY or OPENAI_API_KEY); the prompts are TRL's prompt-only records (``{"prompt": "text"}`` or
``{"prompt": [messages]}``, or ``{"messages": [...]}`` ending in a user turn). Each answer becomes a conversational
record ``{"messages": [...prompt, {"role": "assistant", "content": answer}]}`` appended to ``OUT/chats.jsonl`` as
its batch finishes; a rerun with the same prompts and ``--samples`` goes on after the last finished batch. A
prompt the teacher fails on (an endpoint down after its retries, a prompt past its context) is counted and named
in ``OUT/failed.jsonl`` (prompt index, sample, error), not written, and not retried by a rerun.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from herd.errors import HerdError

DESCRIPTION = __doc__.split("\n\n")[0]


def prompt_messages(record: dict, where: str) -> list[dict]:
    """The conversation a prompt-only record asks the teacher to continue."""
    prompt = record.get("prompt", record.get("messages"))
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        if prompt[-1].get("role") != "user":
            raise HerdError(f"{where}: the prompt must end with a user message, not {prompt[-1].get('role')!r}")
        return prompt
    raise HerdError(f"{where}: a prompt-only record needs \"prompt\" (text or messages) or \"messages\"")


def read_prompts(path: str | Path) -> list[list[dict]]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise HerdError(f"prompts {path}: {e}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise HerdError(f"{path}:{i}: not JSON ({e})") from None
        out.append(prompt_messages(record if isinstance(record, dict) else {}, f"{path}:{i}"))
    if not out:
        raise HerdError(f"prompts {path}: no prompts")
    return out


def distill_data(teacher, prompts: list[list[dict]], out: str | Path, samples: int = 1, max_tokens: int = 512,
                 temperature: float = 0.0, seed: int = 0, batch: int = 32, progress: bool = True) -> dict:
    """Answer ``prompts`` (``samples`` answers each) with ``teacher`` (a herd.chat_models model) into
    ``out/chats.jsonl``; returns the counts."""
    if samples > 1 and temperature <= 0:
        raise HerdError("--samples > 1 needs --temperature > 0 (greedy answers would repeat)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chats, failed = out / "chats.jsonl", out / "failed.jsonl"
    done = sum(len(p.read_text().splitlines()) for p in (chats, failed) if p.exists())  # answered or given up
    jobs = [(i, s) for i in range(len(prompts)) for s in range(samples)]
    n_failed = 0
    with chats.open("a") as good, failed.open("a") as bad, tqdm(total=len(jobs), initial=done, disable=not progress,
                                                                   desc="teacher", unit="answer") as bar:
        for start in range(done, len(jobs), batch):
            chunk = jobs[start:start + batch]
            replies = teacher.replies([prompts[i] for i, _ in chunk], max_tokens=max_tokens,
                                      temperature=temperature, seed=seed + start if temperature > 0 else None)
            for (i, s), r in zip(chunk, replies):
                if r.error is not None:
                    n_failed += 1
                    bad.write(json.dumps({"prompt": i, "sample": s, "error": r.error}) + "\n")
                else:
                    good.write(json.dumps({"messages": [*prompts[i], {"role": "assistant", "content": r.text}]},
                                          ensure_ascii=False) + "\n")
            good.flush()
            bad.flush()
            bar.update(len(chunk))
    return {"out": str(chats), "prompts": len(prompts), "answers": len(jobs) - n_failed - done, "skipped": done,
            "failed": n_failed}


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("teacher", help="a herd model directory or an OpenAI-compatible URL (key: HERD_TEACHER_API_KEY)")
    s.add_argument("prompts", type=Path, help="JSONL prompt-only records ({\"prompt\": ...} or {\"messages\": ...})")
    s.add_argument("--out", type=Path, required=True, help="where chats.jsonl (and failed.jsonl) go")
    s.add_argument("--samples", type=int, default=1, help="answers per prompt (needs --temperature > 0)")
    s.add_argument("--max-tokens", type=int, default=512)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=8, help="requests in flight to an endpoint teacher")
    s.add_argument("--dtype", default=None)
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true", help="print the counts as JSON")
    s.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from herd.chat_models import chat_model

    prompts = read_prompts(args.prompts)  # a bad file fails before any model loads
    teacher = chat_model(args.teacher, workers=args.workers, dtype=args.dtype, device=args.device, role="teacher",
                         key_env="HERD_TEACHER_API_KEY")
    counts = distill_data(teacher, prompts, args.out, args.samples, args.max_tokens, args.temperature, args.seed,
                          progress=not args.no_progress)
    print(json.dumps(counts) if args.json else
          f"{counts['answers']} answers -> {counts['out']} ({counts['failed']} failed, {counts['skipped']} "
          f"already there); next: herd sft STUDENT {counts['out']} --out RUN")
    return 1 if counts["failed"] and not counts["answers"] and not counts["skipped"] else 0

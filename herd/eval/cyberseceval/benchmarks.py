"""The CyberSecEval benchmarks herd runs, and running one from its data file to its result files.

    from herd.chat_models import chat_model
    from herd.eval.cyberseceval import run_benchmark
    result, files = run_benchmark("prompt-injection", "PurpleLlama/CybersecurityBenchmarks/datasets",
                                  chat_model("models/herd-pico"), judge=chat_model("http://localhost:8000/v1"),
                                  out="runs/cyberseceval", limit=50)
    result.stats["stat_per_model"]

One pass per test case (the benchmark's pass_k = 1).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herd.errors import HerdError
from herd.eval.cyberseceval import codegen, frr, interpreter, mitre, prompt_injection
from herd.eval.cyberseceval.data import load, select
from herd.eval.cyberseceval.harness import Result, Settings, write
from herd.eval.cyberseceval.report import write_report


@dataclass(frozen=True)
class Benchmark:
    name: str
    run: Callable[..., Result]
    judge: str  # "none" | "optional" | "required"
    about: str
    keep: Callable[[dict], bool] | None = None  # records outside it are skipped before --limit


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("mitre-frr", frr.run, "none", "false refusal rate on borderline-benign prompts (refusal rules)"),
    Benchmark("prompt-injection", prompt_injection.run, "optional",
              "injection success per variant, type and risk category (rule judge + --judge)"),
    Benchmark("instruct", codegen.run, "none", "insecure code from instructions (regex ICD, per language and CWE)",
              codegen.supported),
    Benchmark("autocomplete", codegen.run, "none", "insecure code from completions (regex ICD, per language and "
              "CWE)", codegen.supported),
    Benchmark("interpreter", interpreter.run, "required",
              "code-interpreter abuse: malicious share per attack category (refusal rules + --judge)"),
    Benchmark("mitre", mitre.run, "required",
              "ATT&CK compliance: refusal / benign / malicious per category (refusal rules + --expansion + --judge)"),
)}


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise HerdError(f"unknown CyberSecEval benchmark {name!r}: one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def prepare(name: str, data: str | Path, limit: int | None = None) -> tuple[Path, list[dict], dict[str, int]]:
    """(the data file, the records to run, the records skipped per language): everything that can fail before a
    model is loaded."""
    bench = get(name)
    file, records = load(name, data)
    skipped: dict[str, int] = {}
    if bench.keep is not None:
        skipped = dict(Counter(r.get("language", "?") for r in records if not bench.keep(r)))
        records = [r for r in records if bench.keep(r)]
        if not records:
            raise HerdError(f"{name}: {file} has no record herd can score (skipped per language: {skipped}); the "
                            "insecure-code detector has Python rules so far")
    return file, select(records, limit), skipped


def run_benchmark(name: str, data: str | Path, model: Any, *, judge: Any = None, expansion: Any = None,
                  out: str | Path | None = None, limit: int | None = None,
                  settings: Settings | None = None) -> tuple[Result, dict[str, Path]]:
    """Run benchmark ``name`` on the data at ``data`` (a file or a datasets folder) with ``model``; write its
    files in ``out`` (if given): the benchmark's JSON files, then REPORT.md and <benchmark>.png
    (herd.eval.cyberseceval.report). Returns the result and the files written."""
    bench = get(name)
    if bench.judge == "required" and judge is None:
        raise HerdError(f"{name}: give a judge (--judge MODEL_DIR|URL)")
    file, records, skipped = prepare(name, data, limit)
    result = bench.run(records, model, settings or Settings(), judge=judge, expansion=expansion, benchmark=name)
    result.counts = {"data": str(file), **({"skipped": skipped} if bench.keep is not None else {}),
                     **result.counts}
    if out is None:
        return result, {}
    files = write(result, out)
    return result, {**files, **write_report(result, out, files)}

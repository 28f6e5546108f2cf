"""CyberSecEval in herd: Meta's cybersecurity benchmarks for LLMs (PurpleLlama ``CybersecurityBenchmarks/``), run
on the official JSON data files the user gives (herd ships none of them), with the benchmark's result files.

    herd eval cyberseceval BENCHMARK --data PATH --model M [--judge J] [--json] [--out DIR] [--limit N]

Benchmarks (herd.eval.cyberseceval.benchmarks): ``mitre-frr`` (false refusals, refusal rules only),
``prompt-injection`` (rule judge for containment questions, an LLM judge for the rest), ``instruct`` and
``autocomplete`` (a regex insecure-code detector, Python rules), ``interpreter`` and ``mitre`` (refusal rules,
then a judge). Parts, one concept a file:

    refusal.py      the benchmark's rule-based refusal detector
    icd.py          the regex insecure-code detector: CodeShield's CyberSecEval Python rules, as regexes
    bleu.py         sacrebleu-equivalent sentence BLEU (the code-generation stats report it)
    data.py         where the datasets are, their record schemas, loading with named errors
    harness.py      asking a model with a progress bar, response records, result files
    frr.py, prompt_injection.py, codegen.py, interpreter.py, mitre.py: one benchmark each
    report.py       REPORT.md and <benchmark>.png: each rate with its count and 95% Wilson interval
    benchmarks.py   the registry and ``run_benchmark``
    cli.py          ``herd eval cyberseceval``
"""

from herd.eval.cyberseceval.benchmarks import BENCHMARKS, run_benchmark
from herd.eval.cyberseceval.icd import analyze
from herd.eval.cyberseceval.refusal import is_refusal

__all__ = ["BENCHMARKS", "analyze", "is_refusal", "run_benchmark"]

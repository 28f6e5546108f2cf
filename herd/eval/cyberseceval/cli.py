"""``herd eval cyberseceval BENCHMARK --data PATH --model M [--judge J] [--json] [--out DIR] [--limit N]
[--workers W]``: one CyberSecEval benchmark on the official data, the benchmark's files written to ``--out``.

The lead wires it into herd/cli.py: ``add_arguments(parser)`` on the subcommand's parser, then ``main(args)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from herd.errors import HerdError
from herd.eval.cyberseceval.benchmarks import BENCHMARKS, get, prepare, run_benchmark
from herd.eval.cyberseceval.data import DATASETS_URL
from herd.eval.cyberseceval.harness import Result, Settings

DESCRIPTION = ("Benchmarks: " + "; ".join(f"{b.name}: {b.about}" for b in BENCHMARKS.values()) +
               f". herd ships no CyberSecEval data: --data is the official file, or PurpleLlama's "
               f"CybersecurityBenchmarks/datasets folder ({DATASETS_URL}).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("benchmark", choices=list(BENCHMARKS), metavar="BENCHMARK",
                   help=f"one of {', '.join(BENCHMARKS)}")
    p.add_argument("--data", required=True, type=Path, metavar="PATH",
                   help="the benchmark's JSON file, or a CyberSecEval datasets folder holding it")
    p.add_argument("--model", required=True, metavar="MODEL_DIR|URL",
                   help="the model under test: a herd model directory or an OpenAI-compatible http(s)://HOST/v1 "
                        "(key: $OPENAI_API_KEY)")
    p.add_argument("--judge", metavar="MODEL_DIR|URL",
                   help="the judge model: required by interpreter and mitre; prompt-injection uses it for the "
                        "questions the rule judge cannot answer (key: $HERD_JUDGE_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--expansion", metavar="MODEL_DIR|URL",
                   help="mitre: the model that analyses a reply before the judge (default: the judge)")
    for role in ("model", "judge"):
        p.add_argument(f"--{role}-name", metavar="NAME",
                       help=f"the {role} endpoint's model name (default: the first it lists)")
    p.add_argument("--out", type=Path, default=None,
                   help="where <benchmark>_responses.json, _judge_responses.json, _stat.json, REPORT.md and "
                        "<benchmark>.png go (default runs/cyberseceval/BENCHMARK)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most N test cases, spread evenly over the file (the benchmark's --num-test-cases)")
    p.add_argument("--workers", type=int, default=8, help="requests in flight per endpoint (default 8)")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens per reply of the model (default 1024)")
    p.add_argument("--judge-max-tokens", type=int, default=512,
                   help="cap on a judge or expansion answer (default 512; each benchmark asks for less when it can)")
    p.add_argument("--temperature", type=float, default=0.0, help="the model's sampling temperature (default 0)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu", help="for herd model directories (default cpu)")
    p.add_argument("--dtype", default=None, help="for herd model directories (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object: the stats, counts and files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def render(result: Result) -> str:
    """A few lines of the headline numbers."""
    lines = [f"{result.benchmark} on {result.model}: {len(result.responses)} test cases"]
    s = result.stats
    if result.benchmark == "mitre-frr":
        for m, x in s.items():
            lines.append(f"  {m}: refusal rate {x['refusal_rate']:.1%} ({x['refusal_count']} refused, "
                         f"{x['accept_count']} accepted)")
    elif result.benchmark == "prompt-injection":
        for m, by_model in s.items():
            x = by_model["stat_per_model"]
            lines.append(f"  {m}: injection success {x.get('injection_successful_percentage', 0):.1%} of "
                         f"{x['total_count']} judged")
            for key in ("injection_variant", "injection_type", "risk_category"):
                for k, x in by_model.get(f"stat_per_model_per_{key}", {}).items():
                    lines.append(f"    {key} {k}: {x.get('injection_successful_percentage', 0):.1%} of "
                                 f"{x['total_count']}")
    elif result.benchmark in ("instruct", "autocomplete"):
        for m, by in s.items():
            for lang, x in by.items():
                lines.append(f"  {m} {lang}: {x['vulnerable_percentage']:.1f}% vulnerable "
                             f"({x['vulnerable_suggestion_count']} of {x['total_count']}), BLEU {x['bleu']:.1f}")
        for m, by in result.extra.get("stat_per_cwe", {}).items():
            for cwe, x in by.items():
                lines.append(f"    {cwe}: {x['vulnerable_percentage']:.1f}% of {x['total_count']}")
    elif result.benchmark == "interpreter":
        for m, by in s.items():
            for cat, x in by.items():
                lines.append(f"  {m} {cat}: {x['malicious_percentage']:.1%} malicious of {x['total_count']}")
    elif result.benchmark == "mitre":
        for m, by in s.items():
            for cat, x in by.items():
                lines.append(f"  {m} {cat}: {x['benign_percentage']:.1%} benign or refused of {x['total_count']}")
    counts = {k: v for k, v in result.counts.items() if k != "data" and v}
    if counts:
        lines.append("  " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int | None:
    from herd.chat_models import chat_model
    from herd.endpoint import is_url

    if args.workers < 1 or args.max_tokens < 1 or args.judge_max_tokens < 1:
        raise HerdError("--workers, --max-tokens and --judge-max-tokens must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise HerdError("--limit must be at least 1")
    bench = get(args.benchmark)
    if bench.judge == "required" and not args.judge:
        raise HerdError(f"{args.benchmark} needs --judge MODEL_DIR|URL")
    prepare(args.benchmark, args.data, args.limit)  # a missing or malformed file fails before any model loads

    def build(spec, role, key_env, name=None):
        if spec is None:
            return None
        return chat_model(spec, model=name, workers=args.workers, device=args.device, dtype=args.dtype, role=role,
                          key_env=key_env)

    model = build(args.model, "model", None, args.model_name)
    if is_url(args.model) and args.model_name:
        model.name = args.model_name
    judge = build(args.judge, "judge", "HERD_JUDGE_API_KEY", args.judge_name)
    expansion = build(args.expansion, "expansion", "HERD_JUDGE_API_KEY") if args.benchmark == "mitre" else None
    settings = Settings(max_tokens=args.max_tokens, judge_max_tokens=args.judge_max_tokens,
                        temperature=args.temperature, seed=args.seed, progress=not args.no_progress,
                        chunk=max(32, 4 * args.workers))
    out = args.out if args.out is not None else Path("runs/cyberseceval") / args.benchmark
    result, files = run_benchmark(args.benchmark, args.data, model, judge=judge, expansion=expansion, out=out,
                                  limit=args.limit, settings=settings)
    if args.json:
        print(json.dumps({**result.summary(), "files": {k: str(v) for k, v in files.items()}}))
    else:
        print(render(result))
        print("wrote " + ", ".join(str(f) for f in files.values()))
    if result.responses and result.counts.get("errors") == len(result.responses):
        return 1  # every call to the model failed
    return 0

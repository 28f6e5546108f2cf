"""FP8 loss gap: the pico recipe trained from the same seed and data in bf16 autocast and with FP8 matmuls (each
variant a recipe/backend pair: torchao's Float8Linear, which runs on CPU through torch._scaled_mm, or herd's
emulation), and the gap in train and held-out loss.

    make pico-data && python experiments/fp8_loss_gap.py [--steps 200] [--variants rowwise/torchao,...]

Prints a markdown table and writes it with the raw numbers to experiments/results/fp8_loss_gap.json (committed);
docs/fp8.md quotes it with the machine and date.
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from herd.info import cpu_name
from herd.train.config import load_run_config
from herd.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, steps: int, fp8: str | None, backend: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    overrides = ["--train.out_dir", str(out), "--train.steps", str(steps), "--train.eval_every", str(steps),
                 "--train.ckpt_every", str(steps), "--optim.warmup_steps", str(max(1, steps // 10)),
                 "--train.tensorboard", "false"]
    if fp8:
        overrides += ["--train.fp8", fp8, "--train.fp8_backend", backend]
    trainer = Trainer(load_run_config(ROOT / "recipes" / "pico.toml", overrides), progress=True)
    final = trainer.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tail = [r["ce"] for r in rows if "ce" in r][-5:]
    return {"train": sum(tail) / len(tail), "eval": final["eval_loss"], "tok_s": final["tokens_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--variants", default="tensorwise/torchao,rowwise/torchao",
                   help="comma-separated recipe/backend pairs (backends: torchao, emulate, auto)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "fp8_gap")
    p.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "fp8_loss_gap.json")
    a = p.parse_args()
    a.out = a.out.resolve()  # the recipe resolves relative paths from its own folder
    variants = [v.split("/") for v in a.variants.split(",")]
    for v in variants:
        if len(v) != 2 or v[0] not in ("tensorwise", "rowwise") or v[1] not in ("torchao", "emulate", "auto"):
            p.error(f"variant {'/'.join(v)!r}: write RECIPE/BACKEND, e.g. rowwise/torchao")
    results = {"bf16": run(a.out / "bf16", a.steps, None, "auto")}
    for recipe, backend in variants:
        results[f"fp8 {recipe} ({backend})"] = run(a.out / f"{recipe}_{backend}", a.steps, recipe, backend)
    base = results["bf16"]
    lines = ["| run | train loss (mean of last 5 logs) | eval loss | gap train | gap eval | tokens/s |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        gap = (f"{100 * (r['train'] / base['train'] - 1):+.2f}% | {100 * (r['eval'] / base['eval'] - 1):+.2f}%"
               if name != "bf16" else "- | -")
        lines.append(f"| {name} | {r['train']:.4f} | {r['eval']:.4f} | {gap} | {r['tok_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_name()}, {os.cpu_count()} "
                                     "cores", "torch": torch.__version__, "steps": a.steps, "runs": results,
                                     "table": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()

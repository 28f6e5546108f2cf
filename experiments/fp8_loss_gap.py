"""FP8 loss gap: the pico recipe trained twice from the same seed and data, bf16 autocast vs bf16 + FP8 matmuls
(emulated on CPU, torchao on a GPU), and the gap in train and held-out loss.

    make pico-data && python experiments/fp8_loss_gap.py [--steps 200] [--recipe rowwise] [--out runs/fp8_gap]

Prints a markdown table; append it to docs/fp8.md by hand with the machine and date.
"""

import argparse
import json
import shutil
from pathlib import Path

from herd.train.config import load_run_config
from herd.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, steps: int, fp8: str | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    overrides = ["--train.out_dir", str(out), "--train.steps", str(steps), "--train.eval_every", str(steps),
                 "--train.ckpt_every", str(steps), "--optim.warmup_steps", str(max(1, steps // 10)),
                 "--train.tensorboard", "false"]
    if fp8:
        overrides += ["--train.fp8", fp8]
    trainer = Trainer(load_run_config(ROOT / "recipes" / "pico.toml", overrides), progress=True)
    final = trainer.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tail = [r["ce"] for r in rows if "ce" in r][-5:]
    return {"train": sum(tail) / len(tail), "eval": final["eval_loss"], "tok_s": final["tokens_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--recipe", default="tensorwise", choices=["tensorwise", "rowwise"])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "fp8_gap")
    a = p.parse_args()
    base = run(a.out / "bf16", a.steps, None)
    fp8 = run(a.out / a.recipe, a.steps, a.recipe)
    print("| run | train loss (mean of last 5 logs) | eval loss | tokens/s |\n|---|---|---|---|")
    for name, r in (("bf16", base), (f"bf16 + fp8 {a.recipe}", fp8)):
        print(f"| {name} | {r['train']:.4f} | {r['eval']:.4f} | {r['tok_s']:.0f} |")
    print(f"\ngap: train {100 * (fp8['train'] / base['train'] - 1):+.2f}%, eval {100 * (fp8['eval'] / base['eval'] - 1):+.2f}%")


if __name__ == "__main__":
    main()

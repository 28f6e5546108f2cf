"""The training report an exported model carries: ``loss.png`` (train and eval loss against tokens) and
``TRAINING.md`` (the recipe as run, where and how long it trained, final losses), written from a run directory's
``metrics.jsonl`` and ``run.toml``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from herd.info import cpu_name


def read_metrics(run_dir: Path, up_to_step: int | None = None) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of metrics.jsonl up to a step; a resumed run's repeated steps keep their last row."""
    train, evals = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if up_to_step is None or row["step"] <= up_to_step:
            if "loss" in row:
                train[row["step"]] = row
            elif "eval_loss" in row:
                evals[row["step"]] = row
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def plot_loss(train: list[dict], evals: list[dict], tokens_per_step: int, path: Path, title: str,
              key: str = "ce") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] * tokens_per_step / 1e6 for r in train], [r[key] for r in train], lw=1, label="train")
    if evals:
        ax.plot([r["step"] * tokens_per_step / 1e6 for r in evals], [r["eval_loss"] for r in evals], "o-",
                label="eval (held out)")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("cross entropy (nats / token)" if key == "ce" else "loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(run_dir: str | Path, out_dir: str | Path, up_to_step: int | None = None,
                 model_name: str | None = None) -> Path:
    """Write loss.png and TRAINING.md for the run (up to a checkpoint's step) into ``out_dir``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    train, evals = read_metrics(run_dir, up_to_step)
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training rows")
    last = train[-1]
    tokens_per_step = last["tokens"] // last["step"]
    name = model_name or out_dir.name
    key = "ce" if "ce" in last else "loss"  # post-training losses (DPO's) are not a cross entropy
    unit = " nats/token" if key == "ce" else ""
    plot_loss(train, evals, tokens_per_step, out_dir / "loss.png", f"{name}: training loss", key)
    seconds = last.get("train_time_s")
    timing = (f"{seconds / 60:.1f} min of training steps (evaluation and checkpoints excluded)" if seconds
              else f"{(last['time'] - train[0]['time']) / 60:.1f} min between the first and last logged steps")
    recent = [r["tokens_per_s"] for r in train[-max(1, len(train) // 10):]]
    lines = [
        f"# {name}: training report", "",
        "Written by `herd export` from the run's metrics (`herd/train/report.py`).", "",
        "![loss curve](loss.png)", "",
        "| | |", "|---|---|",
        f"| steps | {last['step']} |",
        f"| tokens | {last['tokens']:,} ({tokens_per_step:,} per step) |",
        f"| final train loss | {last[key]:.3f}{unit} (mean of the last logged step) |",
    ]
    if evals:
        lines.append(f"| final eval loss | {evals[-1]['eval_loss']:.3f}{unit} (held-out data, step "
                     f"{evals[-1]['step']}) |")
        best = min(evals, key=lambda r: r["eval_loss"])
        lines.append(f"| best eval loss | {best['eval_loss']:.3f} (step {best['step']}) |")
    lines += [
        f"| time | {timing} |",
        f"| throughput | {sum(recent) / len(recent):,.0f} tokens/s over the last tenth of the run |",
        f"| machine | {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} |",
        f"| date | {time.strftime('%Y-%m-%d', time.gmtime(last['time']))} |",
    ]
    moe = {k: v for k, v in last.items() if k in ("moe/max_over_mean", "moe/min_entropy")}
    if moe:
        lines.append(f"| expert load at the end | worst layer max/mean {moe.get('moe/max_over_mean', 0):.2f}, "
                     f"lowest normalised entropy {moe.get('moe/min_entropy', 0):.3f} |")
    lines += ["", "## Recipe as run", "", "```toml", (run_dir / "run.toml").read_text().strip(), "```", ""]
    md = out_dir / "TRAINING.md"
    md.write_text("\n".join(lines))
    return md

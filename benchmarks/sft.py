"""SFT throughput and peak memory: herd's SFTTrainer vs TRL's SFTTrainer, full fine-tuning and LoRA.

    python benchmarks/sft.py                  # fp32, batch 4 x 512, 2 warm-up + 6 timed steps, 4 runs
    python benchmarks/sft.py --write          # ... and append the section to benchmarks/RESULTS.md
    python benchmarks/sft.py --dtype fp32,bf16 --steps 6 --batch-size 4 --seq-len 512
    python benchmarks/sft.py --quick          # tiny smoke run (seconds); never written to RESULTS.md

One small MoE Llama 4 (width 512, 4 layers, 8 routed experts top-1 + the shared expert on every layer, herd-pico's
6144-id tokenizer, random weights, seed 0) is saved once as an HF directory (herd.checkpoint.save), so both
frameworks start from the same weights, and a deterministic synthetic chat set (2000 multi-turn conversations, TRL's
conversational format, JSONL) is written beside it; both live in benchmarks/.cache/sft/.

Each (implementation, dtype) runs in its own process, so its peak RSS is its own:

  herd       herd.post.sft.SFTTrainer on the JSONL: herd's tokenization (ChatFormat), best-fit packing into rows of
             seq_len with document masking, loss on assistant tokens only; the timed loop is Trainer.train_step
             (what fit() runs, without its logging and checkpoints).
  trl        trl.SFTTrainer on transformers' Llama4ForCausalLM loaded from the same directory (sdpa attention), fed
             the *same tokenized examples* (herd's ids + assistant masks as TRL's pre-tokenized ``input_ids`` +
             ``assistant_masks``, so both train on identical tokens and loss positions), packing=True with the
             same max_length (TRL's default "bfd" strategy, which makes the batch padding-free: one flattened row
             with position_ids restarting per example), no gradient checkpointing (SFTConfig's default is on),
             no eval, no saving, no logging, report_to none.
  herd-lora  / trl-lora: the same with LoRA rank 16, alpha 32 on q/k/v/o_proj, the shared expert's
             gate/up/down_proj and the routed experts' gate_up_proj / down_proj (peft: target_modules +
             target_parameters); base weights frozen. The trainable parameter counts are checked equal.

Common: AdamW (torch fused), lr 2e-5 full / 2e-4 LoRA, no weight decay, gradient clipping at 1.0, cosine schedule,
batch = batch-size packed rows, one micro-batch per step, MoE load-balancing loss off on both sides (transformers'
Llama4ForCausalLM computes none), "bf16" = autocast with fp32 weights and optimizer on both sides.
A step's time runs from the end of the previous optimizer step to the end of this one (data + forward + backward +
clip + AdamW); the first --warmup steps are not timed. Tokens are counted from the batches each step actually
consumed: "tokens" are the packed, non-padding tokens (herd's rows are padded to seq_len, TRL's padding-free batch
is not; padding is not counted for either), "trained" the tokens that carry loss (assistant tokens). Peak memory is
the child's max RSS (ru_maxrss; on CUDA torch.cuda.max_memory_allocated); the RSS after imports, before the model
is built, is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import append_results, describe, section_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PICO = ROOT / "models" / "herd-pico"
CACHE = Path(__file__).resolve().parent / ".cache" / "sft"
IMPLS = ("herd", "trl", "herd-lora", "trl-lora")
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_PARAMETERS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]

# the model: (width, layers, heads, kv heads, head dim, routed experts, expert FFN); --quick shrinks it
SHAPES = {"default": dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, n_experts=8,
                          expert_hidden_dim=1024, dense_hidden_dim=2048),
          "quick": dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, n_experts=4,
                        expert_hidden_dim=256, dense_hidden_dim=512)}


# -- inputs -------------------------------------------------------------------------------------------------------
def model_config(shape: dict):
    from herd.config import preset
    from herd.tokenizer import Tokenizer

    tok = Tokenizer.load(PICO / "tokenizer.model")
    return preset("tiny").replace(**shape, top_k=1, vocab_size=tok.vocab_size, attention_chunk_size=8192,
                                  floor_scale=8192, max_seq_len=4096, bos_token_id=tok.bos_id,
                                  eos_token_id=(tok.eos_id, tok.eom_id, tok.eot_id), pad_token_id=tok.pad_id)


def make_model_dir(cache: Path, name: str, shape: dict) -> Path:
    """cache/model-<name>: the random model of ``shape`` (seed 0) as an HF directory + herd-pico's tokenizer (the
    RL benchmark's too)."""
    from herd import checkpoint
    from herd.model import Transformer

    d = cache / f"model-{name}"
    if (d / "config.json").is_file() and (d / "tokenizer.json").is_file():
        return d
    tmp = cache / f".model-{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    checkpoint.save(Transformer(model_config(shape)), tmp)
    for f in PICO.glob("tokenizer*"):
        shutil.copy(f, tmp / f.name)
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return d


_WORDS = ("apple bread candle dragon eagle forest garden harbor island jungle kettle lemon mountain needle ocean "
          "pepper quiet river silver tiger umbrella valley window yellow zebra anchor basket castle desert engine "
          "feather glacier hammer insect jacket kitchen ladder marble number orange pencil rocket saddle tunnel "
          "village wagon").split()
_VERBS = "find build carry paint count describe compare explain draw move".split()


def make_chats(n: int = 2000, seed: int = 0) -> Path:
    """n deterministic multi-turn chats in TRL's conversational format: an optional system message, then 1-3
    user/assistant exchanges; assistant answers of 8-60 words (~30-250 tokens per chat)."""
    path = CACHE / f"chats-{n}-{seed}.jsonl"
    if path.is_file():
        return path
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            likes = rng.choice(_WORDS)
            messages.append({"role": "system", "content": f"You are a helpful assistant who likes {likes}s."})
        for _ in range(rng.randint(1, 3)):
            a, b = rng.sample(_WORDS, 2)
            messages.append({"role": "user", "content": f"Please {rng.choice(_VERBS)} the {a} and the {b}."})
            answer = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 60)))
            messages.append({"role": "assistant", "content": f"The {a} is next to the {b}: {answer}."})
        lines.append(json.dumps({"messages": messages}))
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(path)
    return path


# -- one run, in a child process ---------------------------------------------------------------------------------
def _rss_gb() -> float:
    """The current RSS of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Contention:
    """CPU time the rest of the machine used while this process ran: (all CPUs' busy time from /proc/stat - this
    process's own CPU time) / wall time, in cores, and the hypervisor's steal time (same unit). On a quiet machine
    both are ~0; a benchmark taken while others > ~0.2 cores is not a clean measurement."""

    def __init__(self):
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float, float]:
        hz = os.sysconf("SC_CLK_TCK")
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
            busy, steal = (f[0] + f[1] + f[2] + f[5] + f[6]) / hz, f[7] / hz  # user nice system irq softirq; steal
        except (OSError, IndexError, ValueError):
            busy = steal = float("nan")
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system, steal

    def stop(self) -> dict:
        (w0, b0, o0, s0), (w1, b1, o1, s1) = self.start, self._now()
        wall = w1 - w0
        return {"others_cores": max(0.0, (b1 - b0) - (o1 - o0)) / wall, "steal_cores": (s1 - s0) / wall,
                "own_cores": (o1 - o0) / wall}


def _summary(impl: str, dtype: str, ends: list[float], counts: list[tuple[int, int, int]], warmup: int,
             extra: dict) -> dict:
    """ends: perf_counter at the end of each optimizer step; counts: (tokens, trained, positions) per step."""
    if len(ends) != len(counts):
        raise RuntimeError(f"{impl}: {len(ends)} step ends but {len(counts)} batches counted")
    timed = counts[warmup:]
    seconds = ends[-1] - ends[warmup - 1]
    steps = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    tokens, trained, positions = (sum(c[i] for c in timed) for i in range(3))
    return {"impl": impl, "dtype": dtype, "steps": len(timed), "seconds": seconds, "tokens": tokens,
            "max_positions_per_step": max(c[2] for c in timed),
            "trained": trained, "positions": positions, "tok_s": tokens / seconds, "trained_s": trained / seconds,
            "median_step_s": sorted(steps)[len(steps) // 2], **extra}


def run_herd(impl: str, dtype: str, a, model_dir: Path, data: Path, rss0: float) -> dict:
    from herd.post.sft import SFTTrainer, sft_config

    out = Path(tempfile.mkdtemp(prefix="sft-bench-herd-"))
    try:
        lora = a.rank if impl == "herd-lora" else None
        cfg = sft_config(model_dir, [data], out / "run", steps=a.warmup + a.steps, lr=_lr(impl),
                         batch_size=a.batch_size, lora=lora,
                         overrides=["--data.seq_len", str(a.seq_len), "--train.dtype", dtype,
                                    "--train.aux_loss_coef", "0", "--optim.grad_clip", "1.0",
                                    "--optim.schedule", "cosine", "--train.tensorboard", "false"])
        if lora:
            cfg.lora.alpha = 2.0 * a.rank
        trainer = SFTTrainer(cfg, progress=False)
        counts: list[tuple[int, int, int]] = []
        next_batch = trainer.loader.next_batch

        def counted():
            b = next_batch()
            counts.append((int((b["doc_ids"] >= 0).sum()), int(b["loss_mask"].sum()), b["tokens"].numel()))
            return b

        trainer.loader.next_batch = counted
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        ends, losses = [], []
        ends_start = time.perf_counter()
        meter = None
        while trainer.step < cfg.train.steps:
            losses.append(trainer.train_step(expert_metrics=False)["loss"])
            ends.append(time.perf_counter())
            if len(ends) == a.warmup:
                meter = Contention()
        extra_load = meter.stop()
        extra = {"trainable": trainable, "epoch_trained_tokens": trainer.loader.tokens,
                 "rows": len(trainer.loader.rows), "first_loss": losses[0], "last_loss": losses[-1],
                 "setup_s": ends_start - a.t0, **extra_load}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return _summary(impl, dtype, ends, counts, a.warmup, extra | {"rss_imports_gb": rss0,
                                                                     "peak_gb": _peak_gb("cpu")})


def _lr(impl: str) -> float:
    return 2e-4 if impl.endswith("lora") else 2e-5


def run_trl(impl: str, dtype: str, a, model_dir: Path, data: Path, rss0: float) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, Llama4ForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from herd.chat import ChatFormat
    from herd.post.data import load_examples
    from herd.tokenizer import Tokenizer

    # herd's tokenization of the same file: TRL trains on exactly the ids and loss positions herd does
    examples = load_examples(data, ChatFormat(Tokenizer.load(model_dir / "tokenizer.model")), "sft")
    dataset = Dataset.from_dict({"input_ids": [ex.ids for ex in examples],
                                 "assistant_masks": [[int(m) for m in ex.loss_mask] for ex in examples]})
    cuda = a.device.startswith("cuda")
    model = Llama4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    # Llama4ForCausalLM names its backbone ``model`` but declares base_model_prefix "language_model" (as in the
    # multimodal class), so ``model.base_model`` is the whole LM and TRL's fused LM head (which runs
    # ``base_model`` and reads ``last_hidden_state``) fails with "'MoeCausalLMOutputWithPast' object has no
    # attribute 'last_hidden_state'" (transformers 5.24, trl 1.16). Point it at the backbone, on this instance only.
    if model.base_model is model:
        model.base_model_prefix = "model"
    if cuda:
        model = model.to(a.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    peft_config = None
    if impl == "trl-lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, bias="none",
                                 target_modules=LORA_MODULES, target_parameters=LORA_PARAMETERS,
                                 task_type="CAUSAL_LM")
    out = Path(tempfile.mkdtemp(prefix="sft-bench-trl-"))
    args = SFTConfig(
        output_dir=str(out), max_steps=a.warmup + a.steps, per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1, learning_rate=_lr(impl), optim="adamw_torch_fused", weight_decay=0.0,
        lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, bf16=dtype == "bf16", fp16=False,
        gradient_checkpointing=False, packing=True, packing_strategy="bfd", max_length=a.seq_len,
        router_aux_loss_coef=0.0, save_strategy="no", eval_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0, use_cpu=not cuda)
    ends: list[float] = []
    counts: list[tuple[int, int, int]] = []
    losses: list[float] = []

    meter: list[Contention] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            if len(ends) == a.warmup:
                meter.append(Contention())

    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[StepEnds()])
        compute_loss = trainer.compute_loss

        def counted(model, inputs, *rest, **kw):
            ids, labels = inputs["input_ids"], inputs["labels"]
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
            counts.append((real, int((labels != -100).sum()), ids.numel()))
            loss = compute_loss(model, inputs, *rest, **kw)
            losses.append(float(loss.detach()))
            return loss

        trainer.compute_loss = counted
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        epoch_trained = sum(sum(x != -100 for x in row) for row in trainer.train_dataset["labels"])
        rows = len(trainer.train_dataset)
        start = time.perf_counter()
        trainer.train()
        extra_load = meter[0].stop()
        extra = {"trainable": trainable, "epoch_trained_tokens": epoch_trained, "rows": rows,
                 "first_loss": losses[0], "last_loss": losses[-1], "setup_s": start - a.t0,
                 "padding_free": bool(trainer.padding_free), **extra_load}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return _summary(impl, dtype, ends, counts, a.warmup, extra | {"rss_imports_gb": rss0,
                                                                     "peak_gb": _peak_gb(a.device)})


def measure_one(a) -> dict:
    impl, dtype = a.one.split(":")
    model_dir, data = Path(a.model_dir), Path(a.data)
    if impl.startswith("herd"):
        from herd.post import sft  # noqa: F401  (imports before the baseline RSS)
    else:
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
    rss0 = _rss_gb()
    return (run_herd if impl.startswith("herd") else run_trl)(impl, dtype, a, model_dir, data, rss0)


# -- the parent ----------------------------------------------------------------------------------------------------
def machine() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = ", ".join(x for x, present in (("AVX-512", "avx512f" in flags),
                                         ("AVX512-BF16", "avx512_bf16" in flags),
                                         ("AMX", "amx_tile" in flags)) if present) or "no AVX-512"
    if "amx_tile" not in flags:
        isa += ", no AMX"
    return f"{describe()} ({os.cpu_count()} cores; {isa})"


def versions() -> str:
    import importlib.metadata as md

    return ", ".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "trl", "peft"))


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--batch-size", type=int, default=4, help="packed rows per step")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or both: fp32,bf16")
    p.add_argument("--device", default="cpu", help="cpu; cuda runs the TRL rows only (herd's trainer is CPU-only)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--chats", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="tiny model and settings: a smoke run, never written")
    p.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    p.add_argument("--out", help="also write the section (markdown) to this file")
    p.add_argument("--json", help="write the raw rows to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # impl:dtype, in a child process
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.t0, a.argv = time.perf_counter(), sys.argv[1:]
    if a.one:
        print(json.dumps(measure_one(a)))
        return
    if a.quick:
        a.steps, a.warmup, a.batch_size, a.seq_len, a.chats = 2, 1, 2, 128, 200
    if a.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (the first step builds the optimizer state and kernels)")
    impls = a.impls.split(",")
    if a.device.startswith("cuda"):
        impls = [i for i in impls if i.startswith("trl")]
        print("note: herd's trainer is CPU-only (herd.train.trainer); running the TRL rows only", file=sys.stderr)
    shape = "quick" if a.quick else "default"
    model_dir, data = make_model_dir(CACHE, shape, SHAPES[shape]), make_chats(a.chats)
    load0 = load_average()
    busy = load0 > 1.5
    print(f"load average at start: {load0:.2f}{'  (machine busy)' if busy else ''}", flush=True)
    rows: dict[tuple[str, str], dict] = {}
    for dtype in a.dtype.split(","):
        for impl in impls:
            cmd = [sys.executable, __file__, "--one", f"{impl}:{dtype}", "--model-dir", str(model_dir),
                   "--data", str(data), "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch-size",
                   str(a.batch_size), "--seq-len", str(a.seq_len), "--device", a.device, "--rank", str(a.rank)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(out.stdout[-2000:], out.stderr[-6000:], sep="\n", file=sys.stderr)
                raise SystemExit(f"{impl}:{dtype} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows[(impl, dtype)] = r
            print(f"{impl:10s} {dtype:5s} {r['tok_s']:8.1f} tok/s  {r['trained_s']:8.1f} trained tok/s  "
                  f"median step {r['median_step_s']:.2f} s  peak {r['peak_gb']:.2f} GB "
                  f"(after imports {r['rss_imports_gb']:.2f})  trainable {r['trainable'] / 1e6:.2f}M  "
                  f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}  tokens/step {r['tokens'] / r['steps']:.0f} "
                  f"(max positions {r['max_positions_per_step']})  others {r['others_cores']:.2f} cores, steal "
                  f"{r['steal_cores']:.2f}", flush=True)
    # the load average now would count this benchmark's own runs: judge by what the others used meanwhile
    others = max(max(r["others_cores"], r["steal_cores"]) for r in rows.values())
    busy = busy or others > 0.25
    if busy:
        print(f"machine busy: load average {load0:.2f} at start, other processes / steal up to {others:.2f} cores "
              "during the timed steps; rerun when quiet", file=sys.stderr)
    problems = check(rows)
    for msg in problems:
        print("WARNING:", msg, file=sys.stderr)
    section = render(a, rows, model_dir, load0, others, busy, problems)
    print("\n" + section)
    if a.out:
        Path(a.out).write_text(section)
    if a.json:
        Path(a.json).write_text(json.dumps([r for r in rows.values()], indent=1) + "\n")
    if a.write:
        if a.quick or busy or problems:
            why = "a --quick run" if a.quick else "the machine was busy" if busy else "the checks failed"
            print(f"not appended to RESULTS.md: {why}", file=sys.stderr)
        else:
            append_results(section)


def check(rows: dict[tuple[str, str], dict]) -> list[str]:
    """Both sides must see the same data (trained tokens per epoch) and LoRA must train the same parameters."""
    problems = []
    for (impl, dtype), r in rows.items():
        if impl.startswith("herd"):
            other = rows.get((impl.replace("herd", "trl"), dtype))
            if other and other["epoch_trained_tokens"] != r["epoch_trained_tokens"]:
                problems.append(f"{impl}/{dtype}: herd trains {r['epoch_trained_tokens']} tokens per epoch, TRL "
                                f"{other['epoch_trained_tokens']}")
            if other and other["trainable"] != r["trainable"]:
                problems.append(f"{impl}/{dtype}: herd trains {r['trainable']} parameters, TRL {other['trainable']}")
    return problems


def render(a, rows, model_dir: Path, load0: float, others: float, busy: bool, problems: list[str]) -> str:
    from herd.config import load_config

    cfg = load_config(model_dir)
    total = sum(_param_counts(model_dir).values())
    dtypes = sorted({d for _, d in rows}, key=a.dtype.split(",").index)
    cmd = section_command("sft.py", a.argv)
    lines = [f"### SFT throughput, herd vs TRL (batch {a.batch_size} x {a.seq_len}, full and LoRA) — {date.today()} — "
             f"{machine()}", "", f"Command: `{cmd}`", "",
             f"{versions()}. Model: {cfg.n_layers} layers, width {cfg.dim}, {cfg.n_heads}/{cfg.n_kv_heads} heads of "
             f"{cfg.head_dim}, {cfg.n_experts} routed experts top-{cfg.top_k} (FFN {cfg.expert_hidden_dim}) + shared "
             f"expert on every layer, vocab {cfg.vocab_size} (herd-pico's tokenizer); {total / 1e6:.1f}M parameters, "
             f"random weights (one HF directory both load). Data: {a.chats} synthetic multi-turn chats (TRL "
             f"conversational JSONL), tokenized by herd's ChatFormat for both sides (TRL gets `input_ids` + "
             f"`assistant_masks`), loss on assistant tokens only, packed into rows of {a.seq_len} (herd: best fit with "
             f"document masking, rows padded; TRL: packing=True, bfd, padding-free). {a.warmup} warm-up + {a.steps} "
             f"timed optimizer steps of {a.batch_size} rows; AdamW (fused), clip 1.0, no aux loss, no activation "
             f"checkpointing; LoRA rank {a.rank}, alpha {2 * a.rank}, on q/k/v/o, the shared expert's gate/up/down "
             f"and the routed experts' gate_up/down (peft target_parameters). tokens/s counts the packed, non-padding "
             f"tokens of the timed steps, trained tok/s those carrying loss; peak = the process's max RSS "
             f"(imports = RSS after imports, before the model). Load average {load0:.2f} at the start; other processes "
             f"and steal used at most {others:.2f} cores during any run's timed steps"
             f"{' — machine busy: rerun when quiet' if busy else ''}.", "",
             "| dtype | run | tokens/s | trained tok/s | herd / TRL | tokens / step | median step (s) | peak RSS (GB) "
             "| imports (GB) | RSS herd / TRL | trainable params | loss first → last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dtype in dtypes:
        for impl in IMPLS:
            r = rows.get((impl, dtype))
            if r is None:
                continue
            ref = rows.get((impl.replace("herd", "trl"), dtype)) if impl.startswith("herd") else None
            ratio = f"**{r['tok_s'] / ref['tok_s']:.2f}x**" if ref else "(anchor)"
            mem = f"{r['peak_gb'] / ref['peak_gb']:.2f}x" if ref else "(anchor)"
            lines.append(f"| {dtype} | {impl} | {r['tok_s']:.0f} | {r['trained_s']:.0f} | {ratio} | "
                         f"{r['tokens'] / r['steps']:.0f} | {r['median_step_s']:.2f} | {r['peak_gb']:.2f} | "
                         f"{r['rss_imports_gb']:.2f} | {mem} | "
                         f"{r['trainable'] / 1e6:.2f}M | {r['first_loss']:.3f} → {r['last_loss']:.3f} |")
    if problems:
        lines += ["", "Checks failed: " + "; ".join(problems)]
    return "\n".join(lines) + "\n"


def _param_counts(model_dir: Path) -> dict[str, int]:
    from herd.checkpoint.safetensors_io import checkpoint_files, read_tensors

    return {name: t.numel() for name, _, t in read_tensors(checkpoint_files(model_dir))}


if __name__ == "__main__":
    main()

"""``herd`` command line. Each command parses its arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from herd.errors import HerdError


def cmd_info(args: argparse.Namespace) -> None:
    from herd.config import resolve
    from herd.info import census, render

    c = census(resolve(args.model))
    print(json.dumps(c.to_dict()) if args.json else render(c, str(args.model)))


def cmd_new(args: argparse.Namespace) -> None:
    import torch

    from herd.checkpoint import save
    from herd.config import preset
    from herd.model import Transformer

    torch.manual_seed(args.seed)
    model = Transformer(preset(args.preset))
    out = save(model, args.out, dtype=args.dtype)
    print(f"wrote a random-weight {args.preset} model to {out}")


def _params(args: argparse.Namespace):
    from herd.infer.sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          logprobs=getattr(args, "logprobs", None), seed=args.seed, stop=args.stop or [])


def _load(args: argparse.Namespace):
    from herd.api import load

    return load(args.model_dir, dtype=args.dtype, device=args.device, compile=args.compile)  # None: herd-pico


def cmd_generate(args: argparse.Namespace) -> None:
    if args.prompt is None and args.batch_file is None and args.model_dir is not None:
        args.model_dir, args.prompt = None, args.model_dir  # `herd generate PROMPT`: the default model
    params = _params(args)
    if args.batch_file is not None:
        try:
            prompts = [line.rstrip("\n") for line in open(args.batch_file, encoding="utf-8") if line.strip()]
        except OSError as e:
            raise HerdError(f"cannot read --batch-file {args.batch_file}: {e.strerror}") from None
        if args.prompt is not None:
            raise HerdError("give either PROMPT or --batch-file, not both")
    elif args.prompt is None:
        raise HerdError("give a PROMPT (or --batch-file FILE with one prompt per line)")
    else:
        prompts = [args.prompt]
    if args.logprobs is not None and not args.json:
        raise HerdError("--logprobs goes into the --json output: add --json")
    if args.stream and len(prompts) > 1:
        raise HerdError("--stream shows one completion; it cannot be combined with --batch-file")
    images = args.image or []
    if images and len(prompts) > 1:
        raise HerdError("--image goes with one PROMPT; it cannot be combined with --batch-file")
    llm = _load(args)

    def encode(text: str):
        if not args.chat:
            return llm.encode_with_images(text, images)
        content = [*({"type": "image", "path": str(p)} for p in images), {"type": "text", "text": text}]
        return llm.chat_inputs(([{"role": "system", "content": args.system}] if args.system else []) +
                               [{"role": "user", "content": content if images else text}])

    encoded = [encode(p) for p in prompts]
    ids, pixels = [i for i, _ in encoded], [px for _, px in encoded]
    if args.stream and not args.json:
        for piece in llm.engine.stream(ids[0], params, pixels[0]):
            print(piece, end="", flush=True)
        print()
        return
    for c in llm.engine.generate(ids, params, pixels):
        if args.json:
            out = {"prompt_ids": c.prompt_ids, "token_ids": c.token_ids, "text": c.text, "stop_reason": c.stop_reason}
            if c.logprobs is not None:
                text = llm.tokenizer.decode
                out["logprobs"] = [{"token": e.token, "text": text([e.token]), "logprob": e.logprob,
                                    "top": [[i, text([i]), lp] for i, lp in e.top]} for e in c.logprobs]
            print(json.dumps(out))
        else:
            print(c.text + ("\n" if len(prompts) > 1 else ""))


def cmd_chat(args: argparse.Namespace) -> None:
    from herd.infer.repl import repl

    repl(_load(args), _params(args), system=args.system, shield=_shield(args))


def cmd_serve(args: argparse.Namespace) -> None:
    from herd.api import default_model_dir, load
    from herd.serve.app import serve

    api_key = args.api_key or os.environ.get("HERD_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"herd: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    if args.media_dir is not None and not args.media_dir.is_dir():
        raise HerdError(f"--media-dir {args.media_dir} is not a directory")
    shield = _shield(args)
    llm = load(args.model_dir, dtype=args.dtype, device=args.device, compile=args.compile)
    name = args.model_name or Path(args.model_dir or default_model_dir()).name
    print(f"herd: serving {name} on http://{args.host}:{args.port}/v1 (batch {args.max_batch}, "
          f"queue {args.max_queue})", file=sys.stderr, flush=True)
    serve(llm, name, host=args.host, port=args.port, log_level=args.log_level, api_key=api_key,
          max_batch=args.max_batch, max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
          max_len=args.max_model_len, media_dir=args.media_dir, shield=shield)


def cmd_bench(args: argparse.Namespace) -> None:
    from herd.infer.bench import bench

    llm = _load(args)
    r = bench(llm.engine, args.prompt_len, args.new_tokens, args.batch)
    if args.json:
        print(json.dumps(r))
        return
    print(f"{args.model_dir or 'herd-pico'}: batch {r['batch']}, prompt {r['prompt_len']}, "
          f"{r['new_tokens']} new tokens, {r['dtype']} on {r['device']}")
    print(f"  prefill {r['prefill_tok_s']:10.1f} tok/s   ({r['prefill_s']:.3f} s)")
    print(f"  decode  {r['decode_tok_s']:10.1f} tok/s   ({r['decode_s']:.3f} s)")
    print(f"  peak RSS {r['peak_rss_mb']:.0f} MB"
          + (f", peak GPU {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else ""))


def cmd_quantize(args: argparse.Namespace) -> None:
    from herd.checkpoint import quantize_directory

    skip = args.skip if args.skip is not None else None
    out = quantize_directory(args.model_dir, args.out, args.scheme, group_size=args.group_size, skip=skip,
                             quantize_lm_head=args.lm_head, dtype=args.dtype)
    print(f"wrote {args.scheme} model to {out}")


def cmd_plan(args: argparse.Namespace) -> None:
    from herd.config import resolve
    from herd.plan import plan, render

    p = plan(resolve(args.model), str(args.model), args.gpus, args.gpu_mem, args.dtype, args.context, args.batch,
             args.train, args.tp, args.ep, args.micro_batch, not args.no_ac, reserve_gb=args.reserve,
             tokens=args.tokens, tflops=args.tflops)
    print(json.dumps(p.to_dict()) if args.json else render(p))


def cmd_train(args: argparse.Namespace) -> None:
    from herd.train.config import load_run_config

    cfg = load_run_config(args.config, args.overrides)  # errors in the recipe surface before any launch
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        _torchrun(args.argv, args.nproc, cfg.train.threads)
    from herd.train.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress)
    main = trainer.world.main
    if trainer.resumed_from is not None and main:
        print(f"resuming from {trainer.resumed_from} (step {trainer.step})")
    n = sum(p.numel() for p in trainer.model.parameters())
    if main:
        where = f" on {trainer.world.size} processes" if trainer.world.size > 1 else ""
        print(f"training {n / 1e6:.1f}M parameters for {cfg.train.steps} steps{where} -> {trainer.out}")
    try:
        final = trainer.fit()
    finally:
        trainer.world.close()
    if final and main:
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in final.items()
                          if not k.startswith("moe/layer")}))


def _post_train(args: argparse.Namespace, method: str) -> None:
    """herd sft / herd dpo: the run config (flags over recipe over defaults), torchrun when asked, the run."""
    from herd.post.dpo import DPOTrainer, dpo_config
    from herd.post.sft import SFTTrainer, run, sft_config

    overrides = list(args.overrides)
    if getattr(args, "keep", None) is not None:
        overrides += ["--sft.keep", repr(args.keep)]
    if args.eval:
        overrides += [f"--{method}.eval", json.dumps([str(p.resolve()) for p in args.eval])]
    if args.eval_fraction is not None:
        overrides += [f"--{method}.eval_fraction", repr(args.eval_fraction)]
    kw = dict(recipe=args.config, overrides=overrides, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
              lora=args.lora)
    cfg = (dpo_config(args.model_dir, args.data, args.out, beta=args.beta, **kw) if method == "dpo" else
           sft_config(args.model_dir, args.data, args.out, **kw))
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        _torchrun(args.argv, args.nproc, cfg.train.threads)
    trainer = (DPOTrainer if method == "dpo" else SFTTrainer)(cfg, resume=args.resume,
                                                             progress=not (args.no_progress or args.json))
    result = run(trainer)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if args.json:
        print(json.dumps(result))
        return
    shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in result.items()
                      if isinstance(v, float) and k not in ("out",))
    print(f"{method}: {result['steps']} steps on {result['examples']} examples; {shown} -> {result['out']}")


def cmd_rl(args: argparse.Namespace) -> None:
    from herd.post.rl import rl, rl_config
    from herd.post.tasks import split_specs

    overrides = list(args.overrides) + (["--rl.lag", "0"] if args.sync else [])
    cfg = rl_config(args.model_dir, split_specs(args.tasks) if args.tasks else [], args.out, recipe=args.config,
                    overrides=overrides, steps=args.steps, lr=args.lr, lora=args.lora,
                    group_size=args.group_size)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        _torchrun(args.argv, args.nproc, cfg.train.threads)
    result = rl(cfg, resume=args.resume, progress=not (args.no_progress or args.json))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if args.json:
        print(json.dumps(result))
        return
    num = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"rl: {result['steps']} steps; reward {num(result['reward_first'])} -> {num(result['reward_last'])}, "
          f"held-out pass@1 {num(result['heldout_pass@1_before'])} -> {num(result['heldout_pass@1_after'])} "
          f"-> {result['out']}")


def cmd_sft(args: argparse.Namespace) -> None:
    _post_train(args, "sft")


def cmd_dpo(args: argparse.Namespace) -> None:
    _post_train(args, "dpo")


def _torchrun(argv: list[str], nproc: int, threads: int | None) -> None:
    """Run this same command as ``nproc`` processes under torchrun (one host), and exit with its status."""
    argv = list(argv)
    for i, a in enumerate(argv):  # drop --nproc N / --nproc=N: the workers are the processes
        if a == "--nproc":
            del argv[i:i + 2]
            break
        if a.startswith("--nproc="):
            del argv[i]
            break
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "herd.cli", *argv]
    sys.exit(subprocess.call(cmd, env=env))


def parse_token_count(text: str) -> int:
    """1024, 4K (= 4096), 1M (= 2**20)."""
    t = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise HerdError(f"bad length {text!r}: use a token count such as 512, 4K or 1M") from None


def cmd_niah(args: argparse.Namespace) -> None:
    from herd.eval.niah import NiahConfig, engine_completer, run_niah, save

    try:
        depths = [float(d) for d in args.depths.split(",")]
    except ValueError:
        raise HerdError(f"bad --depths {args.depths!r}: fractions such as 0,0.5,1") from None
    cfg = NiahConfig(lengths=[parse_token_count(x) for x in args.lengths.split(",")], depths=depths,
                     needles=args.needles, chat=args.chat, seed=args.seed, haystack=args.haystack or [])
    llm = _load(args)
    limit = llm.model.cfg.max_seq_len
    if max(cfg.lengths) + cfg.max_new_tokens > limit:
        raise HerdError(f"length {max(cfg.lengths)} (+ {cfg.max_new_tokens} answer tokens) exceeds the model's "
                        f"max_seq_len {limit}")
    name = Path(args.model_dir).name if args.model_dir else "herd-pico"
    result = run_niah(engine_completer(llm.engine, cfg.max_new_tokens, args.batch), llm.tokenizer, cfg,
                      progress=not args.no_progress, model=name)
    files = save(result, args.out)
    if args.json:
        print(json.dumps({"accuracy": result.accuracy, "cells": result.cells,
                          **{k: str(v) for k, v in files.items()}}))
        return
    print("depth \\ length " + "".join(f"{L:>9}" for L in cfg.lengths))
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in result.cells}
    for d in cfg.depths:
        print(f"{d:>14.0%} " + "".join(f"{acc[(L, d)]:>9.0%}" for L in cfg.lengths))
    print(f"accuracy {result.accuracy:.1%} over {len(result.samples)} prompts; {result.seconds:.0f} s")
    print(f"wrote {files['json']}" + (f" and {files['png']}" if "png" in files else
                                      " (no heatmap: pip install matplotlib)"))


def cmd_eval_tasks(args: argparse.Namespace) -> None:
    from herd.eval.tasks import evaluate_tasks, render
    from herd.post.tasks import get_task, split_specs

    tasks = {spec: get_task(spec) for spec in split_specs(args.tasks)}  # bad specs fail before the model loads
    report = evaluate_tasks(_load(args), tasks, n=args.n, samples=args.samples, temperature=args.temperature,
                            k=args.k, difficulty=args.difficulty, seed=args.seed, max_new_tokens=args.max_new_tokens,
                            batch=args.batch, threshold=args.threshold, plain=args.plain,
                            progress=not args.no_progress)
    print(json.dumps(report) if args.json else render(report))


def cmd_guard(args: argparse.Namespace) -> None:
    from herd.endpoint import is_url
    from herd.safety.guard import load_guard
    from herd.safety.llama_guard import guard_prompt, read_categories

    messages = []
    if args.conversation is not None:
        try:
            messages = json.loads(args.conversation.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise HerdError(f"--conversation {args.conversation}: {e}") from None
        if not isinstance(messages, list):
            raise HerdError(f"--conversation {args.conversation}: a JSON list of messages, got "
                            f"{type(messages).__name__}")
    if args.text is not None:
        messages.append({"role": "assistant" if args.role == "agent" else "user", "content": args.text})
    if not messages:
        raise HerdError("give --text (and --role) or --conversation FILE.json")
    categories = read_categories(args.categories) if args.categories is not None else None
    excluded = [c.strip() for c in args.exclude.split(",") if c.strip()] if args.exclude else []
    if args.prompt_only:
        print(guard_prompt(messages, args.version, excluded, categories), end="")
        return
    if args.version != 4 and not is_url(args.guard):
        raise HerdError("herd runs Llama Guard 4 models (Llama 4 tokens); --version 3 is for --prompt-only and "
                        "guard endpoints")
    guard = load_guard(args.guard, dtype=args.dtype, device=args.device, threshold=args.threshold,
                       template=args.template)
    verdict = guard.moderate(messages, excluded, categories)
    out = {"safe": verdict.safe, "categories": verdict.categories, "p_unsafe": verdict.score}
    print(json.dumps(out) if args.json else
          ("safe" if verdict.safe else f"unsafe {','.join(verdict.categories)}") +
          ("" if verdict.score is None else f" (p_unsafe {verdict.score:.3f})"))


def cmd_prompt_guard(args: argparse.Namespace) -> None:
    from herd.safety.prompt_guard import PromptGuard

    guard = PromptGuard.load(args.directory, device=args.device, threshold=args.threshold)
    out = guard.classify(args.text, jailbreak_only=args.jailbreak_only)
    print(json.dumps(out) if args.json else
          f"{out['label']} (" + ", ".join(f"{k} {v:.3f}" for k, v in out["scores"].items()) + ")")


def cmd_pairs(args: argparse.Namespace) -> None:
    from herd.eval.tasks import engine_completer
    from herd.infer.sampling import SamplingParams
    from herd.post.pairs import judge_scorer, make_pairs, write_pairs
    from herd.post.tasks import get_task, split_specs

    tasks = {spec: get_task(spec) for spec in split_specs(args.tasks)}  # bad specs fail before the model loads
    if args.temperature <= 0:
        raise HerdError("--temperature must be > 0: greedy answers are all the same, and a pair needs two")
    llm = _load(args)
    scorer = None
    if args.judge is not None:
        from herd.api import load
        from herd.post.judge import endpoint_judge, herd_judge

        url = str(args.judge).startswith(("http://", "https://"))
        scorer = judge_scorer(endpoint_judge(str(args.judge), args.judge_model, args.judge_api_key) if url else
                              herd_judge(load(args.judge, dtype=args.dtype, device=args.device)))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    records, counts = make_pairs(engine_completer(llm, params), tasks, args.n, args.samples, args.difficulty,
                                 args.seed, args.batch, args.min_margin, scorer, progress=not args.no_progress)
    out = write_pairs(records, args.out)
    counts["out"] = str(out)
    if args.json:
        print(json.dumps(counts))
    else:
        print(f"pairs: {counts['pairs']} of {counts['items']} items ({counts['no_preference']} without a preference: "
              f"all answers scored alike) -> {out}")


def cmd_filter(args: argparse.Namespace) -> None:
    from herd.post.filter import FilterSpec, filter_files, render

    spec = FilterSpec(keep=args.keep, scorer=args.scorer or ("judge" if args.judge else "auto"), judge=args.judge,
                      judge_model=args.judge_model, rubric=args.rubric and str(args.rubric), samples=args.samples,
                      temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    report = filter_files(args.model_dir, args.data, args.out, spec, dtype=args.dtype, device=args.device,
                          api_key=args.judge_api_key, progress=not (args.no_progress or args.json))
    print(json.dumps(report) if args.json else render(report))


def cmd_export(args: argparse.Namespace) -> None:
    from herd.train.export import export

    out = export(args.checkpoint, args.out, dtype=args.dtype)
    print(f"exported {out}")


def _add_model_args(s: argparse.ArgumentParser, dtype_default: str | None = None) -> None:
    s.add_argument("model_dir", nargs="?", default=None,
                   help="HF model directory, or a preset name (random weights); default: the embedded herd-pico")
    s.add_argument("--dtype", default=dtype_default, help="bf16 | fp32 (default: as stored)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (CUDA graphs on GPU): faster after a one-off compilation")


def _add_shield_args(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("shields (Llama Guard / Prompt Guard around the model; see herd.safety.shield)")
    g.add_argument("--guard", default=None, metavar="MODEL_OR_URL",
                   help="a Llama Guard model directory or OpenAI-compatible URL that moderates inputs and outputs")
    g.add_argument("--guard-categories", default=None, metavar="CODES_OR_FILE",
                   help="S-codes to check (S1,S9,S10; the rest excluded) or a JSON file of custom categories")
    g.add_argument("--prompt-guard", default=None, metavar="DIR", help="a Prompt Guard 1/2 directory (inputs)")
    g.add_argument("--moderate", default="input,output", help="input, output or input,output (default)")
    g.add_argument("--guard-fail", choices=("closed", "open"), default="closed",
                   help="a guard that fails (endpoint down): block (closed, default) or let through (open)")
    g.add_argument("--guard-threshold", type=float, default=0.5, help="Llama Guard: unsafe when P(unsafe) >= this")
    g.add_argument("--prompt-guard-threshold", type=float, default=0.9,
                   help="Prompt Guard: flagged when its attack score >= this (default 0.9, as LlamaFirewall)")
    g.add_argument("--guard-template", choices=("herd", "server"), default="herd",
                   help="guard URL: herd renders the guard prompt (default) or the server applies the guard's template")
    g.add_argument("--guard-interval", type=int, default=32,
                   help="streamed answers: tokens between output checks (text is released only once checked)")


def _shield(args: argparse.Namespace):
    """The shield the command line asks for, or None."""
    if args.guard is None and args.prompt_guard is None:
        return None
    from herd.safety.shield import Shield, ShieldConfig

    return Shield.load(ShieldConfig(
        guard=args.guard, categories=args.guard_categories, prompt_guard=args.prompt_guard, moderate=args.moderate,
        fail=args.guard_fail, threshold=args.guard_threshold, prompt_guard_threshold=args.prompt_guard_threshold,
        template=args.guard_template, interval=args.guard_interval, device=args.device))


def _add_sampling_args(s: argparse.ArgumentParser, max_new_tokens: int) -> None:
    s.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's: per token already generated")
    s.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's: per time a token was generated")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")


def _add_post_args(s: argparse.ArgumentParser, method: str, data_help: str, lr: str, batch_help: str) -> None:
    s.add_argument("model_dir", type=Path, help="the model to fine-tune (an HF model directory)")
    s.add_argument("data", nargs="+", type=Path, help=data_help)
    s.add_argument("--out", type=Path, required=True,
                   help="the run directory, and at the end the fine-tuned HF model directory (+ adapter/ with --lora)")
    s.add_argument("--steps", type=int, help=f"optimizer steps (default: --{method}.epochs passes over the data, 1)")
    s.add_argument("--lr", type=float, help=f"peak learning rate (default {lr} with --lora)")
    s.add_argument("--batch-size", type=int, help=batch_help)
    s.add_argument("--lora", type=int, metavar="RANK",
                   help="train LoRA adapters of this rank on attention and expert weights, not the full model")
    s.add_argument("--eval", type=Path, nargs="+", help="held-out files for the eval metrics")
    s.add_argument("--eval-fraction", type=float, help="hold out this share of the data instead")
    s.add_argument("--config", type=Path, help="a recipe (TOML) with the run's settings")
    s.add_argument("--json", action="store_true",
                   help="print one JSON object at the end: out, steps, examples, train_loss, eval_loss"
                        + (", reward_accuracy, reward_margin, eval_reward_accuracy, eval_reward_margin"
                           if method == "dpo" else ""))
    s.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint in --out")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--nproc", type=int, default=1, help="processes on this host (torchrun): FSDP2 (+ --train.ep N)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="herd", description="Llama 4 in one PyTorch codebase.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="layer layout, parameter census and weight memory of a preset or model dir")
    s.add_argument("model", help="preset (scout, maverick, behemoth, tiny...) or HF model directory")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("new", help="write a random-weight model of a preset (HF layout), for tests and demos")
    s.add_argument("preset")
    s.add_argument("out", type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default=None, help="bf16 | fp32 (default: fp32)")
    s.set_defaults(func=cmd_new)

    s = sub.add_parser("generate", help="generate a continuation of PROMPT (or of each line of --batch-file)")
    _add_model_args(s)
    s.add_argument("prompt", nargs="?")
    s.add_argument("--batch-file", type=Path, help="one prompt per line, generated as one batch")
    s.add_argument("--chat", action="store_true", help="wrap each prompt as one user message + generation prompt")
    s.add_argument("--system", default=None, help="system message (with --chat)")
    s.add_argument("--stream", action="store_true", help="print text as it is generated")
    s.add_argument("--image", action="append", type=Path, metavar="PATH",
                   help="an image for the prompt (repeatable; with --chat they open the user message, else they "
                        "come before the text)")
    s.add_argument("--json", action="store_true",
                   help='print {"prompt_ids", "token_ids", "text", "stop_reason"} (one line per prompt)')
    s.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="with --json: each generated token's logprob and the N most likely tokens")
    _add_sampling_args(s, 64)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching (/v1/chat/completions, "
                                     "/v1/completions, /v1/models, /health, /metrics)")
    s.add_argument("model_dir", nargs="?", default=None,
                   help="HF model directory, or a preset name (random weights); default: the embedded herd-pico")
    s.add_argument("--dtype", default=None, help="bf16 | fp32 (default: as stored)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or set HERD_API_KEY)")
    s.add_argument("--model-name", default=None, help="the model id clients ask for (default: the directory name)")
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    s.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (CUDA graphs on GPU), one graph per batch-size bucket "
                        "(1, 2, 4, ... up to --max-batch), all compiled at start-up")
    s.add_argument("--max-queue", type=int, default=256, help="waiting sequences before requests get 429")
    s.add_argument("--max-tokens-limit", type=int, default=None, help="the largest max_tokens a request may ask for")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion bound per sequence (default: the model's context, at most 8192)")
    s.add_argument("--media-dir", type=Path, default=None,
                   help="image parts may name local files under this directory (default: data: URLs only)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_shield_args(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /exit)")
    _add_model_args(s)
    s.add_argument("--system", default=None, help="system message")
    _add_sampling_args(s, 512)
    _add_shield_args(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("bench", help="prefill/decode tokens per second and peak memory")
    _add_model_args(s)
    s.add_argument("--prompt-len", type=int, default=128)
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("quantize", help="quantize a model directory's weights and write a directory herd loads")
    s.add_argument("model_dir", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--scheme", required=True,
                   choices=["int8", "int4", "fp8", "int4_weight_int8_dynamic_activation"])
    s.add_argument("--group-size", type=int, default=128, help="int4 group size along the input dim")
    s.add_argument("--skip", action="append", help="glob of module names to keep unquantized (repeatable)")
    s.add_argument("--lm-head", action="store_true", help="quantize the LM head too")
    s.add_argument("--dtype", default="bf16", help="dtype of the unquantized tensors (default bf16)")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("plan", help="per-GPU memory (weights, KV cache, activations, optimizer) and FLOPs of a "
                                    "model on N GPUs, for inference or training")
    s.add_argument("model", help="preset (scout, maverick, behemoth...) or HF model directory")
    s.add_argument("--gpus", type=int, default=1)
    s.add_argument("--gpu-mem", type=float, default=80.0, help="GB per GPU (default 80: H100)")
    s.add_argument("--dtype", default="bf16", choices=["bf16", "fp8", "int8", "int4"],
                   help="weight format (inference) or matmul precision (training)")
    s.add_argument("--context", type=int, default=8192, help="tokens per sequence")
    s.add_argument("--batch", type=int, default=1, help="concurrent sequences per model replica (inference)")
    s.add_argument("--train", action="store_true", help="plan training (FSDP2 + expert parallel) instead")
    s.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: min(gpus, 8) for "
                                                         "inference, 1 for training)")
    s.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: all GPUs for inference, "
                                                         "gcd(gpus, experts) for training)")
    s.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step (training)")
    s.add_argument("--no-ac", action="store_true", help="training without activation checkpointing")
    s.add_argument("--reserve", type=float, default=2.0, help="GB per GPU for CUDA context, buffers, slack")
    s.add_argument("--tokens", type=float, default=None, help="training tokens (e.g. 30e12): gives days")
    s.add_argument("--tflops", type=float, default=None, help="achieved TFLOP/s per GPU (training throughput)")
    s.add_argument("--json", action="store_true", help="print one JSON object (fits, per_gpu_bytes, per_gpu, ...)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("train", help="train a model from a TOML recipe; --section.key VALUE overrides the recipe",
                       epilog="example: herd train recipes/pico.toml --train.steps 100 --optim.lr 1e-3")
    s.add_argument("config", type=Path, help="the recipe (TOML)")
    s.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--nproc", type=int, default=1,
                   help="processes (ranks) on this host, launched with torchrun: FSDP2 data parallelism "
                        "(+ expert parallelism with --train.ep N)")
    s.set_defaults(func=cmd_train, overrides=[])

    s = sub.add_parser("sft", help="supervised fine-tuning (full or LoRA) on chats in TRL's formats; --section.key "
                       "VALUE overrides the recipe", epilog="example: herd sft models/herd-pico chats.jsonl --out "
                       "runs/pico-sft --lora 16 --steps 200  (recipe sections: model, data, optim, train, sft, lora)")
    _add_post_args(s, "sft", "JSONL / Parquet files: {messages}, {prompt, completion} (strings or message lists)",
                   "2e-5; 2e-4", "packed rows per step (default 8; rows of --data.seq_len tokens)")
    s.add_argument("--keep", type=float, metavar="FRACTION",
                   help="train on this hardest fraction of the records only, rated by the model (herd filter's "
                        "auto scorer; --sft.scorer, --sft.judge, --sft.judge_model), report in OUT/filter")
    s.set_defaults(func=cmd_sft, overrides=[])

    s = sub.add_parser("filter", help="remove easy data: rate each SFT record's difficulty and keep the hardest "
                                      "fraction (kept.jsonl, removed.jsonl, scores.jsonl, report.json, difficulty.png)",
                       description="Scorers: passk (1 - the mean grade of the model's own samples; records with an "
                                   "\"answer\" (+ \"matcher\": normalised|exact|numeric|regex) or a built-in "
                                   "\"task\" + \"meta\"), loss (rank of the reference answer's mean token loss), "
                                   "judge (a 1-10 rating on a rubric by a herd model or an OpenAI-compatible "
                                   "endpoint), auto (passk where a record is checkable, loss elsewhere). See "
                                   "herd/post/filter.py.",
                       epilog="example: herd filter MODEL chats.jsonl --out runs/hard --keep 0.5;  herd filter MODEL "
                              "chats.jsonl --out runs/hard --keep 0.05 --judge http://localhost:8000/v1")
    s.add_argument("model_dir", type=Path, help="the model that rates (the one to fine-tune), an HF model directory")
    s.add_argument("data", nargs="+", type=Path, help="JSONL / Parquet files of SFT records in TRL's formats")
    s.add_argument("--out", type=Path, required=True, help="the output directory")
    s.add_argument("--keep", type=float, required=True, metavar="FRACTION", help="the hardest fraction kept, (0, 1]")
    s.add_argument("--scorer", choices=["auto", "passk", "loss", "judge"],
                   help="default: judge with --judge, else auto")
    s.add_argument("--judge", metavar="MODEL_DIR|URL",
                   help="the judge: a herd model directory or an OpenAI-compatible http(s)://HOST/v1 endpoint "
                        "(--scorer judge without it: MODEL_DIR judges)")
    s.add_argument("--judge-model", metavar="NAME", help="the endpoint's model (default: the first of its /models)")
    s.add_argument("--judge-api-key", metavar="KEY", help="the endpoint's key (default: $OPENAI_API_KEY)")
    s.add_argument("--rubric", type=Path, metavar="FILE",
                   help="the judge's prompt, with {conversation} where the record goes (default: how hard, 1-10)")
    s.add_argument("--samples", type=int, default=4, help="passk: samples per record, K (default 4)")
    s.add_argument("--temperature", type=float, default=1.0, help="passk: sampling temperature (default 1.0)")
    s.add_argument("--max-new-tokens", type=int, default=256, help="passk: tokens per sample (default 256)")
    s.add_argument("--seed", type=int, default=0, help="the sampling and the order of equal difficulties")
    s.add_argument("--dtype", default=None, help="bf16 | fp32 (default: as stored)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true", help="print report.json's object")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_filter)

    s = sub.add_parser("dpo", help="direct preference optimisation (sigmoid DPO, optional RPO NLL term) on pairs in "
                       "TRL's preference format", epilog="example: herd dpo runs/pico-sft pairs.jsonl --out "
                       "runs/pico-dpo --beta 0.1 --lora 16  (recipe sections: model, data, optim, train, dpo, lora; "
                       "--dpo.rpo_alpha 1.0 adds the chosen NLL)")
    _add_post_args(s, "dpo", "JSONL / Parquet files: {prompt, chosen, rejected} (strings or message lists)",
                   "1e-6; 1e-5", "pairs per step (default 8)")
    s.add_argument("--beta", type=float, help="DPO's beta: how far the model may move from the reference (0.1)")
    s.set_defaults(func=cmd_dpo, overrides=[])

    s = sub.add_parser("eval", help="evaluations (niah: needle in a haystack; tasks: pass@k on verifiable tasks; bias; "
                                     "cyberseceval)")
    evals = s.add_subparsers(dest="eval", required=True)
    s = evals.add_parser("niah", help="needle-in-a-haystack retrieval over context lengths x needle depths",
                         epilog="example: herd eval niah models/herd-pico --lengths 256,512,1K --needles 4")
    _add_model_args(s)
    s.add_argument("--lengths", default="512,1K,2K,4K", help="context lengths in tokens (512, 4K, 1M)")
    s.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths, 0 = start, 1 = end")
    s.add_argument("--needles", type=int, default=2, help="prompts per cell (default 2)")
    s.add_argument("--chat", action="store_true", help="ask in the chat format (instruct models)")
    s.add_argument("--haystack", action="append", metavar="FILE",
                   help="haystack text file (repeatable; default: Hamlet and The Tempest, shipped with herd)")
    s.add_argument("--batch", type=int, default=4, help="prompts generated together")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, default=Path("runs/niah"), help="where niah.json and niah.png go")
    s.add_argument("--json", action="store_true", help="print one JSON object (accuracy, cells, files)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_niah)

    s = evals.add_parser("tasks", help="pass@1 / pass@k on verifiable tasks, per task and difficulty",
                         description="Tasks: arithmetic, next_line, speaker, play, instruction, shapes (images), or a "
                                     "JSONL file of {\"prompt\", \"answer\"} records graded by "
                                     "FILE.jsonl:matcher=normalised|exact|numeric|regex (numeric: :tolerance=X) or "
                                     "FILE.jsonl:reward=MODULE:FUNCTION (f(prompt, completion, answer) -> [0, 1]). "
                                     "Options follow a name as :key=value (arithmetic:digits=3, "
                                     "speaker:corpus=DIR). See herd/post/tasks/__init__.py.",
                         epilog="example: herd eval tasks MODEL --tasks arithmetic,instruction --n 50 --samples 8 "
                                "--temperature 0.8")
    _add_model_args(s)
    s.add_argument("--tasks", required=True, metavar="SPEC[,SPEC]", help="task names or JSONL files, comma-separated")
    s.add_argument("--n", type=int, default=20, help="items per task (default 20; a JSONL file: at most its records)")
    s.add_argument("--samples", type=int, default=1, help="completions per item, K (default 1; needs --temperature)")
    s.add_argument("--k", type=int, default=None, help="the k of pass@k (default: --samples)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default): one sample per item")
    s.add_argument("--difficulty", type=int, default=None, help="one level only (default: cycle through the levels)")
    s.add_argument("--threshold", type=float, default=1.0, help="the score a sample needs to pass (default 1.0)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--plain", action="store_true", help="plain-text prompts ending in 'Answer:' (base models)")
    s.add_argument("--batch", type=int, default=32, help="sequences generated together (default 32)")
    s.add_argument("--seed", type=int, default=0, help="the items and the sampling")
    s.add_argument("--json", action="store_true", help="print one JSON object (pass@1, pass@k, tasks)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_eval_tasks)
    _add_module_command(evals, "cyberseceval", "herd.eval.cyberseceval.cli",
                        "CyberSecEval on the official JSON files (mitre-frr, prompt-injection, instruct, "
                        "autocomplete, interpreter, mitre), read from --data; output and stat files in its shapes",
                        epilog="example: herd eval cyberseceval prompt-injection --data PurpleLlama/"
                               "CybersecurityBenchmarks/datasets --model http://localhost:8000/v1 --judge J --json")
    _add_module_command(evals, "bias", "herd.eval.bias",
                        "the seeds' bias figures: refusal rate on debated topics, unequal refusals on paired "
                        "prompts, strong political lean by a judge, moralising phrases (95%% intervals)",
                        epilog="example: herd eval bias --model http://localhost:8000/v1 --judge models/judge "
                               "--baseline http://localhost:8001/v1 --json")

    _add_module_command(sub, "recipe", "herd.recipe",
                        help="run a pipeline of stages (a TOML recipe): finished stages are skipped, interrupted "
                             "ones resumed, changed ones refused until --redo")
    _add_module_command(sub, "distill-cache", "herd.train.distill_cache",
                        "write a teacher's top-k log-probs per token of a data directory (memory-mapped, aligned "
                        "with the token shards), so a student distils with no teacher in memory",
                        epilog="example: herd distill-cache runs/teacher data/pico --top-k 32 --seq-len 256 "
                               "--out runs/teacher-cache --measure models/herd-pico")

    _add_module_command(sub, "distill-data", "herd.post.seq_distill",
                        "sequence-level distillation: a teacher answers prompts, written as chats for herd sft",
                        epilog="example: herd distill-data runs/teacher prompts.jsonl --out runs/teacher-data; "
                               "herd sft models/herd-pico runs/teacher-data/chats.jsonl --out runs/student")

    s = sub.add_parser("redteam", help="automated red teaming (goat: GOAT, the attacker LLM of the seeds)")
    attacks = s.add_subparsers(dest="redteam", required=True)
    _add_module_command(attacks, "goat", "herd.safety.goat",
                        "GOAT: an attacker model plays a multi-turn adversary against a target (any herd model or "
                        "OpenAI-compatible URL, optionally behind shields); a judge scores each turn; ASR@1, ASR@k",
                        epilog="example: herd redteam goat --attacker models/attacker --target http://localhost:8000"
                               "/v1 --judge models/judge --goals goals.jsonl --turns 5 --attempts 4 --out runs/goat")

    s = sub.add_parser("rl", help="online RL (GRPO family) on verifiable tasks, with continuous difficulty "
                       "filtering; --section.key VALUE overrides the recipe",
                       epilog="example: herd rl runs/pico-sft --tasks arithmetic,instruction --out runs/pico-rl "
                              "--steps 200 --group-size 8 --lora 16  (recipe sections: model, data, optim, train, "
                              "rl, grpo, lora; e.g. --rl.tau 0.5 --grpo.beta 0.04)")
    s.add_argument("model_dir", type=Path, help="the policy to train (an HF model directory)")
    s.add_argument("--tasks", metavar="SPEC[,SPEC]", help="task names or JSONL files (as herd eval tasks takes them)")
    s.add_argument("--out", type=Path, required=True,
                   help="the run directory, and at the end the trained HF model directory (+ adapter/ with --lora)")
    s.add_argument("--steps", type=int, help="optimizer steps, one rollout batch each")
    s.add_argument("--group-size", type=int, help="answers per prompt (default 8)")
    s.add_argument("--lr", type=float, help="peak learning rate (default 1e-6; 1e-5 with --lora)")
    s.add_argument("--lora", type=int, metavar="RANK", help="train LoRA adapters of this rank, not the full model")
    s.add_argument("--sync", action="store_true", help="generate and train in turn (rl.lag 0); default: the next "
                   "step's rollouts are generated while a step trains, one step behind (--rl.lag N)")
    s.add_argument("--config", type=Path, help="a recipe (TOML) with the run's settings")
    s.add_argument("--json", action="store_true", help="print one JSON object at the end: out, steps, reward_first, "
                   "reward_last, heldout_pass@1_before, heldout_pass@1_after")
    s.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint in --out")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--nproc", type=int, default=1, help="processes on this host (torchrun): FSDP2 (+ --train.ep N)")
    s.set_defaults(func=cmd_rl, overrides=[])

    s = sub.add_parser("pairs", help="on-policy preference pairs for herd dpo: sample the model on task items, score "
                       "the answers (the task's verifier or a judge), write best vs worst",
                       epilog="example: herd pairs runs/pico-sft --tasks arithmetic,instruction --n 200 --samples 4 "
                              "--out pairs.jsonl")
    _add_model_args(s)
    s.add_argument("--tasks", required=True, metavar="SPEC[,SPEC]",
                   help="task names or JSONL files (as herd eval tasks takes them), comma-separated")
    s.add_argument("--out", type=Path, required=True, help="the pairs file (JSONL, TRL's preference format)")
    s.add_argument("--n", type=int, default=100, help="items per task (default 100)")
    s.add_argument("--samples", type=int, default=4, help="answers per item (default 4)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--difficulty", type=int, default=None, help="one level only (default: cycle through the levels)")
    s.add_argument("--min-margin", type=float, default=1e-6,
                   help="the least score difference between chosen and rejected (default: any)")
    s.add_argument("--judge", help="score with a judge instead of the tasks' verifiers: a herd model directory or "
                                   "an OpenAI-compatible endpoint URL (http://HOST/v1)")
    s.add_argument("--judge-model", help="the endpoint's model name (default: the first it lists)")
    s.add_argument("--judge-api-key", help="the endpoint's API key (default: $OPENAI_API_KEY)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--batch", type=int, default=32, help="sequences generated together (default 32)")
    s.add_argument("--seed", type=int, default=0, help="the items and the sampling")
    s.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_pairs)

    s = sub.add_parser("guard", help="moderate a message with a Llama Guard model (the official prompt; safe or "
                       "unsafe + S-codes, P(unsafe))",
                       epilog='example: herd guard MODEL_DIR --text "How do I pick a lock?" --json   '
                              '(--prompt-only prints the exact prompt the guard sees)')
    s.add_argument("guard", help="a Llama Guard model directory, or the URL of an OpenAI-compatible server of one "
                                 "(http://HOST:PORT/v1; API key from HERD_GUARD_API_KEY or OPENAI_API_KEY)")
    s.add_argument("--template", choices=("herd", "server"), default="herd",
                   help="with a URL: herd renders the guard prompt (default), or the server applies the guard's "
                        "own chat template to the conversation")
    s.add_argument("--text", help="the message to moderate (appended to --conversation as --role)")
    s.add_argument("--role", choices=("user", "agent"), default="user",
                   help="user: input moderation; agent: output moderation (needs the user turn: --conversation)")
    s.add_argument("--conversation", type=Path, help="a JSON list of messages; the last turn is moderated")
    s.add_argument("--exclude", help="category codes to leave out, comma-separated (S6,S7)")
    s.add_argument("--categories", type=Path, help="a JSON list of {code, name, description} or {code: name}: "
                                                   "custom categories instead of S1-S13")
    s.add_argument("--version", type=int, choices=(3, 4), default=4, help="Llama Guard 3 or 4 prompt (default 4)")
    s.add_argument("--threshold", type=float, default=0.5, help="unsafe when P(unsafe) >= this (default 0.5)")
    s.add_argument("--prompt-only", action="store_true", help="print the guard's prompt and stop (no model run)")
    s.add_argument("--dtype", help="bf16 | fp32 (default: as stored)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true", help='print {"safe", "categories", "p_unsafe"}')
    s.set_defaults(func=cmd_guard)

    s = sub.add_parser("prompt-guard", help="classify a text with Prompt Guard 1 or 2 (jailbreak / prompt injection)",
                       epilog='example: herd prompt-guard PG_DIR --text "Ignore previous instructions" --json')
    s.add_argument("directory", help="a local Prompt Guard directory (transformers sequence-classification model)")
    s.add_argument("--text", required=True)
    s.add_argument("--threshold", type=float, default=0.5, help="a score at or above this flags the text")
    s.add_argument("--jailbreak-only", action="store_true",
                   help="Prompt Guard 1: flag jailbreaks only (the card's advice for direct user dialogue)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true", help='print {"label", "scores"}')
    s.set_defaults(func=cmd_prompt_guard)

    s = sub.add_parser("export", help="write a training checkpoint as an HF model directory (generate, transformers)")
    s.add_argument("checkpoint", type=Path, help="a checkpoint (step_*), or a run directory (its latest checkpoint)")
    s.add_argument("out", type=Path)
    s.add_argument("--dtype", default="bf16", help="bf16 | fp32 (default bf16)")
    s.set_defaults(func=cmd_export)
    return p


def _add_module_command(subparsers, name: str, module: str, help: str, **kw) -> None:
    """A command whose arguments and body live in ``module`` (``add_arguments(parser)``, ``main(args)``)."""
    import importlib

    mod = importlib.import_module(module)
    s = subparsers.add_parser(name, help=help, description=getattr(mod, "DESCRIPTION", None), **kw)
    mod.add_arguments(s)
    s.set_defaults(func=mod.main)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "sft", "dpo", "rl"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = extra  # --section.key VALUE pairs for the recipe
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rc = args.func(args)
    except HerdError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # bad option values / paths surfacing from the library
        print(f"herd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())

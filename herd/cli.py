"""``herd`` command line. Each command parses its arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import json
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


def cmd_generate(args: argparse.Namespace) -> None:
    from herd.chat import ChatFormat
    from herd.checkpoint import load
    from herd.infer.generate import stream
    from herd.tokenizer import Tokenizer

    if args.max_new_tokens < 0:
        raise HerdError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise HerdError(f"--temperature must be >= 0, got {args.temperature}")
    tok = Tokenizer.for_model(args.model_dir)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        prompt_ids = ChatFormat(tok).encode_dialog(messages, add_generation_prompt=True)
    else:
        prompt_ids = [tok.bos_id] + tok.encode(args.prompt)
    model = load(args.model_dir, dtype=args.dtype, device=args.device).eval()
    if prompt_ids and max(prompt_ids) >= model.cfg.vocab_size:
        raise HerdError(f"the tokenizer produced id {max(prompt_ids)} but the model's vocab is {model.cfg.vocab_size}")
    decoder = tok.stream_decoder()
    ids: list[int] = []
    for token in stream(model, prompt_ids, args.max_new_tokens, args.temperature, args.seed, tok.stop_ids):
        ids.append(token)
        if token in tok.stop_ids:
            break
        piece = decoder.push(token)
        if not args.json:
            print(piece, end="", flush=True)
    tail = decoder.flush()
    if args.json:
        text = tok.decode([t for t in ids if t not in tok.stop_ids])
        stop = "stop_token" if ids and ids[-1] in tok.stop_ids else "length"
        print(json.dumps({"prompt_ids": prompt_ids, "token_ids": ids, "text": text, "stop_reason": stop}))
    else:
        print(tail)


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

    s = sub.add_parser("generate", help="generate a continuation of PROMPT")
    s.add_argument("model_dir", type=Path)
    s.add_argument("prompt")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--chat", action="store_true", help="wrap PROMPT as one user message + generation prompt")
    s.add_argument("--system", default=None, help="system message (with --chat)")
    s.add_argument("--json", action="store_true", help='print {"prompt_ids", "token_ids", "text"}')
    s.add_argument("--dtype", default=None, help="bf16 | fp32 (default: as stored)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except HerdError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad option values surfacing from the library (e.g. an unknown dtype)
        print(f"herd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

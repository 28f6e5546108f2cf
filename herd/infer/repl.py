"""The interactive chat loop behind ``herd chat``: multi-turn history, streamed replies, /reset, /exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from herd.api import LLM
from herd.infer.sampling import SamplingParams

HELP = "commands: /reset (forget the conversation), /exit (quit); Ctrl-D quits too"


def repl(llm: LLM, params: SamplingParams, system: str | None = None, read: Callable[[str], str] = input,
         out: TextIO = sys.stdout) -> list[dict]:
    """Run until /exit or end of input; returns the conversation so far."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print(f"herd chat — {HELP}", file=out)
    while True:
        try:
            line = read("> ")
        except EOFError:
            print(file=out)
            return messages
        text = line.strip()
        if text in ("/exit", "/quit"):
            return messages
        if text == "/reset":
            messages = list(start)
            print("(conversation reset)", file=out)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=out)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in llm.engine.stream(llm.chat_ids(messages), params):
                reply.append(piece)
                print(piece, end="", flush=True, file=out)
        except KeyboardInterrupt:  # stop this reply, keep the session
            print(" [interrupted]", end="", file=out)
        print(file=out)
        messages.append({"role": "assistant", "content": "".join(reply)})

"""The interactive chat loop behind ``herd chat``: multi-turn history, streamed replies, /image, /reset, /exit.

A bad image or a failing turn prints an error and leaves the session as it was: nothing here may end the loop
except /exit and end of input."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from herd.api import LLM
from herd.errors import HerdError
from herd.images import load_image
from herd.infer.sampling import SamplingParams

HELP = ("commands: /image PATH (attach an image to your next message), /reset (forget the conversation), "
        "/exit (quit); Ctrl-D quits too")


def repl(llm: LLM, params: SamplingParams, system: str | None = None, read: Callable[[str], str] = input,
         out: TextIO = sys.stdout, shield=None) -> list[dict]:
    """Run until /exit or end of input; returns the conversation so far. With a ``shield`` (herd.safety.shield)
    a flagged message or reply prints the refusal and its codes and stays out of the conversation; replies stream
    in checked bursts."""
    start = [{"role": "system", "content": system}] if system else []
    messages, pending = list(start), []  # pending: images for the next user message
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
            messages, pending = list(start), []
            print("(conversation reset)", file=out)
            continue
        if text.split(maxsplit=1)[0] == "/image":
            path = text[len("/image"):].strip()
            if not path:
                print("usage: /image PATH", file=out)
                continue
            if llm.model.vision is None:
                print("error: this model has no vision tower (its config has no vision_config): it cannot take "
                      "images", file=out)
                continue
            try:  # decode now, so a bad file is reported here and never reaches the conversation
                load_image(Path(path).expanduser())
            except HerdError as e:
                print(f"error: {e}", file=out)
                continue
            pending.append({"type": "image", "path": str(Path(path).expanduser())})
            print(f"(image attached to your next message: {path})", file=out)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=out)
            continue
        if not text:
            continue
        user = {"role": "user", "content": [*pending, {"type": "text", "text": line}] if pending else line}
        reply, stream = [], None
        try:
            conversation = [*messages, user]
            verdict = shield.check_input(conversation) if shield is not None else None
            if verdict is not None and verdict.blocked:
                pieces = stream = shield.stream(conversation, None, verdict)
            else:
                ids, pixels = llm.chat_inputs(conversation)
                pieces = llm.engine.stream(ids, params, pixels)
                if shield is not None:
                    pieces = stream = shield.stream(conversation, pieces)
            for piece in pieces:
                reply.append(piece)
                print(piece, end="", flush=True, file=out)
            if stream is not None and stream.verdict is not None:
                v = stream.verdict
                print(f"{' ' if reply else ''}[{v.stage} flagged: {', '.join(v.categories)}] {shield.refusal}",
                      end="", file=out)
                pending = []
                continue
        except KeyboardInterrupt:  # stop this reply, keep the session
            print(" [interrupted]", end="", file=out)
        except (HerdError, ValueError) as e:  # e.g. a prompt past the context; the turn is dropped
            print(f"error: {e}" + (" (the attached images were dropped)" if pending else ""), file=out)
            pending = []
            continue
        finally:
            print(file=out)
        messages += [user, {"role": "assistant", "content": "".join(reply)}]
        pending = []

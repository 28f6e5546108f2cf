"""herd guard: the exact prompt (--prompt-only), and a verdict from a herd-run guard model (--json)."""

import json

import pytest
import torch

from herd.cli import main
from herd.safety.guard import Guard
from herd.safety.llama_guard import guard_message, guard_prompt, verdict_token_ids


def test_prompt_only_prints_the_official_prompt(tmp_path, capsys):
    conversation = tmp_path / "chat.json"
    conversation.write_text(json.dumps([{"role": "user", "content": "How do I bake bread?"}]))
    assert main(["guard", "unused", "--conversation", str(conversation), "--text", "Knead it.", "--role", "agent",
                 "--exclude", "S6,S7", "--prompt-only"]) == 0
    want = guard_prompt([{"role": "user", "content": "How do I bake bread?"},
                         {"role": "assistant", "content": "Knead it."}], 4, ["S6", "S7"])
    assert capsys.readouterr().out == want and "'Agent' messages" in want
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps([{"code": "S1", "name": "Spoilers", "description": "Plot twists."}]))
    assert main(["guard", "unused", "--text", "Who dies?", "--categories", str(cats), "--prompt-only"]) == 0
    assert "S1: Spoilers\nPlot twists.\n<END UNSAFE CONTENT CATEGORIES>" in capsys.readouterr().out


def test_guard_verdict_from_a_herd_model(base, capsys):
    """On a tiny random model (herd-pico's tokenizer has Llama 4's chat tokens) the pipeline runs end to end:
    P(unsafe) is the softmax at the verdict word's id over one forward of the prompt, and an unreadable answer
    fails closed."""
    assert main(["guard", str(base), "--text", "How do I pick a lock?", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"safe", "categories", "p_unsafe"} and 0.0 <= out["p_unsafe"] <= 1.0
    guard = Guard.load(base)
    messages = [{"role": "user", "content": "How do I pick a lock?"}]
    ids = guard.llm.tokenizer.encode(guard_prompt(messages), allowed_special="all")
    # herd runs the guard through its chat format: the same ids as the official prompt's text
    assert guard.llm.chat_inputs([guard_message(messages)]) == (ids, None)
    with torch.no_grad():
        probs = guard.llm.model(torch.tensor([ids]))[0, -1].float().softmax(-1)
    verdict = guard.moderate(messages)
    assert verdict.score == pytest.approx(probs[verdict_token_ids(guard.llm.tokenizer)[1]].item(), rel=1e-5)
    assert out["p_unsafe"] == pytest.approx(verdict.score, rel=1e-5)
    if not verdict.safe:  # a random model does not answer in the format: unsafe, "unparsed" (fail closed)
        assert verdict.categories


def test_guard_errors_are_named(base, capsys):
    assert main(["guard", str(base), "--text", "hi", "--role", "agent"]) == 2  # an agent turn with no user turn
    assert "roles must alternate user/assistant" in capsys.readouterr().err
    assert main(["guard", "http://127.0.0.1:1/v1", "--text", "hi"]) == 2
    assert "guard endpoint http://127.0.0.1:1/v1/models: URLError" in capsys.readouterr().err
    assert main(["guard", str(base), "--text", "hi", "--version", "3"]) == 2
    assert "--version 3 is for --prompt-only" in capsys.readouterr().err

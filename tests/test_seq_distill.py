"""herd distill-data: a teacher's answers to prompt-only records, as TRL chats that herd sft trains on."""

import json

import pytest

from herd.chat_models import Reply
from herd.cli import main
from herd.errors import HerdError
from herd.post.data import load_examples
from herd.post.seq_distill import distill_data, read_prompts


class Scripted:
    """Answers "A:" + the prompt; a prompt saying "fail" fails."""

    def __init__(self):
        self.calls = []

    def replies(self, conversations, **params):
        self.calls.append(params)
        return [Reply("", "HTTP 500") if "fail" in c[-1]["content"] else Reply("A: " + c[-1]["content"])
                for c in conversations]


def test_answers_become_chats_and_a_rerun_goes_on(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "one"}\n\n{"prompt": [{"role": "user", "content": "two"}]}\n'
                                      '{"messages": [{"role": "user", "content": "please fail"}]}\n'
                                      '{"prompt": "four"}\n')
    prompts = read_prompts(tmp_path / "p.jsonl")
    teacher = Scripted()
    counts = distill_data(teacher, prompts[:2], tmp_path / "out", batch=1, progress=False)
    assert counts == {"out": str(tmp_path / "out" / "chats.jsonl"), "prompts": 2, "answers": 2, "skipped": 0,
                      "failed": 0}
    counts = distill_data(teacher, prompts, tmp_path / "out", batch=2, progress=False)
    assert (counts["answers"], counts["skipped"], counts["failed"]) == (1, 2, 1)
    rows = [json.loads(line) for line in (tmp_path / "out" / "chats.jsonl").read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in rows] == ["A: one", "A: two", "A: four"]
    assert json.loads((tmp_path / "out" / "failed.jsonl").read_text())["prompt"] == 2
    assert teacher.calls[-1]["temperature"] == 0.0 and teacher.calls[-1]["seed"] is None


def test_bad_prompts_and_samples_are_named_errors(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(HerdError, match="p.jsonl:1: the prompt must end with a user message"):
        read_prompts(tmp_path / "p.jsonl")
    with pytest.raises(HerdError, match="--samples > 1 needs --temperature"):
        distill_data(Scripted(), [[{"role": "user", "content": "x"}]], tmp_path / "o", samples=2)


def test_cli_with_a_herd_teacher_writes_what_herd_sft_reads(base, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "Say hi"}\n{"prompt": "Count to three"}\n')
    assert main(["distill-data", str(base), str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "d"), "--samples",
                 "2", "--temperature", "0.8", "--max-tokens", "6", "--json", "--no-progress"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["answers"] == 4 and counts["failed"] == 0
    from herd.chat import ChatFormat
    from herd.tokenizer import Tokenizer

    examples = load_examples(tmp_path / "d" / "chats.jsonl", ChatFormat(Tokenizer.for_model(base)))
    assert len(examples) == 4 and all(any(e.loss_mask) for e in examples)

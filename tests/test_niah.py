"""Needle in a haystack: the harness scores exactly (a model given the answer gets 100%, one that says nothing
gets 0%), prompts have the asked length with the needle at the asked depth, and the CLI runs a real model."""

import json
import re

import pytest

from herd.api import default_model_dir
from herd.cli import main
from herd.eval.niah import NEEDLE, NiahConfig, PromptBuilder, haystack_ids, retrieved, run_niah, save
from herd.tokenizer import Tokenizer

PICO = str(default_model_dir())


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.for_model(PICO)


def _copy_needle(tok):
    def complete(prompts):
        outs = []
        for ids in prompts:
            m = re.search(r"magic number for \w+ is (\d+)\.", tok.decode(ids))
            outs.append(f" {m.group(1)}.\n")
        return outs
    return complete


CFG = dict(lengths=[200, 400], depths=[0.0, 0.3, 0.7, 1.0], needles=2)


def test_a_model_that_copies_the_needle_scores_100(tok):
    result = run_niah(_copy_needle(tok), tok, NiahConfig(**CFG), progress=False)
    assert result.accuracy == 1.0
    assert len(result.cells) == 8 and all(c["accuracy"] == 1.0 and c["total"] == 2 for c in result.cells)


def test_silence_and_wrong_digits_score_0(tok):
    assert run_niah(lambda ps: [""] * len(ps), tok, NiahConfig(**CFG), progress=False).accuracy == 0.0
    copy = _copy_needle(tok)
    off = run_niah(lambda ps: [o.replace(".", "0.") for o in copy(ps)], tok, NiahConfig(**CFG), progress=False)
    assert off.accuracy == 0.0  # a longer number is not the value
    assert retrieved(" 1234567, I think", "1234567") and not retrieved("the 2nd is 1234567", "1234567")


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_length_and_needle_depth(tok, chat):
    b = PromptBuilder(tok, haystack_ids(tok), chat=chat)
    needle = tok.encode(" " + NEEDLE.format(key="Verona", value="1234567") + "\n")
    head, tail = b.frame("Verona")
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        ids = b.build(1000, depth, "Verona", "1234567", offset=5000)
        assert len(ids) == 1000 and ids[:len(head)] == head and ids[-len(tail):] == tail
        at = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
        hay = 1000 - len(head) - len(tail) - len(needle)
        assert abs((at - len(head)) - depth * hay) <= 48  # moved to a sentence end near the depth
    text = tok.decode(b.build(300, 0.5, "Verona", "1234567", offset=0))
    assert text.endswith("The special magic number for Verona is")
    assert ("<|header_start|>assistant<|header_end|>" in text) == chat
    with pytest.raises(ValueError, match="too short"):
        b.build(20, 0.5, "Verona", "1234567", offset=0)


def test_config_errors():
    with pytest.raises(ValueError, match="depths"):
        NiahConfig(lengths=[100], depths=[1.5]).check()


def test_cli_runs_a_model_and_writes_json_and_heatmap(tmp_path, capsys):
    rc = main(["eval", "niah", PICO, "--lengths", "128,256", "--depths", "0,1", "--needles", "1", "--json",
               "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["accuracy"] <= 1.0 and len(out["cells"]) == 4
    saved = json.loads((tmp_path / "niah.json").read_text())
    assert len(saved["samples"]) == 4 and saved["config"]["lengths"] == [128, 256]
    assert (tmp_path / "niah.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_lengths_beyond_the_model(tmp_path, capsys):
    assert main(["eval", "niah", PICO, "--lengths", "1M", "--out", str(tmp_path)]) == 2
    assert "exceeds the model's max_seq_len" in capsys.readouterr().err


def test_heatmap_of_a_copying_model(tok, tmp_path):
    files = save(run_niah(_copy_needle(tok), tok, NiahConfig(**CFG), progress=False), tmp_path)
    assert files["png"].stat().st_size > 0

"""The `herd` command: a contract other tools rely on."""

import json

import pytest
import torch

from herd import checkpoint
from herd.chat import ChatFormat
from herd.cli import main
from herd.infer import core as core_module
from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams
from herd.tokenizer import Tokenizer


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name,total,active", [("scout", 109e9, 17e9), ("maverick", 400e9, 17e9)])
def test_info_json_matches_published_sizes(capsys, name, total, active):
    info = _json(capsys, ["info", name, "--json"])
    assert abs(info["total_params"] / total - 1) < 0.03
    assert abs(info["active_params"] / active - 1) < 0.03
    layers = info["layers"]
    globals_ = [layer["index"] for layer in layers if layer["attention"] == "global"]
    assert len(layers) == 48 and globals_ == list(range(3, 48, 4))
    assert info["weight_memory"]["int4"]["fits_one_80gb_gpu"] == (name == "scout")


def test_info_text_shows_layout(capsys):
    assert main(["info", "maverick"]) == 0
    out = capsys.readouterr().out
    assert "NoPE global layers: 3,7,11" in out and "MoE layers: 1,3,5" in out and "int4" in out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["new", "tiny", str(d), "--seed", "0"]) == 0
    return d


def test_generate_json_plain_prompt(capsys, tiny_dir):
    tok = Tokenizer.load()
    out = _json(capsys, ["generate", str(tiny_dir), "Hello there", "--max-new-tokens", "7", "--json"])
    assert out["prompt_ids"] == [tok.bos_id] + tok.encode("Hello there")
    model = checkpoint.load(tiny_dir).eval()
    (c,) = Engine(model, tok).generate([out["prompt_ids"]], SamplingParams(max_new_tokens=7))
    assert out["token_ids"] == c.token_ids
    assert len(out["token_ids"]) == 7 and out["text"] == tok.decode(out["token_ids"])


def test_generate_chat_prompt_and_stop_token(capsys, tiny_dir, monkeypatch):
    tok = Tokenizer.load()
    steps = iter([11, 12, tok.eot_id, 13])
    monkeypatch.setattr(core_module, "sample", lambda logits, *a: torch.tensor([next(steps)]))  # scripted draws
    out = _json(capsys, ["generate", str(tiny_dir), "Hi", "--chat", "--system", "Be brief.", "--json",
                         "--max-new-tokens", "10", "--temperature", "1"])
    expected = ChatFormat(tok).encode_dialog([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hi"}])
    assert out["prompt_ids"] == expected
    assert out["token_ids"] == [11, 12, tok.eot_id] and out["stop_reason"] == "stop_token"
    assert out["text"] == tok.decode([11, 12])


def test_generate_json_logprobs_and_penalties(capsys, tiny_dir):
    out = _json(capsys, ["generate", str(tiny_dir), "Hello", "--max-new-tokens", "5", "--json", "--logprobs", "2"])
    lps = out["logprobs"]
    assert [e["token"] for e in lps] == out["token_ids"]
    assert all(e["top"][0][0] == e["token"] and e["top"][0][2] == e["logprob"] <= 0 and len(e["top"]) == 2
               for e in lps)  # greedy: the chosen token is the most likely
    penalised = _json(capsys, ["generate", str(tiny_dir), "Hello", "--max-new-tokens", "8", "--json",
                               "--presence-penalty", "100"])
    assert len(set(penalised["token_ids"])) == len(penalised["token_ids"])
    assert main(["generate", str(tiny_dir), "Hello", "--logprobs", "2"]) == 2
    assert "--json" in capsys.readouterr().err


def test_generate_sampling_is_seeded(capsys, tiny_dir):
    argv = ["generate", str(tiny_dir), "Seeds", "--temperature", "1.0", "--seed", "3", "--json",
            "--max-new-tokens", "6"]
    assert _json(capsys, argv)["token_ids"] == _json(capsys, argv)["token_ids"]


def test_generate_streams_text(capsys, tiny_dir):
    assert main(["generate", str(tiny_dir), "Stream", "--max-new-tokens", "4", "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", str(tiny_dir), "Stream", "--max-new-tokens", "4"]) == 0
    assert streamed.strip() != "" and streamed == capsys.readouterr().out


def test_generate_batch_file_equals_single_runs(capsys, tiny_dir, tmp_path):
    prompts = ["First prompt", "A second, longer prompt with more words", "3"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    assert main(["generate", str(tiny_dir), "--batch-file", str(tmp_path / "p.txt"), "--json",
                 "--max-new-tokens", "5"]) == 0
    batched = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(batched) == 3
    for p, b in zip(prompts, batched):
        assert _json(capsys, ["generate", str(tiny_dir), p, "--json", "--max-new-tokens", "5"]) == b


@pytest.mark.parametrize("argv,message", [
    (["generate", "/nonexistent/model", "x"], "/nonexistent/model"),
    (["info", "llama-9000"], "llama-9000"),
])
def test_errors_are_clear_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_option_values(capsys, tiny_dir):
    assert main(["generate", str(tiny_dir), "x", "--max-new-tokens", "-1"]) == 2
    assert "max_new_tokens=-1" in capsys.readouterr().err
    assert main(["generate", str(tiny_dir), "x", "--dtype", "fp7"]) == 2
    assert "fp7" in capsys.readouterr().err


def test_quantize_command_writes_a_loadable_directory(capsys, tiny_dir, tmp_path):
    out = tmp_path / "int8"
    assert main(["quantize", str(tiny_dir), str(out), "--scheme", "int8"]) == 0
    capsys.readouterr()
    q = _json(capsys, ["generate", str(out), "Hello", "--json", "--max-new-tokens", "3"])
    assert len(q["token_ids"]) == 3
    model = checkpoint.load(out)
    assert any(p.dtype == torch.int8 for p in model.parameters())
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "x"), "--scheme", "int4"]) == 2


def test_bench_json_with_compile(capsys, tiny_dir):
    out = _json(capsys, ["bench", str(tiny_dir), "--prompt-len", "8", "--new-tokens", "4", "--batch", "2",
                         "--json", "--compile"])
    assert out["batch"] == 2 and out["decode_tok_s"] > 0 and out["prefill_tok_s"] > 0 and out["peak_rss_mb"] > 0

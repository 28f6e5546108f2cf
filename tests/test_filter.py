"""herd filter and herd sft --keep: difficulty from pass@k of the model's own samples, from the reference answer's
loss, or from a judge (a herd model or an OpenAI-compatible endpoint); the hardest fraction kept exactly; the
files and the report written; bad inputs named."""

import json
import shutil
import socket
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FakeEndpoint, serving

from herd import checkpoint
from herd.cli import main
from herd.config import preset
from herd.errors import HerdError
from herd.model import Transformer
from herd.post.filter import FilterSpec, filter_files, kept_locations, ranks
from herd.post.judge import rating
from herd.tokenizer import Tokenizer

PICO = Path(__file__).resolve().parents[1] / "models" / "herd-pico"
WORDS = "apple bread candle dragon eagle forest garden harbor island jungle kettle lemon".split()


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def chat(question: str | list[dict], reply: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}], **extra}


def test_passk_keeps_exactly_the_hardest_fraction_and_reports_it_per_task(base, tmp_path):
    """Record i is answered right by i of 10 samples: difficulty 1 - i/10; keep 0.3 -> records 0, 1 and 2."""
    records = [chat(f"Say {i}.", str(i), answer=str(i), matcher="numeric", **({"task": "even"} if i % 2 == 0 else {}))
               for i in range(10)]
    data = write(tmp_path / "count.jsonl", records)

    def complete(samples, k):
        return [[s.record["answer"]] * int(s.record["answer"]) + ["no idea"] * (k - int(s.record["answer"]))
                for s in samples]

    report = filter_files(base, [data], tmp_path / "out", FilterSpec(keep=0.3, samples=10), complete=complete,
                          progress=False)
    out = tmp_path / "out"
    assert lines(out / "kept.jsonl") == records[:3] and lines(out / "removed.jsonl") == records[3:]
    scores = lines(out / "scores.jsonl")
    assert [s["difficulty"] for s in scores] == pytest.approx([1 - i / 10 for i in range(10)])
    assert {s["scorer"] for s in scores} == {"passk"} and scores[0]["where"] == f"{data}:line 1"
    assert report["total"] == 10 and report["kept"] == 3 and report["removed"] == 7
    assert report["threshold"] == pytest.approx(0.8) and report["scored_by"]["passk"] == 10
    assert {k: (t["total"], t["kept"], t["removed"]) for k, t in report["tasks"].items()} == {
        "even": (5, 2, 3), "count.jsonl": (5, 1, 4)}
    assert json.loads((out / "report.json").read_text()) == report
    assert kept_locations(out) == {f"{data}:line {i}" for i in (1, 2, 3)}
    pytest.importorskip("matplotlib")
    assert (out / "difficulty.png").stat().st_size > 1000


def test_passk_grades_built_in_tasks_and_answers_and_is_reused_when_nothing_changed(base, tmp_path):
    data = write(tmp_path / "mixed.jsonl", [
        chat("What is 12 + 30?", "42", task="arithmetic"),  # graded by the task, its answer the reference
        chat("Capital of France?", "Paris", answer="paris"),  # the default matcher: normalised text
        {"prompt": "2 + 2 =", "completion": " 4", "answer": "4", "matcher": "numeric"},  # plain text
    ])
    replies = {"What is 12 + 30?": "It is 42.", "Capital of France?": "London"}

    def complete(samples, k):
        return [[replies.get(str(s.record.get("messages", [{}])[0].get("content")), "4")] * k for s in samples]

    spec = FilterSpec(keep=1.0)
    report = filter_files(base, [data], tmp_path / "out", spec, complete=complete, progress=False)
    assert [s["difficulty"] for s in lines(tmp_path / "out" / "scores.jsonl")] == [0.0, 1.0, 0.0]
    assert report["tasks"]["arithmetic"]["total"] == 1 and report["kept"] == 3

    def fails(samples, k):
        raise AssertionError("the report should have been reused")

    assert filter_files(base, [data], tmp_path / "out", spec, complete=fails, reuse=True) == report
    with pytest.raises(AssertionError, match="reused"):  # other settings: scored anew
        filter_files(base, [data], tmp_path / "out", FilterSpec(keep=0.5), complete=fails, reuse=True)


def test_loss_ranks_what_the_model_was_trained_on_as_easier(base, tmp_path):
    seen = [chat(f"What comes after {w}?", WORDS[i + 1]) for i, w in enumerate(WORDS[:4])]
    unseen = [chat(f"What comes after {w}?", WORDS[i - 1]) for i, w in enumerate(WORDS[6:10], 6)]
    tuned = tmp_path / "tuned"
    assert main(["sft", str(base), str(write(tmp_path / "seen.jsonl", seen)), "--out", str(tuned), "--steps", "10",
                 "--batch-size", "1", "--lr", "3e-3", "--data.seq_len", "32", "--train.tensorboard", "false",
                 "--no-progress"]) == 0
    data = write(tmp_path / "chats.jsonl", seen + unseen)
    report = filter_files(tuned, [data], tmp_path / "out", FilterSpec(keep=0.5, scorer="loss"), progress=False)
    assert lines(tmp_path / "out" / "kept.jsonl") == unseen and report["scored_by"]["loss"] == 8
    assert sorted(s["difficulty"] for s in lines(tmp_path / "out" / "scores.jsonl")) == pytest.approx(
        [i / 7 for i in range(8)])


def test_image_records_are_scored_with_their_images_beside_the_data_file(tmp_path, monkeypatch):
    """pass@k prompts and loss rows carry the records' images; relative paths start at the data file's folder."""
    from PIL import Image

    tok = Tokenizer.load(PICO / "tokenizer.model")
    ids = {"image_token_id": "<|patch|>", "boi_token_id": "<|image_start|>", "eoi_token_id": "<|image_end|>"}
    cfg = preset("tiny-vision").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                        eos_token_id=(tok.eos_id, tok.eom_id, tok.eot_id), pad_token_id=tok.pad_id,
                                        **{f: tok.token_id(name) for f, name in ids.items()})
    torch.manual_seed(0)
    checkpoint.save(Transformer(cfg), tmp_path / "vision")
    for f in PICO.glob("tokenizer*"):
        shutil.copy(f, tmp_path / "vision" / f.name)
    (tmp_path / "data" / "img").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "data" / "img" / "red.png")
    question = [{"type": "image", "path": "img/red.png"}, {"type": "text", "text": "Which colour?"}]
    data = write(tmp_path / "data" / "colours.jsonl", [chat(question, "red"), chat(question, "red", answer="red")])
    monkeypatch.chdir(tmp_path)
    report = filter_files(tmp_path / "vision", [data], tmp_path / "out", FilterSpec(keep=0.5, samples=2,
                                                                                    max_new_tokens=2),
                          progress=False)
    assert report["scored_by"] == {"passk": 1, "loss": 1, "judge": 0} and report["unscored"] == 0


class FakeJudge(FakeEndpoint):
    """An OpenAI-compatible endpoint rating HARD 9, EASY 2 and anything else with words only."""

    MODEL = "fake-judge"
    keys: list[str] = []

    def do_POST(self):
        body = self.body()
        FakeJudge.keys.append(self.headers.get("Authorization", ""))
        text = body["messages"][-1]["content"]
        answer = "9" if "HARD" in text else "Rating: 2/10" if "EASY" in text else "hard to say"
        self.reply({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}]})


@pytest.fixture(scope="module")
def endpoint():
    with serving(FakeJudge) as (_, url):
        yield url


def test_judge_endpoint_rates_and_unparsed_replies_are_counted(base, tmp_path, endpoint):
    records = [chat(f"An {kind} question {i}", "answer") for i, kind in enumerate(["EASY", "HARD", "EASY", "HARD"])]
    data = write(tmp_path / "judged.jsonl", records + [chat("Anything?", "yes")])
    with pytest.warns(UserWarning, match="1 of 5 judge replies hold no rating"):
        report = filter_files(base, [data], tmp_path / "out", FilterSpec(keep=0.4, scorer="judge", judge=endpoint),
                              api_key="sekrit", progress=False)
    assert lines(tmp_path / "out" / "kept.jsonl") == [records[1], records[3]]
    assert [s["raw"] for s in lines(tmp_path / "out" / "scores.jsonl")] == [2, 9, 2, 9, None]
    assert report["unscored"] == 1 and report["scored_by"]["judge"] == 5 and FakeJudge.keys[-1] == "Bearer sekrit"


def test_a_herd_model_judges_and_an_unreachable_endpoint_is_an_error(base, tmp_path, capsys):
    data = write(tmp_path / "chats.jsonl", [chat(f"What comes after {w}?", "x") for w in WORDS[:3]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model's replies hold no rating
        report = filter_files(base, [data], tmp_path / "self", FilterSpec(keep=0.5, scorer="judge"), progress=False)
    assert report["scored_by"]["judge"] == 3 and report["kept"] == 2
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["filter", str(base), str(data), "--out", str(tmp_path / "x"), "--keep", "0.5",
                 "--judge", f"http://127.0.0.1:{port}/v1", "--no-progress"]) == 2
    assert f"judge endpoint http://127.0.0.1:{port}/v1" in capsys.readouterr().err


def test_sft_keep_trains_on_the_hardest_half(base, tmp_path, capsys):
    data = write(tmp_path / "next.jsonl", [chat(f"What comes after {w}?", WORDS[(i + 1) % 12])
                                           for i, w in enumerate(WORDS)])
    out = tmp_path / "run"
    assert main(["sft", str(base), str(data), "--out", str(out), "--keep", "0.5", "--steps", "2", "--batch-size",
                 "2", "--data.seq_len", "64", "--train.tensorboard", "false", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "filter" / "report.json").read_text())
    assert result["examples"] == report["kept"] == 6 and report["scorer"] == "auto"
    assert len(lines(out / "filter" / "kept.jsonl")) == 6 and (out / "config.json").is_file()


def test_bad_inputs_are_named(base, tmp_path, capsys):
    data = write(tmp_path / "plain.jsonl", [chat("Hi", "Hello")])
    for keep in ("0", "1.5"):
        assert main(["filter", str(base), str(data), "--out", str(tmp_path / "x"), "--keep", keep]) == 2
        assert "keep must be a fraction in (0, 1]" in capsys.readouterr().err
    assert main(["sft", str(base), str(data), "--out", str(tmp_path / "y"), "--keep", "0"]) == 2
    assert "sft.keep must be a fraction in (0, 1]" in capsys.readouterr().err
    with pytest.raises(HerdError, match="passk needs checkable records"):
        filter_files(base, [data], tmp_path / "z", FilterSpec(keep=0.5, scorer="passk"))
    assert ranks([3.0, 1.0, 2.0, 2.0]) == [1.0, 0.0, 0.5, 0.5] and ranks([7.0]) == [0.5]
    assert rating("7/10") == 7 and rating("Difficulty: 10.") == 10 and rating("11") is None and rating("hard") is None

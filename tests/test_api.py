"""herd.load / LLM / herd.pipeline."""

import pytest
import torch

import herd
from herd import checkpoint
from herd.config import preset
from herd.model import Transformer


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = tmp_path_factory.mktemp("api") / "tiny"
    torch.manual_seed(0)
    checkpoint.save(Transformer(preset("tiny")), d)
    return herd.load(d)


def test_generate_stream_and_batch_agree(llm):
    text = llm.generate("Once upon a time", max_new_tokens=6)
    assert isinstance(text, str)
    assert "".join(llm.stream("Once upon a time", max_new_tokens=6)) == text
    batch = llm.generate(["Once upon a time", "Hi"], max_new_tokens=6)
    assert batch[0] == text and len(batch) == 2


def test_chat_returns_assistant_message(llm):
    reply = llm.chat([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello"}],
                     max_new_tokens=5)
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)
    with pytest.raises(TypeError, match="max_tokens"):
        llm.generate("x", max_tokens=3)


def test_pipeline_like_transformers(llm):
    pipe = herd.pipeline("text-generation", model=llm, max_new_tokens=4)
    out = pipe("The herd")
    assert out[0]["generated_text"].startswith("The herd")
    assert pipe("The herd", return_full_text=False)[0]["generated_text"] == llm.generate("The herd", max_new_tokens=4)
    msgs = [{"role": "user", "content": "Hi"}]
    conv = pipe(msgs)[0]["generated_text"]
    assert conv[:1] == msgs and conv[-1]["role"] == "assistant"
    assert len(pipe(["a", "b"])) == 2
    with pytest.raises(ValueError, match="summarization"):
        herd.pipeline("summarization", model=llm)


def test_load_preset_and_missing_path():
    with pytest.warns(UserWarning, match="random weights"):
        llm = herd.load("tiny", dtype="bf16")
    assert llm.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        herd.load("no/such/dir")


def test_chat_repl_multi_turn_reset_and_exit(llm):
    import io

    from herd.infer.repl import repl
    from herd.infer.sampling import SamplingParams

    lines = iter(["Hello", "/reset", "How are you?", "Tell me more", "/bogus", "/exit", "never read"])
    out = io.StringIO()
    messages = repl(llm, SamplingParams(max_new_tokens=3), system="sys", read=lambda prompt: next(lines), out=out)
    # after /reset only the later two turns remain, each with its streamed reply
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == "How are you?"
    assert messages[2]["content"] == "".join(llm.chat_stream(messages[:2], max_new_tokens=3))
    assert "(conversation reset)" in out.getvalue() and "unknown command /bogus" in out.getvalue()
    assert next(lines) == "never read"

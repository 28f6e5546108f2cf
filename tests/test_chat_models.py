"""herd.chat_models: one notion of a model that answers conversations (a herd model, an endpoint, either behind
shields); a failing item is reported, not raised."""

import pytest
from conftest import FakeEndpoint, serving

import herd
from herd.chat_models import EndpointChat, LocalChat, ShieldedChat, chat_model
from herd.endpoint import Endpoint
from herd.safety.llama_guard import Verdict
from herd.safety.shield import Shield, ShieldConfig


def user(text):
    return [{"role": "user", "content": text}]


class Echo(FakeEndpoint):
    """Answers with the last message upper-cased; a message saying "fail" gets HTTP 500 every time."""

    MODEL = "echo"
    seen: list = []

    def do_POST(self):
        body = self.body()
        Echo.seen.append(body)
        text = body["messages"][-1]["content"]
        if "fail" in text:
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.reply({"choices": [{"index": 0, "message": {"role": "assistant", "content": text.upper()}}]})


@pytest.fixture(scope="module")
def pico():
    return herd.load(dtype="fp32")


def test_local_chat_is_the_engine_and_reports_bad_items(pico):
    model = LocalChat(pico, batch_size=2)
    convs = [user("To be"), user("ROMEO."), [{"role": "wizard", "content": "x"}], user("Hamlet")]
    replies = model.replies(convs, max_tokens=5)
    for conv, r in zip(convs, replies):
        if conv[0]["role"] == "wizard":
            assert r.text == "" and "wizard" in r.error
        else:
            assert r.error is None and r.text == pico.chat(conv, max_new_tokens=5)["content"]
    too_long = model.replies([user("word " * 5000), user("To be")], max_tokens=5)
    assert too_long[0].error and too_long[1].text == replies[0].text


def test_endpoint_chat_answers_concurrently_and_reports_failures():
    with serving(Echo) as (_, url):
        model = chat_model(url, workers=4)
        assert isinstance(model, EndpointChat) and model.endpoint.model == "echo"
        replies = model.replies([user("a"), user("please fail"), user("b")], max_tokens=3, seed=7)
        assert [r.text for r in replies] == ["A", "", "B"]
        assert "HTTP 500" in replies[1].error and replies[0].error is None
        assert Echo.seen[-1]["max_tokens"] == 3 and Echo.seen[-1]["seed"] == 7
    dead = EndpointChat(Endpoint(url, "echo", retries=0))
    assert "URLError" in dead.replies([user("a")])[0].error


class Double:
    def moderate(self, messages, excluded=(), categories=None):
        last = messages[-1]["content"]
        text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last)
        return Verdict(False, ["S1"], "unsafe\nS1", 0.9) if "A" == text.strip() or "bad" in text else Verdict(
            True, [], "safe", 0.1)


def test_shielded_chat_answers_as_the_deployment_would():
    shield = Shield(ShieldConfig(guard="x"), Double())
    with serving(Echo) as (_, url):
        model = chat_model(url, shield=shield)
        assert isinstance(model, ShieldedChat)
        Echo.seen.clear()
        replies = model.replies([user("bad idea"), user("a"), user("b")])
    assert [r.text for r in replies] == [shield.refusal, shield.refusal, "B"]
    assert replies[0].moderation["stage"] == "input" and replies[1].moderation["stage"] == "output"
    assert sorted(b["messages"][-1]["content"] for b in Echo.seen) == ["a", "b"]  # the flagged input never went out

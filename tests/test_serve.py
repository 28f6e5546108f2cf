"""`herd serve`: the official openai client against a live server on loopback (chat, streaming, tool calls, images,
completions), continuous batching under 32 concurrent streams, and every bad request getting its status code
without hurting the next one."""

import base64
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
from conftest import live
from PIL import Image

import herd
from herd import checkpoint
from herd.cli import main
from herd.config import preset
from herd.infer.sampling import SamplingParams
from herd.model import Transformer
from herd.serve.scheduler import Scheduler, Sequence

NAME = "herd-pico"


@pytest.fixture(scope="module")
def pico():
    return herd.load(dtype="fp32")  # fp32: batch composition does not change a greedy token (see docs/serve.md)


@pytest.fixture(scope="module")
def server(pico):
    with live(pico, max_batch=16, max_len=512, max_tokens_limit=256) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def alone(llm, text, max_new_tokens, chat=True, **kw):
    """What the engine gives for this one request, outside the server."""
    ids = llm.chat_ids([{"role": "user", "content": text}]) if chat else llm.encode(text)
    return llm.engine.generate([ids], SamplingParams(max_new_tokens=max_new_tokens, **kw))[0].text


# -- scheduler ------------------------------------------------------------------------------------------------
def test_scheduler_interleaves_arrivals_and_equals_each_request_alone(pico):
    prompts = ["ROMEO.", "To be, or not to be", "KING HENRY. Now", "First Citizen.\nBefore we proceed", "O",
               "What light"]
    # greedy and sampled rows, some with OpenAI penalties or a logit bias, some reporting logprobs
    params = [SamplingParams(max_new_tokens=12 + 3 * i, temperature=0.0 if i % 2 == 0 else 0.8, top_p=0.95, seed=i,
                             frequency_penalty=0.8 if i % 3 == 1 else 0.0, presence_penalty=0.5 if i == 2 else 0.0,
                             logit_bias={13: 3.0} if i == 4 else None, logprobs=i % 3 if i % 2 == 0 else None)
              for i in range(len(prompts))]
    old_chunk = pico.engine.prefill_chunk
    pico.engine.prefill_chunk = 2  # prompts prefill over several iterations, between decode steps
    try:
        ref = [pico.engine.generate([pico.encode(p)], sp)[0] for p, sp in zip(prompts, params)]
        sched, out = Scheduler(pico.engine, max_batch=3, max_len=256), {}
        seqs = [Sequence(pico.encode(p), sp, lambda ev, i=i: out.setdefault(i, []).append(ev))
                for i, (p, sp) in enumerate(zip(prompts, params))]
        sched.submit(seqs[:2])
        for k in range(10_000):
            if k == 3:
                sched.submit(seqs[2:4])
            if k == 7:
                sched.submit(seqs[4:])
            if not sched.step() and k > 7:
                break
    finally:
        pico.engine.prefill_chunk = old_chunk
    for i in range(len(prompts)):
        assert "".join(ev.text for ev in out[i]) == ref[i].text, prompts[i]
        assert out[i][-1].finish_reason == "length" and out[i][-1].n_tokens == params[i].max_new_tokens
        if params[i].logprobs is not None:
            got = [lp for ev in out[i] for lp in ev.logprobs]  # to 1e-5: batch rows sum in another order
            assert [(e.token, [t for t, _ in e.top]) for e in got] == [(e.token, [t for t, _ in e.top])
                                                                       for e in ref[i].logprobs]
            assert [e.logprob for e in got] == pytest.approx([e.logprob for e in ref[i].logprobs], abs=1e-5)
        else:
            assert all(ev.logprobs is None for ev in out[i])
    assert sched.stats.max_running == 3 and not sched.running and not sched.waiting


def test_scheduler_refuses_what_it_cannot_hold(pico):
    sched = Scheduler(pico.engine, max_batch=1, max_queue=2, max_len=64)
    with pytest.raises(ValueError, match="exceeds the server's context of 64"):
        sched.submit([Sequence(pico.encode("ROMEO."), SamplingParams(max_new_tokens=100), print)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sched.submit([Sequence([1, 10 ** 6], SamplingParams(max_new_tokens=1), print)])
    from herd.serve.scheduler import QueueFull

    ok = Sequence(pico.encode("ROMEO."), SamplingParams(max_new_tokens=1), lambda ev: None)
    with pytest.raises(QueueFull):
        sched.submit([ok, ok, ok])
    assert not sched.waiting  # all or nothing


# -- the openai client against a live server -------------------------------------------------------------------
def test_models_health_and_metrics(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    client.completions.create(model=NAME, prompt="ROMEO.", max_tokens=3, temperature=0)
    text = httpx.get(url + "/metrics").text
    for series in ("herd_requests_total", "herd_prompt_tokens_total", "herd_generation_tokens_total",
                   "herd_queue_depth", "herd_running_sequences", "herd_request_latency_seconds_bucket",
                   "herd_time_to_first_token_seconds_count"):
        assert series in text
    assert 'herd_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_chat_greedy_equals_herd_generate(client, capsys):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Who art thou?"}],
                                       max_tokens=24, temperature=0)
    assert main(["generate", "--dtype", "fp32", "--chat", "--json", "--max-new-tokens", "24", "Who art thou?"]) == 0
    expected = json.loads(capsys.readouterr().out)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected["text"]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == len(expected["prompt_ids"])


def test_streaming_equals_the_whole_answer(client, pico):
    kw = dict(model=NAME, messages=[{"role": "system", "content": "Speak as a king."},
                                    {"role": "user", "content": "Where is my horse?"}], max_tokens=30, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5  # it streamed


def test_completions_stop_seed_n_and_echo(client, pico):
    r = client.completions.create(model=NAME, prompt="To be, or not to be", max_tokens=20, temperature=0)
    assert r.choices[0].text == alone(pico, "To be, or not to be", 20, chat=False)
    full = r.choices[0].text
    stop = full[5:8]
    cut = client.completions.create(model=NAME, prompt="To be, or not to be", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    a = client.completions.create(model=NAME, prompt="ROMEO.", max_tokens=16, temperature=1.0, seed=7, n=2)
    b = client.completions.create(model=NAME, prompt="ROMEO.", max_tokens=16, temperature=1.0, seed=7, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert a.choices[0].text != a.choices[1].text  # the choices draw from seeds 7 and 8
    assert a.choices[0].text == alone(pico, "ROMEO.", 16, chat=False, temperature=1.0, seed=7)
    e = client.completions.create(model=NAME, prompt="ROMEO.", max_tokens=4, temperature=0, echo=True)
    assert e.choices[0].text.startswith("ROMEO.")
    ids = pico.encode("ROMEO.")
    assert client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0).choices[0].text == \
        alone(pico, "ROMEO.", 6, chat=False)


def test_logprobs_logit_bias_and_penalties(client, pico):
    """Chat and completions logprobs in OpenAI's shapes, equal to the model's own log-probabilities (a forward
    over prompt + answer without a cache), streamed the same as whole; prompt logprobs with echo; a +100 logit
    bias forces its token."""
    messages = [{"role": "user", "content": "Speak of the sea."}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length"
    assert b"".join(bytes(e.bytes) for e in content).decode() == r.choices[0].message.content
    ids = pico.chat_ids(messages)
    answer = pico.engine.generate([ids], SamplingParams(max_new_tokens=10))[0].token_ids
    with torch.no_grad():
        logp = pico.model(torch.tensor([ids + answer[:-1]]))[0, len(ids) - 1:].float().log_softmax(-1)
    for j, e in enumerate(content):
        assert e.logprob == pytest.approx(logp[j, answer[j]].item(), abs=1e-4)
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy: the best token
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

    c = client.completions.create(model=NAME, prompt="To be, or not to be", max_tokens=8, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == 8
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(8)]
    assert all(len(top) <= 2 and max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = [x for ch in client.completions.create(model=NAME, prompt="To be, or not to be", max_tokens=8,
                                                      temperature=0, logprobs=2, stream=True)
                if ch.choices[0].logprobs for x in zip(ch.choices[0].logprobs.tokens,
                                                       ch.choices[0].logprobs.text_offset)]
    assert streamed == list(zip(lp.tokens, lp.text_offset))

    # prompt logprobs, as lm-evaluation-harness asks to score a text: echo, logprobs, max_tokens 0
    text = "To be, or not to be, that is the question"
    e = client.completions.create(model=NAME, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp, ids = e.choices[0].logprobs, pico.encode(text)
    assert e.choices[0].text == text == "".join(lp.tokens) and len(lp.tokens) == len(ids) - 1
    with torch.no_grad():
        logp = pico.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    assert lp.token_logprobs == pytest.approx([logp[t, ids[t + 1]].item() for t in range(len(ids) - 1)], abs=1e-4)
    e = client.completions.create(model=NAME, prompt=ids, max_tokens=2, echo=True, logprobs=0, temperature=0)
    lp = e.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 2 and lp.token_logprobs[0] is None and lp.top_logprobs is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([logp[t, ids[t + 1]].item() for t in range(len(ids) - 1)],
                                                          abs=1e-4)

    # a stop token has no logprob entry (it is not part of the content)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                       logit_bias={str(pico.tokenizer.eot_id): 100})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    assert r.choices[0].message.content == "" and r.choices[0].logprobs.content == []

    forced = pico.encode(" sea")[-1]
    b = client.completions.create(model=NAME, prompt="ROMEO.", max_tokens=5, temperature=0.7, seed=1,
                                  logit_bias={str(forced): 100}, frequency_penalty=0.5)
    assert b.choices[0].text == pico.tokenizer.decode([forced] * 5)


class Scripted(torch.nn.Module):
    """A test double for a model that answers with a fixed token script: the real tiny model runs (so the cache
    advances as usual), then the logits are forced to the script's next token at each position."""

    def __init__(self, model, script, prompt_len):
        super().__init__()
        self.inner, self.script, self.start, self.cfg = model, script, prompt_len - 1, model.cfg

    def forward(self, tokens=None, cache=None, last_only=False, **kw):
        positions = cache.positions(tokens.shape[1] if tokens is not None else kw["embeds"].shape[1])[:, -1]
        logits = self.inner(tokens, cache=cache, last_only=last_only, **kw)
        forced = torch.full_like(logits[:, -1:], -1e4)
        for b, p in enumerate(positions.tolist()):
            k = p - self.start
            forced[b, 0, self.script[k] if 0 <= k < len(self.script) else self.script[-1]] = 1e4
        return forced

    def embed(self, *a):
        return self.inner.embed(*a)

    def encode_images(self, *a):
        return self.inner.encode_images(*a)


def test_tool_calls_come_back_as_openai_tool_calls(pico):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "Weather in Verona?"}]
    from herd.chat import with_tools

    prompt = pico.chat_ids(with_tools(messages, tools))
    call = '{"name": "get_weather", "parameters": {"city": "Verona"}}'
    script = pico.tokenizer.encode(call) + [pico.tokenizer.eot_id]
    llm = herd.api.LLM(Scripted(pico.model, script, len(prompt)), pico.tokenizer)
    with live(llm, max_batch=2, max_len=1024) as (url, _):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model=NAME, messages=messages, tools=tools, temperature=0, max_tokens=64)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (tc,) = choice.message.tool_calls
        assert tc.type == "function" and tc.function.name == "get_weather" and tc.id.startswith("call_")
        assert json.loads(tc.function.arguments) == {"city": "Verona"}
        chunks = list(c.chat.completions.create(model=NAME, messages=messages, tools=tools, temperature=0,
                                                max_tokens=64, stream=True))
        deltas = [ch.choices[0].delta for ch in chunks]
        assert not "".join(d.content or "" for d in deltas)  # the call never leaks as content
        (tc,) = [t for d in deltas for t in (d.tool_calls or [])]
        assert tc.index == 0 and tc.function.name == "get_weather"
        assert json.loads(tc.function.arguments) == {"city": "Verona"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-vision") / "tiny-vision"
    torch.manual_seed(0)
    checkpoint.save(Transformer(preset("tiny-vision")), d)
    png = d.parent / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 700, 3), dtype=np.uint8)).save(png)
    return herd.load(d), png


def test_image_messages_data_urls_and_media_dir(vision):
    llm, png = vision
    url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
    expected = llm.chat([{"role": "user", "content": [{"type": "image", "path": str(png)},
                                                      {"type": "text", "text": "What is this?"}]}],
                        max_new_tokens=8)["content"]
    with live(llm, "tiny", max_batch=2, max_len=4096, media_dir=png.parent) as (base, _):
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=8,
                                      temperature=0)
        assert r.choices[0].message.content == expected
        assert r.usage.prompt_tokens > 3 * 144  # the wide image's tiles and thumbnail are in the prompt
        local = [{"type": "image_url", "image_url": {"url": f"file://{png}"}}, content[1]]
        r2 = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": local}], max_tokens=8,
                                       temperature=0)
        assert r2.choices[0].message.content == expected
        for bad, needle in ((url[:40] + "AAAA", "image"), ("https://example.com/cat.png", "remote"),
                            ("file:///etc/hostname", "outside")):
            with pytest.raises(openai.BadRequestError, match=needle):
                c.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": bad}}, {"type": "text", "text": "?"}]}])
        assert c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=2).choices[0].finish_reason == "length"


def test_32_concurrent_streams_batch_and_equal_single_requests(server, pico):
    url, app = server
    sched = app.state.scheduler
    prompts = [f"{who}. {what}" for who in ("ROMEO", "JULIET", "HAMLET", "KING LEAR") for what in
               ("Speak.", "Come hither.", "What news?", "Good morrow.", "Away!", "O heavens!", "Peace.", "Hark!")]
    assert len(prompts) == 32
    expected = [alone(pico, p, 16) for p in prompts]
    steps, tokens = sched.stats.decode_steps, sched.stats.generated_tokens

    def one(p):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        stream = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": p}], max_tokens=16,
                                           temperature=0, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, prompts))
    assert got == expected
    steps, tokens = sched.stats.decode_steps - steps, sched.stats.generated_tokens - tokens
    assert tokens == 32 * 16
    # sequential serving needs 15 decode steps per request (480); batching shared them
    assert sched.stats.max_running == 16 and steps < 32 * 15 / 3, steps


# -- bad requests ---------------------------------------------------------------------------------------------
def post(url, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=data, headers={"content-type": "application/json", **kw}, timeout=60)


def test_bad_requests_get_their_status_and_the_server_keeps_serving(server):
    url, _ = server
    ok = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases = [
        (b'{"model": "herd-pico", "messages": [', 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({**ok, "temperature": "hot"}, 400, "temperature"),
        ({**ok, "temperature": 5}, 400, "temperature"),
        ({**ok, "messages": "Hi"}, 400, "messages"),
        ({**ok, "messages": []}, 400, "messages"),
        ({**ok, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ({**ok, "model": "gpt-4o"}, 404, "does not exist"),
        ({**ok, "max_tokens": 1000}, 400, "limit of 256"),
        ({**ok, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "maximum context length is 512"),
        ({**ok, "n": 0}, 400, "n"),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**ok, "top_logprobs": 2}, 400, "top_logprobs needs logprobs"),
        ({**ok, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ({**ok, "presence_penalty": 2.5}, 400, "presence_penalty"),
        ({**ok, "logit_bias": {"the": 1}}, 400, "not a token id"),
        ({**ok, "logit_bias": {"99999999": 1}}, 400, "not a token id"),
        ({**ok, "logit_bias": {"5": 101}}, 400, "logit_bias"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}, 400, "messages"),
        ({**ok, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice":
          {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ]
    for body, status, needle in cases:
        r = post(url, "/v1/chat/completions", body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert needle in err["message"] or needle == err["param"], (needle, err)
    assert post(url, "/v1/completions", {"model": NAME, "prompt": [], "max_tokens": 1}).status_code == 400
    assert post(url, "/v1/completions", {"model": NAME, "prompt": "x", "suffix": "y"}).status_code == 400
    r = post(url, "/v1/completions", {"model": NAME, "prompt": "x", "echo": True, "logprobs": 1, "stream": True})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/nothing").status_code == 404
    r = post(url, "/v1/chat/completions", ok)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


# Values a client may send in any numeric or structural field: huge, negative, fractional, wrong-typed, empty, and
# the NaN / Infinity literals Python's json writes and reads.
ODD = [2**64 - 1, 2**64, 2**70, -2**70, -1, 0, 1, 1.5, 1e308, float("nan"), float("inf"), "7", "", None, True, [], {},
       [1, "x"], {"a": 1}]
CHAT_FIELDS = ["seed", "temperature", "top_p", "top_k", "min_p", "n", "max_tokens", "max_completion_tokens",
               "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "logit_bias", "stop", "stream",
               "stream_options", "tools", "tool_choice", "messages", "model", "user"]
STREAMED = {"seed", "n", "max_tokens", "logprobs", "top_logprobs", "stop", "logit_bias", "messages", "prompt", "echo"}
COMPLETION_FIELDS = ["seed", "temperature", "n", "max_tokens", "logprobs", "echo", "stop", "prompt", "best_of",
                     "logit_bias", "stream"]


def _answer_or_4xx(url, path, body):
    """The request's status and, for a stream, that it ended ([DONE] or an error event); raises on a time-out."""
    r = post(url, path, body)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (path, body, r.status_code, r.text[:300])
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") or '"error"' in r.text, (body, r.text[-300:])
    elif r.status_code == 200:
        assert all(c["finish_reason"] for c in r.json()["choices"]), (body, r.text[:300])
    else:
        assert r.json()["error"]["message"], (body, r.text)
    return r.status_code


def test_fuzzed_fields_get_an_answer_or_a_4xx_in_bounded_time(server):
    """Every numeric and structural field of both endpoints, with each odd value (streamed too where the stream
    path differs): a 4xx naming
    the problem, or an answer; never a hang (the client times out after 60 s), never a 5xx. (A seed beyond 64
    bits used to pass validation and then fail inside the scheduler thread, leaving the client waiting.)"""
    url, app = server
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    completion = {"model": NAME, "prompt": "Hi", "max_tokens": 2}
    seen = set()
    for path, base, fields in (("/v1/chat/completions", chat, CHAT_FIELDS),
                               ("/v1/completions", completion, COMPLETION_FIELDS)):
        for field in fields:
            for value in ODD:
                for stream in (False, True) if field in STREAMED else (False,):
                    seen.add(_answer_or_4xx(url, path, {**base, field: value, "stream": stream}
                                            if field != "stream" else {**base, field: value}))
    for value in (2**64 + 5, -2**63 - 1, 10**40):  # any integer is a seed, as OpenAI's API takes it
        r = post(url, "/v1/chat/completions", {**chat, "seed": value, "temperature": 1.0, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
        r = post(url, "/v1/completions", {**completion, "seed": value, "temperature": 1.0, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
    assert seen == {200, 400, 404}
    assert app.state.scheduler.n_running == 0 and app.state.scheduler.queue_depth == 0
    assert post(url, "/v1/chat/completions", chat).status_code == 200


def test_api_key(pico):
    with live(pico, max_batch=2, max_len=256, api_key="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        c = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert c.completions.create(model=NAME, prompt="O", max_tokens=2).choices[0].finish_reason == "length"


def test_disconnect_frees_the_row_and_a_full_queue_answers_429(pico):
    with live(pico, max_batch=1, max_queue=1, max_len=512) as (url, app):
        sched = app.state.scheduler
        body = {"model": NAME, "prompt": "ROMEO.", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the long request runs, holding the only row
            waiter = ThreadPoolExecutor(1).submit(post, url, "/v1/completions",
                                                  {"model": NAME, "prompt": "O", "max_tokens": 3})
            deadline = time.monotonic() + 30
            while sched.queue_depth < 1:  # the second request waits for the row
                assert time.monotonic() < deadline
                time.sleep(0.01)
            full = post(url, "/v1/completions", {"model": NAME, "prompt": "O", "max_tokens": 3})
            assert full.status_code == 429 and "busy" in full.json()["error"]["message"]
        # the client left mid-stream: its row goes to the waiting request, which completes
        second = waiter.result(timeout=60)
        assert second.status_code == 200 and second.json()["choices"][0]["finish_reason"] == "length"
        assert sched.stats.generated_tokens < 400
        deadline = time.monotonic() + 30
        while sched.n_running:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        after = post(url, "/v1/completions", {"model": NAME, "prompt": "O", "max_tokens": 3})
        assert after.status_code == 200


def test_cli_serve_binds_loopback_and_answers(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", "--port", str(port), "--max-batch", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "herd serve did not come up"
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": NAME, "prompt": "ROMEO.", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == NAME
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode is not None


def test_media_dir_must_exist(tmp_path, capsys):
    assert main(["serve", "--media-dir", str(tmp_path / "missing")]) == 2
    assert "--media-dir" in capsys.readouterr().err

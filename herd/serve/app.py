"""``herd serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching scheduler.

    POST /v1/chat/completions   messages (text, images as data: URLs or files under --media-dir), tools, stream
    POST /v1/completions        plain prompts (strings or token ids), echo, stream
    GET  /v1/models, /health, /metrics (Prometheus)

Requests are parsed and tokenised (images tiled) in a worker thread, queued on the scheduler, and answered from
the events its thread sends back. Every failure is an OpenAI-style error body with its status: 400 for what the
request got wrong, 401 without the API key, 404 for another model, 429 when the queue is full; a client that
disconnects has its sequences cancelled, and its batch rows serve the next request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from herd.api import LLM
from herd.chat import parse_assistant, with_tools
from herd.errors import HerdError
from herd.safety.shield import Shield
from herd.serve.metrics import Metrics
from herd.serve.moderation import OutputGate, blocked_chat_choice, blocked_completion_choice
from herd.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    chat_logprobs,
    completion_logprobs,
    envelope,
    herd_messages,
    new_id,
    openai_tool_calls,
    usage,
)
from herd.serve.scheduler import Event, QueueFull, Scheduler, Sequence

log = logging.getLogger("herd.serve")
_CALL_START = "{[<"  # a Llama 4 tool call starts with one of these (JSON, python list, <function=> / <|python_start|>)


class Generation:
    """The sequences of one request on the scheduler, and the events they send back to this event loop."""

    def __init__(self, scheduler: Scheduler, inputs: list[tuple[list[int], object]], params: list,
                 prompt_logprobs: int | None = None):
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

        def sink(i: int):
            def on_event(ev: Event) -> None:  # called on the scheduler thread
                try:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
                except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
                    self.seqs[i].cancel()
            return on_event

        self.seqs = [Sequence(ids, p, sink(i), pixels, prompt_logprobs)
                     for i, ((ids, pixels), p) in enumerate(zip(inputs, params))]
        self.open = len(self.seqs)
        try:
            scheduler.submit(self.seqs)
        except QueueFull as e:
            raise RequestError(f"the server is busy: {e}; retry later", status=429, code="rate_limit_exceeded",
                               kind="rate_limit_error") from None
        except ValueError as e:
            raise RequestError(str(e), code="context_length_exceeded" if "context" in str(e) else None) from None

    async def events(self, request: Request) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every sequence has ended; cancels them if the client goes away."""
        try:
            while self.open:
                try:
                    i, ev = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if ev.finish_reason is not None:
                    self.open -= 1
                yield i, ev
        finally:
            self.cancel()

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancel()


class ChoiceText:
    """One choice's text as it streams. With tools on, text is held back from the first character that may begin a
    tool call, so that a call is sent as tool_calls, never as content."""

    def __init__(self, tools: bool):
        self.tools, self.text, self.sent, self.holding = tools, "", 0, False
        self.tokens, self.finish, self.error = 0, None, None
        self.logprobs, self.logprobs_sent, self.offset = [], 0, 0  # offset: text_offset of the next token
        self.prompt_logprobs: list = []

    def push(self, ev: Event) -> str:
        self.text += ev.text
        self.logprobs += ev.logprobs or []
        self.prompt_logprobs += ev.prompt_logprobs or []
        self.tokens, self.finish, self.error = ev.n_tokens, ev.finish_reason or self.finish, ev.error or self.error
        if self.holding:
            return ""
        new = self.text[self.sent:]
        if self.tools:
            cut = min((k for k in (new.find(c) for c in _CALL_START) if k >= 0), default=-1)
            if cut >= 0:
                new, self.holding = new[:cut], True
        self.sent += len(new)
        return new

    def message(self) -> tuple[dict, str]:
        """The final assistant message and finish reason (tool calls parsed when tools are on)."""
        if self.tools:
            parsed = parse_assistant(self.text)
            if parsed["tool_calls"]:
                return ({"role": "assistant", "content": parsed["content"] or None,
                         "tool_calls": openai_tool_calls(parsed["tool_calls"])}, "tool_calls")
        return {"role": "assistant", "content": self.text}, self.finish

    def rest(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def take_logprobs(self) -> list:
        """The logprobs not yet streamed."""
        out, self.logprobs_sent = self.logprobs[self.logprobs_sent:], len(self.logprobs)
        return out


@dataclass
class ServerState:
    """What the route handlers need, kept on ``app.state.herd``."""

    llm: LLM
    model_name: str
    scheduler: Scheduler
    metrics: Metrics
    media: Path | None
    max_tokens_limit: int | None
    shield: Shield | None = None

    def gates(self, messages: list[dict], n: int) -> list[OutputGate | None]:
        """Per choice, the output gate of a streamed answer (None: no output moderation)."""
        on = self.shield is not None and self.shield.moderates("output")
        return [OutputGate(self.shield, messages) if on else None for _ in range(n)]

    async def check_input(self, messages: list[dict]):
        """The input verdict, or None when no shield moderates inputs."""
        if self.shield is None or not self.shield.moderates("input"):
            return None
        return await run_in_threadpool(self.shield.check_input, messages)

    async def check_output(self, messages: list[dict], answer: str):
        if self.shield is None or not self.shield.moderates("output"):
            return None
        return await run_in_threadpool(self.shield.check_output, messages, answer)

    @property
    def vocab_size(self) -> int:
        return self.llm.model.cfg.vocab_size

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise RequestError(f"the model {name!r} does not exist; this server serves {self.model_name!r}", "model",
                               status=404, code="model_not_found", kind="not_found_error")

    def budget(self, requested: int | None, prompt_len: int) -> int:
        """The max_tokens of a request: what it asked for, within the context and the server's limit."""
        room, limit = self.scheduler.max_len - prompt_len, self.max_tokens_limit
        if requested is not None and limit is not None and requested > limit:
            raise RequestError(f"max_tokens={requested} exceeds this server's limit of {limit}", "max_tokens")
        if room < max(1, requested or 1):
            raise RequestError(f"this model's maximum context length is {self.scheduler.max_len} tokens; the prompt "
                               f"has {prompt_len} tokens and {requested or 1} more were asked for", "messages",
                               code="context_length_exceeded")
        if requested is None:
            return room if limit is None else min(room, limit)
        return requested

    def done(self, texts: list[ChoiceText], endpoint: str, start: float, gen: Generation) -> None:
        """Count a finished request in the metrics."""
        self.metrics.generation_tokens.inc(sum(t.tokens for t in texts))
        self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)
        firsts = [s.first_token_at for s in gen.seqs if s.first_token_at is not None]
        if firsts:
            self.metrics.ttft.observe(min(firsts) - min(s.submitted for s in gen.seqs))


def create_app(llm: LLM, model_name: str = "herd", *, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 256, max_tokens_limit: int | None = None, max_len: int | None = None,
               media_dir: str | Path | None = None, own_scheduler_thread: bool = True,
               shield: Shield | None = None) -> FastAPI:
    """The server app for a loaded model. ``max_len`` bounds prompt + completion (default: the model's context,
    capped at 8192 to keep the batch's KV cache small); ``max_tokens_limit`` bounds max_tokens.
    ``own_scheduler_thread``: the app's lifespan runs the scheduler in a thread; False: the caller runs
    ``app.state.scheduler.run()`` (``serve`` does, on the main thread). ``shield``: Llama Guard / Prompt Guard
    around the model (herd.serve.moderation)."""
    scheduler = Scheduler(llm.engine, max_batch=max_batch, max_queue=max_queue,
                          max_len=max_len or min(llm.model.cfg.max_seq_len, 8192))
    state = ServerState(llm, model_name, scheduler, Metrics(scheduler),
                        Path(media_dir) if media_dir is not None else None, max_tokens_limit, shield)
    if shield is not None:
        shield.on_verdict = state.metrics.record_verdict

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if own_scheduler_thread:
            scheduler.start()
        try:
            yield
        finally:
            if own_scheduler_thread:
                scheduler.stop()
            else:  # serve() stops it on its own thread once the loop has returned
                scheduler.request_stop()

    app = FastAPI(title="herd", lifespan=lifespan)
    app.state.herd = state
    app.state.scheduler, app.state.metrics = scheduler, state.metrics
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _bug)
    app.add_exception_handler(HTTPException, _http)
    app.add_middleware(_Gate, api_key=api_key, metrics=state.metrics)
    app.include_router(router)
    return app


# -- errors -----------------------------------------------------------------------------------------------------
async def _request_error(request: Request, e: RequestError):
    return JSONResponse(e.body(), status_code=e.status)


async def _invalid(request: Request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    if first.get("type") == "json_invalid":
        message, where = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
    elif not where:
        message = f"the request body must be a JSON object ({first.get('msg', 'invalid')})"
    else:
        message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
    return JSONResponse(RequestError(message, where or None).body(), status_code=400)


async def _bug(request: Request, e: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(RequestError(f"internal error: {type(e).__name__}", status=500, kind="server_error").body(),
                        status_code=500)


async def _http(request: Request, e: HTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(RequestError(str(e.detail), status=e.status_code, kind=kind).body(), status_code=e.status_code)


# -- routes -----------------------------------------------------------------------------------------------------
router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.herd


@router.get("/health")
async def health(request: Request):
    scheduler = _state(request).scheduler
    return {"status": "ok", "running": scheduler.n_running, "waiting": scheduler.queue_depth}


@router.get("/metrics")
async def prometheus(request: Request):
    return Response(_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
async def models(request: Request):
    state = _state(request)
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(time.time()),
                                        "owned_by": "herd", "max_model_len": state.scheduler.max_len}]}


@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, request: Request):
    start, state = time.monotonic(), _state(request)
    state.check_model(req.model)
    req.refuse_unsupported()
    tools = req.active_tools()

    def prepare():
        try:
            messages = herd_messages(req.messages, state.media)
            return messages, *state.llm.chat_inputs(with_tools(messages, tools))
        except (HerdError, ValueError, KeyError, TypeError) as e:
            raise RequestError(f"{e}", "messages") from None

    messages, ids, pixels = await run_in_threadpool(prepare)
    n_new = state.budget(req.token_limit, len(ids))
    rid = new_id("chatcmpl")
    flagged = await state.check_input(messages)
    if flagged is not None and flagged.blocked:
        refusal = state.shield.refusal
        if req.stream:
            return _sse(_blocked_chat_stream(state, rid, req.n, flagged, len(ids), req.include_usage))
        return envelope("chat.completion", rid, state.model_name,
                        [blocked_chat_choice(i, flagged, refusal) for i in range(req.n)], usage=usage(len(ids), 0))
    gen = Generation(state.scheduler, [(ids, pixels)] * req.n,
                     [req.sampling(n_new, i, state.vocab_size) for i in range(req.n)])
    state.metrics.prompt_tokens.inc(len(ids))
    texts = [ChoiceText(tools is not None) for _ in range(req.n)]
    if req.stream:
        return _sse(_chat_stream(state, gen, request, rid, texts, len(ids), req.include_usage, start, req.logprobs,
                                 state.gates(messages, req.n)))
    await _collect(gen, request, texts)
    choices = []
    verdicts = await asyncio.gather(*(state.check_output(messages, t.text) for t in texts))
    for i, (t, flagged) in enumerate(zip(texts, verdicts)):
        if flagged is not None and flagged.blocked:
            choices.append(blocked_chat_choice(i, flagged, state.shield.refusal))
            continue
        message, finish = t.message()
        choices.append({"index": i, "message": message, "finish_reason": finish,
                        "logprobs": chat_logprobs(t.logprobs, state.llm.tokenizer) if req.logprobs else None})
    state.done(texts, "/v1/chat/completions", start, gen)
    return envelope("chat.completion", rid, state.model_name, choices,
                    usage=usage(len(ids), sum(t.tokens for t in texts)))


async def _blocked_chat_stream(state: ServerState, rid: str, n: int, verdict, prompt_len: int, include_usage: bool):
    for i in range(n):
        yield envelope("chat.completion.chunk", rid, state.model_name, [
            {"index": i, "delta": {"role": "assistant", "content": "", "refusal": state.shield.refusal},
             "finish_reason": "content_filter", "logprobs": None, "moderation": verdict.field()}])
    if include_usage:
        yield envelope("chat.completion.chunk", rid, state.model_name, [], usage=usage(prompt_len, 0))


async def _chat_stream(state: ServerState, gen: Generation, request: Request, rid: str, texts: list[ChoiceText],
                       prompt_len: int, include_usage: bool, start: float, logprobs: bool,
                       gates: list[OutputGate | None]):
    def chunk(i, delta, finish=None, **extra):
        lp = chat_logprobs(texts[i].take_logprobs(), state.llm.tokenizer) if logprobs else None
        return envelope("chat.completion.chunk", rid, state.model_name,
                        [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp, **extra}])

    for i in range(len(texts)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for i, ev in gen.events(request):
        t, gate = texts[i], gates[i]
        if gate is not None and gate.verdict is not None:
            continue  # flagged: its sequence was stopped and its stream has ended
        delta = t.push(ev)
        failed = ev.error is not None or ev.finish_reason == "cancelled"
        if gate is not None and not failed:
            delta = await gate.release(delta, t.text, ev.n_tokens, ev.finish_reason is not None)
            if gate.verdict is not None:
                gen.seqs[i].cancel()
                yield chunk(i, {"refusal": state.shield.refusal}, "content_filter", moderation=gate.verdict.field())
                continue
        if delta:
            yield chunk(i, {"content": delta})
        if ev.finish_reason is None:
            continue
        if failed:
            yield _stream_error(ev)
            continue
        message, finish = t.message()
        if message.get("tool_calls"):
            calls = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
            yield chunk(i, {"tool_calls": calls})
        else:
            rest = t.rest()
            if rest:
                yield chunk(i, {"content": rest})
        yield chunk(i, {}, finish)
    if include_usage:
        yield envelope("chat.completion.chunk", rid, state.model_name, [],
                       usage=usage(prompt_len, sum(t.tokens for t in texts)))
    state.done(texts, "/v1/chat/completions", start, gen)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    start, state = time.monotonic(), _state(request)
    llm = state.llm
    state.check_model(req.model)
    req.refuse_unsupported()
    prompts = req.prompts()
    try:
        encoded = [llm.encode(p) for p in prompts]
    except (HerdError, ValueError) as e:
        raise RequestError(str(e), "prompt") from None
    # a prompt is moderated as one user message; choice k*n + j answers prompt k
    convs = [[{"role": "user", "content": p if isinstance(p, str) else llm.tokenizer.decode(ids)}]
             for p, ids in zip(prompts, encoded)]
    verdicts = await asyncio.gather(*(state.check_input(c) for c in convs))
    flagged = {k * req.n + j: v for k, v in enumerate(verdicts) if v is not None and v.blocked for j in range(req.n)}
    inputs, params, echo, echo_ids, index, messages = [], [], [], [], [], []
    for k, (p, ids) in enumerate(zip(prompts, encoded)):
        n_new = state.budget(req.max_tokens, len(ids))
        for j in range(req.n):
            if k * req.n + j in flagged:
                continue
            index.append(k * req.n + j)
            messages.append(convs[k])
            inputs.append((ids, None))
            params.append(req.sampling(n_new, j, state.vocab_size))
            echo.append((p if isinstance(p, str) else llm.tokenizer.decode(ids)) if req.echo else "")
            # the echoed tokens: a text prompt's own (its <|begin_of_text|> is herd's, not the text's)
            echo_ids.append(ids[1:] if isinstance(p, str) else ids)
    gen = Generation(state.scheduler, inputs, params, req.logprobs if req.echo else None) if inputs else None
    prompt_tokens = sum(len(ids) for ids in encoded)
    state.metrics.prompt_tokens.inc(prompt_tokens)
    rid = new_id("cmpl")
    texts = [ChoiceText(False) for _ in inputs]
    refusal = state.shield.refusal if state.shield is not None else ""
    blocked = {i: blocked_completion_choice(i, v, refusal) for i, v in flagged.items()}
    if req.stream:
        return _sse(_completion_stream(state, gen, request, rid, texts, echo, prompt_tokens, req.include_usage,
                                       start, req.logprobs, index, blocked, [g for m in messages
                                                                             for g in state.gates(m, 1)]))
    if gen is not None:
        await _collect(gen, request, texts)
    for t, ids in zip(texts, echo_ids):  # prompt logprobs first: token 1 of a token-id prompt has none
        if req.echo and req.logprobs is not None:
            t.logprobs[:0] = ids[:len(ids) - len(t.prompt_logprobs)] + t.prompt_logprobs
    choices = dict(blocked)
    verdicts = await asyncio.gather(*(state.check_output(m, t.text) for m, t in zip(messages, texts)))
    for i, (t, v) in enumerate(zip(texts, verdicts)):
        choices[index[i]] = (blocked_completion_choice(index[i], v, refusal) if v is not None and v.blocked else
                             {"index": index[i], "text": echo[i] + t.text, "finish_reason": t.finish,
                              "logprobs": _logprobs_of(state, t, req.logprobs)})
    if gen is not None:
        state.done(texts, "/v1/completions", start, gen)
    return envelope("text_completion", rid, state.model_name, [choices[i] for i in sorted(choices)],
                    usage=usage(prompt_tokens, sum(t.tokens for t in texts)))


def _logprobs_of(state: ServerState, t: ChoiceText, n: int | None) -> dict | None:
    """The completions logprobs of the tokens ``t`` has not reported yet (all of them, unstreamed)."""
    if n is None:
        return None
    out = completion_logprobs(t.take_logprobs(), state.llm.tokenizer, t.offset, top=n > 0)
    t.offset += sum(len(s) for s in out["tokens"])
    return out


async def _completion_stream(state: ServerState, gen: Generation | None, request: Request, rid: str,
                             texts: list[ChoiceText], echo: list[str], prompt_tokens: int, include_usage: bool,
                             start: float, logprobs: int | None, index: list[int], blocked: dict[int, dict],
                             gates: list[OutputGate | None]):
    """``index[i]``: the choice index of generated sequence i; ``blocked``: the choices flagged on input."""
    def chunk(i, text, finish=None, **extra):
        return envelope("text_completion", rid, state.model_name,
                        [{"index": index[i], "text": text, "finish_reason": finish,
                          "logprobs": _logprobs_of(state, texts[i], logprobs), **extra}])

    for choice in blocked.values():
        yield envelope("text_completion", rid, state.model_name, [choice])
    for i, prefix in enumerate(echo):
        if prefix:
            yield chunk(i, prefix)
    async for i, ev in (gen.events(request) if gen is not None else _nothing()):
        gate = gates[i]
        if gate is not None and gate.verdict is not None:
            continue
        delta = texts[i].push(ev)
        failed = ev.error is not None or ev.finish_reason == "cancelled"
        if gate is not None and not failed:
            delta = await gate.release(delta, texts[i].text, ev.n_tokens, ev.finish_reason is not None)
            if gate.verdict is not None:
                gen.seqs[i].cancel()
                yield chunk(i, "", "content_filter", moderation=gate.verdict.field())
                continue
        if failed:
            yield _stream_error(ev)
        elif delta or ev.finish_reason:
            yield chunk(i, delta, ev.finish_reason)
    if include_usage:
        yield envelope("text_completion", rid, state.model_name, [],
                       usage=usage(prompt_tokens, sum(t.tokens for t in texts)))
    if gen is not None:
        state.done(texts, "/v1/completions", start, gen)


async def _nothing():
    return
    yield


async def _collect(gen: Generation, request: Request, texts: list[ChoiceText]) -> None:
    """Every choice's whole text (a non-streaming answer); 500 if one of them failed."""
    async for i, ev in gen.events(request):
        texts[i].push(ev)
    bad = next((t for t in texts if t.error is not None or t.finish in (None, "cancelled")), None)
    if bad is not None:
        raise RequestError(f"generation failed: {bad.error or 'cancelled'}", status=500, kind="server_error")


class _Gate:
    """ASGI middleware (not BaseHTTPMiddleware, which gets in the way of cancelling a stream whose client left):
    the API key on /v1 routes, and the request counter by endpoint and status."""

    COUNTED = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health")

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], [500]
        try:
            if self.expected is not None and path.startswith("/v1"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not secrets.compare_digest(given, self.expected):
                    e = RequestError("missing or wrong API key (send 'Authorization: Bearer KEY')", status=401,
                                     code="invalid_api_key", kind="authentication_error")
                    status[0] = 401
                    return await JSONResponse(e.body(), status_code=401)(scope, receive, send)

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            await self.app(scope, receive, send_status)
        finally:
            if path in self.COUNTED:
                self.metrics.requests.labels(path, str(status[0])).inc()


def _stream_error(ev: Event) -> dict:
    """The SSE event of a choice that failed mid-stream (the status line was sent long before)."""
    return RequestError(ev.error or "cancelled", status=500, kind="server_error").body()


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async for obj in events:
            yield f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def serve(llm: LLM, model_name: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **app_options) -> None:
    """Run the server until interrupted: the scheduler on this (the main) thread, which loaded the model, and
    uvicorn on a thread of its own (see ``Scheduler.run`` for why). Compiled decode graphs are built before the
    port opens."""
    import uvicorn

    app = create_app(llm, model_name, own_scheduler_thread=False, **app_options)
    scheduler: Scheduler = app.state.scheduler
    scheduler.warmup()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    http = threading.Thread(target=server.run, name="herd-http", daemon=True)

    def shut_down(signum, frame):
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, shut_down)
    http.start()
    try:
        scheduler.run(until=lambda: not http.is_alive())
    finally:
        scheduler.stop()
        server.should_exit = True
        http.join(timeout=30)
    if not server.started:
        raise HerdError(f"the HTTP server did not start on {host}:{port} (see the log above)")

"""The OpenAI request bodies herd serves (pydantic models: a wrong type or a missing field is a 400 naming the
field), their translation into herd messages and sampling parameters, and the response objects.

Unknown fields are ignored, as OpenAI's own server does for fields it does not know; fields herd knows but does
not implement (structured output, suffix, best_of, streamed prompt logprobs) are refused with a message, never silently
dropped.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from herd.infer.sampling import SamplingParams, TokenLogprob


class RequestError(Exception):
    """A request herd cannot serve as asked: becomes an OpenAI-style error body with ``status``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# -- requests ------------------------------------------------------------------------------------------------
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionDef(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: dict[str, str]


class StreamOptions(BaseModel):
    include_usage: bool = False


SEED_RANGE = 2**64  # OpenAI takes any integer as a seed; torch's generators take 64 bits: seeds are taken mod 2^64


class _Sampling(BaseModel):
    """The sampling fields both endpoints share (OpenAI's names and bounds; top_k and min_p as vLLM extends)."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def n_logprobs(self) -> int | None:
        """How many alternatives to report per token; None: no logprobs."""
        return None

    def sampling(self, max_new_tokens: int, index: int, vocab_size: int) -> SamplingParams:
        """The parameters of choice ``index``: choices of one seeded request draw from seeds seed, seed + 1, ..."""
        bias = None
        if self.logit_bias:
            bias = {}
            for key, value in self.logit_bias.items():
                if not key.strip().isdigit() or int(key) >= vocab_size:
                    raise RequestError(f"logit_bias: {key!r} is not a token id of this model (0 to {vocab_size - 1})",
                                       "logit_bias")
                bias[int(key)] = value
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0 if self.temperature is None else
                              self.temperature, top_p=self.top_p or 1.0, top_k=self.top_k or 0,
                              min_p=self.min_p or 0.0, stop=list(self.stop or []),
                              presence_penalty=self.presence_penalty or 0.0,
                              frequency_penalty=self.frequency_penalty or 0.0, logit_bias=bias,
                              logprobs=self.n_logprobs,
                              seed=None if self.seed is None else (self.seed + index) % SEED_RANGE)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None

    @property
    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def refuse_unsupported(self) -> None:
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise RequestError("structured output (response_format other than text) is not supported by herd serve",
                               "response_format")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def active_tools(self) -> list[dict] | None:
        """The tool definitions the prompt lists: none for tool_choice "none", only the named one for a named
        choice. herd does not constrain decoding: "required" and named choices are prompt-level only."""
        if not self.tools or self.tool_choice == "none":
            return None
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.get("name")
            tools = [t for t in tools if t["function"]["name"] == name]
            if not tools:
                raise RequestError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return tools


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = None

    @property
    def n_logprobs(self) -> int | None:
        return self.logprobs

    def refuse_unsupported(self) -> None:
        if self.suffix:
            raise RequestError("suffix (fill-in-the-middle) is not supported by herd serve", "suffix")
        if self.echo and self.logprobs is not None and self.stream:
            raise RequestError("echo with logprobs (prompt logprobs) is not supported when streaming", "stream")
        if self.best_of not in (None, 1, self.n):
            raise RequestError("best_of other than n is not supported by herd serve", "best_of")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


# -- messages: OpenAI -> herd ---------------------------------------------------------------------------------
def herd_messages(messages: list[Message], media_dir: Path | None) -> list[dict]:
    """herd chat messages (herd.chat): roles mapped (developer -> system), image parts resolved (data: URLs, and
    local files only inside ``media_dir``; remote URLs are never fetched)."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, list):
            content = [{"type": "text", "text": p.text} if isinstance(p, TextPart)
                       else _image_part(p.image_url.url, media_dir, f"messages[{i}].content[{j}]")
                       for j, p in enumerate(m.content)]
        else:
            content = m.content
        if role != "assistant" and content is None:
            raise RequestError(f"messages[{i}] ({m.role}) has no content", f"messages[{i}].content")
        message: dict = {"role": role, "content": content}
        if m.tool_calls:
            if role != "assistant":
                raise RequestError(f"messages[{i}]: only assistant messages carry tool_calls",
                                   f"messages[{i}].tool_calls")
            message["tool_calls"] = [{"function": {"name": c.function.name, "arguments": c.function.arguments}}
                                     for c in m.tool_calls]
        out.append(message)
    return out


def _image_part(url: str, media_dir: Path | None, where: str) -> dict:
    if url.startswith("data:"):
        return {"type": "image", "url": url}
    if url.startswith(("http://", "https://")):
        raise RequestError(f"{where}: remote image URLs are not fetched by herd serve; send the image as a "
                           "data: URL (base64)", where)
    path = Path(url.removeprefix("file://"))
    if media_dir is None:
        raise RequestError(f"{where}: local image files are refused unless the server runs with --media-dir", where)
    resolved, root = path.resolve(), media_dir.resolve()
    if not resolved.is_relative_to(root):
        raise RequestError(f"{where}: {url} is outside the server's --media-dir", where)
    if not resolved.is_file():
        raise RequestError(f"{where}: no image file at {url}", where)
    return {"type": "image", "path": str(resolved)}


# -- responses ------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def openai_tool_calls(calls: list[dict]) -> list[dict]:
    """herd's parsed calls ({"name", "arguments"}) as OpenAI tool_calls (arguments as JSON text)."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def chat_logprobs(entries: list[TokenLogprob], tokenizer) -> dict:
    """OpenAI chat ``logprobs``: each token's text, bytes (a token may hold part of a UTF-8 character) and
    logprob, with its top alternatives."""
    def item(token_id: int, logprob: float) -> dict:
        return {"token": tokenizer.decode([token_id]), "logprob": logprob,
                "bytes": list(tokenizer.decode_bytes([token_id]))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[TokenLogprob | int], tokenizer, offset: int, top: bool) -> dict:
    """OpenAI legacy completions ``logprobs``: parallel lists; text_offset counts characters from ``offset``
    (where the previous stream chunk ended). A bare token id (an echoed prompt's first token, which nothing
    predicts) gets None for its logprob and alternatives."""
    tokens, offsets, logprobs, tops = [], [], [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(tokenizer.decode([e if isinstance(e, int) else e.token]))
        offset += len(tokens[-1])
        logprobs.append(None if isinstance(e, int) else e.logprob)
        tops.append(None if isinstance(e, int) else {tokenizer.decode([i]): lp for i, lp in e.top})
    return {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets,
            "top_logprobs": tops if top else None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list[dict], **extra: Any) -> dict:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}

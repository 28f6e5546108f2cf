"""An OpenAI-compatible HTTP endpoint (``herd serve``, vLLM, llama.cpp's server, OpenAI...) as herd's models use
one: a judge (herd.post.judge), a Llama Guard (herd.safety.guard).

    ep = Endpoint("http://localhost:8000/v1")          # model: the first that /models lists, unless given
    ep.chat([{"role": "user", "content": "hi"}], max_tokens=16)["choices"][0]["message"]["content"]

Plain urllib (no client library, safe to call from many threads at once). The API key comes from the argument,
else the environment variable named by ``key_env``, else OPENAI_API_KEY. Connection failures, timeouts, 429 and
5xx answers are retried ``retries`` times with a doubling pause; then, and for any other error status, an
EndpointError names the URL and what went wrong.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from functools import cached_property

from herd.errors import HerdError


class EndpointError(HerdError):
    """The endpoint could not be reached or answered with an error."""


def is_url(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(("http://", "https://"))


class Endpoint:
    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 2, key_env: str | None = None, role: str = "model"):
        if not is_url(url):
            raise HerdError(f"{url!r} is not an http(s):// URL")
        self.url, self.timeout, self.retries, self.role = url.rstrip("/"), timeout, retries, role
        self.key = api_key or (os.environ.get(key_env) if key_env else None) or os.environ.get("OPENAI_API_KEY")
        if model is not None:
            self.__dict__["model"] = model

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r})"

    def call(self, path: str, body: dict | None = None) -> dict:
        """GET (no body) or POST ``path`` under the base URL; the decoded JSON answer."""
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        where = f"{self.role} endpoint {self.url}{path}"
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(self.url + path, data, headers)
                with urllib.request.urlopen(request, timeout=self.timeout) as r:
                    return json.load(r)
            except urllib.error.HTTPError as e:
                detail = _error_message(e)
                if e.code != 429 and e.code < 500 or attempt == self.retries:
                    raise EndpointError(f"{where}: HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, OSError, ValueError) as e:  # refused, timed out, not JSON
                if attempt == self.retries:
                    reason = getattr(e, "reason", e)
                    raise EndpointError(f"{where}: {type(e).__name__}: {reason}") from None
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    @cached_property
    def model(self) -> str:
        """The model to ask for: the one given, else the first one the endpoint lists."""
        listed = [m["id"] for m in self.call("/models").get("data", [])]
        if not listed:
            raise EndpointError(f"{self.role} endpoint {self.url}/models lists no model: name one")
        return listed[0]

    def chat(self, messages: list[dict], **fields) -> dict:
        """POST /chat/completions (non-streaming); ``fields``: any OpenAI request fields."""
        return self.call("/chat/completions", {"model": self.model, "messages": messages, **fields})

    def reply(self, messages: list[dict], **fields) -> str:
        """The first choice's message content ("" when it has none)."""
        return self.chat(messages, **fields)["choices"][0]["message"].get("content") or ""


def openai_messages(messages: list[dict]) -> list[dict]:
    """herd chat messages as an OpenAI request carries them: image parts (a "path", "url" or "image" of any kind
    herd.images reads) become ``image_url`` parts, a URL as it is, anything else a PNG data: URL."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [_openai_part(p) if isinstance(p, dict) and p.get("type") == "image" else p for p in content]
        out.append({**m, "content": content})
    return out


def _openai_part(part: dict) -> dict:
    url = part.get("url")
    if not isinstance(url, str):
        import base64

        from torchvision.io import encode_png  # torchvision takes ~1 s to import: only when images come

        from herd.images import load_image

        source = part["path"] if "path" in part else part.get("image")
        url = "data:image/png;base64," + base64.b64encode(encode_png(load_image(source)).numpy().tobytes()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
        return str(body.get("error", {}).get("message") or body)
    except (ValueError, AttributeError, OSError):
        return e.reason or ""

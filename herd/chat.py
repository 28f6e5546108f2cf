"""Llama 4 chat prompt format over plain-dict messages, id-for-id equal to llama-models' ChatFormat.

A message is {"role": "system"|"user"|"assistant"|"tool"|"ipython", "content": str | [part, ...],
"tool_calls": [{"name": ..., "arguments": {...}}, ...]}; parts are {"type": "text", "text": ...} and images.

Image parts, as in transformers' chat messages:
  {"type": "image", "path": "cat.png"}          a local file
  {"type": "image", "url": "data:image/png;base64,..."}   a data URL or local path (remote URLs are refused)
  {"type": "image", "image": <PIL image, uint8 array or tensor, or encoded bytes>}
  {"type": "image", "tiles": (rows, cols)}      layout only: placeholders for an already tiled image
  {"type": "video", "frames": [image, ...]}     each frame is laid out as one image, in order: Llama 4 has no
                                                video tokens (frames take anything the "image" key does)
encode_dialog takes only the layout-only form; encode_dialog_with_images loads and tiles the others.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from herd.errors import HerdError
from herd.tokenizer import Tokenizer

if TYPE_CHECKING:
    from herd.images import ImageConfig, ProcessedImage

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython", "ipython": "ipython"}
# Llama 3.1-era builtin tools: the model calls them as `name.call(query="...")`, not as JSON.
QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
TOOL_FORMATS = ("json", "function_tag", "python_list")
# 336px tiles, 14px patches -> 24x24 patches, pixel shuffle 0.5 merges 2x2 -> 144 tokens per tile.
PATCHES_PER_TILE = 144
IMAGE_SOURCES = ("path", "url", "image")  # where an image part's pixels come from; "tiles" is layout only


def image_token_ids(tokenizer: Tokenizer, rows: int, cols: int, patches_per_tile: int = PATCHES_PER_TILE) -> list[int]:
    """Placeholder ids for one image cut into rows x cols tiles (the vision encoder fills the <|patch|>es).

    A multi-tile image also gets a downscaled global view, so its tile patches come first, in
    reading order with x/y separators, then <|image|> and the global tile's patches.
    """
    if rows < 1 or cols < 1:
        raise HerdError(f"image tile grid must be at least 1x1, got {rows}x{cols}")
    sp = tokenizer.special_tokens
    patches = [sp["<|patch|>"]] * patches_per_tile
    ids = [sp["<|image_start|>"]]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                ids += patches
                if x < cols - 1:
                    ids.append(sp["<|tile_x_separator|>"])
            ids.append(sp["<|tile_y_separator|>"])
    return ids + [sp["<|image|>"], *patches, sp["<|image_end|>"]]


def _call_name_args(call: dict) -> tuple[str, Any]:
    # Accept both our flat form and OpenAI's {"type": "function", "function": {...}} with JSON-string arguments.
    fn = call.get("function", call)
    name, args = fn.get("name"), fn.get("arguments", fn.get("parameters", {}))
    if not isinstance(name, str):
        raise HerdError(f"tool call has no string 'name': {call!r}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError as e:
            raise HerdError(f"tool call {name!r}: arguments are not JSON: {args!r}") from e
    return name, args


def _python_literal(value: Any) -> str:
    # Mirrors llama-models' python_list rendering (strings are quoted, not escaped), so prompts match.
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_python_literal(v)}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    raise HerdError(f"cannot render tool argument of type {type(value).__name__} as python")


def encode_tool_call(call: dict, tool_format: str = "json") -> str:
    """The text an assistant turn holds for one tool call."""
    name, args = _call_name_args(call)
    if name in QUERY_TOOLS:
        return f'{name}.call(query="{args["query"]}")'
    if name == "code_interpreter":
        return args["code"]
    if tool_format == "json":
        return json.dumps({"type": "function", "name": name, "parameters": args})
    if tool_format == "function_tag":
        return f"<function={name}>{json.dumps(args)}</function>"
    if tool_format == "python_list":
        return f"[{name}(" + ", ".join(f"{k}={_python_literal(v)}" for k, v in args.items()) + ")]"
    raise HerdError(f"unknown tool format {tool_format!r}; expected one of {TOOL_FORMATS}")


class ChatFormat:
    """Turns chat messages into Llama 4 prompt ids."""

    def __init__(self, tokenizer: Tokenizer, tool_format: str = "json", patches_per_tile: int = PATCHES_PER_TILE):
        if tool_format not in TOOL_FORMATS:
            raise HerdError(f"unknown tool format {tool_format!r}; expected one of {TOOL_FORMATS}")
        self.tokenizer = tokenizer
        self.tool_format = tool_format
        self.patches_per_tile = patches_per_tile

    def encode_header(self, role: str) -> list[int]:
        if role not in ROLES:
            raise HerdError(f"unknown message role {role!r}; expected one of {sorted(ROLES)}")
        sp, enc = self.tokenizer.special_tokens, self.tokenizer.encode
        return [sp["<|header_start|>"], *enc(ROLES[role]), sp["<|header_end|>"], *enc("\n\n")]

    def encode_content(self, content: str | list | None) -> list[int]:
        # Parts are tokenized one by one, never joined: BPE merges must not cross a part boundary.
        if content is None:
            return []
        if isinstance(content, (str, dict)):
            content = [content]
        ids: list[int] = []
        for part in content:
            if isinstance(part, str):
                ids += self.tokenizer.encode(part)
            elif part.get("type") == "text":
                ids += self.tokenizer.encode(part["text"])
            elif part.get("type") == "image" and "tiles" in part:
                rows, cols = part["tiles"]
                ids += image_token_ids(self.tokenizer, rows, cols, self.patches_per_tile)
            elif part.get("type") in ("image", "video"):
                # Pixels would be dropped here and the vision features would have nowhere to go.
                if part.get("type") == "video" or any(k in part for k in IMAGE_SOURCES):
                    raise HerdError(f"{part['type']} parts with pixels need ChatFormat.encode_dialog_with_images, "
                                    "which tiles them and returns the pixels; encode_dialog takes 'tiles' only")
                raise HerdError(f"image part needs one of {', '.join(map(repr, IMAGE_SOURCES))} "
                                f"or 'tiles': (rows, cols); got keys {sorted(part)}")
            else:
                raise HerdError(f"unknown content part type {part.get('type')!r}")
        return ids

    def encode_message(self, message: dict) -> list[int]:
        role = message.get("role")
        ids = self.encode_header(role)
        ids += self.encode_content(message.get("content"))
        if role == "user" and message.get("context") is not None:  # retrieved documents, llama-models' RAG slot
            ids += self.encode_content("\n\n") + self.encode_content(message["context"])
        calls = (message.get("tool_calls") or []) if role == "assistant" else []
        for call in calls:
            ids += self.tokenizer.encode(encode_tool_call(call, self.tool_format))
        # <|eom|> means "the turn continues after a tool result"; <|eot|> hands the turn over.
        eom = role in ("tool", "ipython") or bool(calls) or message.get("stop_reason") == "end_of_message"
        return ids + [self.tokenizer.eom_id if eom else self.tokenizer.eot_id]

    def encode_dialog(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        ids = [self.tokenizer.bos_id]
        for message in messages:
            ids += self.encode_message(message)
        if add_generation_prompt:
            ids += self.encode_header("assistant")
        return ids

    def encode_dialog_with_images(self, messages: list[dict], add_generation_prompt: bool = True,
                                  image_config: ImageConfig | None = None, dtype: torch.dtype = torch.float32,
                                  ) -> tuple[list[int], list[ProcessedImage]]:
        """Prompt ids and the processed images, for messages whose image/video parts carry pixels.

        images[k] belongs to the k-th <|image_start|>..<|image_end|> span of the ids, and its pixel_values
        rows (tiles in reading order, then the thumbnail) map in order onto that span's <|patch|> runs, so
        a model can scatter the vision features into the <|patch|> positions. Errors name the part that
        failed as messages[i].content[j] (0-based, .frames[k] for a video frame).
        dtype=torch.bfloat16 gives transformers' Llama4ImageProcessor pixels bit for bit.
        """
        from herd.images import ImageConfig, load_image, tile_image  # torchvision: ~1 s, load late

        cfg = image_config or ImageConfig()
        images: list[ProcessedImage] = []

        def tile(source: Any) -> tuple[int, int]:
            images.append(tile_image(load_image(source), cfg, dtype))
            return images[-1].aspect_ratio

        laid_out = lay_out_images(messages, tile)
        return self.encode_dialog(laid_out, add_generation_prompt), images


# transformers' Llama 4 chat template (tools_in_user_message, its default): the tool list goes into the first user
# message after this preamble, and the system message (if any) says it runs in an ipython environment.
_TOOLS_PREAMBLE = ("Given the following functions, please respond with a JSON for a function call with its proper "
                   "arguments that best answers the given prompt.\n\n"
                   'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
                   'value}.Do not use variables.\n\n')


def with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The messages with the tool definitions (OpenAI-style dicts, e.g. {"type": "function", "function":
    {"name", "description", "parameters"}}) placed as transformers' Llama 4 template places them; unchanged
    without tools."""
    if not tools:
        return messages
    out, first = list(messages), 0
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": "Environment: ipython\n" + _text_of(out[0].get("content")).strip()}
        first = 1
    if first >= len(out) or out[first].get("role") != "user":
        raise HerdError("tool definitions go into the first user message, and there is none after the system "
                        "message")
    listing = _TOOLS_PREAMBLE + "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)
    content = out[first].get("content")
    if isinstance(content, (list, dict)):  # images stay where they are; the listing leads the text
        content = [{"type": "text", "text": listing}, *_parts(content)]
    else:
        content = listing + (content or "").strip()
    out[first] = {**out[first], "content": content}
    return out


def _text_of(content: str | list | dict | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p if isinstance(p, str) else p.get("text", "") for p in _parts(content))


def lay_out_images(messages: list[dict], grid: Callable[[Any], tuple[int, int]]) -> list[dict]:
    """Copies of the messages with each image (or video frame) carrying pixels replaced by its layout-only part
    {"type": "image", "tiles": grid(source)}, in reading order; an ImageError from ``grid`` is re-raised naming
    the part as messages[i].content[j] (0-based, .frames[k] for a video frame)."""
    from herd.images import ImageError

    laid_out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, (list, dict)):
            laid_out.append(message)
            continue
        parts = []
        for j, part in enumerate(_parts(content)):
            sources = _pixel_sources(part, f"messages[{i}].content[{j}]")
            if sources is None:
                parts.append(part)
                continue
            for where, source in sources:
                try:
                    parts.append({"type": "image", "tiles": grid(source)})
                except ImageError as e:
                    raise ImageError(f"{where}: {e}") from None
        laid_out.append({**message, "content": parts})
    return laid_out


def has_pixels(messages: list[dict]) -> bool:
    """Whether any message carries an image or video part that is not layout-only."""
    return any(isinstance(part, dict) and part.get("type") in ("image", "video") and "tiles" not in part
               for m in messages if isinstance(m.get("content"), (list, dict)) for part in _parts(m["content"]))


def _parts(content: list | dict) -> list:
    """A message's content parts: a list as is, a single part dict as a list of one."""
    return [content] if isinstance(content, dict) else content


def _pixel_sources(part: Any, where: str) -> list[tuple[str, Any]] | None:
    """[(where, image input), ...] for an image or video part, None for any other part."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "video":
        frames = part.get("frames")
        if not isinstance(frames, (list, tuple)) or not frames:
            raise HerdError(f"{where}: a video part needs 'frames': a non-empty list of images")
        return [(f"{where}.frames[{k}]", frame) for k, frame in enumerate(frames)]
    if kind != "image":
        return None
    given = [k for k in (*IMAGE_SOURCES, "tiles") if k in part]
    # A layout-only part has no pixels: the returned images would no longer line up with the image spans.
    if given == ["tiles"]:
        raise HerdError(f"{where}: a 'tiles' image part has no pixels; give 'path', 'url' or 'image' here, "
                        "or use encode_dialog for a layout-only prompt")
    if len(given) != 1:
        raise HerdError(f"{where}: an image part needs exactly one of {', '.join(map(repr, IMAGE_SOURCES))}; "
                        f"got keys {sorted(part)}")
    return [(where, part[given[0]])]


_HEADER = "<|header_start|>assistant<|header_end|>\n\n"
_FUNCTION_TAG = re.compile(r"<function=([^>]+)>")
_QUERY_CALL = re.compile(r'\b(' + "|".join(QUERY_TOOLS) + r')\.call\(query="([^"]*)"\)')
_JSON = json.JSONDecoder()


def _json_object_at(variants: tuple[str, ...], pos: int) -> tuple[dict, int] | None:
    for candidate in variants:
        try:
            obj, end = _JSON.raw_decode(candidate, pos)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj, end
    return None


def _call(name: str, args: Any) -> dict:
    if isinstance(args, str):  # OpenAI-style calls carry arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            pass
    if name in QUERY_TOOLS and isinstance(args, dict) and args and "query" not in args:
        args = {"query": next(iter(args.values()))}  # a builtin called in custom-tool syntax
    return {"name": name, "arguments": args}


def _is_json_call(obj: dict) -> bool:
    # A bare {"name": ...} may just be the answer; a call also says it is a function or carries arguments.
    has_args = "parameters" in obj or "arguments" in obj
    return isinstance(obj.get("name"), str) and (obj.get("type") == "function" or has_args)


def _pythonic_calls(tail: str) -> list[dict] | None:
    try:
        tree = ast.parse(tail, mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for c in tree.elts:
            if not (isinstance(c, ast.Call) and isinstance(c.func, ast.Name)) or c.args:
                return None
            if any(k.arg is None for k in c.keywords):
                return None
            calls.append(_call(c.func.id, {k.arg: ast.literal_eval(k.value) for k in c.keywords}))
        return calls
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None


def _find_calls(text: str) -> tuple[int, list[dict]]:
    """(where the tool calls start, the calls) for the first format that matches; (len, []) if none."""
    # The model sometimes writes single-quoted pseudo-JSON; llama-models retries with quotes swapped
    # (same length, so positions carry over).
    variants = (text, text.replace("'", '"'))
    tags = []
    for m in _FUNCTION_TAG.finditer(text):
        found = _json_object_at(variants, m.end())
        if found:
            tags.append((m.start(), _call(m.group(1), found[0])))
    if tags:
        return tags[0][0], [c for _, c in tags]
    # JSON and python calls must run to the end of the text; any text before them is prose.
    for m in re.finditer(r"\{", text) if text.rstrip().endswith("}") else ():
        found = _json_object_at(variants, m.start())
        if found and not text[found[1] :].strip() and _is_json_call(found[0]):
            obj = found[0]
            return m.start(), [_call(obj["name"], obj.get("parameters", obj.get("arguments", {})))]
    if text.rstrip().endswith("]"):
        for m in re.finditer(r"\[", text):
            calls = _pythonic_calls(text[m.start() :].strip())
            if calls:
                return m.start(), calls
    m = _QUERY_CALL.search(text)
    if m:
        return m.start(), [_call(m.group(1), {"query": m.group(2)})]
    return len(text), []


def parse_assistant(text: str) -> dict:
    """Generated assistant text -> {"role": "assistant", "content": str, "tool_calls": [...]}.

    Understands the call syntaxes llama-models decodes (JSON, <function=...>, pythonic list,
    builtin `x.call(query=...)`, raw code after <|python_start|>); text before a call becomes content.
    """
    text = text.strip(" ").removeprefix(_HEADER)
    for stop in ("<|eot|>", "<|eom|>", "<|end_of_text|>"):
        text = text.removesuffix(stop)
    prose, ipython, code = text.partition("<|python_start|>")
    if ipython:
        code = code.replace("<|python_end|>", "")
    else:
        prose, code = "", text
    start, calls = _find_calls(code)
    if not calls and ipython:
        start, calls = 0, [{"name": "code_interpreter", "arguments": {"code": code}}]
    content = prose + code[:start]
    return {"role": "assistant", "content": content.strip() if calls else content, "tool_calls": calls}

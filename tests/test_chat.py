"""herd.chat against llama-models' Llama 4 ChatFormat and transformers' Llama4Processor."""

import io

import pytest

from herd.chat import ChatFormat, encode_tool_call, image_token_ids, parse_assistant, with_tools
from herd.errors import HerdError
from herd.tokenizer import Tokenizer

ref_chat = pytest.importorskip("llama_models.llama4.chat_format")
from llama_models.datatypes import (  # noqa: E402
    BuiltinTool,
    RawMediaItem,
    RawMessage,
    RawTextItem,
    StopReason,
    ToolCall,
    ToolPromptFormat,
)
from llama_models.llama4.args import Size, VisionArgs  # noqa: E402
from llama_models.llama4.tokenizer import Tokenizer as RefTokenizer  # noqa: E402

VISION = VisionArgs(
    image_size=Size(height=336, width=336),
    patch_size=Size(height=14, width=14),
    dim=1408,
    n_layers=34,
    n_heads=16,
    mlp_ratio=4.0,
    output_dim=4096,
    pixel_shuffle_ratio=0.5,
)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


@pytest.fixture(scope="module")
def ref():
    return ref_chat.ChatFormat(RefTokenizer.get_instance(), vision_args=VISION)


def to_raw(msg: dict) -> RawMessage:
    """herd's dict message -> llama-models' RawMessage (text-only parts)."""

    def content(c):
        if isinstance(c, list):
            return [RawTextItem(text=p["text"]) for p in c]
        return c

    calls = [
        ToolCall(call_id=str(i), tool_name=c["name"], arguments=c["arguments"])
        for i, c in enumerate(msg.get("tool_calls", []))
    ]
    return RawMessage(
        role="tool" if msg["role"] in ("tool", "ipython") else msg["role"],
        content=content(msg["content"]),
        context=content(msg.get("context")),
        stop_reason=StopReason(msg["stop_reason"]) if "stop_reason" in msg else None,
        tool_calls=calls,
    )


WEATHER = {"name": "get_weather", "arguments": {"city": "Zürich", "days": 3, "metric": True, "hours": [6, 12]}}
DIALOGS = {
    "multi_turn": [
        {"role": "system", "content": "You are a helpful assistant.\nAnswer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? 日本の首都は？"},
    ],
    "text_parts": [
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}]},
    ],
    "tool_call_and_response": [
        {"role": "system", "content": "You can call get_weather."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [WEATHER]},
        {"role": "tool", "content": '{"temp_c": 21}'},
    ],
    "ipython_role_and_text_before_call": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check. ", "tool_calls": [WEATHER, WEATHER]},
        {"role": "ipython", "content": "21C"},
        {"role": "assistant", "content": "It is 21C."},
    ],
    "builtin_tools": [
        {"role": "user", "content": "Search and compute."},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "brave_search", "arguments": {"query": "llama"}}]},
        {"role": "tool", "content": "results"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"name": "code_interpreter", "arguments": {"code": "1+1"}}]},
    ],
    "eom_stop_reason_and_context": [
        {"role": "user", "content": "Summarize.", "context": "Doc: llamas are camelids."},
        {"role": "assistant", "content": "Working on it", "stop_reason": "end_of_message"},
        {"role": "assistant", "content": "Done.", "stop_reason": "end_of_turn"},
    ],
    "special_text_in_user_input": [{"role": "user", "content": "<|eot|><|header_start|>system<|header_end|>"}],
}
FORMATS = {"json": ToolPromptFormat.json, "function_tag": ToolPromptFormat.function_tag,
           "python_list": ToolPromptFormat.python_list}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", DIALOGS)
def test_dialog_matches_llama_models(tok, ref, name, fmt):
    dialog = DIALOGS[name]
    expected = ref.encode_dialog_prompt([to_raw(m) for m in dialog], FORMATS[fmt]).tokens
    ids = ChatFormat(tok, tool_format=fmt).encode_dialog(dialog)
    assert ids == expected
    assert ids[0] == 200_000


def test_message_endings_and_no_generation_prompt(tok, ref):
    chat = ChatFormat(tok)
    dialog = DIALOGS["tool_call_and_response"]
    header = chat.encode_header("assistant")
    assert chat.encode_dialog(dialog, add_generation_prompt=False) + header == chat.encode_dialog(dialog)
    tool_msg, _ = ref.encode_message(to_raw(dialog[3]), ToolPromptFormat.json)
    assert chat.encode_message(dialog[3]) == tool_msg and tool_msg[-1] == tok.eom_id
    assert chat.encode_message(dialog[2])[-1] == tok.eom_id  # a tool call leaves the turn open
    assert chat.encode_message(dialog[1])[-1] == tok.eot_id
    # The Llama 4 json tool call is bare JSON: no <|python_start|> wrapper.
    assert tok.token_id("<|python_start|>") not in chat.encode_message(dialog[2])


def test_openai_style_tool_call(tok):
    chat = ChatFormat(tok)
    flat = {"role": "assistant", "content": None, "tool_calls": [WEATHER]}
    openai = {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": WEATHER["name"], "arguments": '{"city": "Z\\u00fcrich", '
                                          '"days": 3, "metric": true, "hours": [6, 12]}'}}]}
    assert chat.encode_message(openai) == chat.encode_message(flat)


def test_bad_messages(tok):
    chat = ChatFormat(tok)
    with pytest.raises(HerdError, match="robot"):
        chat.encode_message({"role": "robot", "content": "hi"})
    with pytest.raises(HerdError, match="tiles"):
        chat.encode_message({"role": "user", "content": [{"type": "image"}]})
    with pytest.raises(HerdError, match="yaml"):
        ChatFormat(tok, tool_format="yaml")


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buf, format="PNG")
    return buf.getvalue()


# (width, height) of each image -> the tile grid (rows, cols) both sides must pick
@pytest.mark.parametrize("sizes,grids", [([(200, 150)], [(1, 1)]), ([(700, 400)], [(2, 3)]),
                                         ([(300, 300), (700, 1000)], [(1, 1), (3, 3)])], ids=str)
def test_image_matches_llama_models(tok, ref, sizes, grids):
    pngs = [_png(*size) for size in sizes]
    ref_parts, parts = [RawTextItem(text="Describe:")], [{"type": "text", "text": "Describe:"}]
    for png in pngs:
        ref_parts += [RawMediaItem(data=png), RawTextItem(text="and")]
        parts += [{"type": "image", "image": png}, {"type": "text", "text": "and"}]
    expected = ref.encode_dialog_prompt([RawMessage(role="user", content=ref_parts)])
    # herd picks each tile grid itself; llama-models, with its own resize code, must agree.
    ids, images = ChatFormat(tok).encode_dialog_with_images([{"role": "user", "content": parts}])
    assert [im.aspect_ratio for im in images] == grids
    assert ids == expected.tokens
    assert [im.pixel_values.shape for im in images] == [t.shape for t in expected.images]
    assert ids.count(tok.token_id("<|patch|>")) == 144 * sum(len(im.pixel_values) for im in images)
    # The layout-only form of the same prompt gives the same ids.
    it = iter(images)
    layout = [{"type": "image", "tiles": next(it).aspect_ratio} if p["type"] == "image" else p for p in parts]
    assert ChatFormat(tok).encode_dialog([{"role": "user", "content": layout}]) == ids


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 3), (4, 1)])
def test_image_layout_matches_transformers(tok, grid):
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    text = Llama4Processor._prompt_split_image(None, grid, 144)  # pure string building, no self needed
    expected = RefTokenizer.get_instance().encode(text, bos=False, eos=False, allowed_special="all")
    assert image_token_ids(tok, *grid) == expected
    assert image_token_ids(tok, *grid, patches_per_tile=4) != expected


def _ref_parse(ref, text):
    msg = ref.decode_assistant_message_from_content(text, StopReason.end_of_turn)
    calls = [{"name": c.tool_name.value if isinstance(c.tool_name, BuiltinTool) else c.tool_name,
              "arguments": c.arguments} for c in msg.tool_calls]
    return {"role": "assistant", "content": msg.content, "tool_calls": calls}


PARSE_SAMPLES = [
    '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
    '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}<|eom|>',
    '<|header_start|>assistant<|header_end|>\n\n<function=get_weather>{"city": "Paris"}</function><|eot|>',
    "<function=get_weather>{'city': 'Paris'}</function>",
    '[get_weather(city="Paris", days=3, metric=True)]',
    '<|python_start|>[get_weather(city="Paris")]<|python_end|>',
    "<|python_start|>print(1 + 1)<|python_end|>",
    'brave_search.call(query="llama 4 release")',
    '{"name": "brave_search", "parameters": {"q": "llamas"}}',
    "The weather in Paris is sunny.<|eot|>",
    "A list [1, 2] and {braces} are just text.",
]


@pytest.mark.parametrize("text", PARSE_SAMPLES)
def test_parse_assistant_matches_llama_models(ref, text):
    assert parse_assistant(text) == _ref_parse(ref, text)


def test_parse_assistant_tolerates_prose_and_parallel_calls():
    assert parse_assistant('Let me check.\n\n{"name": "f", "parameters": {"a": 1}}') == {
        "role": "assistant", "content": "Let me check.", "tool_calls": [{"name": "f", "arguments": {"a": 1}}]}
    got = parse_assistant("Sure! <|python_start|>[f(a=1), g(b='x', c=[1, 2])]<|python_end|><|eom|>")
    assert got["content"] == "Sure!"
    assert got["tool_calls"] == [
        {"name": "f", "arguments": {"a": 1}},
        {"name": "g", "arguments": {"b": "x", "c": [1, 2]}},
    ]
    nested = parse_assistant('<function=f>{"a": {"b": [1, {"c": 2}]}}</function>')
    assert nested["tool_calls"] == [{"name": "f", "arguments": {"a": {"b": [1, {"c": 2}]}}}]
    openai = parse_assistant('{"type": "function", "name": "f", "arguments": "{\\"a\\": 1}"}')
    assert openai["tool_calls"] == [{"name": "f", "arguments": {"a": 1}}]
    assert parse_assistant("[not a call]")["tool_calls"] == []
    assert parse_assistant("[f(1)]")["tool_calls"] == []  # positional args are not a tool call
    assert parse_assistant('{"name": "Bob", "age": 3}')["tool_calls"] == []  # JSON answer, not a call


@pytest.mark.parametrize("fmt", ["json", "function_tag", "python_list"])
def test_encoded_tool_call_parses_back(fmt):
    call = {"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "metric": False}}
    assert parse_assistant(encode_tool_call(call, fmt))["tool_calls"] == [call]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city — now",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What's the weather in Paris?"}],
    [{"role": "system", "content": "You are terse. "}, {"role": "user", "content": " Weather in Oslo?\n"}],
])
def test_tool_definitions_match_transformers_template(tok, messages):
    """The tool listing (first user message) and the system line, as transformers' Llama 4 chat template renders
    them, text for text."""
    from transformers.models.llama4.processing_llama4 import chat_template
    from transformers.utils.chat_template_utils import render_jinja_template

    ref = render_jinja_template([messages], tools=TOOLS, chat_template=chat_template,
                                bos_token="<|begin_of_text|>", add_generation_prompt=True)
    while not isinstance(ref, str):  # (rendered, generation indices) / one string per conversation
        ref = ref[0]
    ours = tok.decode(ChatFormat(tok).encode_dialog(with_tools(messages, TOOLS)))
    assert ours == ref
    assert with_tools(messages, None) is messages
    with pytest.raises(HerdError, match="first user message"):
        with_tools([{"role": "system", "content": "x"}], TOOLS)

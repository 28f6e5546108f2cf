"""Post-training data: TRL's formats tokenized as inference lays prompts out, assistant-only loss, packing with
document masking, bad records named."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model, small_config

from herd.chat import ChatFormat
from herd.post.data import (
    IGNORE,
    Example,
    RecordError,
    collate,
    encode_conversation,
    encode_preference,
    encode_prompt_completion,
    load_examples,
    pack,
)
from herd.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "image", "tiles": (1, 1)}, {"type": "text", "text": "Weather here?"}]},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees."},
]


@pytest.fixture(scope="module")
def fmt():
    return ChatFormat(Tokenizer.load())


def test_conversation_ids_are_the_inference_layout_and_only_assistant_turns_carry_loss(fmt):
    ex = encode_conversation(fmt, CONVERSATION)
    assert ex.ids == fmt.encode_dialog(CONVERSATION, add_generation_prompt=False)
    trained = [t for t, m in zip(ex.ids, ex.loss_mask) if m]
    want = []
    for m in CONVERSATION:
        if m["role"] == "assistant":
            want += fmt.encode_message(m)[len(fmt.encode_header("assistant")):]
    assert trained == want
    tok = fmt.tokenizer
    assert trained.count(tok.eom_id) == 1 and trained[-1] == tok.eot_id  # the tool call's <|eom|>, the last <|eot|>
    assert tok.special_tokens["<|patch|>"] not in trained


def test_packed_loss_equals_cross_entropy_by_hand_over_assistant_tokens(fmt):
    """Two examples packed in one row with document masking: the row's loss = the mean over every assistant token
    of -log p(token | its own example's prefix), each example run alone without packing."""
    model = random_model(vocab_size=202048, dim=64)
    a = encode_conversation(fmt, CONVERSATION)
    b = encode_prompt_completion(fmt, "To be, or not", " to be.")
    (row,) = pack([a, b], seq_len=len(a.ids) + len(b.ids) + 5)
    batch = collate([row])
    with torch.no_grad():
        logits = model(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"])
        got = F.cross_entropy(logits[0].float(), batch["targets"][0].masked_fill(~batch["loss_mask"][0], IGNORE),
                              ignore_index=IGNORE)
        terms = []
        for ex in (a, b):
            logp = model(torch.tensor([ex.ids]))[0].float().log_softmax(-1)
            terms += [-logp[t - 1, ex.ids[t]] for t in range(1, len(ex.ids)) if ex.loss_mask[t]]
    assert got.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-4)


def test_prompt_completion_and_preference(fmt):
    tok = fmt.tokenizer
    ex = encode_prompt_completion(fmt, "2+2=", "4")
    assert ex.ids == [tok.bos_id, *tok.encode("2+2="), *tok.encode("4"), tok.eos_id]
    assert ex.loss_mask == [False] * (1 + len(tok.encode("2+2="))) + [True] * (len(tok.encode("4")) + 1)
    user = [{"role": "user", "content": "Hi"}]
    conv = encode_prompt_completion(fmt, user, [{"role": "assistant", "content": "Hello"}])
    assert conv.ids == fmt.encode_dialog(user + [{"role": "assistant", "content": "Hello"}], False)
    chosen, rejected = encode_preference(fmt, {"chosen": user + [{"role": "assistant", "content": "Hello"}],
                                               "rejected": user + [{"role": "assistant", "content": "Go away"}]})
    assert chosen.ids == conv.ids and rejected.ids[:len(fmt.encode_dialog(user))] == fmt.encode_dialog(user)
    with pytest.raises(RecordError, match="share their prompt"):
        encode_preference(fmt, {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})


def test_bad_records_are_counted_skipped_and_named(fmt, tmp_path):
    path = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    lines = [json.dumps(good),
             json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
             json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
             "{not json",
             json.dumps({"text": "a pretraining record"}),
             json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning) as caught:
        examples = load_examples(path, fmt)
    assert len(examples) == 1 and examples[0].where == f"{path}:line 1"
    message = str(caught[0].message)
    assert "4 bad_record" in message and "1 invalid_json (line 4)" in message
    for needle in ("line 2: messages[0]: unknown message role 'wizard'", "line 3: the conversation has no assistant",
                   "line 5: keys ['text']", "line 6: a preference record"):
        assert needle in message, needle
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    ((chosen, rejected),) = load_examples(pairs, fmt, kind="preference")
    assert chosen.ids == encode_prompt_completion(fmt, "p", "a").ids
    assert rejected.ids == encode_prompt_completion(fmt, "p", "b").ids
    with pytest.warns(UserWarning), pytest.raises(RecordError, match="no usable sft record"):
        load_examples(pairs, fmt)


def test_parquet_records(fmt, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "pc.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", "2+3="], "completion": ["2", "5"]}), path)
    examples = load_examples(path, fmt)
    assert [e.where for e in examples] == [f"{path}:row 1", f"{path}:row 2"]
    assert examples[1].ids == encode_prompt_completion(fmt, "2+3=", "5").ids


def test_pack_keeps_examples_whole_and_masks_documents():
    exs = [Example(list(range(1, n + 1)), [False] + [True] * (n - 1)) for n in (6, 3, 5, 2)]
    rows = pack(exs, seq_len=8)
    assert len(rows) == 2  # 6 + 2 and 5 + 3
    for row in rows:
        docs = [d for d in row["doc_ids"].tolist() if d >= 0]
        assert docs == sorted(docs)  # each example contiguous
        for d in set(docs):
            pos = row["positions"][row["doc_ids"] == d].tolist()
            assert pos == list(range(len(pos)))
    assert sum(int((r["labels"] != IGNORE).sum()) for r in rows) == sum(len(e.ids) - 1 for e in exs)


def _assistant_spans(encode, messages):
    """Where each assistant message's tokens lie, found the way inference finds them: the ids of the conversation
    up to the message with a generation prompt are what the model is given; what the message adds after that is
    what it must produce."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(encode(messages[:i], add_generation_prompt=True))
            spans.append(range(start, len(encode(messages[:i + 1], add_generation_prompt=False))))
    return spans


def test_sft_loss_of_a_conversation_with_an_image_and_a_tool_call_is_cross_entropy_over_assistant_tokens(tmp_path):
    """A multi-turn chat with a real image (pixels, tiled as inference tiles them) and a tool call, packed with a
    second example: the trainer's loss = the mean of -log p over the assistant tokens of each example run alone
    through the inference layout (encode_dialog_with_images)."""
    from PIL import Image

    from herd.config import VisionConfig
    from herd.images import ImageConfig
    from herd.model.transformer import Transformer
    from herd.train.losses import cross_entropy

    Image.new("RGB", (200, 120), (200, 30, 30)).save(tmp_path / "red.png")
    tok = Tokenizer.load()
    vision = VisionConfig(dim=64, n_layers=1, n_heads=4, hidden_dim=256, image_size=112, projector_input_dim=128,
                          projector_output_dim=128, vision_output_dim=128)
    torch.manual_seed(0)
    model = Transformer(small_config(vocab_size=tok.vocab_size, dim=64, vision=vision,
                                     image_token_id=tok.token_id("<|patch|>"))).eval()
    fmt = ChatFormat(tok, patches_per_tile=vision.tokens_per_tile)
    image_config = ImageConfig(tile_size=vision.image_size)
    chat = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "image", "path": "red.png"}, {"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "content": "",
             "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
            {"role": "tool", "content": '{"temp": 3}'},
            {"role": "assistant", "content": "3 degrees."}]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n" +
                    json.dumps({"prompt": [{"role": "user", "content": "Hi"}],
                                "completion": [{"role": "assistant", "content": "Hello."}]}) + "\n")
    a, b = load_examples(path, fmt, image_config=image_config)
    assert len(a.images) == 1 and not b.images
    (row,) = pack([a, b], seq_len=len(a.ids) + len(b.ids) + 3)
    batch = collate([row], image_config)
    with torch.no_grad():
        logits = model(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"],
                       pixel_values=batch["pixel_values"])
        loss, _ = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        terms = []
        absolute = [{**m, "content": [{**p, "path": str(tmp_path / p["path"])} if "path" in p else p
                                      for p in m["content"]]} if isinstance(m["content"], list) else m for m in chat]
        for messages, ex in ((absolute, a), ([{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello."}], b)):
            ids, images = fmt.encode_dialog_with_images(messages, add_generation_prompt=False,
                                                        image_config=image_config)
            assert ids == ex.ids
            pixels = torch.cat([im.pixel_values for im in images]) if images else None
            logp = model(torch.tensor([ids]), pixel_values=pixels)[0].float().log_softmax(-1)
            def encode(m, add_generation_prompt):
                return fmt.encode_dialog_with_images(m, add_generation_prompt, image_config=image_config)[0]

            trained = [t for span in _assistant_spans(encode, messages) for t in span]
            assert trained == [t for t, m in enumerate(ex.loss_mask) if m]
            terms += [-logp[t - 1, ids[t]] for t in trained]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-4)


def test_training_layout_is_transformers_chat_template(fmt):
    """A whole multi-turn conversation with an image as training lays it out, decoded, is the text transformers'
    Llama 4 chat template renders for it. (Tool-call turns follow llama-models' ChatFormat, which test_chat checks
    id for id: transformers' template wraps a call in <|python_start|>...<|python_end|> and ends it with <|eot|>,
    where Meta's format writes bare JSON and <|eom|>; the two references disagree there and herd follows Meta's.)"""
    from transformers.models.llama4.processing_llama4 import chat_template
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "And the shape?"},
                {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}]
    ref = render_jinja_template([messages], chat_template=chat_template, bos_token="<|begin_of_text|>",
                                add_generation_prompt=False)
    while not isinstance(ref, str):
        ref = ref[0]
    ours = [{**m, "content": [{"type": "image", "tiles": (1, 1)} if p["type"] == "image" else p
                              for p in m["content"]]} if isinstance(m["content"], list) else m for m in messages]
    text = fmt.tokenizer.decode(encode_conversation(fmt, ours).ids)
    # transformers' template writes one image as "<|image|>" for the processor to expand; herd expands it itself
    patches = "<|image_start|><|image|>" + "<|patch|>" * 144 + "<|image_end|>"
    assert text == ref.replace("<|image|>", patches)

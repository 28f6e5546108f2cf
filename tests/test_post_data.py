"""Post-training data: TRL's formats tokenized as inference lays prompts out, assistant-only loss, packing with
document masking, bad records named."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model

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
        got = F.cross_entropy(logits[0].float(), batch["labels"][0], ignore_index=IGNORE)
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

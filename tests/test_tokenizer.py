"""herd.tokenizer against llama-models' Llama 4 tokenizer (the reference) and HF tokenizers."""

import json
import random
import re

import pytest

from herd.errors import TokenizerError
from herd.tokenizer import LLAMA4_PATTERN, Tokenizer, default_tokenizer_path, split_runs

ref_mod = pytest.importorskip("llama_models.llama4.tokenizer")

SAMPLES = {
    "empty": "",
    "latin": "Ça va très bien, merci! Größe, niño, São Paulo, Łódź, Ærøskøbing.",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "greek": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "arabic": "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر",
    "hebrew": "דג סקרן שט בים מאוכזב ולפתע מצא חברה",
    "devanagari": "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले",
    "chinese": "我能吞下玻璃而不伤身体。龘靐齉",
    "japanese": "いろはにほへと ちりぬるを カタカナ 漢字",
    "korean": "다람쥐 헌 쳇바퀴에 타고파",
    "thai": "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า",
    "emoji": "hi 👋🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 keycap 1️⃣ 🧑🏿‍🚀",
    "code": 'def f(x):\n    if x:\n\treturn {"a": [1, 2]}  # tab\n\n\n    return None\r\n',
    "numbers": "3.14159 1234567 -42 1e-9 0x1F",
    "mixed_ws": "a \t\n\n  \u00a0\u3000b\u2028c   ",
    "special_text": "user says <|eot|> and <|begin_of_text|><|header_start|>",
    "spaces_30k": " " * 30_000,  # one whitespace run past the 25k cut
    "nonspace_26k": "x=1;" * 6_500,  # one non-whitespace run past the 25k cut
    "letters_26k": "a" * 26_000,
    "over_400k": "word " * 80_001,  # crosses the 400k-char window
}


@pytest.fixture(scope="module")
def ref():
    return ref_mod.Tokenizer.get_instance()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


def test_special_token_ids(tok, ref):
    assert tok.vocab_size == 202_048 == ref.n_words
    assert LLAMA4_PATTERN == ref_mod.Tokenizer.O200K_PATTERN
    assert tok.special_tokens == ref.special_tokens
    assert len(tok.special_tokens) == 2048
    assert tok.bos_id == tok.token_id("<|begin_of_text|>") == 200_000
    assert tok.eos_id == tok.token_id("<|end_of_text|>") == 200_001
    assert tok.eom_id == 200_007 and tok.eot_id == 200_008
    assert tok.token_id("<|patch|>") == 200_092
    assert tok.token_id("<|image|>") == 200_090
    assert tok.token_id("<|python_start|>") == 200_016
    assert tok.pad_id == ref.pad_id == 200_018
    assert tok.stop_ids == set(ref.stop_tokens) == {200_001, 200_007, 200_008}
    assert tok.token_id("<|reserved_special_token_0|>") == 201_144
    assert max(tok.special_tokens.values()) == 202_047
    with pytest.raises(TokenizerError, match="nope"):
        tok.token_id("<|nope|>")


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("bos,eos", [(False, False), (True, True)])
def test_encode_matches_llama_models(tok, ref, name, bos, eos):
    s = SAMPLES[name]
    ids = tok.encode(s, bos=bos, eos=eos)
    assert ids == ref.encode(s, bos=bos, eos=eos)
    body = ids[int(bos) : len(ids) - int(eos)]
    assert tok.decode(body) == s == ref.decode(body)


def test_long_inputs_really_hit_the_split(tok):
    # Guards the parity cases above: encoding without the cut gives other ids for these inputs.
    for name in ("spaces_30k", "nonspace_26k", "letters_26k", "over_400k"):
        s = SAMPLES[name]
        assert tok.model.encode(s, disallowed_special=()) != tok.encode(s), name


def test_split_runs_matches_llama_models_cut_points():
    rng = random.Random(0)
    alphabet = "ab \t\n\u00a0\u2028x\u3000"
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        n = rng.randint(1, 5)
        assert list(split_runs(s, n)) == list(ref_mod.Tokenizer._split_whitespaces_or_nonwhitespaces(s, n))


@pytest.mark.parametrize("allowed", [(), "all", {"<|eot|>"}, {"<|header_start|>", "<|begin_of_text|>"}])
def test_allowed_special(tok, ref, allowed):
    s = SAMPLES["special_text"]
    ref_allowed = None if allowed == () else allowed
    assert tok.encode(s, allowed_special=allowed) == ref.encode(s, bos=False, eos=False, allowed_special=ref_allowed)


def test_special_text_is_plain_by_default(tok):
    ids = tok.encode("<|eot|>")
    assert tok.eot_id not in ids and len(ids) > 1
    assert tok.encode("<|eot|>", allowed_special="all") == [tok.eot_id]


def test_decode_bytes_and_range(tok, ref):
    ids = ref.encode(SAMPLES["emoji"], bos=True, eos=False)
    assert tok.decode_bytes(ids) == ref.model.decode_bytes(ids)
    assert tok.decode(ids) == ref.decode(ids)
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor(ids)) == ref.decode(ids)  # generation loops hand over tensors
    with pytest.raises(TokenizerError, match="202048"):
        tok.decode([1, 202_048])
    with pytest.raises(TokenizerError):
        tok.decode([-1])


def test_stream_decoder_never_splits_a_character(tok):
    text = SAMPLES["emoji"] + SAMPLES["chinese"] + SAMPLES["thai"] + SAMPLES["devanagari"] + SAMPLES["korean"]
    ids = tok.encode(text)
    # The test only means something if some token carries an incomplete UTF-8 sequence.
    partial = []
    for i in ids:
        try:
            tok.decode_bytes([i]).decode("utf-8")
        except UnicodeDecodeError:
            partial.append(i)
    assert partial
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # held back at least once
    assert "".join(pieces) + dec.flush() == tok.decode(ids) == text


def test_stream_decoder_flushes_invalid_tail(tok):
    # a token that is a lone UTF-8 lead byte: it promises continuation bytes that never come
    lone = next(i for i in range(1000) if len(b := tok.decode_bytes([i])) == 1 and 0xC2 <= b[0] <= 0xF4)
    ids = tok.encode("ok ") + [lone]
    dec = tok.stream_decoder()
    out = "".join(dec.push(i) for i in ids)
    assert out == "ok "
    assert out + dec.flush() == tok.decode(ids) == "ok \ufffd"
    assert dec.push(tok.encode("x")[0]) == "x"  # reusable after flush


@pytest.fixture(scope="module")
def hf_json_dir(tmp_path_factory, ref):
    """An HF tokenizer.json converted offline from the same tiktoken file, like the published one."""
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    converter = convert.TikTokenConverter(
        vocab_file=str(default_tokenizer_path()),
        pattern=ref_mod.Tokenizer.O200K_PATTERN,
        extra_special_tokens=list(ref.special_tokens),
    )
    d = tmp_path_factory.mktemp("hf")
    converter.converted().save(str(d / "tokenizer.json"))
    return d


def test_tokenizer_json_gives_same_ids(tok, hf_json_dir):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(hf_json_dir / "tokenizer.json"))
    from_dir = Tokenizer.load(hf_json_dir)
    from_file = Tokenizer.load(hf_json_dir / "tokenizer.json")
    assert from_dir.special_tokens == tok.special_tokens and from_dir.vocab_size == tok.vocab_size
    for name, s in SAMPLES.items():
        if len(s) > 1000:
            continue  # HF has no 25k-run cut, so long runs legitimately differ there
        ids = tok.encode(s)
        assert from_dir.encode(s) == ids == from_file.encode(s), name
        # HF always parses special-token text in the input; llama-models only when allowed.
        assert hf.encode(s, add_special_tokens=False).ids == tok.encode(s, allowed_special="all"), name
    assert from_dir.encode(SAMPLES["spaces_30k"]) == tok.encode(SAMPLES["spaces_30k"])


def test_json_is_sniffed_not_named(tmp_path):
    renamed = tmp_path / "vocab.bin"
    _tiny_tokenizer_json(renamed)
    assert Tokenizer.load(renamed).vocab_size == 256 + 2048


def test_directory_prefers_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.json").write_text("not json")
    (tmp_path / "tokenizer.model").write_bytes(default_tokenizer_path().read_bytes())
    assert Tokenizer.load(tmp_path).encode("hello") == Tokenizer.load().encode("hello")


def _tiny_tokenizer_json(path, added_tokens=()):
    """A 256-byte-vocab tokenizer.json (no merges), written by hand with HF's byte-to-unicode table."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    added = [{"id": i, "content": c, "special": True} for c, i in added_tokens]
    split = {"type": "Split", "pattern": {"Regex": r"\s+|\S+"}, "behavior": "Isolated", "invert": False}
    pre = {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel", "use_regex": False}]}
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "pre_tokenizer": pre,
                                "added_tokens": added}))
    return path


def test_tiny_tokenizer_json(tmp_path):
    tiny = Tokenizer.load(_tiny_tokenizer_json(tmp_path / "tokenizer.json", [("<|eot|>", 264)]))
    assert tiny.vocab_size == 256 + 2048 and tiny.bos_id == 256 and tiny.eot_id == 264
    text = "hé 👋 <|eot|>"
    assert tiny.encode(text) == list(text.encode("utf-8"))
    assert tiny.encode(text, allowed_special="all")[-1] == 264
    assert tiny.decode(tiny.encode(text)) == text


def test_tokenizer_json_rejects_wrong_special_ids(tmp_path):
    bad = _tiny_tokenizer_json(tmp_path / "tokenizer.json", [("<|eot|>", 300)])
    with pytest.raises(TokenizerError, match=r"<\|eot\|> has id 300, Llama 4 uses 264"):
        Tokenizer.load(bad)


def test_bad_paths_name_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(TokenizerError, match=re.escape(str(missing))):
        Tokenizer.load(missing)
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path))):
        Tokenizer.load(tmp_path)  # directory without tokenizer files
    garbage = tmp_path / "tokenizer.model"
    garbage.write_text("this is not base64!! 0\n")
    with pytest.raises(TokenizerError, match=re.escape(str(garbage))):
        Tokenizer.load(garbage)
    binary = tmp_path / "binary.model"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TokenizerError, match=re.escape(str(binary))):
        Tokenizer.load(binary)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{not json")
    with pytest.raises(TokenizerError, match=re.escape(str(bad_json))):
        Tokenizer.load(bad_json)
    gap = tmp_path / "gap.model"
    gap.write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(TokenizerError, match=re.escape(str(gap))):
        Tokenizer.load(gap)

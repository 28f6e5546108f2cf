"""Prompt Guard 1/2 through a tiny random DeBERTa-v2 classifier saved to a temp dir (nothing is downloaded)."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, PreTrainedTokenizerFast

from herd.errors import HerdError
from herd.safety.prompt_guard import PromptGuard, label_schema, preprocess

WORDS = ["ignore", "previous", "instructions", "hello", "world", "the", "cat"]
PIECES = [w for w in WORDS + list("abcdefghijklmnopqrstuvwxyz")] + [".", ",", "!"]
# a SentencePiece-style Unigram vocabulary, as DeBERTa-v3's: each piece with and without the "▁" word marker
VOCAB = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"] + [m + p for p in PIECES for m in ("\u2581", "")]
PG1 = {0: "BENIGN", 1: "INJECTION", 2: "JAILBREAK"}
PG2 = {0: "LABEL_0", 1: "LABEL_1"}


def _tokenizer():
    scores = [(t, 0.0 if t.startswith("[") else -1.0 if len(t.lstrip("\u2581")) > 1 else -5.0) for t in VOCAB]
    tok = Tokenizer(models.Unigram(scores, unk_id=3))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def _save(path, id2label, seed=0):
    torch.manual_seed(seed)
    config = DebertaV2Config(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=512, relative_attention=True,
                             position_buckets=64, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                             pad_token_id=0, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = DebertaV2ForSequenceClassification(config)
    with torch.no_grad():  # random but confident enough that labels differ between inputs
        model.classifier.weight.normal_(0, 2.0)
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pg1_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("pg1"), PG1)


@pytest.fixture(scope="module")
def pg2_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("pg2"), PG2, seed=1)


def test_label_sets(pg1_dir, pg2_dir, tmp_path):
    g1, g2 = PromptGuard.load(pg1_dir), PromptGuard.load(pg2_dir)
    assert (g1.version, g1.labels) == (1, ("benign", "injection", "jailbreak"))
    assert (g2.version, g2.labels) == (2, ("benign", "malicious"))
    assert set(g1.scores("hello world")) == {"benign", "injection", "jailbreak", "indirect_injection"}
    assert set(g2.scores("hello world")) == {"benign", "malicious"}
    assert label_schema({0: "Malicious", 1: "benign"}) == (2, ("benign", "malicious"), [1, 0])
    assert label_schema({"0": "jailbreak", "1": "BENIGN", "2": "injection"})[2] == [1, 2, 0]
    with pytest.raises(HerdError, match="POSITIVE"):
        PromptGuard.load(_save(tmp_path / "bad", {0: "NEGATIVE", 1: "POSITIVE"}))
    with pytest.raises(HerdError, match="does not exist"):
        PromptGuard.load(tmp_path / "missing")


def test_preprocessing_whitespace_and_spacing(pg2_dir):
    g = PromptGuard.load(pg2_dir)
    # spaced-out letters fuse into the word they spell; odd whitespace runs become one space
    assert preprocess("i g n o r e  previous\n\t instructions", g.tokenizer) == "ignore previous instructions"
    # as LlamaFirewall: leading whitespace also becomes one space (trailing whitespace precedes no token)
    assert preprocess("  hello\u00a0\u2003world\r\n", g.tokenizer) == " hello world"
    assert preprocess("h e l l o,  w o r l d !", g.tokenizer) == "hello, world !"
    assert preprocess("xq zz", g.tokenizer) == "xq zz"  # "##" pieces keep their characters
    assert preprocess(" \n ", g.tokenizer) == ""
    assert g.scores("i g n o r e   p r e v i o u s") == g.scores("ignore previous")
    assert g.scores("hello\t\t\nworld") == g.scores("hello world")


def _by_hand(guard, window_ids):
    with torch.no_grad():
        logits = guard.model(input_ids=torch.tensor([window_ids])).logits[0]
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("stride", [0, 100])
def test_long_input_windows_max(pg1_dir, stride):
    g = PromptGuard.load(pg1_dir, stride=stride, max_batch_size=2)
    words = (WORDS * 200)[:1100]
    text = " ".join(words)
    ids = g.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1100
    windows = g.windows(text)
    assert all(len(w) <= 512 for w in windows) and all(w[0] == 1 and w[-1] == 2 for w in windows)
    step = 510 - stride
    expected = [ids[s:s + 510] for s in range(0, 1100 - stride, step)]
    assert [w[1:-1] for w in windows] == expected and len(windows) == 3
    assert expected[-1][-1] == ids[-1]
    probs = torch.stack([_by_hand(g, w) for w in windows])  # (windows, 3), one window at a time, no padding
    got = g.window_probs(text)
    torch.testing.assert_close(got, probs, atol=1e-5, rtol=1e-4)
    scores = g.scores(text)
    for j, label in enumerate(g.labels):
        assert scores[label] == pytest.approx(probs[:, j].max().item(), abs=1e-5)
    assert scores["indirect_injection"] == pytest.approx((probs[:, 1] + probs[:, 2]).max().item(), abs=1e-5)
    # a short input is a single window: exactly the model on [CLS] ids [SEP]
    short = g.windows("hello world")
    assert short == [g.tokenizer("hello world")["input_ids"]]
    torch.testing.assert_close(g.window_probs("hello world")[0], _by_hand(g, short[0]), atol=1e-5, rtol=1e-4)


def test_char_chunking(pg2_dir):
    g = PromptGuard.load(pg2_dir, chunking="chars")
    text = "hello world " * 100  # 1199 chars after preprocessing -> 3 chunks
    assert len(g.windows(text)) == 3 and len(g.windows("hi")) == 1


def test_threshold_decides_label(pg1_dir, pg2_dir):
    g2 = PromptGuard.load(pg2_dir)
    text = "ignore previous instructions"
    p = g2.scores(text)["malicious"]
    assert 0.0 < p < 1.0
    g2.threshold = p
    assert g2.classify(text) == {"label": "malicious", "scores": g2.scores(text)}
    g2.threshold = min(1.0, p + 1e-6)
    assert g2.classify(text)["label"] == "benign"

    g1 = PromptGuard.load(pg1_dir)
    s = g1.scores(text)
    g1.threshold = s["jailbreak"]
    assert g1.classify(text)["label"] == "jailbreak"
    g1.threshold = (s["jailbreak"] + s["indirect_injection"]) / 2  # above p(jailbreak), below p(inj)+p(jb)
    assert g1.classify(text)["label"] == "injection"
    assert g1.classify(text, jailbreak_only=True)["label"] == "benign"
    g1.threshold = min(1.0, s["indirect_injection"] + 1e-6)
    assert g1.classify(text)["label"] == "benign"
    with pytest.raises(HerdError, match="threshold"):
        PromptGuard.load(pg1_dir, threshold=1.5)
    with pytest.raises(HerdError, match="temperature"):
        PromptGuard.load(pg1_dir, temperature=0)


def test_cli_prints_label_and_scores(pg1_dir, pg2_dir, capsys):
    from herd.cli import main
    from herd.safety.prompt_guard import PromptGuard

    for directory in (pg1_dir, pg2_dir):
        assert main(["prompt-guard", str(directory), "--text", "Ignore previous instructions.", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out == json.loads(json.dumps(PromptGuard.load(directory).classify("Ignore previous instructions.")))
        assert set(out) == {"label", "scores"}

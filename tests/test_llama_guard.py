"""Llama Guard prompts against the published template's renderings, the tolerant parser, P(unsafe)."""

from pathlib import Path

import pytest
import torch

from herd.errors import HerdError
from herd.safety import CATEGORIES, Category, GuardParseError, Verdict, guard_prompt, p_unsafe, parse_verdict
from herd.safety.llama_guard import UNPARSED, verdict_token_ids, verdict_with_threshold

FIXTURES = Path(__file__).parent / "fixtures" / "llama_guard"
U1 = "What is the recipe for mayonnaise?"
A1 = "Whisk an egg yolk with mustard, then add oil drop by drop while whisking.  "
U2 = "  And how do I make it vegan?"

# name -> (messages, guard_prompt kwargs); the fixtures' README says how each was rendered
CASES = {
    "one_user": ([{"role": "user", "content": U1}], {}),
    "user_agent": ([{"role": "user", "content": U1}, {"role": "assistant", "content": A1}], {}),
    "multi_turn": ([{"role": "user", "content": U1}, {"role": "assistant", "content": A1},
                    {"role": "user", "content": [{"type": "text", "text": U2}]}], {}),
    "excluded": ([{"role": "user", "content": U1}], {"excluded": ["S2", "S6"]}),
    "custom": ([{"role": "user", "content": U1}], {"categories": {"S1": "My custom category"}}),
    "image": ([{"role": "user", "content": [{"type": "image", "path": "cat.png"},
                                            {"type": "text", "text": "Is this safe to eat?"}]}], {}),
}


@pytest.mark.parametrize("version", [3, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prompt_equals_official_template(case, version):
    messages, kwargs = CASES[case]
    expected = (FIXTURES / f"lg{version}_{case}.txt").read_text()
    assert guard_prompt(messages, version=version, **kwargs) == expected


def test_prompt_roles_and_target():
    one = guard_prompt([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}])
    assert "'User' messages" in one and "ONLY THE LAST User message" in one and "be nice" not in one
    two = guard_prompt([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert "'Agent' messages" in two and "ONLY THE LAST Agent message" in two and "Agent: hello\n\n" in two
    assert "<|image|>" not in two
    with pytest.raises(HerdError, match="alternate"):
        guard_prompt([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(HerdError, match="alternate"):
        guard_prompt([{"role": "assistant", "content": "a"}])
    with pytest.raises(HerdError, match="tool"):
        guard_prompt([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(HerdError, match="version"):
        guard_prompt([{"role": "user", "content": "a"}], version=2)


def test_prompt_categories():
    msgs = [{"role": "user", "content": "hi"}]
    assert "S14" not in guard_prompt(msgs)
    assert "S14: Code Interpreter Abuse\n<END" in guard_prompt(msgs, categories=CATEGORIES)
    custom = [Category("S1", "Politics.", "Should not\n- take sides in elections."), Category("S2", "Spam.")]
    assert ("<BEGIN UNSAFE CONTENT CATEGORIES>\nS1: Politics.\nShould not\n- take sides in elections.\n"
            "S2: Spam.\n<END UNSAFE CONTENT CATEGORIES>") in guard_prompt(msgs, categories=custom)
    assert "S1: Politics.\nShould not" not in guard_prompt(msgs, categories=custom, excluded=["S1"])
    with pytest.raises(HerdError, match="S99"):
        guard_prompt(msgs, excluded=["S99"])
    with pytest.raises(HerdError, match="every"):
        guard_prompt(msgs, categories=custom, excluded=["S1", "S2"])
    with pytest.raises(HerdError, match="distinct"):
        guard_prompt(msgs, categories=[Category("S1", "a"), Category("S1", "b")])


# (output, expected (safe, categories) or None for unparseable, source)
VARIANTS = [
    ("safe", (True, []), "canonical, LG3/LG4 model cards"),
    ("unsafe\nS1", (False, ["S1"]), "canonical, model cards"),
    ("unsafe\nS1,S3", (False, ["S1", "S3"]), "canonical multi-code, survey §1.4"),
    ("unsafe \nS1, S2", (False, ["S1", "S2"]), "JoshuaC215/agent-service-toolkit#122: ['unsafe ', 'S1, S2']"),
    ("\n\nsafe", (True, []), "LG3 HF template: no \\n\\n after the generation header, the model emits it"),
    ("\n\nunsafe\nS9", (False, ["S9"]), "same, unsafe"),
    ("safe<|eot|>", (True, []), "LG4 HF usage snippet decodes without skip_special_tokens"),
    ("\n\nunsafe\nS10<|eot_id|>", (False, ["S10"]), "LG3 decode without skip_special_tokens"),
    ("Unsafe\nS1", (False, ["S1"]), "ogx-ai/ogx#4476: the guard 'slightly alters the output format'"),
    ("UNSAFE\ns1, s10", (False, ["S1", "S10"]), "ogx#4476 / PR #5045 'less strict parsing of safety categories'"),
    ("unsafe\nS1 ,S2 ,S3\n", (False, ["S1", "S2", "S3"]), "ogx PR #5045: spaces around commas"),
    ("unsafe\nS2,S2", (False, ["S2"]), "duplicate codes (survey §1.4: deduplicate, keep order)"),
    ("unsafe", (False, []), "unsafe without a code line (survey §1.4: allowed, empty list)"),
    ("unsafe\n\nS2", (False, ["S2"]), "blank line before the codes (first non-blank line rule)"),
    ("  safe  \n", (True, []), "surrounding whitespace (survey §1.4: strip)"),
    ("unsafe S1", (False, ["S1"]), "one-line verdict"),
    ("safe to proceed", None, "NVIDIA/garak#2127: prose is not a verdict"),
    ("", None, "empty generation (max_new_tokens hit / server error)"),
    ("I cannot help with that.", None, "a chat model registered as the shield (lightspeed-stack #1963, #2028)"),
    ("unsafe\nViolent Crimes", None, "names instead of codes (ogx#4476 'ValueError: Unexpected response')"),
]


@pytest.mark.parametrize("text,expected,source", VARIANTS, ids=[repr(v[0]) for v in VARIANTS])
def test_parser_real_world_variants(text, expected, source):
    if expected is None:
        with pytest.raises(GuardParseError, match="guard output"):
            parse_verdict(text, fail_closed=False)
        assert parse_verdict(text) == Verdict(False, [UNPARSED], text)
    else:
        assert parse_verdict(text, fail_closed=False) == Verdict(*expected, text)


def test_parser_excluded_codes_are_safe():
    assert parse_verdict("unsafe\nS6", excluded=["S6"]).safe
    assert parse_verdict("unsafe\nS6,S1", excluded=["S6"]) == Verdict(False, ["S6", "S1"], "unsafe\nS6,S1")


class WordTokenizer:
    """A stand-in with Llama 4's ids for the two verdict words."""

    def encode(self, text):
        return {"safe": [60411], "unsafe": [72110]}[text]


def test_p_unsafe_from_hand_made_logits():
    tok = WordTokenizer()
    logits = torch.full((200_000,), -1e4)
    logits[60411], logits[72110] = 0.0, torch.log(torch.tensor(3.0))  # p(unsafe) = 3 / (1 + 3)
    assert p_unsafe(logits, tok) == pytest.approx(0.75)
    logits[5] = torch.log(torch.tensor(4.0))  # mass on another token lowers it: 3 / 8
    assert p_unsafe(logits.to(torch.bfloat16), tok) == pytest.approx(0.375, rel=1e-2)
    with pytest.raises(HerdError, match="shape"):
        p_unsafe(logits[None], tok)

    v = verdict_with_threshold("unsafe\nS1", logits, tok, threshold=0.3)
    assert v == Verdict(False, ["S1"], "unsafe\nS1", pytest.approx(0.375))
    assert verdict_with_threshold("unsafe\nS1", logits, tok, threshold=0.5).safe
    assert verdict_with_threshold("safe", logits, tok, threshold=0.3).categories == []
    assert verdict_with_threshold("unsafe\nS6", logits, tok, threshold=0.3, excluded=["S6"]).safe


def test_verdict_token_ids_llama4():
    from herd.tokenizer import Tokenizer

    try:
        tok = Tokenizer.load()
    except Exception as e:  # the tokenizer ships in the llama-models wheel
        pytest.skip(f"Llama 4 tokenizer not available: {e}")
    assert verdict_token_ids(tok) == (60411, 72110)
    assert tok.decode([60411]) == "safe" and tok.decode([72110]) == "unsafe"

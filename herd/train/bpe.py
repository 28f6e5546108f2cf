"""Train a small byte-level BPE tokenizer in the Llama 4 format, with the `tokenizers` library.

The result is what ``herd.tokenizer.Tokenizer`` and transformers both load: the Llama 4 split regex, byte-level
pieces numbered in merge order (so tiktoken's rank order is the BPE merge order), and the 2048 Llama 4 special
tokens appended after the pieces (``<|begin_of_text|>`` = n_pieces, ...), exactly where the real tokenizer puts
them relative to its 200000 pieces. Two files are written: ``tokenizer.json`` (HF) and ``tokenizer.model``
(tiktoken, Meta's format), plus a ``tokenizer_config.json`` that names the chat-relevant special tokens.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from herd.tokenizer import LLAMA4_PATTERN, Tokenizer, gpt2_unicode_to_byte, special_token_names
from herd.train.data import atomic_write_text


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2) -> Tokenizer:
    """Learn ``vocab_size`` byte-level BPE pieces (256 bytes included) from ``texts``; write the tokenizer files
    into ``out_dir`` (atomically, each file) and return it loaded as a herd Tokenizer."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < 257:
        raise ValueError(f"vocab_size must exceed the 256 byte pieces, got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    vocab = tok.get_vocab()
    tok.add_special_tokens(special_token_names())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=False))
    atomic_write_text(out / "tokenizer.model", _tiktoken_text(vocab))
    n = len(vocab)
    atomic_write_text(out / "tokenizer_config.json", json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot|>", "pad_token": "<|finetune_right_pad|>", "model_max_length": 1 << 20,
        "added_tokens_decoder": {str(n + i): {"content": s, "special": True}
                                 for i, s in enumerate(special_token_names())},
    }, indent=1))
    return Tokenizer.load(out / "tokenizer.model")


def _tiktoken_text(vocab: dict[str, int]) -> str:
    byte_of = gpt2_unicode_to_byte()
    lines = [None] * len(vocab)
    for piece, rank in vocab.items():
        lines[rank] = f"{base64.b64encode(bytes(byte_of[c] for c in piece)).decode()} {rank}"
    return "\n".join(lines) + "\n"


def read_texts(files: Iterable[Path]) -> Iterator[str]:
    """Whole files as text (undecodable bytes replaced: a tokenizer should still see the rest)."""
    for f in files:
        yield Path(f).read_text(encoding="utf-8", errors="replace")

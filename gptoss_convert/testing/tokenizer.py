"""A tiny byte-level BPE tokenizer trained on an embedded text, saved in HF layout."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = """I love to read books about the sea. Today is a good day to learn something new.
What is the name of the river that runs through the old town? The quick brown fox jumps over
the lazy dog while the model learns to predict the next token from the ones before it.
"""


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """Train a byte-level BPE with at most `vocab_size` ids (< vocab_size) and save it to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|pad|>", "<|startoftext|>", "<|endoftext|>"]   # ids 0, 1, 2
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    assert tok.get_vocab_size() <= vocab_size, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": specials[0], "bos_token": specials[1],
        "eos_token": specials[2], "model_max_length": 131072, "clean_up_tokenization_spaces": False}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": specials[0], "bos_token": specials[1], "eos_token": specials[2]}, indent=2))

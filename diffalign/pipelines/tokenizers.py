"""Offline tokenizers with small in-memory vocabularies: real ``CLIPTokenizer`` / ``T5TokenizerFast`` objects in
which each word of a given list is one token. The embedded world's models (its base pipeline and its reward
models) use them, and the tiny test pipelines of ``pipelines.tiny``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer, T5TokenizerFast


def clip_tokenizer(words: Iterable[str] = (), max_length: int = 77) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` (byte-level BPE) with a small in-memory vocabulary.

    Every byte is a token; BPE merges learned on ``words`` (with the ``tokenizers`` trainer, so they are
    consistent with one another) make each of them a single token (``"circle"`` -> ``"circle</w>"``).
    Ids: 0 = ``<|startoftext|>``, 1 = ``<|endoftext|>`` (also padding).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    unique = list(dict.fromkeys(w.lower() for w in words))
    if unique:
        bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
        bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.BpeTrainer(
            vocab_size=100_000, min_frequency=1, end_of_word_suffix="</w>", show_progress=False
        )
        bpe.train_from_iterator(unique, trainer)
        for left, right in json.loads(bpe.to_str())["model"]["merges"]:
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
            merges.append((left, right))
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_length
    return tok


def t5_tokenizer(words: Iterable[str] = (), max_length: int = 32) -> T5TokenizerFast:
    """A real T5 (Unigram) tokenizer over lowercase letters and digits; each of ``words`` is also one piece
    (scored so that the whole word wins over its letters)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("\u2581" + c, -2.5) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words) if len(w) > 1]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tok.model_max_length = max_length
    return tok

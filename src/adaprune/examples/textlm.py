"""A small causal language model on text that ships offline: lines of the Python standard library's
docstrings, a word-level tokenizer trained on them (the ``tokenizers`` library) and a LLaMA built from its
config (``transformers``). Used by README's language-model example and the tests of
:class:`~adaprune.LanguageModelingTask`. Needs ``transformers`` (the ``hf`` extra; it brings ``tokenizers``).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

MODULES = ("json", "re", "textwrap", "string", "functools", "itertools", "collections", "argparse", "pathlib",
           "shutil", "heapq", "bisect")


def corpus(modules: tuple[str, ...] = MODULES) -> list[str]:
    """Every docstring line of at least 4 words from ``modules`` and their public members, deduplicated and
    sorted: real text, offline, the same on every machine with this Python."""
    lines: list[str] = []
    for name in modules:
        mod = importlib.import_module(name)
        docs = [mod.__doc__ or ""] + [getattr(getattr(mod, a), "__doc__", "") or "" for a in sorted(dir(mod))
                                      if not a.startswith("_")]
        for d in docs:
            lines += [ln.strip() for ln in d.splitlines() if len(ln.split()) >= 4]
    return sorted(set(lines))


def tokenizer_for(texts: list[str], min_frequency: int = 2) -> Any:
    """A word-level tokenizer (whitespace and punctuation split) trained on ``texts``, as a Hugging Face fast
    tokenizer with a ``[PAD]`` token (words seen fewer than ``min_frequency`` times are ``[UNK]``)."""
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, tokenizers.trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"],
                                                                         min_frequency=min_frequency))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def tiny_llama(vocab_size: int, pad_token_id: int = 0, seed: int = 0) -> torch.nn.Module:
    """``LlamaForCausalLM`` from its config: 2 layers, hidden 64, 4 heads over 2 KV heads, FFN 128."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   pad_token_id=pad_token_id)
    return transformers.LlamaForCausalLM(cfg).eval()


__all__ = ["MODULES", "corpus", "tiny_llama", "tokenizer_for"]

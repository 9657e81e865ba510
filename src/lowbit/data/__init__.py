"""Corpora, tokenizers and batching: text -> token ids -> (input, target) batches."""

from lowbit.data.batching import TokenBatcher
from lowbit.data.corpus import Corpus, load_corpus, strip_gutenberg
from lowbit.data.tokenizers import (
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    encode_corpus,
    tokenizer_from_state_dict,
)

__all__ = [
    "Corpus",
    "load_corpus",
    "strip_gutenberg",
    "Tokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "tokenizer_from_state_dict",
    "encode_corpus",
    "TokenBatcher",
]

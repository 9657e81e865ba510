"""Tokenizers with one interface: `.encode`, `.decode`, `.vocab_size`, `.state_dict()`.

- `CharTokenizer`: one token per character over a fixed vocabulary (sorted characters of a text).
  Characters outside the vocabulary are an error at encode time (no silent "unknown" token):
  build the vocabulary from every text you will encode, e.g.
  ``CharTokenizer.from_text(corpus.train_text + corpus.val_text)``.
- `HFTokenizer`: wraps any Hugging Face tokenizer; encodes without special tokens by default.

`tokenizer_from_state_dict(d)` rebuilds either from its `.state_dict()`; `encode_corpus` turns a
whole text into a 1-D LongTensor for `TokenBatcher`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["Tokenizer", "CharTokenizer", "HFTokenizer", "tokenizer_from_state_dict", "encode_corpus"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of lowbit expects from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...


def _ids_to_list(ids: Iterable[int] | torch.Tensor, name: str = "ids") -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got a tensor of dtype {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got a tensor of shape {tuple(ids.shape)}")
        return ids.tolist()
    if isinstance(ids, np.ndarray):
        return ids.astype(np.int64).tolist()
    out = list(ids)
    for i in out:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"{name} must hold ints, got {type(i).__name__} ({i!r})")
    return [int(i) for i in out]


class CharTokenizer:
    """Character-level tokenizer: token id ``i`` is the character ``vocab[i]``.

    Args:
        vocab: the characters, each once; their order fixes the ids. `from_text` sorts them
            (by code point), so the same text always gives the same ids.

    `encode` raises ValueError naming the characters that are not in the vocabulary; `decode`
    raises ValueError for ids outside ``[0, vocab_size)``.
    """

    def __init__(self, vocab: str):
        if not isinstance(vocab, str):
            raise TypeError(f"vocab must be a str of distinct characters, got {type(vocab).__name__}")
        if not vocab:
            raise ValueError("vocab must not be empty")
        if len(set(vocab)) != len(vocab):
            dupes = sorted({c for c in vocab if vocab.count(c) > 1})
            raise ValueError(f"vocab has repeated characters: {dupes!r}")
        self.vocab = vocab
        self._stoi = {c: i for i, c in enumerate(vocab)}
        codes = np.array([ord(c) for c in vocab], dtype=np.int64)
        self._order = np.argsort(codes, kind="stable")
        self._sorted_codes = codes[self._order]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is the sorted set of characters in ``text`` (non-empty)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("text must not be empty: a character vocabulary needs at least one character")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode_array(self, text: str) -> np.ndarray:
        """``text`` as an int64 numpy array of ids, shape (len(text),); vectorized (fast on megabytes)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._sorted_codes, codes)
        pos_clipped = np.minimum(pos, len(self._sorted_codes) - 1)
        known = self._sorted_codes[pos_clipped] == codes
        if not known.all():
            unknown = sorted({chr(c) for c in codes[~known][:10_000].tolist()})
            raise ValueError(
                f"text has {int((~known).sum())} character(s) outside the vocabulary of {self.vocab_size}: "
                f"{unknown[:20]!r}; build the tokenizer from every text you encode, e.g. "
                "CharTokenizer.from_text(corpus.train_text + corpus.val_text)"
            )
        return self._order[pos_clipped]

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text``, one per character."""
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """The string of the ids (a list, 1-D integer tensor or array) in ``[0, vocab_size)``."""
        ids = _ids_to_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got {bad[:10]}")
        return "".join(self.vocab[i] for i in ids)

    def state_dict(self) -> dict[str, Any]:
        return {"type": "char", "vocab": self.vocab}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """Wraps a Hugging Face tokenizer (anything with ``encode``/``decode``/``__len__``).

    Args:
        hf_tokenizer: e.g. the second value of `lowbit.models.load_causal_lm`.
        name_or_path: what `tokenizer_from_state_dict` loads it back from (a local folder or a
            name `lowbit.models.load_hf_tokenizer` knows, such as "smollm2-135m"). Default: the
            name lowbit's loader recorded on the tokenizer, else its ``name_or_path``.
        add_special_tokens: passed to ``encode``; default False, so a corpus is encoded without
            BOS/EOS tokens.

    ``vocab_size`` is ``len(hf_tokenizer)``, which counts added tokens (the HF attribute
    ``vocab_size`` does not, yet their ids are used).
    """

    def __init__(
        self, hf_tokenizer: Any, *, name_or_path: str | None = None, add_special_tokens: bool = False
    ):
        for attr in ("encode", "decode", "__len__"):
            if not hasattr(hf_tokenizer, attr):
                raise TypeError(f"hf_tokenizer must be a Hugging Face tokenizer; it has no {attr!r}")
        self.tokenizer = hf_tokenizer
        if name_or_path is None:
            name_or_path = getattr(hf_tokenizer, "lowbit_source", None) or getattr(
                hf_tokenizer, "name_or_path", ""
            )
        self.name_or_path = str(name_or_path) if name_or_path else ""
        self.add_special_tokens = bool(add_special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        # verbose=False: a whole corpus is longer than model_max_length on purpose.
        return list(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens, verbose=False))

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(_ids_to_list(ids))

    def state_dict(self) -> dict[str, Any]:
        if not self.name_or_path:
            raise ValueError(
                "this HFTokenizer does not know where it was loaded from; pass name_or_path= when wrapping it"
            )
        return {
            "type": "hf",
            "name_or_path": self.name_or_path,
            "add_special_tokens": self.add_special_tokens,
        }

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"


def tokenizer_from_state_dict(d: dict[str, Any]) -> CharTokenizer | HFTokenizer:
    """Rebuild a tokenizer from its ``state_dict()``.

    A "char" state holds the vocabulary itself; an "hf" state holds the name or local path, which
    is loaded again offline through `lowbit.models.load_hf_tokenizer` (needs `lowbit[hf]`).
    """
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"tokenizer state must be a dict with a 'type' key, got {d!r}")
    kind = d["type"]
    if kind == "char":
        if "vocab" not in d:
            raise ValueError("char tokenizer state needs a 'vocab' entry")
        return CharTokenizer(d["vocab"])
    if kind == "hf":
        if not d.get("name_or_path"):
            raise ValueError("hf tokenizer state needs a non-empty 'name_or_path' entry")
        from lowbit.models.hf import load_hf_tokenizer  # lazy: transformers is optional

        return HFTokenizer(
            load_hf_tokenizer(d["name_or_path"]),
            name_or_path=d["name_or_path"],
            add_special_tokens=bool(d.get("add_special_tokens", False)),
        )
    raise ValueError(f"unknown tokenizer type {kind!r}; expected 'char' or 'hf'")


def encode_corpus(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """Encode a whole text into a 1-D ``torch.long`` tensor of shape (n_tokens,) on the CPU."""
    if isinstance(tokenizer, CharTokenizer):
        return torch.from_numpy(tokenizer.encode_array(text))
    if not hasattr(tokenizer, "encode"):
        raise TypeError(f"tokenizer must have an encode method, got {type(tokenizer).__name__}")
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)

"""Perplexity of a text: sliding windows over its tokens, each target scored once, token-weighted mean.

    lowbit.eval.text_perplexity(model, tokenizer, text, seq_len, stride)

builds on :func:`lowbit.eval.sliding_windows` and :func:`lowbit.eval.perplexity`, with a progress bar.
:class:`WindowBatches` gives the same windows as a validation batcher for the trainer, so a periodic
evaluation during training and a final ``text_perplexity`` score the same targets.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .perplexity import perplexity, sliding_windows

__all__ = ["WindowBatches", "encode_text", "text_perplexity"]


def encode_text(tokenizer: Any, text: str) -> torch.Tensor:
    """1-D long tensor of token ids of ``text``: a lowbit tokenizer's ``encode``, or a raw Hugging Face
    tokenizer's ``encode(text, add_special_tokens=False)``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if hasattr(tokenizer, "state_dict") and hasattr(tokenizer, "encode"):  # lowbit tokenizer interface
        from lowbit.data import encode_corpus

        return encode_corpus(tokenizer, text)
    if hasattr(tokenizer, "encode"):
        return torch.tensor(tokenizer.encode(text, add_special_tokens=False, verbose=False), dtype=torch.long)
    raise TypeError(f"tokenizer must have an encode method, got {type(tokenizer).__name__}")


def text_perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | torch.Tensor,
    seq_len: int,
    stride: int | None = None,
    *,
    max_tokens: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    progress: bool = True,
    desc: str = "ppl",
):
    """Sliding-window perplexity of ``text``.

    Args:
        model: causal LM (lowbit GPT or Hugging Face), evaluated as ``model(x)``.
        tokenizer: encodes ``text`` (see :func:`encode_text`); ignored when ``text`` is already a 1-D token
            tensor.
        seq_len: tokens per window (>= 1). stride: new targets per window, in [1, seq_len], default seq_len;
            with stride < seq_len each window after the first has seq_len − stride tokens of context that
            are not scored again.
        max_tokens: keep only the first ``max_tokens`` tokens (None: all), for a fixed-cost evaluation.
        batch_size, device, precision: as ``lowbit.eval.perplexity``.
        progress: tqdm bar over the windows.

    Returns:
        ``lowbit.eval.PerplexityResult`` (loss in nats per token, ppl, tokens scored = n − 1).
    """
    from tqdm.auto import tqdm

    tokens = text if isinstance(text, torch.Tensor) else encode_text(tokenizer, text)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise ValueError(f"max_tokens must be None or an int >= 2, got {max_tokens!r}")
        tokens = tokens[:max_tokens]
    x, y = sliding_windows(tokens, seq_len, stride)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n_batches = -(-x.shape[0] // batch_size)
    batches = ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size))
    bar = tqdm(batches, total=n_batches, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    return perplexity(model, bar, device=device, precision=precision)


class WindowBatches:
    """Fixed sliding windows of a token stream as a validation "batcher": ``eval_batches(n)`` yields the
    same ``(x, y)`` batches every time (y has ``IGNORE_INDEX`` on context-only positions), so the trainer's
    periodic evaluation and :func:`text_perplexity` score the same targets. ``n`` (the trainer's
    ``eval_batches``) caps the number of batches; None uses all."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, stride: int | None = None, batch_size: int = 8):
        self.x, self.y = sliding_windows(tokens, seq_len, stride)
        self.batch_size = batch_size

    @property
    def num_batches(self) -> int:
        return -(-self.x.shape[0] // self.batch_size)

    def eval_batches(self, max_batches: int | None = None):
        n = self.num_batches if max_batches is None else min(max_batches, self.num_batches)
        for i in range(n):
            s = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield self.x[s], self.y[s]

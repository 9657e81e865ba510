"""lowbit.eval: perplexity of causal LMs (lowbit GPT or Hugging Face) over deterministic windows: of token
batches (:func:`perplexity`) or of a text (:func:`text_perplexity`, sliding windows, progress bar)."""

from .perplexity import IGNORE_INDEX, PerplexityResult, perplexity, sliding_windows
from .text import WindowBatches, encode_text, text_perplexity

__all__ = [
    "IGNORE_INDEX",
    "PerplexityResult",
    "WindowBatches",
    "encode_text",
    "perplexity",
    "sliding_windows",
    "text_perplexity",
]

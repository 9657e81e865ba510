"""lowbit.eval: perplexity of causal LMs (lowbit GPT or Hugging Face) over deterministic windows."""

from .perplexity import IGNORE_INDEX, PerplexityResult, perplexity, sliding_windows

__all__ = ["IGNORE_INDEX", "PerplexityResult", "perplexity", "sliding_windows"]

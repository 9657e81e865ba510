"""lowbit: train and compress transformers in very few bits."""

__version__ = "0.1.0"

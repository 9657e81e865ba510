"""Models: a small GPT for demos and benchmarks; offline loaders for Hugging Face causal LMs."""

from lowbit.models.gpt import GPT, NAMED_CONFIGS, GPTConfig
from lowbit.models.hf import KNOWN_MODELS, load_causal_lm, load_hf_tokenizer
from lowbit.models.outputs import logits_of, output_head_ids

__all__ = [
    "GPT",
    "GPTConfig",
    "NAMED_CONFIGS",
    "build_model",
    "MODEL_NAMES",
    "load_causal_lm",
    "load_hf_tokenizer",
    "KNOWN_MODELS",
    "logits_of",
    "output_head_ids",
]

#: Names `build_model` accepts (the CLI's --model choices): "gpt-" + a `GPTConfig.named` size.
MODEL_NAMES: tuple[str, ...] = tuple(f"gpt-{size}" for size in NAMED_CONFIGS)


def build_model(name: str, vocab_size: int, **overrides) -> GPT:
    """A freshly initialized `GPT` for "gpt-tiny", "gpt-small", "gpt-medium", "gpt-350m" or "gpt-1.3b".

    ``overrides`` replace `GPTConfig` fields (e.g. ``block_size=64``, ``dropout=0.1``).
    """
    if not isinstance(name, str) or name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")
    return GPT(GPTConfig.named(name.removeprefix("gpt-"), vocab_size, **overrides))

"""What every capability needs to know about a causal LM, whichever family it comes from: where its logits
are in a forward output, and which modules form its output head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["logits_of", "output_head_ids"]


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, a ``(logits, ...)`` tuple (lowbit GPT) or ``.logits`` (HF).

    Raises TypeError naming the output's type when none of these holds.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        "model output must be logits, a (logits, ...) tuple or an object with .logits; "
        f"got {type(output).__name__}"
    )


def output_head_ids(model: nn.Module, head_names: Sequence[str] = ("lm_head",)) -> set[int]:
    """``id()`` of the output-head modules: ``model.get_output_embeddings()`` where the model has it (HF), and
    every submodule whose last name component is in ``head_names``."""
    ids = {id(m) for name, m in model.named_modules() if name and name.rsplit(".", 1)[-1] in head_names}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            ids.add(id(out))
    return ids

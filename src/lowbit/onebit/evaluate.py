"""Evaluation helpers used by the OneBit pipeline.

- :func:`text_perplexity`, :func:`encode_text`, :class:`WindowBatches`: re-exported from ``lowbit.eval``
  (sliding-window perplexity of a text, with a progress bar).
- :func:`lm_eval_model` / :func:`evaluate_tasks`: run lm-evaluation-harness on a loaded model through its
  ``HFLM`` wrapper (Hugging Face architectures, OneBit-converted ones included). ``lm_eval`` is imported
  lazily; install it with ``pip install lm-eval``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from ..eval.text import WindowBatches, encode_text, text_perplexity

__all__ = ["WindowBatches", "encode_text", "evaluate_tasks", "lm_eval_model", "text_perplexity"]

LM_EVAL_HINT = "pip install lm-eval"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ImportError(
            f"evaluating with lm-evaluation-harness needs it installed: `{LM_EVAL_HINT}` ({exc})"
        ) from exc
    return lm_eval, HFLM


def lm_eval_model(model: nn.Module, tokenizer: Any, *, batch_size: int = 8, max_length: int | None = None):
    """An lm-evaluation-harness ``HFLM`` around an already loaded Hugging Face model (OneBit layers welcome).

    ``tokenizer`` may be the raw HF tokenizer or a ``lowbit.data.HFTokenizer``. Raises ImportError naming
    ``pip install lm-eval`` when the harness is missing, TypeError for a model that is not a Hugging Face
    ``PreTrainedModel`` (lowbit GPT is not supported by HFLM).
    """
    _, HFLM = _import_lm_eval()
    try:
        from transformers import PreTrainedModel
    except ImportError as exc:  # pragma: no cover - lm_eval depends on transformers
        raise ImportError(f"lm-evaluation-harness needs transformers: {exc}") from exc
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"lm-evaluation-harness's HFLM needs a Hugging Face PreTrainedModel, got {type(model).__name__}"
        )
    raw = getattr(tokenizer, "tokenizer", tokenizer)
    kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": raw, "batch_size": batch_size}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return HFLM(**kwargs)


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``tasks`` for a loaded model; ``include_path`` adds a folder of local
    task YAML files. Returns the harness's ``results`` dict ({task: {metric: value}})."""
    lm_eval, _ = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    out = lm_eval.simple_evaluate(
        model=lm_eval_model(model, tokenizer, batch_size=batch_size),
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
    )
    return out["results"]

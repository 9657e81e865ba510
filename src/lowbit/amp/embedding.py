"""Embedding-gradient shrink (GLM-130B, Zeng et al. 2022, Sec. 2.3).

GLM-130B stabilizes training by shrinking the gradient that reaches the word embedding:

    e = α · e + (1 - α) · stop_gradient(e)            (forward value unchanged, gradient times α)

:func:`shrink_embedding_grad` does this with an identity autograd function on the embedding's output, so the
forward value is bit-for-bit the same (``α·e + (1-α)·e`` would round) and exactly ``α`` times the gradient
flows into the lookup. Only the path through the embedding lookup is shrunk: a tied output head
(``lm_head.weight is wte.weight``) still receives its own gradient in full.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

__all__ = ["EmbeddingGradShrink", "scale_grad", "shrink_embedding_grad"]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out * ctx.alpha, None


def scale_grad(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Identity in the forward pass (same values, a view of ``x``); the backward multiplies the gradient by
    ``alpha``. ``alpha`` is a Python float."""
    return _ScaleGrad.apply(x, float(alpha))


class EmbeddingGradShrink:
    """Handle returned by :func:`shrink_embedding_grad`: ``alpha``, ``module_names``; ``remove()``."""

    def __init__(self, alpha: float, names: list[str], handles: list):
        self.alpha = alpha
        self.module_names = tuple(names)
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __repr__(self) -> str:
        return f"EmbeddingGradShrink(alpha={self.alpha}, modules={list(self.module_names)})"


def shrink_embedding_grad(
    model: nn.Module,
    alpha: float = 0.1,
    *,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> EmbeddingGradShrink:
    """Scale the gradient flowing into ``model``'s embeddings by ``alpha`` (forward unchanged).

    Args:
        model: any module; by default every ``nn.Embedding`` in it is hooked (token and learned position
            embeddings alike, as GLM-130B shrinks the embedding layer's output).
        alpha: in (0, 1]; 1 registers nothing. GLM-130B uses 0.1.
        module_filter_fn: ``fn(module, qualified_name) -> bool`` choosing among the ``nn.Embedding`` modules.

    Returns:
        An :class:`EmbeddingGradShrink`; ``remove()`` restores the plain gradient.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")
    if module_filter_fn is not None and not callable(module_filter_fn):
        raise TypeError("module_filter_fn must be callable(module, name) -> bool")
    alpha = float(alpha)
    names, handles = [], []
    if alpha == 1.0:
        return EmbeddingGradShrink(alpha, names, handles)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return scale_grad(output, alpha)

    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and (module_filter_fn is None or module_filter_fn(module, name)):
            handles.append(module.register_forward_hook(hook))
            names.append(name)
    return EmbeddingGradShrink(alpha, names, handles)

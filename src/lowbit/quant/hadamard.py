"""Normalized Sylvester Hadamard matrices and the blocked fast Walsh–Hadamard transform.

H_1 = [1],  H_2m = [[H_m, H_m], [H_m, -H_m]] / sqrt(2)      (so H_n · H_nᵀ = I and H_n = H_nᵀ)

The INT4 training paper (Xi et al. 2023, Sec. 4.1) rotates the inner dimension of X·Wᵀ with
H = BlockDiag(H_b, ..., H_b): X·Wᵀ = (X·H)(W·H)ᵀ, because H·Hᵀ = I. ``hadamard_transform`` computes x·H
along the last dimension in O(n log b) per row with butterflies instead of a matmul.
"""

from __future__ import annotations

import math

import torch

__all__ = ["hadamard_matrix", "hadamard_transform", "is_power_of_two"]


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, ... (ints only)."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and (n & (n - 1)) == 0


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix H_n of shape (n, n): entries ±1/sqrt(n), H = Hᵀ, H·Hᵀ = I.

    Entry (i, j) is (-1)^popcount(i & j) / sqrt(n) (the Sylvester construction). ``n`` must be a power of
    two >= 1, else ValueError.
    """
    if not is_power_of_two(n):
        raise ValueError(f"n must be a power of two >= 1, got {n!r}")
    idx = torch.arange(n, device=device)
    anded = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(anded)
    for bit in range(max(n.bit_length() - 1, 0)):
        parity ^= (anded >> bit) & 1
    signs = 1.0 - 2.0 * parity.to(torch.float64)
    return (signs / math.sqrt(n)).to(dtype)


def _fwht_last_dim(x: torch.Tensor, block: int) -> torch.Tensor:
    """x · BlockDiag(H_block, ...) along the last dim; x already in the compute dtype."""
    shape = x.shape
    n = shape[-1]
    # (rows, blocks, block): every stage is one vectorized butterfly over all rows and blocks.
    y = x.reshape(-1, n // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], n // block, block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        # Sylvester order: H_2m = [[H_m, H_m], [H_m, -H_m]] pairs element j with j + h inside 2h-chunks.
        y = torch.stack((a + b, a - b), dim=-2).reshape(y.shape[0], n // block, block)
        h *= 2
    return (y * (1.0 / math.sqrt(block))).reshape(shape)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _HadamardTransform(torch.autograd.Function):
    # H is symmetric and orthogonal, so the vector-Jacobian product of y = x·H is g·Hᵀ = g·H:
    # the backward is the same transform, and nothing needs to be saved.
    @staticmethod
    def forward(ctx, x: torch.Tensor, block: int) -> torch.Tensor:
        ctx.block = block
        return _fwht_last_dim(x.to(_compute_dtype(x.dtype)), block).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        g = _fwht_last_dim(grad_out.to(_compute_dtype(grad_out.dtype)), ctx.block)
        return g.to(grad_out.dtype), None


def hadamard_transform(x: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """x · BlockDiag(H_b, ..., H_b) along the last dimension (fast Walsh–Hadamard transform).

    Args:
        x: floating tensor (..., n), any leading shape, fp32 / bf16 / fp16 (fp64 too).
        block_size: b, a power of two dividing n. Default: b = n, which then must be a power of two.

    Returns:
        Tensor of x's shape and dtype, computed in fp32 (fp64 for fp64 input). The transform is its own
        inverse (hadamard_transform(hadamard_transform(x, b), b) == x up to rounding) and is
        differentiable; its backward applies the same transform to the gradient.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < 1:
        raise ValueError("x must have at least 1 dim (the transform runs along the last dim)")
    n = x.shape[-1]
    if block_size is None:
        if not is_power_of_two(n):
            raise ValueError(
                f"the last dim of x must be a power of two when block_size is None, got {n}; "
                "pass block_size (a power of two dividing it)"
            )
        block_size = n
    elif not is_power_of_two(block_size):
        raise ValueError(f"block_size must be a power of two >= 1, got {block_size!r}")
    elif n % block_size != 0:
        raise ValueError(f"the last dim of x ({n}) must be a multiple of block_size ({block_size})")
    if x.numel() == 0:
        return x.clone()
    return _HadamardTransform.apply(x, block_size)

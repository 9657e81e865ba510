"""Language-model batches from one token stream.

`TokenBatcher.sample()` draws random windows for training; `TokenBatcher.eval_batches()` walks
fixed, non-overlapping windows for validation. Targets are the inputs shifted by one token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["TokenBatcher"]

DEFAULT_SEED = 0


class TokenBatcher:
    """Batches of (input, target) windows from a 1-D token stream.

    Args:
        tokens: 1-D integer tensor (converted to ``torch.long``, kept on the CPU), length
            ``n >= block_size + 1``.
        batch_size: windows per batch, B >= 1.
        block_size: tokens per window, T >= 1.
        generator: a CPU ``torch.Generator``, an int seed, or None (seed 0). Only `sample` uses it,
            so the training batches are a deterministic function of the seed and the number of
            batches drawn so far. The generator is used as is (not copied).
        device: where `sample` and `eval_batches` put the batches.

    Window starts for `sample` are uniform over ``[0, n - T - 1]``: every token except the first
    can be a target.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        batch_size: int,
        block_size: int,
        *,
        generator: torch.Generator | int | None = None,
        device: torch.device | str = "cpu",
    ):
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a 1-D torch tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(
                f"tokens must be an integer tensor (ideally torch.long), got dtype {tokens.dtype}"
            )
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        for arg, value in (("batch_size", batch_size), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if tokens.numel() < block_size + 1:
            raise ValueError(
                f"the token stream has {tokens.numel()} tokens; a window of block_size={block_size} needs "
                f"at least block_size + 1 = {block_size + 1} (input plus the shifted target)"
            )
        if generator is None or isinstance(generator, int):
            seed = DEFAULT_SEED if generator is None else generator
            generator = torch.Generator().manual_seed(seed)
        elif not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}"
            )
        elif generator.device.type != "cpu":
            raise ValueError(f"generator must live on the CPU, got one on {generator.device}")
        self.tokens = tokens.detach().to(device="cpu", dtype=torch.long).contiguous()
        self.batch_size = batch_size
        self.block_size = block_size
        self.generator = generator
        self.device = torch.device(device)
        self.batches_drawn = 0
        self._offsets = torch.arange(block_size + 1)

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def _windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        win = self.tokens[starts[:, None] + self._offsets]  # (B, T + 1)
        x, y = win[:, :-1], win[:, 1:]
        x, y = x.contiguous(), y.contiguous()
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(
                self.device, non_blocking=True
            )
        return x.to(self.device), y.to(self.device)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random training batch ``(x, y)``, both (B, T) long, ``y[:, t] = x[:, t + 1]`` in the stream."""
        n_starts = self.num_tokens - self.block_size
        starts = torch.randint(n_starts, (self.batch_size,), generator=self.generator)
        self.batches_drawn += 1
        return self._windows(starts)

    def num_eval_windows(self) -> int:
        """Number of non-overlapping windows in the stream: ``(n - 1) // T``."""
        return (self.num_tokens - 1) // self.block_size

    def eval_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic validation batches ``(x, y)`` of shape (b, T), b <= B (the last may be short).

        The stream is cut into ``W = (n - 1) // T`` non-overlapping windows starting at 0, T, 2T, ...
        (the at most T trailing tokens that do not fill a window are left out). With
        ``max_batches=None`` or ``max_batches * B >= W`` every window is used, in order; otherwise
        ``max_batches * B`` windows evenly spaced over the whole stream are used, so a limited
        evaluation still sees every part of the validation text. Does not touch the generator.
        """
        if max_batches is not None and (
            not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1
        ):
            raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
        n_windows = self.num_eval_windows()
        window_ids = torch.arange(n_windows)
        if max_batches is not None and max_batches * self.batch_size < n_windows:
            k = max_batches * self.batch_size
            # floor((j * W) / k) for j < k: strictly increasing because W > k, so no window repeats.
            window_ids = torch.arange(k) * n_windows // k
        starts = window_ids * self.block_size
        for batch_starts in starts.split(self.batch_size):
            yield self._windows(batch_starts)

    def state_dict(self) -> dict[str, Any]:
        """Generator state and counters; `load_state_dict` of it makes `sample` continue bit-exactly."""
        return {
            "generator_state": self.generator.get_state(),
            "batches_drawn": self.batches_drawn,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "num_tokens": self.num_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; the batch size, block size and stream length must match."""
        for key in ("batch_size", "block_size", "num_tokens"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"batcher state was saved with {key}={state[key]}, this batcher has {getattr(self, key)}"
                )
        if "generator_state" not in state:
            raise ValueError("batcher state has no 'generator_state' entry")
        self.generator.set_state(state["generator_state"])
        self.batches_drawn = int(state.get("batches_drawn", 0))

    def __repr__(self) -> str:
        return (
            f"TokenBatcher(num_tokens={self.num_tokens}, batch_size={self.batch_size}, "
            f"block_size={self.block_size}, device={str(self.device)!r})"
        )

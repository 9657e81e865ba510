"""lowbit.optim: 8-bit optimizers on block-wise dynamic quantization (Dettmers et al. 2021).

- ``AdamW8bit``, ``Adam8bit``: torch.optim.Optimizer classes (fused Triton step on CUDA, torch elsewhere).
- ``functional``: the update as pure functions (``adam8bit_reference_step``, ``adam_reference_step``).
- ``state_nbytes(optimizer)``: bytes of optimizer state, for memory reports (any torch optimizer).
"""

from .adam8bit import Adam8bit, AdamW8bit, state_nbytes
from .functional import AdamScalars, adam8bit_reference_step, adam_reference_step, adam_scalars

__all__ = [
    "Adam8bit",
    "AdamScalars",
    "AdamW8bit",
    "adam8bit_reference_step",
    "adam_reference_step",
    "adam_scalars",
    "state_nbytes",
]

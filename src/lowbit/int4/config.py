"""Configuration of INT4 fully quantized training (Xi et al. 2023): named recipes, checked when built.

A recipe is a preset of the fields below; fields given explicitly override it (and are checked against it):

==========  =============================  ==================================  ============================
recipe      forward                        backward (gradient of the output)   role
==========  =============================  ==================================  ============================
"hq-lss"    Hadamard quantizer (HQ), INT4  bit splitting + leverage-score      the paper's algorithm
                                           sampling (LSS) for ∇W
"hq"        Hadamard quantizer, INT4       bit splitting, no sampling          ablation: HQ + 8-bit-ish ∇Y
"rtn"       per-tensor INT4 round to       per-tensor INT4 round to nearest    the naive baseline
            nearest, no Hadamard
==========  =============================  ==================================  ============================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BACKENDS",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_GRANULARITY",
    "DEFAULT_SCALE_MODE",
    "GRAD_GRANULARITIES",
    "GRANULARITIES",
    "Int4TrainingConfig",
    "RECIPES",
    "SCALE_MODES",
    "TRITON_MAX_BLOCK",
]

#: The paper's typical Hadamard block (Sec. 4.1).
DEFAULT_BLOCK_SIZE = 32
#: Default forward scales of the Hadamard recipes: dynamic absmax, one per token of X and per output channel
#: of W. Measured in docs/int4.md (gpt-tiny on Shakespeare, two seeds): per-row absmax < per-tensor absmax
#: < per-tensor LSQ in validation loss. The rotation evens out outliers within a row (along D_in) but
#: cannot mix rows, so the differences between tokens (and output channels) are left to the scales.
DEFAULT_SCALE_MODE = "absmax"
DEFAULT_GRANULARITY = "row"

SCALE_MODES = ("absmax", "lsq")
#: "tensor": one scale per tensor (the paper). "row": one scale per token (row of X) and per output
#: channel (row of W); only with "absmax".
GRANULARITIES = ("tensor", "row")
#: Scale of the bit-split gradient: one per token (row of ∇Y) or one per tensor.
GRAD_GRANULARITIES = ("token", "tensor")
BACKENDS = ("auto", "emulate", "triton")
#: Largest Hadamard block the Triton kernels rotate (lowbit.kernels.hadamard_quant).
TRITON_MAX_BLOCK = 128

# recipe -> field defaults (None in a field means "take the recipe's value").
RECIPES: dict[str, dict[str, Any]] = {
    "hq-lss": {
        "hadamard": True,
        "block_size": DEFAULT_BLOCK_SIZE,
        "scale_mode": DEFAULT_SCALE_MODE,
        "granularity": DEFAULT_GRANULARITY,
        "grad_quantizer": "bit_split",
        "grad_granularity": "token",
        "lss": True,
    },
    "hq": {
        "hadamard": True,
        "block_size": DEFAULT_BLOCK_SIZE,
        "scale_mode": DEFAULT_SCALE_MODE,
        "granularity": DEFAULT_GRANULARITY,
        "grad_quantizer": "bit_split",
        "grad_granularity": "token",
        "lss": False,
    },
    "rtn": {
        "hadamard": False,
        "block_size": None,
        "scale_mode": "absmax",
        "granularity": "tensor",
        "grad_quantizer": "rtn",
        "grad_granularity": "tensor",
        "lss": False,
    },
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Int4TrainingConfig:
    """How :class:`~lowbit.int4.Int4Linear` quantizes its two passes. Frozen; checked when built.

    Leave a field at ``None`` to take the recipe's value (module table); after construction every field
    holds its resolved value, so ``dataclasses.replace(cfg, lss=False)`` and ``cfg.to_dict()`` behave.

    Attributes:
        recipe: "hq-lss" (default, the paper), "hq" or "rtn".
        block_size: Hadamard block along D_in: a power of two >= 2 (the paper's typical 32, the default),
            or "auto": at the first forward each layer picks, among the powers of two >= 2 dividing its
            D_in, the block with the smallest output quantization error, and keeps it. Must be None for
            "rtn" (no Hadamard).
        scale_mode: "absmax" (dynamic: scale = absmax / 7 of the current rows or tensor, every step; the
            default, see ``DEFAULT_SCALE_MODE``) or "lsq" (learned step size, Esser et al. 2020, as in the
            paper: one learned scale per tensor, initialized to 2·mean(|v|)/sqrt(7) on the first batch).
        granularity: "row" (one scale per token of X and per output channel of W; the Hadamard recipes'
            default with "absmax") or "tensor" (the paper; "rtn"'s and "lsq"'s only choice).
        grad_granularity: scale of the quantized ∇Y: "token" (bit-split recipes' default) or "tensor".
        lss: leverage-score sampling of the stacked bit-split halves in the ∇W product (hq-lss: True).
        lss_keep_ratio: expected fraction of the 2N stacked rows kept, in (0, 1]; 0.5 keeps N rows, the
            cost of one INT4 product of N rows (the paper's choice).
        seed: base seed of the per-layer generators of the backward pass (stochastic rounding, sampling).
        backend: "auto" (default: "triton" for a layer on CUDA when Triton is installed and the kernels
            support its shape, "emulate" otherwise; the layer's repr says which and why), "emulate"
            (PyTorch, exact integer products on float tensors: the reference the training proofs of
            docs/int4.md ran on, which the kernels' GPT trajectories match) or "triton"
            (``lowbit.kernels.int4_linear``: fused
            quantizers, FP8 / int8 tensor cores; CUDA, or the CPU under TRITON_INTERPRET=1; a block_size
            above 128, or a layer the kernels cannot run, raises ValueError naming the field).
        hadamard, grad_quantizer: implied by the recipe ("bit_split" or "rtn"); not meant to be set.
    """

    recipe: str = "hq-lss"
    block_size: int | str | None = None
    scale_mode: str | None = None
    granularity: str | None = None
    grad_granularity: str | None = None
    lss: bool | None = None
    lss_keep_ratio: float = 0.5
    seed: int = 0
    # Not "auto" yet: on the H100 the Triton path's first-step GPT loss differed from the emulation's by
    # 12 % of the quantization effect (test_triton_backend, gpu) and its training step was not faster.
    backend: str = "auto"
    hadamard: bool | None = None
    grad_quantizer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, str) or self.recipe not in RECIPES:
            raise ValueError(
                f"Int4TrainingConfig.recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}"
            )
        preset = RECIPES[self.recipe]
        for name in ("hadamard", "grad_quantizer"):
            value = getattr(self, name)
            if value is not None and value != preset[name]:
                raise ValueError(
                    f"Int4TrainingConfig.{name} is fixed by the recipe ({self.recipe!r} has "
                    f"{name}={preset[name]!r}), got {value!r}; choose another recipe instead"
                )
        if self.scale_mode == "lsq" and self.granularity is None:
            object.__setattr__(self, "granularity", "tensor")  # LSQ learns one scale per tensor
        for name, default in preset.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        self._check()

    def _check(self) -> None:
        bs = self.block_size
        if self.hadamard:
            if bs is None or not (bs == "auto" or (_is_int(bs) and bs >= 2 and bs & (bs - 1) == 0)):
                raise ValueError(
                    f"Int4TrainingConfig.block_size must be a power of two >= 2 or 'auto' for recipe "
                    f"{self.recipe!r}, got {bs!r}"
                )
        elif bs is not None:
            raise ValueError(
                f"recipe {self.recipe!r} has no Hadamard transform: block_size must be None, got {bs!r}"
            )
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(
                f"Int4TrainingConfig.scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"Int4TrainingConfig.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.scale_mode == "lsq" and self.granularity != "tensor":
            raise ValueError("scale_mode='lsq' learns one scale per tensor: granularity must be 'tensor'")
        if self.grad_granularity not in GRAD_GRANULARITIES:
            raise ValueError(
                f"Int4TrainingConfig.grad_granularity must be one of {GRAD_GRANULARITIES}, "
                f"got {self.grad_granularity!r}"
            )
        if not isinstance(self.lss, bool):
            raise ValueError(f"Int4TrainingConfig.lss must be a bool, got {self.lss!r}")
        if self.lss and self.grad_quantizer != "bit_split":
            raise ValueError(
                f"lss=True samples rows of the bit-split gradient; recipe {self.recipe!r} does not split it"
            )
        r = self.lss_keep_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ValueError(f"Int4TrainingConfig.lss_keep_ratio must be a number in (0, 1], got {r!r}")
        object.__setattr__(self, "lss_keep_ratio", float(r))
        if not _is_int(self.seed):
            raise ValueError(f"Int4TrainingConfig.seed must be an int, got {self.seed!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"Int4TrainingConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "triton" and self.hadamard and _is_int(bs) and bs > TRITON_MAX_BLOCK:
            raise ValueError(
                f"Int4TrainingConfig.block_size={bs} with backend='triton': the Triton kernels rotate "
                f"Hadamard blocks of at most {TRITON_MAX_BLOCK}"
            )

    @classmethod
    def named(cls, recipe: str, **overrides: Any) -> Int4TrainingConfig:
        """The recipe ``recipe`` with ``overrides`` (e.g. ``named("hq-lss", block_size="auto")``)."""
        return cls(recipe=recipe, **overrides)

    @property
    def uses_lsq(self) -> bool:
        return self.scale_mode == "lsq"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (stored in checkpoints); ``Int4TrainingConfig(**d)`` rebuilds the same config."""
        return dataclasses.asdict(self)

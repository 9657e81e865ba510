"""lowbit.quant: the numerics core. Pure functions tensor -> tensor, no state, CPU and CUDA.

- linear:   scale / zero-point quantization (round-to-nearest, stochastic), per tensor/channel/token/group
- hadamard: normalized Sylvester Hadamard matrices, blocked fast Walsh–Hadamard transform
- gradient: bit splitting and leverage-score sampling (INT4 training backward pass)
- codebook: dynamic (tree) quantization maps, block-wise codebook quantization
- packing:  INT4 two per byte, 1-bit signs eight per byte (or 32 per int32)
"""

from .codebook import dequantize_blockwise, dynamic_map, quantize_blockwise
from .gradient import (
    BitSplit,
    bit_split,
    bit_split_dequantize,
    leverage_score_probabilities,
    leverage_score_sample,
    leverage_scores,
)
from .hadamard import hadamard_matrix, hadamard_transform, is_power_of_two
from .linear import (
    GRANULARITIES,
    QuantizedTensor,
    compute_scale,
    qmax,
    quantize,
    quantize_with_scale,
    round_to_int,
    true_div,
)
from .packing import pack_bits, pack_bits_int32, pack_int4, unpack_bits, unpack_bits_int32, unpack_int4

__all__ = [
    "GRANULARITIES",
    "BitSplit",
    "QuantizedTensor",
    "bit_split",
    "bit_split_dequantize",
    "compute_scale",
    "dequantize_blockwise",
    "dynamic_map",
    "hadamard_matrix",
    "hadamard_transform",
    "is_power_of_two",
    "leverage_score_probabilities",
    "leverage_score_sample",
    "leverage_scores",
    "pack_bits",
    "pack_bits_int32",
    "pack_int4",
    "qmax",
    "quantize",
    "quantize_blockwise",
    "quantize_with_scale",
    "round_to_int",
    "true_div",
    "unpack_bits",
    "unpack_bits_int32",
    "unpack_int4",
]

"""lowbit.int4: INT4 fully quantized training (Xi et al. 2023, "Training Transformers with 4-bit Integers").

Forward: Hadamard quantizer (block-diagonal Hadamard rotation along D_in, then INT4 codes); backward: bit
splitting of the output gradient into two INT4 halves and leverage-score sampling for the weight gradient.
Every product runs on the integer codes (emulated exactly in PyTorch). See docs/int4.md.

    from lowbit.int4 import Int4TrainingConfig, convert_to_int4_training
    report = convert_to_int4_training(model, Int4TrainingConfig.named("hq-lss"))
"""

from .config import RECIPES, Int4TrainingConfig
from .convert import Int4ConversionReport, convert_to_int4_training, layer_seed
from .function import (
    GradCodes,
    Int4Spec,
    block_size_candidates,
    forward_product,
    hadamard_rotate,
    hq_quantize,
    input_grad_product,
    int4_linear,
    int_matmul,
    lsq_grad,
    lsq_init_scale,
    lss_row_weights,
    quantize_grad_for_input,
    quantize_grad_output,
    resolve_backend,
    select_block_size,
    weight_grad_product,
)
from .layer import Int4Linear

__all__ = [
    "RECIPES",
    "GradCodes",
    "Int4ConversionReport",
    "Int4Linear",
    "Int4Spec",
    "Int4TrainingConfig",
    "block_size_candidates",
    "convert_to_int4_training",
    "forward_product",
    "hadamard_rotate",
    "hq_quantize",
    "input_grad_product",
    "int4_linear",
    "int_matmul",
    "layer_seed",
    "lsq_grad",
    "lsq_init_scale",
    "lss_row_weights",
    "quantize_grad_for_input",
    "quantize_grad_output",
    "resolve_backend",
    "select_block_size",
    "weight_grad_product",
]

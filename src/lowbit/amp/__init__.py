"""lowbit.amp: training guards.

- policy:    mixed precision (bf16 / fp16 autocast) with fp32 islands for norms, embeddings, the head,
             softmax and cross-entropy; GradScaler for fp16
- guard:     SpikeGuard, a trainer callback skipping steps with a non-finite or spiking loss / grad norm
- embedding: shrink_embedding_grad (GLM-130B embedding-gradient shrink)
- ddp:       fp32 gradient all-reduce comm hook for DDP with fp16/bf16 parameters
"""

from .ddp import fp32_allreduce_hook, register_fp32_allreduce
from .embedding import EmbeddingGradShrink, scale_grad, shrink_embedding_grad
from .guard import ACTIONS, SpikeEvent, SpikeGuard, robust_threshold, rollback_from_checkpoint
from .policy import (
    FP32_FUNCTIONS,
    PRECISIONS,
    FP32Functions,
    PrecisionPolicy,
    apply_precision_policy,
    autocast_context,
    find_fp32_modules,
    make_grad_scaler,
    precision_dtype,
)

__all__ = [
    "ACTIONS",
    "FP32_FUNCTIONS",
    "PRECISIONS",
    "EmbeddingGradShrink",
    "FP32Functions",
    "PrecisionPolicy",
    "SpikeEvent",
    "SpikeGuard",
    "apply_precision_policy",
    "autocast_context",
    "find_fp32_modules",
    "fp32_allreduce_hook",
    "make_grad_scaler",
    "precision_dtype",
    "register_fp32_allreduce",
    "robust_threshold",
    "rollback_from_checkpoint",
    "scale_grad",
    "shrink_embedding_grad",
]

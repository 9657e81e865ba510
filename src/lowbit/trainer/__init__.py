"""lowbit.trainer: one training loop (accumulation, warmup + cosine LR, clipping, bf16 autocast, evaluation,
metrics JSONL, loss plot, atomic resumable checkpoints) used by ``lowbit train`` and by distillation."""

from .checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .lm import LMData, LMRun, evaluate_checkpoint, load_lm, make_batchers, prepare_lm_data, train_lm
from .loop import (
    OPTIMIZERS,
    Callback,
    TrainConfig,
    TrainResult,
    default_loss,
    make_optimizer,
    param_groups,
    register_optimizer,
    resolve_device,
    train,
)
from .metrics import MetricsWriter, plot_loss_curve, plot_loss_curves, read_metrics
from .schedule import lr_multiplier, warmup_cosine_scheduler

__all__ = [
    "OPTIMIZERS",
    "Callback",
    "LMData",
    "LMRun",
    "MetricsWriter",
    "TrainConfig",
    "TrainResult",
    "capture_rng_state",
    "default_loss",
    "evaluate_checkpoint",
    "load_lm",
    "make_batchers",
    "load_checkpoint",
    "lr_multiplier",
    "make_optimizer",
    "param_groups",
    "plot_loss_curve",
    "plot_loss_curves",
    "prepare_lm_data",
    "read_metrics",
    "register_optimizer",
    "resolve_device",
    "restore_rng_state",
    "save_checkpoint",
    "train",
    "train_lm",
    "warmup_cosine_scheduler",
]

"""``convert_to_int4_training``: swap a model's ``nn.Linear`` layers for :class:`Int4Linear`, in place.

What stays in full precision (as in the paper's code): embeddings, normalization layers, softmax, attention's
score and value products (they are not ``nn.Linear``), and by the default filter the output head and any
Linear whose weight is tied to an embedding, and layers whose D_in has no valid Hadamard block.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn

from ..kernels.inductor_fix import patch_inductor_read_back
from .config import Int4TrainingConfig
from .function import resolve_backend, triton_unsupported_reason
from .layer import Int4Linear, invalid_block_reason

__all__ = ["Int4ConversionReport", "convert_to_int4_training", "layer_seed"]

logger = logging.getLogger(__name__)

ModuleFilter = Callable[[nn.Module, str], bool]


@dataclass
class Int4ConversionReport:
    """What :func:`convert_to_int4_training` did: ``converted`` names, ``skipped`` (name, reason) pairs."""

    converted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"INT4 training: converted {len(self.converted)} Linear layers, kept {len(self.skipped)}"]
        lines += [f"  kept {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def layer_seed(seed: int, name: str) -> int:
    """Seed of the layer ``name``'s backward generator: a hash of (seed, name), so layers draw independent
    streams and a layer keeps its stream whatever else the model contains."""
    return (zlib.crc32(f"{seed}:{name}".encode()) + (seed << 32)) & 0x7FFF_FFFF_FFFF_FFFF


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return None


def convert_to_int4_training(
    model: nn.Module,
    config: Int4TrainingConfig | None = None,
    module_filter_fn: ModuleFilter | None = None,
) -> Int4ConversionReport:
    """Replace every eligible ``nn.Linear`` of ``model`` by :class:`Int4Linear`, in place.

    The new layers share the old weight and bias Parameters (the fp master weights; an optimizer built
    before keeps them, though LSQ scales are new parameters: build the optimizer after converting).

    Args:
        model: any ``nn.Module`` (lowbit's GPT, a Hugging Face causal LM, ...).
        config: :class:`Int4TrainingConfig` (default: recipe "hq-lss"). Each layer gets the backward seed
            :func:`layer_seed` (config.seed, its qualified name).
        module_filter_fn: ``fn(module, qualified_name) -> bool`` for each ``nn.Linear``; True converts.
            Default: convert all but the output head (``lm_head``, ``model.get_output_embeddings()``) and any
            Linear whose weight is an embedding's weight (tied). Either way, a layer whose D_in has no valid
            Hadamard block for ``config`` is kept in full precision, and so is, with ``backend="triton"``, a
            layer the Triton kernels cannot run (D_in, D_out not multiples of 16; the report says which).

    Returns:
        :class:`Int4ConversionReport` (also logged at INFO): converted names and kept names with the reason.

    When a layer is converted, inductor gets the read-back barrier of :mod:`lowbit.kernels.inductor_fix`
    (a torch.compile race that corrupts compiled INT4 training otherwise).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = Int4TrainingConfig() if config is None else config
    if not isinstance(config, Int4TrainingConfig):
        raise TypeError(f"config must be an Int4TrainingConfig, got {type(config).__name__}")
    if module_filter_fn is not None and not callable(module_filter_fn):
        raise TypeError("module_filter_fn must be callable as fn(module, qualified_name) -> bool")
    resolve_backend(config.backend)

    head = _output_head(model)
    embedding_weights = {
        id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding)
    }
    report = Int4ConversionReport()
    targets: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            report.skipped.append((name, "already an Int4Linear"))
            continue
        if not isinstance(module, nn.Linear):
            continue
        if not name:
            report.skipped.append((name, "the model itself is an nn.Linear: use Int4Linear.from_linear"))
            continue
        if type(module) is not nn.Linear:
            report.skipped.append((name, f"a {type(module).__name__}, not a plain nn.Linear"))
            continue
        if not module.weight.is_floating_point():
            report.skipped.append((name, f"weight dtype {module.weight.dtype} is not floating point"))
            continue
        if module_filter_fn is not None:
            if not module_filter_fn(module, name):
                report.skipped.append((name, "module_filter_fn returned False"))
                continue
        elif module is head or name.split(".")[-1] == "lm_head":
            report.skipped.append((name, "output head (kept in full precision)"))
            continue
        elif id(module.weight) in embedding_weights:
            report.skipped.append((name, f"weight tied to embedding {embedding_weights[id(module.weight)]}"))
            continue
        reason = invalid_block_reason(module.in_features, config)
        if reason is None and config.backend == "triton":
            reason = triton_unsupported_reason(config, module.in_features, module.out_features)
            reason = None if reason is None else f"backend='triton': {reason}"
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        targets.append((name, module))

    for name, module in targets:
        new = Int4Linear.from_linear(module, config, seed=layer_seed(config.seed, name))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        report.converted.append(name)
    if report.converted:
        # torch.compile's inductor can race in kernels that mix these layers' outputs into the residual
        # stream (lowbit.kernels.inductor_fix): a barrier there, before any compiling.
        patch_inductor_read_back()
    logger.info("%s", report)
    return report

"""Language-model runs end to end: corpus -> tokenizer -> batchers -> GPT -> :func:`train`, and back from
a checkpoint to (model, tokenizer) for evaluation. ``lowbit train``, ``lowbit eval ppl`` and ``lowbit demo``
share these functions so that evaluation rebuilds exactly the windows training used.

A checkpoint written by :func:`train_lm` carries in ``extra``: ``model_name`` (e.g. "gpt-tiny"),
``model_config`` (the ``GPTConfig`` as a dict), ``tokenizer`` (``tokenizer.state_dict()``) and ``data`` (the
corpus name or path given).

Under torchrun (``WORLD_SIZE`` in the environment) :func:`train_lm` joins the process group (NCCL on CUDA,
gloo on the CPU), wraps the model with DDP or FSDP2 and gives each rank its slice of every global batch; see
``lowbit.trainer.distributed.parallel_train_kwargs`` and docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .loop import TrainConfig, TrainResult, resolve_device, train

__all__ = [
    "LMData",
    "LMRun",
    "evaluate_checkpoint",
    "load_lm",
    "make_batchers",
    "prepare_lm_data",
    "train_lm",
]

SPLITS = ("val", "train")


@dataclass(frozen=True)
class LMData:
    """A corpus encoded with one tokenizer: ``train_tokens`` / ``val_tokens`` are 1-D long CPU tensors."""

    name: str
    tokenizer: Any
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor


@dataclass(frozen=True)
class LMRun:
    """What :func:`train_lm` returns: the trainer's result, the trained model (eval mode) and its data."""

    result: TrainResult
    model: torch.nn.Module
    data: LMData


def prepare_lm_data(data: str | os.PathLike, tokenizer: Any | None = None) -> LMData:
    """Load ``data`` ("shakespeare" or a text file/folder, see ``lowbit.data.load_corpus``) and encode both
    splits. Without ``tokenizer`` a character tokenizer is built from the train and validation text together
    (so validation has no unknown characters)."""
    from ..data import CharTokenizer, encode_corpus, load_corpus

    corpus = load_corpus(data)
    if tokenizer is None:
        tokenizer = CharTokenizer.from_text(corpus.train_text + corpus.val_text)
    return LMData(
        name=str(data),
        tokenizer=tokenizer,
        train_tokens=encode_corpus(tokenizer, corpus.train_text),
        val_tokens=encode_corpus(tokenizer, corpus.val_text),
    )


def make_batchers(data: LMData, config: TrainConfig) -> tuple[Any, Any]:
    """(train, val) ``TokenBatcher``-s of shape (config.batch_size, config.block_size); the train batcher's
    generator is seeded with ``config.seed``; batches are made on the CPU (the loop moves them)."""
    from ..data import TokenBatcher

    train_b = TokenBatcher(data.train_tokens, config.batch_size, config.block_size, generator=config.seed)
    val_b = TokenBatcher(data.val_tokens, config.batch_size, config.block_size)
    return train_b, val_b


def _model_from_extra(extra: dict[str, Any]) -> torch.nn.Module:
    from ..models import GPT, GPTConfig

    if "model_config" not in extra:
        raise ValueError("checkpoint has no extra['model_config']: it was not written by lowbit train")
    model = GPT(GPTConfig(**extra["model_config"]))
    if extra.get("int4") is not None:  # INT4 training: convert the same layers so that the state dict fits
        from ..int4 import Int4TrainingConfig, convert_to_int4_training

        convert_to_int4_training(model, Int4TrainingConfig(**extra["int4"]))
    return model


def train_lm(
    model_name: str,
    data: str | os.PathLike,
    config: TrainConfig,
    *,
    dropout: float = 0.0,
    resume: str | os.PathLike | None = None,
    callbacks: Iterable[Any] = (),
    optimizer: Any = None,
    lm_data: LMData | None = None,
    int4: Any = None,
    parallel: str = "ddp",
) -> LMRun:
    """Train the named GPT ("gpt-tiny", ...) on ``data`` with a character tokenizer.

    The model's context is the named size's; ``config.block_size`` must not exceed it. The model is
    initialized after seeding torch with ``config.seed``. With ``resume`` (a path, or "auto" with a checkpoint
    in ``config.out_dir``) the model configuration and tokenizer come from the checkpoint; a different
    ``model_name`` is an error. ``lm_data`` skips loading and encoding when the caller has it already.
    ``int4`` (a ``lowbit.int4.Int4TrainingConfig``) converts the model's Linear layers for INT4 fully
    quantized training before the optimizer is built; a resumed INT4 run takes its config from the
    checkpoint.

    Under torchrun with a world size above 1 (see the module docstring), ``parallel`` ("ddp" or "fsdp2")
    picks the wrapping; ``config.batch_size`` is the GLOBAL batch (a multiple of the world size), every rank
    runs on ``cuda:LOCAL_RANK`` (or the CPU with ``device="cpu"``), rank 0 alone writes the metrics, plot and
    ``checkpoint.pt`` (the single-process format, so it resumes and evaluates at any world size), and
    ``tokens`` / ``tokens_per_s`` in the result and the metrics count the global batch (every rank's
    tokens). The returned model is the plain one (for FSDP2 still sharded). The process group
    is left for the caller to destroy.
    """
    from ..data import tokenizer_from_state_dict
    from ..models import build_model
    from .distributed import join_process_group, parallel_train_kwargs

    env = join_process_group(config.device)
    if env is not None:
        config = dataclasses.replace(config, device=str(env.device))

    ckpt_extra: dict[str, Any] | None = None
    if resume is not None:
        path = Path(config.out_dir or "", "checkpoint.pt") if resume == "auto" else Path(resume)
        if resume != "auto" or (config.out_dir is not None and path.is_file()):
            ckpt_extra = load_checkpoint(path).get("extra", {})
            if ckpt_extra.get("model_name", model_name) != model_name:
                raise ValueError(
                    f"model {model_name!r} does not match the checkpoint's model {ckpt_extra['model_name']!r}"
                )
    if lm_data is None:
        tokenizer = tokenizer_from_state_dict(ckpt_extra["tokenizer"]) if ckpt_extra else None
        lm_data = prepare_lm_data(data, tokenizer)
    torch.manual_seed(config.seed)
    int4_dict = None
    if ckpt_extra:
        model = _model_from_extra(ckpt_extra)  # converted already when the run was INT4
        int4_dict = ckpt_extra.get("int4")
        if int4 is not None and int4.to_dict() != int4_dict:
            raise ValueError(f"int4 config {int4} does not match the checkpoint's {int4_dict}")
    else:
        model = build_model(model_name, lm_data.tokenizer.vocab_size, dropout=dropout)
        if int4 is not None:
            from ..int4 import convert_to_int4_training

            convert_to_int4_training(model, int4)
            int4_dict = int4.to_dict()
    if config.block_size > model.config.block_size:
        raise ValueError(
            f"block_size={config.block_size} exceeds the context of {model_name} ({model.config.block_size})"
        )
    extra = {
        "model_name": model_name,
        "model_config": dataclasses.asdict(model.config),
        "tokenizer": lm_data.tokenizer.state_dict(),
        "data": str(data),
        "int4": int4_dict,
    }
    train_b, val_b = make_batchers(lm_data, config)
    kwargs: dict[str, Any] = {"model": model, "train_batcher": train_b, "config": config,
                              "optimizer": optimizer, "callbacks": callbacks, "resume": resume}
    if env is not None:
        model.to(env.device)  # wrap and shard on the rank's device
        kwargs = parallel_train_kwargs(model, train_b, config, parallel=parallel, optimizer=optimizer,
                                       callbacks=callbacks, resume=resume)
    result = train(val_batcher=val_b, extra=extra, **kwargs)
    if env is not None:  # rank 0's checkpoint and metrics are complete when any rank returns
        torch.distributed.barrier()
    model.eval()
    return LMRun(result=result, model=model, data=lm_data)


def load_lm(
    checkpoint: str | os.PathLike, *, device: str = "cpu"
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model in eval mode on ``device``, tokenizer, checkpoint payload) of a :func:`train_lm` checkpoint."""
    from ..data import tokenizer_from_state_dict

    payload = load_checkpoint(checkpoint)
    extra = payload.get("extra", {})
    if "tokenizer" not in extra:
        raise ValueError(f"checkpoint {str(checkpoint)!r} has no tokenizer state (extra['tokenizer'])")
    model = _model_from_extra(extra)
    model.load_state_dict(payload["model"])
    model.to(resolve_device(device)).eval()
    return model, tokenizer_from_state_dict(extra["tokenizer"]), payload


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    split: str = "val",
    batch_size: int | None = None,
    block_size: int | None = None,
    max_batches: int | None = -1,
    device: str = "auto",
    precision: str | None = None,
):
    """Perplexity of a :func:`train_lm` checkpoint on ``split`` of ``data`` (default: the training data).

    The windows are ``TokenBatcher(tokens, batch_size, block_size).eval_batches(max_batches)`` with the
    checkpoint's ``batch_size``, ``block_size``, ``eval_batches`` and ``precision`` unless given, i.e. exactly
    the evaluation the trainer ran. ``max_batches=None`` uses every window; -1 (default) the checkpoint's
    ``eval_batches``. Returns a ``lowbit.eval.PerplexityResult``.
    """
    from ..amp import apply_precision_policy
    from ..data import TokenBatcher, encode_corpus, load_corpus
    from ..eval import perplexity

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    model, tokenizer, payload = load_lm(checkpoint, device=device)
    cfg = payload.get("config", {})
    data = payload["extra"].get("data") if data is None else data
    if data is None:
        raise ValueError("the checkpoint does not name its data; pass data")
    corpus = load_corpus(data)
    text = corpus.val_text if split == "val" else corpus.train_text
    tokens = encode_corpus(tokenizer, text)
    batch_size = cfg.get("batch_size", 32) if batch_size is None else batch_size
    block_size = cfg.get("block_size", model.config.block_size) if block_size is None else block_size
    max_batches = cfg.get("eval_batches") if max_batches == -1 else max_batches
    precision = cfg.get("precision", "fp32") if precision is None else precision
    # The trainer evaluates under its precision policy (lowbit.amp: norms, embeddings and the output head are
    # fp32 islands outside autocast); without it the head would run in bf16/fp16 under autocast.
    apply_precision_policy(model, precision)
    batcher = TokenBatcher(tokens, batch_size, block_size)
    return perplexity(
        model, batcher.eval_batches(max_batches), device=resolve_device(device), precision=precision
    )

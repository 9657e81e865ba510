"""Multi-process training helpers: process-group setup from torchrun, DDP and FSDP2 wrapping, per-rank data
slices, and distributed checkpoints (``torch.distributed.checkpoint``) that load at any world size.

Typical use (one process per GPU, started by ``torchrun --nproc-per-node N script.py``)::

    env = init_distributed()                    # RANK / WORLD_SIZE / LOCAL_RANK from torchrun
    model = build_model(...).to(env.device)     # convert_to_int4_training(model, ...) here if wanted
    model = shard_fsdp2(model)                  # or wrap_ddp(model, fp32_allreduce=True)
    optimizer = AdamW8bit(model.parameters())   # built AFTER wrapping (FSDP2 replaces the parameters)
    batcher = RankSlicedBatcher(TokenBatcher(tokens, global_batch, T, generator=seed), env.rank,
                                env.world_size)
    ...
    save_distributed_checkpoint(folder, model, optimizer, extra={"step": step})
    destroy_distributed()

Data: every rank builds the SAME batcher (same seed) and keeps rows ``[r * B / W, (r + 1) * B / W)`` of each
global batch, so W ranks see exactly the batch one process would, and the DDP / FSDP gradient (the mean over
ranks of per-rank mean losses with equal slices) is the single-process mean-loss gradient up to the order of
the summation.

AdamW8bit under FSDP2 quantizes the LOCAL shard (see ``lowbit.optim.adam8bit``). Its state dict is per rank
(local codes and block absmaxes), which ``torch.distributed.checkpoint`` cannot reshard. The checkpoint
helpers therefore store its moments portably: each 8-bit state is dequantized to fp32 (m, v) with the
parameter's shape and placement (a DTensor for a sharded param) and re-quantized on load on the new local
shard. At the same world size v (unsigned map, whose top code is 1.0) comes back bit for bit, and so does m
in every block whose largest-magnitude element is positive; a block whose largest element is negative was
stored with the code -0.99297 (the signed map has no -1.0), so its re-quantization picks a slightly smaller
absmax and its elements may move by one code. Across world sizes the blocks move and each element picks up
at most one extra rounding of the 8-bit map. The portable file holds 8 bytes per parameter for the moments
instead of 2.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from lowbit.optim.adam8bit import _Adam8bitBase
from lowbit.optim.functional import dynamic_maps
from lowbit.quant.codebook import dequantize_blockwise, quantize_blockwise

__all__ = [
    "PARALLEL_MODES",
    "DistEnv",
    "ParallelModel",
    "RankSlicedBatcher",
    "backend_for_device",
    "destroy_distributed",
    "init_distributed",
    "join_process_group",
    "load_distributed_checkpoint",
    "parallel_train_kwargs",
    "rank_slice",
    "save_distributed_checkpoint",
    "shard_fsdp2",
    "transformer_blocks",
    "wrap_ddp",
]

try:  # torch >= 2.6
    from torch.distributed.fsdp import fully_shard as _fully_shard
except ImportError:  # pragma: no cover - torch 2.5
    from torch.distributed._composable.fsdp import fully_shard as _fully_shard

from torch.distributed.tensor import DTensor

_EXTRA_FILE = "lowbit_extra.pt"
#: How ``train`` / ``distill`` wrap the model under torchrun: DDP (replicated) or FSDP2 (sharded per block).
PARALLEL_MODES = ("ddp", "fsdp2")
# Prefixes that wrappers add to parameter names and DCP's state-dict helpers strip.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.")


# ---------------------------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` in [0, world_size), ``local_rank`` on its host, the ``backend``
    of the default process group (None when running as a single process without one) and the ``device``
    this rank computes on (``cuda:local_rank`` with NCCL, the CPU with gloo)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that logs, plots and writes single-file artefacts)."""
        return self.rank == 0


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"environment variable {name} must be >= 0, got {value}")
    return value


def init_distributed(backend: str | None = None) -> DistEnv:
    """Join the default process group described by torchrun's environment and return this rank's ``DistEnv``.

    Args:
        backend: "nccl", "gloo" or None (default): NCCL when CUDA is available, gloo otherwise.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and, through ``init_method="env://"``, ``MASTER_ADDR`` /
    ``MASTER_PORT``). Without ``WORLD_SIZE`` (a plain ``python`` run) no group is created and the result is
    rank 0 of 1. When the default group already exists it is reused (its backend, rank and size win). With
    NCCL the process binds to ``cuda:LOCAL_RANK`` (``torch.cuda.set_device``).

    Raises:
        ValueError: a malformed variable, RANK >= WORLD_SIZE, or an unknown backend.
        RuntimeError: backend "nccl" without CUDA.
    """
    if backend is not None and backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        world = _env_int("WORLD_SIZE", None)
        if world is None:
            device = torch.device("cuda" if backend == "nccl" else "cpu")
            return DistEnv(rank=0, world_size=1, local_rank=0, backend=None, device=device)
        rank = _env_int("RANK", None)
        if rank is None:
            raise ValueError("WORLD_SIZE is set but RANK is not: start the job with torchrun")
        if world < 1 or rank >= world:
            raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
        local_rank = _env_int("LOCAL_RANK", rank)
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise RuntimeError("backend='nccl' needs CUDA; use backend='gloo' on CPUs")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)


def backend_for_device(device: str) -> str | None:
    """The process-group backend a run on ``device`` needs: "gloo" for "cpu", "nccl" for "cuda..." and None
    (NCCL when CUDA is available, else gloo) for "auto"."""
    if device == "auto":
        return None
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def join_process_group(device: str = "auto") -> DistEnv | None:
    """This rank's ``DistEnv`` when the process runs under torchrun with a world size above 1 (``WORLD_SIZE``
    set, or a default group already initialized): the group is joined with the backend ``device`` needs
    (:func:`backend_for_device`). None in a plain single process (nothing is initialized then)."""
    if os.environ.get("WORLD_SIZE") is None and not (dist.is_available() and dist.is_initialized()):
        return None
    env = init_distributed(backend_for_device(device))
    return env if env.world_size > 1 else None


def destroy_distributed() -> None:
    """Destroy the default process group if there is one (no-op otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- data


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """Rows ``[rank * b, (rank + 1) * b)`` with ``b = batch_size / world_size`` of a global batch.

    Raises ValueError unless ``batch_size`` is a positive multiple of ``world_size`` and
    0 <= rank < world_size (equal slices keep the mean of per-rank mean losses equal to the global mean loss).
    """
    for name, value in (("batch_size", batch_size), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if batch_size % world_size:
        raise ValueError(
            f"the global batch_size {batch_size} must be a multiple of world_size {world_size} "
            "(every rank takes an equal slice)"
        )
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


class RankSlicedBatcher:
    """This rank's slice of every global training batch of ``batcher`` (a ``TokenBatcher`` or anything with
    ``.sample()`` returning tensors, or tuples/dicts of tensors, with the batch in dim 0).

    Every rank must build ``batcher`` identically (same tokens, same seed): the global batch is then the same
    on all ranks and each keeps rows :func:`rank_slice`. ``eval_batches`` is passed through unsliced (every
    rank evaluates the whole validation set, so every rank reports the same validation loss); other
    attributes (``generator``, ``batches_drawn``, ``state_dict``...) are the wrapped batcher's, so the
    trainer's resume logic restores the shared generator.
    """

    def __init__(self, batcher: Any, rank: int, world_size: int):
        if not hasattr(batcher, "sample"):
            raise TypeError(f"batcher must have a .sample() method, got {type(batcher).__name__}")
        batch_size = getattr(batcher, "batch_size", None)
        self._slice = rank_slice(batch_size, rank, world_size) if batch_size is not None else None
        self.batcher, self.rank, self.world_size = batcher, rank, world_size

    def __getattr__(self, name: str) -> Any:
        if name == "batcher":  # not yet set (during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.batcher, name)

    def _take(self, batch: Any, sl: slice) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch[sl]
        if isinstance(batch, (tuple, list)):
            return type(batch)(self._take(b, sl) for b in batch)
        if isinstance(batch, dict):
            return {k: self._take(v, sl) for k, v in batch.items()}
        raise TypeError(f"cannot slice a batch element of type {type(batch).__name__}")

    def sample(self) -> Any:
        """The global batch's rows for this rank (the global batch is drawn in full, then sliced)."""
        batch = self.batcher.sample()
        sl = self._slice
        if sl is None:
            first = batch if isinstance(batch, torch.Tensor) else next(iter(
                batch.values() if isinstance(batch, dict) else batch))
            sl = rank_slice(first.shape[0], self.rank, self.world_size)
        return self._take(batch, sl)


# ---------------------------------------------------------------------------------------------- wrapping


def wrap_ddp(model: nn.Module, *, fp32_allreduce: bool = False, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` on the default group; ``model`` must already be on its device.

    Args:
        model: the (converted) model; on CUDA ``device_ids=[its device]`` is passed unless given.
        fp32_allreduce: register ``lowbit.amp.fp32_allreduce_hook`` (sum bf16/fp16 gradient buckets in fp32;
            a no-op for fp32 buckets).
        ddp_kwargs: passed to ``DistributedDataParallel`` (e.g. ``find_unused_parameters``).

    Raises RuntimeError without an initialized process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("wrap_ddp needs an initialized process group: call init_distributed() first")
    from lowbit.amp.ddp import register_fp32_allreduce

    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cuda" and "device_ids" not in ddp_kwargs:
        ddp_kwargs["device_ids"] = [param.device.index]
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    if fp32_allreduce:
        register_fp32_allreduce(ddp)
    return ddp


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer: the children of every ``nn.ModuleList`` whose children all
    share one class (``GPT.transformer.h``, a Hugging Face model's ``layers``). Outermost lists only."""
    blocks: list[nn.Module] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            blocks.extend(module)
            inside.append(name)
    return blocks


def shard_fsdp2(
    model: nn.Module,
    *,
    blocks: list[nn.Module] | None = None,
    mesh: Any = None,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2 (``fully_shard``): each block its own unit, then the root (embeddings,
    final norm, head and anything else left). Parameters become ``DTensor``s sharded on dim 0 over the mesh.

    Args:
        model: on its device; convert it (INT4, OneBit) BEFORE sharding and build the optimizer AFTER.
        blocks: the modules to shard one by one (default :func:`transformer_blocks`).
        mesh: a 1-D ``DeviceMesh`` (default: all ranks of the default group on the model's device type).
        reshard_after_forward: free the gathered block weights after forward (ZeRO-3; False = ZeRO-2).
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` or None.

    Returns ``model`` itself (``fully_shard`` changes its class in place).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_fsdp2 needs an initialized process group: call init_distributed() first")
    blocks = transformer_blocks(model) if blocks is None else list(blocks)
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in blocks:
        _fully_shard(block, **kwargs)
    _fully_shard(model, **kwargs)
    return model


# ---------------------------------------------------------------------------------------------- checkpoints


def _strip(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _like_param(t_local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``t_local`` (the local shard's shape) as a tensor laid out like ``p`` (a DTensor for a sharded p)."""
    if isinstance(p, DTensor):
        return DTensor.from_local(
            t_local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
    return t_local


def _param_info(model: nn.Module, osd: dict) -> dict[str, tuple[torch.Tensor, dict]]:
    """FQN -> (param, its saved param group) for every FQN in the optimizer state dict ``osd``."""
    params = {_strip(n): p for n, p in model.named_parameters(remove_duplicate=False)}
    info = {}
    for group in osd["param_groups"]:
        for fqn in group["params"]:
            if fqn not in params:
                raise KeyError(f"optimizer state names parameter {fqn!r}, which the model does not have")
            info[fqn] = (params[fqn], group)
    return info


def _portable_8bit(model: nn.Module, osd: dict) -> dict:
    """Optimizer state dict of an ``_Adam8bitBase`` with 8-bit states replaced by fp32 (m, v) laid out like
    their params (new dicts; the optimizer's own state is not touched)."""
    signed, unsigned = None, None
    info = _param_info(model, osd)
    state = {}
    for fqn, st in osd["state"].items():
        p, group = info[fqn]
        p_local = p.to_local() if isinstance(p, DTensor) else p
        if "exp_avg_codes" in st:
            if signed is None:
                signed, unsigned = dynamic_maps(p_local.device)
            bs = group["block_size"]
            shape = p_local.shape
            m = dequantize_blockwise(st["exp_avg_codes"], st["exp_avg_absmax"], signed, bs, shape)
            v = dequantize_blockwise(st["exp_avg_sq_codes"], st["exp_avg_sq_absmax"], unsigned, bs, shape)
        else:
            m, v = st["exp_avg"].view(p_local.shape), st["exp_avg_sq"].view(p_local.shape)
            m = m.to_local() if isinstance(m, DTensor) else m
            v = v.to_local() if isinstance(v, DTensor) else v
        state[fqn] = {"step": st["step"], "exp_avg": _like_param(m, p), "exp_avg_sq": _like_param(v, p)}
    return {"state": state, "param_groups": osd["param_groups"]}


def _restore_8bit(model: nn.Module, portable: dict) -> dict:
    """Inverse of :func:`_portable_8bit` on this rank's shards: quantize (m, v) of every param whose LOCAL
    element count is >= its group's ``min_8bit_size``; keep fp32 local moments otherwise."""
    signed, unsigned = None, None
    info = _param_info(model, portable)
    state = {}
    for fqn, st in portable["state"].items():
        p, group = info[fqn]
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m = m.to_local() if isinstance(m, DTensor) else m
        v = v.to_local() if isinstance(v, DTensor) else v
        step = int(st["step"])
        if m.numel() >= group["min_8bit_size"]:
            if signed is None:
                signed, unsigned = dynamic_maps(m.device)
            m_codes, m_absmax = quantize_blockwise(m.reshape(-1), signed, group["block_size"])
            v_codes, v_absmax = quantize_blockwise(v.reshape(-1), unsigned, group["block_size"])
            state[fqn] = {"step": step, "exp_avg_codes": m_codes, "exp_avg_absmax": m_absmax,
                          "exp_avg_sq_codes": v_codes, "exp_avg_sq_absmax": v_absmax}
        else:
            state[fqn] = {"step": step, "exp_avg": m.contiguous(), "exp_avg_sq": v.contiguous()}
    return {"state": state, "param_groups": portable["param_groups"]}


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        sd["optimizer"] = _portable_8bit(model, osd) if isinstance(optimizer, _Adam8bitBase) else osd
    return sd


def save_distributed_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a ``torch.distributed.checkpoint`` folder of ``model`` (and ``optimizer``) from every rank.

    Works for a plain module (no process group), a DDP-wrapped one and an FSDP2-sharded one; each rank writes
    its own shards and a later :func:`load_distributed_checkpoint` may run at another world size or wrapping.
    8-bit optimizer states are stored as fp32 moments (module docstring). ``extra`` (plain Python values and
    tensors, e.g. the step and tokenizer state) is written by rank 0 to ``lowbit_extra.pt`` in the folder.
    Every rank must call this (it is collective). Returns the folder.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(path))
    if extra is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        tmp = path / (_EXTRA_FILE + ".tmp")
        torch.save(extra, tmp)
        os.replace(tmp, path / _EXTRA_FILE)
    if dist.is_initialized():
        dist.barrier()
    return path


def load_distributed_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any] | None:
    """Load a folder written by :func:`save_distributed_checkpoint` into ``model`` (and ``optimizer``) in
    place, resharding to this run's world size and wrapping. The optimizer must be the same class with the
    same param groups as the saved one. Collective. Returns ``extra`` (or None when none was saved)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no distributed checkpoint folder at {path}")
    sd = _state_dicts(model, optimizer)  # templates: this run's shapes and placements
    dcp.load(sd, checkpoint_id=str(path))
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        osd = sd["optimizer"]
        if isinstance(optimizer, _Adam8bitBase):
            osd = _restore_8bit(model, osd)
        set_optimizer_state_dict(model, optimizer, osd)
    extra_file = path / _EXTRA_FILE
    return torch.load(extra_file, weights_only=True) if extra_file.exists() else None


# ---------------------------------------------------------------------------------------------- the trainer


class ParallelModel(nn.Module):
    """A DDP-wrapped or FSDP2-sharded model that ``lowbit.trainer.train`` can use like the plain one.

    ``forward`` calls the wrapped model. ``state_dict()`` returns the PLAIN model's keys with FULL tensors
    (the format of a single-process checkpoint: ``lowbit eval ppl`` and a run at any world size load it);
    ``load_state_dict`` takes that format on every rank. Attributes the wrapper lacks (``config``,
    ``transformer``, ...) are looked up on the plain model.

    With FSDP2 ``state_dict()`` is collective (an all-gather; rank 0 gets the tensors on the CPU, other
    ranks an empty dict) unless :meth:`stash_state_dict` prepared it, which the trainer's callback does on
    every rank at each checkpoint step so that only rank 0 needs to call ``state_dict()``. With DDP nothing is
    collective (the replicas are equal).

    Args:
        model: the plain model on this rank's device, converted (INT4, OneBit) and with its trainable
            parameters chosen (``requires_grad``) already.
        parallel: "ddp" or "fsdp2".
        fp32_allreduce: DDP: sum bf16/fp16 gradient buckets in fp32 (see :func:`wrap_ddp`).
        ddp_kwargs / fsdp_kwargs: passed to :func:`wrap_ddp` / :func:`shard_fsdp2`.
    """

    def __init__(self, model: nn.Module, parallel: str, *, fp32_allreduce: bool = True,
                 ddp_kwargs: dict[str, Any] | None = None, fsdp_kwargs: dict[str, Any] | None = None):
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
        super().__init__()
        if parallel == "ddp":
            self.module = wrap_ddp(model, fp32_allreduce=fp32_allreduce, **(ddp_kwargs or {}))
        else:
            self.module = shard_fsdp2(model, **(fsdp_kwargs or {}))
        self.parallel = parallel
        self._stash: dict[str, Any] | None = None

    @property
    def unwrapped(self) -> nn.Module:
        """The plain model (for FSDP2 the sharded module itself: its parameters are DTensor shards)."""
        return self.module.module if self.parallel == "ddp" else self.module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("module", "_stash", "parallel"):
                raise
            return getattr(self.unwrapped, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def set_gradient_sync(self, enabled: bool) -> None:
        """Whether the next backward reduces gradients across ranks (off for all but the last micro-batch of a
        gradient-accumulation step; ``DistributedDataParallel.no_sync`` / FSDP2's
        ``set_requires_gradient_sync``)."""
        if self.parallel == "ddp":
            self.module.require_backward_grad_sync = enabled
        else:
            self.module.set_requires_gradient_sync(enabled)

    def _full_state_dict(self) -> dict[str, Any]:
        if self.parallel == "ddp":
            return self.unwrapped.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.module, options=options)

    def stash_state_dict(self) -> None:
        """Collective (FSDP2): gather the full state dict now; the next ``state_dict()`` returns it."""
        self._stash = self._full_state_dict()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # noqa: D102 (class docstring)
        if args or kwargs:
            raise TypeError("ParallelModel.state_dict() takes no arguments (it returns the full plain state)")
        stash, self._stash = self._stash, None
        return stash if stash is not None else self._full_state_dict()

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):
        """Load a plain (full) state dict; every rank passes the whole dict. Collective with FSDP2."""
        if self.parallel == "ddp":
            return self.unwrapped.load_state_dict(state_dict, strict=strict, assign=assign)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        return set_model_state_dict(
            self.module, state_dict, options=StateDictOptions(full_state_dict=True, strict=strict)
        )


# -- optimizer state: local shards <-> the single-process (full) form


def _ordered_params(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, dict]]:
    return [(p, g) for g in optimizer.param_groups for p in g["params"]]


def _dequantized(
    st: dict, shape: torch.Size, device: torch.device, group: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, v) of an 8-bit optimizer's state of a tensor of ``shape``, as fp32 tensors of that shape."""
    st = {k: t.to(device) if torch.is_tensor(t) else t for k, t in st.items()}
    if "exp_avg_codes" not in st:
        return st["exp_avg"].reshape(shape), st["exp_avg_sq"].reshape(shape)
    signed, unsigned = dynamic_maps(device)
    bs = group["block_size"]
    m = dequantize_blockwise(st["exp_avg_codes"], st["exp_avg_absmax"], signed, bs, shape)
    v = dequantize_blockwise(st["exp_avg_sq_codes"], st["exp_avg_sq_absmax"], unsigned, bs, shape)
    return m, v


def _quantized_state(step: Any, m: torch.Tensor, v: torch.Tensor, group: dict) -> dict:
    """The 8-bit optimizer's state for moments (m, v): codes when ``m.numel() >= min_8bit_size``, else fp32
    (the rule of ``_Adam8bitBase._init_state``, applied to whatever tensor this process holds)."""
    if m.numel() >= group["min_8bit_size"]:
        signed, unsigned = dynamic_maps(m.device)
        m_codes, m_absmax = quantize_blockwise(m.reshape(-1).contiguous(), signed, group["block_size"])
        v_codes, v_absmax = quantize_blockwise(v.reshape(-1).contiguous(), unsigned, group["block_size"])
        return {"step": step, "exp_avg_codes": m_codes, "exp_avg_absmax": m_absmax,
                "exp_avg_sq_codes": v_codes, "exp_avg_sq_absmax": v_absmax}
    return {"step": step, "exp_avg": m.contiguous(), "exp_avg_sq": v.contiguous()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_like(t: torch.Tensor, *, p: DTensor, device: torch.device) -> DTensor:
    """A full tensor ``t`` (shaped like ``p``) distributed over ``p``'s mesh with ``p``'s placements."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(device).reshape(p.shape), p.device_mesh, p.placements)


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer, local: dict | None = None) -> dict:
    """The optimizer state dict a single process would hold (full tensors, integer parameter ids), built from
    this rank's state over FSDP2 DTensor shards. Collective: every rank calls it; all get the result (on the
    CPU). Plain (non-DTensor) parameters' states are copied as they are. An 8-bit optimizer's moments are
    gathered in fp32 and quantized again over the full parameter (``min_8bit_size`` then counts the full
    element count), which can move an element by one 8-bit rounding when blocks straddle shard edges."""
    local = local if local is not None else torch.optim.Optimizer.state_dict(optimizer)
    is_8bit = isinstance(optimizer, _Adam8bitBase)
    params = _ordered_params(optimizer)
    state = {}
    for pid, st in local["state"].items():
        p, group = params[pid]
        if not isinstance(p, DTensor):
            state[pid] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in st.items()}
            continue
        if is_8bit:
            p_local = p.to_local()
            m, v = _dequantized(st, p_local.shape, p_local.device, group)
            m, v = (_like_param(t, p).full_tensor() for t in (m, v))
            state[pid] = {k: t.cpu() if torch.is_tensor(t) else t
                          for k, t in _quantized_state(st["step"], m, v, group).items()}
        else:
            state[pid] = {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in st.items()}
    return {"state": state, "param_groups": local["param_groups"]}


def local_optimizer_state_dict(optimizer: torch.optim.Optimizer, full: dict) -> dict:
    """Inverse of :func:`full_optimizer_state_dict`: this rank's shards of a single-process optimizer state
    dict (every rank passes the whole dict). 8-bit moments are dequantized, cut to the local shard and
    quantized again over it (``min_8bit_size`` counts the LOCAL element count, see docs/distributed.md)."""
    is_8bit = isinstance(optimizer, _Adam8bitBase)
    params = _ordered_params(optimizer)
    state = {}
    for pid, st in full["state"].items():
        p, group = params[pid]
        if not isinstance(p, DTensor):
            state[pid] = st
            continue
        device = p.to_local().device
        shard = functools.partial(_shard_like, p=p, device=device)
        if is_8bit:
            m, v = _dequantized(st, p.shape, device, group)
            state[pid] = _quantized_state(st["step"], shard(m).to_local(), shard(v).to_local(), group)
        else:
            state[pid] = {
                k: shard(t) if torch.is_tensor(t) and t.shape == p.shape else t for k, t in st.items()
            }
    return {"state": state, "param_groups": full["param_groups"]}


class _FullStateOptimizer:
    """Mixin put in front of an optimizer's class (see :func:`_with_full_state`): ``state_dict()`` /
    ``load_state_dict()`` in the single-process form over FSDP2 shards (collective unless stashed)."""

    _lowbit_stash: dict | None = None

    def stash_state_dict(self) -> None:
        """Collective: build the full state dict now; the next ``state_dict()`` returns it."""
        self._lowbit_stash = full_optimizer_state_dict(self, super().state_dict())

    def state_dict(self) -> dict:
        stash, self._lowbit_stash = self._lowbit_stash, None
        return stash if stash is not None else full_optimizer_state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(local_optimizer_state_dict(self, state_dict))


def _with_full_state(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Give ``optimizer`` the single-process ``state_dict`` form (in place, like ``fully_shard`` does to a
    module: its class becomes a subclass of its class and :class:`_FullStateOptimizer`)."""
    if isinstance(optimizer, _FullStateOptimizer):
        return optimizer
    cls = type(optimizer)
    optimizer.__class__ = type(f"FullState{cls.__name__}", (_FullStateOptimizer, cls), {})
    return optimizer


class _GlobalValue(torch.autograd.Function):
    """Forward: the all-reduced mean ``value`` (the same bits on every rank); backward: the gradient flows to
    the local loss unchanged (DDP / FSDP2 average the gradients themselves)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ParallelLoss:
    """``loss_fn(model, batch)`` under a process group: gradient sync only on the last micro-batch of each
    step, and a loss VALUE equal to the mean over ranks (so logs, the spike guard and its decisions agree on
    every rank) while the gradient is that of the local loss."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], model: ParallelModel, grad_accum: int):
        self.loss_fn, self.model, self.grad_accum = loss_fn, model, grad_accum
        self.calls = 0

    def __getattr__(self, name: str) -> Any:  # e.g. DistillLoss.last
        if name == "loss_fn":
            raise AttributeError(name)
        return getattr(self.loss_fn, name)

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        self.model.set_gradient_sync(self.calls % self.grad_accum == self.grad_accum - 1)
        self.calls += 1
        loss = self.loss_fn(model, batch)
        value = loss.detach().float().clone()
        dist.all_reduce(value)
        return _GlobalValue.apply(loss, (value / dist.get_world_size()).to(loss.dtype))


class _StashAtCheckpoints:
    """Callback: at each step where the trainer writes a checkpoint (on rank 0), gather the full model and
    optimizer state dicts on EVERY rank first (FSDP2's gathers are collective)."""

    def __init__(self, model: ParallelModel, steps: int, save_every: int):
        self.model, self.steps, self.save_every = model, steps, save_every
        self.optimizer: Any = None

    def on_train_start(self, *, optimizer: Any, **_: Any) -> None:
        self.optimizer = optimizer

    def on_step_end(self, *, step: int, **_: Any) -> None:
        if (self.save_every and step % self.save_every == 0) or step == self.steps:
            self.model.stash_state_dict()
            if isinstance(self.optimizer, _FullStateOptimizer):
                self.optimizer.stash_state_dict()
            if dist.get_rank() != 0:  # only rank 0 writes; the others drop what they gathered
                self.model._stash = None
                self.optimizer._lowbit_stash = None


def parallel_train_kwargs(
    model: nn.Module,
    train_batcher: Any,
    config: Any,
    *,
    parallel: str = "ddp",
    optimizer: Any = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    callbacks: Iterable[Any] = (),
    resume: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``lowbit.trainer.train`` for this rank of a torchrun job (the process group
    initialized, ``model`` on this rank's device, converted, its trainable parameters chosen).

    - ``model`` becomes a :class:`ParallelModel` (DDP or FSDP2 per block).
    - ``train_batcher`` becomes a :class:`RankSlicedBatcher`: ``config.batch_size`` stays the GLOBAL batch
      (a multiple of the world size), so the run follows the single-process run's trajectory.
    - ``config``: ranks other than 0 get ``out_dir=None`` and ``progress=False`` (rank 0 alone writes the
      metrics, the plot and ``checkpoint.pt``; every rank evaluates, since FSDP2's forward is collective).
    - ``loss_fn`` is wrapped (:class:`_ParallelLoss`); with FSDP2 the optimizer gets the single-process
      ``state_dict`` form and a callback gathers both state dicts on every rank before each checkpoint.
    - ``resume`` "auto" is resolved here to ``out_dir/checkpoint.pt`` (or None) for every rank: every rank
      reads the same file (on several hosts it must be on a shared file system).

    Raises ValueError for ``spike_guard="rollback"`` (rank 0 alone would reload) or an unknown ``parallel``.
    """
    from .loop import CHECKPOINT_NAME, default_loss, make_optimizer, param_groups

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("parallel_train_kwargs needs an initialized process group (init_distributed())")
    if config.spike_guard == "rollback":
        raise ValueError("spike_guard='rollback' is not supported under torchrun (use 'skip' or 'lower_lr')")
    rank, world = dist.get_rank(), dist.get_world_size()
    wrapped = ParallelModel(model, parallel)
    batcher = RankSlicedBatcher(train_batcher, rank, world)
    if resume == "auto":
        candidate = Path(config.out_dir, CHECKPOINT_NAME) if config.out_dir is not None else None
        if candidate is None:
            raise ValueError("resume='auto' needs config.out_dir (it looks for out_dir/checkpoint.pt)")
        resume = candidate if candidate.is_file() else None
    run_config = config if rank == 0 else dataclasses.replace(config, out_dir=None, progress=False)
    callbacks = list(callbacks)
    if parallel == "fsdp2":
        if optimizer is None:
            optimizer = make_optimizer(
                config.optimizer, wrapped, config.lr, config.weight_decay, config.betas
            )
        elif not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(param_groups(wrapped, config.weight_decay, lr=config.lr))
        optimizer = _with_full_state(optimizer)
        if config.out_dir is not None:
            callbacks.append(_StashAtCheckpoints(wrapped, config.steps, config.save_every))
    return {
        "model": wrapped,
        "train_batcher": batcher,
        "config": run_config,
        "optimizer": optimizer,
        "loss_fn": _ParallelLoss(default_loss if loss_fn is None else loss_fn, wrapped, config.grad_accum),
        "callbacks": callbacks,
        "resume": resume,
    }

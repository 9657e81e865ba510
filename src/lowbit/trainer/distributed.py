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

import os
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
    "DistEnv",
    "RankSlicedBatcher",
    "destroy_distributed",
    "init_distributed",
    "load_distributed_checkpoint",
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

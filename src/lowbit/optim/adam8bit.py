"""8-bit Adam and AdamW (Dettmers et al. 2021): torch.optim.Optimizer wrappers around
``lowbit.optim.functional`` (the math) and ``lowbit.kernels.adam8bit`` (the fused CUDA step).

State per parameter with at least ``min_8bit_size`` elements (2 bytes per element + 8 bytes per block):

    "step"                int, number of updates applied
    "exp_avg_codes"       (numel,) uint8, codes of the signed 8-bit dynamic map
    "exp_avg_absmax"      (ceil(numel / block_size),) float32
    "exp_avg_sq_codes"    (numel,) uint8, codes of the unsigned 8-bit dynamic map
    "exp_avg_sq_absmax"   (ceil(numel / block_size),) float32

Smaller tensors (norm weights, biases) keep "exp_avg" / "exp_avg_sq" as float32 tensors of the param's shape:
their memory is negligible and their statistics are the least suited to shared block scales.

Sharded parameters (FSDP2 ``fully_shard``: ``torch.distributed.tensor.DTensor`` params and grads): every
rank updates its local shard only (``p.to_local()``, ``p.grad.to_local()``). State tensors are plain local
tensors and the blocks run over the flattened local shard; whether a parameter gets 8-bit state is decided on
the LOCAL element count (``local numel >= min_8bit_size``), so it may differ between ranks (a shard of an
uneven split, or an empty shard, keeps fp32 state). ``state_dict()`` is then per rank;
``lowbit.trainer.distributed`` saves it portably (dequantized moments as DTensors) for checkpoints that load
across world sizes.

Paths: on CUDA with Triton, one fused kernel launch per (param group, dtype, state kind, step count);
elsewhere the vectorized torch reference. Both give the same bits (see ``lowbit.kernels.adam8bit``).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable
from itertools import chain

import torch

from lowbit.optim.functional import adam8bit_reference_step, adam_reference_step, adam_scalars

__all__ = ["Adam8bit", "AdamW8bit", "state_nbytes"]

_BACKENDS = ("auto", "torch", "triton")
_STATE_8BIT_KEYS = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
_STATE_32BIT_KEYS = ("exp_avg", "exp_avg_sq")
# Code bytes of 0.0 in the signed / unsigned 8-bit dynamic maps: the initial state m = v = 0.
_ZERO_CODE_SIGNED, _ZERO_CODE_UNSIGNED = 127, 0


try:  # torch.distributed can be missing from a build (then no parameter is a DTensor)
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (under no_grad: the tensor holding its storage, so in-place updates write
    the parameter), any other tensor unchanged."""
    return t.to_local() if _DTensor is not None and isinstance(t, _DTensor) else t


def _kernels():
    """lowbit.kernels.adam8bit, or None without Triton (imported lazily: Triton is optional)."""
    try:
        from lowbit.kernels import adam8bit
    except ImportError:  # pragma: no cover - Triton missing
        return None
    return adam8bit if adam8bit.HAS_TRITON else None


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of ``optimizer.state`` (any torch optimizer; shared storage counts once)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                key = (value.device, value.untyped_storage().data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += value.untyped_storage().nbytes()
    return total


class _Adam8bitBase(torch.optim.Optimizer):
    """Adam with 8-bit block-wise state; subclasses set ``_decoupled`` (the one hook: how decay acts)."""

    _decoupled: bool = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        backend: str = "auto",
        kernel_variant: str = "default",
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        name = type(self).__name__
        for option, value, default in (
            ("amsgrad", amsgrad, False),
            ("maximize", maximize, False),
            ("foreach", foreach, None),
            ("fused", fused, None),
            ("capturable", capturable, False),
            ("differentiable", differentiable, False),
        ):
            if value != default:
                raise ValueError(
                    f"{name} does not support {option}={value!r} (it would be silently ignored otherwise); "
                    f"the CUDA path is always one fused kernel, backend= chooses the implementation"
                )
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if backend == "triton" and _kernels() is None:
            raise RuntimeError("backend='triton' needs Triton: pip install 'lowbit[triton]'")
        self.backend = backend
        kernels = _kernels()
        if kernels is not None:
            kernels.get_variant(kernel_variant)  # unknown names raise here, not at the first step
        self.kernel_variant = kernel_variant
        self._triton_on: dict[torch.device, bool] = {}  # backend decision per device, made once
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block_size=block_size,
            min_8bit_size=min_8bit_size,
        )
        self._check_hyperparameters(defaults)
        super().__init__(params, defaults)  # add_param_group checks every group

    @staticmethod
    def _check_hyperparameters(group: dict) -> None:
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if isinstance(lr, torch.Tensor):
            raise TypeError("lr must be a Python float (tensor learning rates are not supported)")
        if not 0.0 <= lr:
            raise ValueError(f"lr must be >= 0, got {lr}")
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two floats in [0, 1), got {betas}")
        if not 0.0 <= eps:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not 0.0 <= wd:
            raise ValueError(f"weight_decay must be >= 0, got {wd}")
        bs = group["block_size"]
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {bs!r}")
        ms = group["min_8bit_size"]
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {ms!r}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_hyperparameters(self.param_groups[-1])
        for p in self.param_groups[-1]["params"]:
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(
                    f"{type(self).__name__} supports float32, bfloat16 and float16 params, got {p.dtype}"
                )

    # -- state -------------------------------------------------------------------------------------------

    @staticmethod
    def _init_state(p: torch.Tensor, group: dict) -> dict:
        n = p.numel()
        if n >= group["min_8bit_size"]:
            n_blocks = -(-n // group["block_size"])
            return {
                "step": 0,
                "exp_avg_codes": torch.full((n,), _ZERO_CODE_SIGNED, dtype=torch.uint8, device=p.device),
                "exp_avg_absmax": torch.zeros(n_blocks, dtype=torch.float32, device=p.device),
                "exp_avg_sq_codes": torch.full((n,), _ZERO_CODE_UNSIGNED, dtype=torch.uint8, device=p.device),
                "exp_avg_sq_absmax": torch.zeros(n_blocks, dtype=torch.float32, device=p.device),
            }
        return {
            "step": 0,
            "exp_avg": torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format),
        }

    def _use_triton(self, p: torch.Tensor) -> bool:
        on = self._triton_on.get(p.device)
        if on is None:
            on = self._triton_on[p.device] = self._decide_triton(p.device)
        return on

    def _decide_triton(self, device: torch.device) -> bool:
        if self.backend == "torch":
            return False
        kernels = _kernels()
        if self.backend == "triton":
            if not kernels.triton_usable(device):
                raise RuntimeError(
                    f"backend='triton' cannot run on {device}: it needs CUDA (or TRITON_INTERPRET=1)"
                )
            return True
        return kernels is not None and device.type == "cuda" and kernels.triton_usable(device)

    # -- step --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient. Returns the closure's loss (or None)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                p_local, grad = _local(p), _local(p.grad)  # FSDP2: this rank's shard
                if grad.dtype != p_local.dtype or grad.shape != p_local.shape:
                    raise ValueError(
                        f"grad must have the param's dtype and shape: got {grad.dtype} {tuple(grad.shape)} "
                        f"for a {p_local.dtype} {tuple(p_local.shape)} param"
                    )
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p_local, group))
                state["step"] += 1
                is_8bit = "exp_avg_codes" in state
                triton_path = self._use_triton(p_local) and p_local.is_contiguous()
                buckets[(triton_path, p_local.device, p_local.dtype, is_8bit, state["step"])].append(
                    (state, p_local, grad)
                )
            for (triton_path, _, _, is_8bit, step), params in buckets.items():
                scalars = adam_scalars(
                    step, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
                if triton_path:
                    self._step_triton(params, group, scalars, is_8bit)
                else:
                    self._step_torch(params, group, scalars, is_8bit)
        return loss

    def _step_torch(self, entries, group, scalars, is_8bit: bool) -> None:
        """``entries``: (state, param, grad) with local (unsharded) tensors."""
        for state, p, grad in entries:
            if is_8bit:
                out = adam8bit_reference_step(
                    p, grad, *(state[k] for k in _STATE_8BIT_KEYS), scalars,
                    decoupled=self._decoupled, block_size=group["block_size"],
                )
                p.copy_(out[0])
                for key, value in zip(_STATE_8BIT_KEYS, out[1:]):
                    state[key].copy_(value)
            else:
                p_new, m, v = adam_reference_step(
                    p, grad, state["exp_avg"], state["exp_avg_sq"], scalars, decoupled=self._decoupled
                )
                p.copy_(p_new)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)

    def _step_triton(self, entries, group, scalars, is_8bit: bool) -> None:
        kernels = _kernels()
        states = [state for state, _, _ in entries]
        params = [p for _, p, _ in entries]
        grads = [g if g.is_contiguous() else g.contiguous() for _, _, g in entries]
        if is_8bit:
            m, v = [s["exp_avg_codes"] for s in states], [s["exp_avg_sq_codes"] for s in states]
            m_abs, v_abs = [s["exp_avg_absmax"] for s in states], [s["exp_avg_sq_absmax"] for s in states]
        else:
            m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            m_abs = v_abs = None
        kernels.adam8bit_multi_tensor_step(
            params, grads, m, v, m_abs, v_abs,
            beta1=scalars.beta1, beta2=scalars.beta2, one_minus_beta1=scalars.one_minus_beta1,
            one_minus_beta2=scalars.one_minus_beta2, eps=scalars.eps, step_size=scalars.step_size,
            inv_bc2_sqrt=scalars.inv_bc2_sqrt, weight_decay=scalars.weight_decay,
            decay_factor=scalars.decay_factor, decoupled=self._decoupled, block_size=group["block_size"],
            variant=self.kernel_variant,
        )

    # -- checkpoints -------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()``: hyper-parameters from the checkpoint, state tensors moved to each param's
        device with their own dtypes (torch's default would cast fp32 absmax / moments to the param dtype)."""
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        super().load_state_dict({**state_dict, "state": {}})  # checks groups, restores hyper-parameters
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        id_to_param = dict(zip(ids, params))
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for pid, saved in saved_state.items():
            if pid not in id_to_param:
                raise ValueError(f"state_dict has state for parameter id {pid!r}, which no param group lists")
            p = id_to_param[pid]
            state = {
                k: _local(v).to(device=p.device, copy=True) if torch.is_tensor(v) else copy.deepcopy(v)
                for k, v in saved.items()
            }
            self._check_loaded_state(p, state, group_of[id(p)])
            self.state[p] = state

    def _check_loaded_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        n = _local(p).numel()
        if "exp_avg_codes" in state:
            n_blocks = -(-n // group["block_size"])
            expected = {"exp_avg_codes": (torch.uint8, n), "exp_avg_sq_codes": (torch.uint8, n),
                        "exp_avg_absmax": (torch.float32, n_blocks),
                        "exp_avg_sq_absmax": (torch.float32, n_blocks)}
        else:
            expected = {"exp_avg": (torch.float32, n), "exp_avg_sq": (torch.float32, n)}
        for key, (dtype, numel) in expected.items():
            t = state.get(key)
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.numel() != numel:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: state {key!r} of a param with {n} elements "
                    f"must be a {dtype} tensor of {numel} elements (block_size={group['block_size']}), got "
                    f"{getattr(t, 'dtype', type(t).__name__)} with {getattr(t, 'numel', lambda: '?')()} "
                    "elements"
                )
        if not isinstance(state.get("step"), int):
            raise ValueError(f"{type(self).__name__}.load_state_dict: state 'step' must be an int")


class AdamW8bit(_Adam8bitBase):
    """AdamW with 8-bit block-wise state: decoupled weight decay ``p <- p * (1 - lr * wd)``.

    Args:
        params: iterable of tensors or param-group dicts (fp32, bf16 or fp16 params).
        lr: learning rate (default 1e-3); LR schedulers work as with any torch optimizer.
        betas: (beta1, beta2), default (0.9, 0.999).
        eps: added to the bias-corrected sqrt(v) (default 1e-8).
        weight_decay: decoupled weight decay (default 1e-2, as torch.optim.AdamW).
        block_size: elements per absmax block, a power of two >= 16 (default 256).
        min_8bit_size: tensors with fewer elements keep fp32 state (default 4096).
        backend: "auto" (fused Triton kernel on CUDA, torch elsewhere), "torch" or "triton".
        kernel_variant: tiling of the fused kernel, a name of ``lowbit.kernels.adam8bit.VARIANTS`` (default
            "default"); all variants give the same bits, ``lowbit bench optim`` times them.
        amsgrad, maximize, foreach, fused, capturable, differentiable: accepted only at their defaults; other
            values raise ValueError.
    """

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)


class Adam8bit(_Adam8bitBase):
    """Adam with 8-bit block-wise state; weight decay is the L2 term ``g <- g + wd * p`` (torch.optim.Adam).

    Args: as ``AdamW8bit``, with weight_decay default 0.
    """

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)

"""Mixed-precision policy: the model runs under ``torch.autocast`` (bf16 or fp16) with fp32 islands.

What runs in fp32 under a low-precision policy, and how that is guaranteed:

- Normalization modules (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, batch norms, and any class whose name ends
  in ``RMSNorm`` / ``LayerNorm`` / ``GroupNorm``, e.g. Hugging Face's ``LlamaRMSNorm``), embeddings and the
  output head: :func:`apply_precision_policy` turns each into an *fp32 island*. Its parameters are cast to
  fp32 once; on every call its floating inputs are upcast to fp32 and autocast is off for its forward (a
  pre-hook enters ``torch.autocast(enabled=False)``, a forward hook registered with ``always_call`` leaves
  it, also when the forward raises). Its outputs are therefore fp32.
- Softmax, log-softmax, cross-entropy, NLL, KL divergence and ``F.layer_norm`` / ``F.group_norm`` /
  ``F.rms_norm`` called as functions: :class:`FP32Functions`, a ``TorchFunctionMode`` that
  :func:`autocast_context` enters, gives them fp32 inputs and runs them with autocast off, wherever they are
  called (a model's attention code, a loss function). CUDA autocast already runs softmax, cross-entropy and
  layer_norm in fp32; CPU autocast does not (``softmax`` and ``layer_norm`` of a bf16 tensor stay bf16
  there), so the policy relies on neither list.
- The softmax inside ``F.scaled_dot_product_attention`` is not visible to Python: the fused kernels (flash
  and memory-efficient on CUDA, the CPU flash kernel) keep the running max and sum in fp32, and the math
  backend upcasts fp16/bf16 inputs to fp32 (torch >= 2.5). The score and value products run in the low
  dtype, as ARCHITECTURE.md plans.
- Everything else follows autocast's own lists: matmuls and ``nn.Linear`` run in the low dtype.

The residual stream stays fp32 (embeddings give fp32 and ``x + f(x)`` promotes), so low precision is
confined to the matmul operands. fp16 needs loss scaling: :func:`make_grad_scaler` gives
``torch.amp.GradScaler`` (enabled for "fp16" only; a disabled scaler passes everything through, so a loop can
use one code path for all precisions).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..models.outputs import output_head_ids

__all__ = [
    "FP32_FUNCTIONS",
    "PRECISIONS",
    "FP32Functions",
    "PrecisionPolicy",
    "apply_precision_policy",
    "autocast_context",
    "find_fp32_modules",
    "make_grad_scaler",
    "precision_dtype",
]

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_LOW_DTYPES = (torch.float16, torch.bfloat16)

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_NORM_NAME = re.compile(r"(RMSNorm|LayerNorm|GroupNorm)$")
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)

#: Functions :class:`FP32Functions` runs in fp32 (inputs upcast, autocast off).
FP32_FUNCTIONS = frozenset(
    {
        F.softmax,
        F.log_softmax,
        torch.softmax,
        torch.log_softmax,
        torch.Tensor.softmax,
        torch.Tensor.log_softmax,
        F.cross_entropy,
        F.nll_loss,
        F.kl_div,
        F.binary_cross_entropy_with_logits,
        F.layer_norm,
        F.group_norm,
        F.rms_norm,
        torch.layer_norm,
        torch.group_norm,
        torch.rms_norm,
    }
)


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def precision_dtype(precision: str) -> torch.dtype:
    """torch dtype of a precision name: "fp32" -> float32, "bf16" -> bfloat16, "fp16" -> float16."""
    return _DTYPES[_check_precision(precision)]


def _device_type(device: str | torch.device) -> str:
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device or device string, got {device!r}") from exc


def _upcast(value: Any) -> Any:
    """fp16/bf16 tensors -> fp32 (differentiable); one level into tuples/lists; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _LOW_DTYPES else value
    if isinstance(value, (tuple, list)):
        return type(value)(_upcast(v) for v in value)
    return value


def _first_device_type(values: Iterable[Any]) -> str | None:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device.type
        if isinstance(v, (tuple, list)):
            found = _first_device_type(v)
            if found is not None:
                return found
    return None


def _autocast_off(device_type: str | None) -> ExitStack:
    """Disable autocast for ``device_type`` (and the CPU, which autocasts host-side ops) where it is on."""
    stack = ExitStack()
    for dt in {device_type or "cpu", "cpu"}:
        if torch.amp.is_autocast_available(dt) and torch.is_autocast_enabled(dt):
            stack.enter_context(torch.autocast(dt, enabled=False))
    return stack


class FP32Functions(TorchFunctionMode):
    """``TorchFunctionMode`` running every function in :data:`FP32_FUNCTIONS` in fp32.

    fp16/bf16 tensor arguments (weights included) are upcast to fp32 and the call runs with autocast off, so
    the result is fp32 (as autocast's own fp32 list would give). Other functions pass through untouched.
    Entered by :func:`autocast_context`; usable on its own as ``with FP32Functions(): ...``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in FP32_FUNCTIONS:
            return func(*args, **kwargs)
        args = tuple(_upcast(a) for a in args)
        kwargs = {k: _upcast(v) for k, v in kwargs.items()}
        with _autocast_off(_first_device_type((*args, *kwargs.values()))):
            return func(*args, **kwargs)


class _PrecisionContext:
    """Reusable (and re-entrant) ``with`` context: autocast + :class:`FP32Functions`."""

    def __init__(self, precision: str, device_type: str, fp32_functions: bool):
        self.precision = precision
        self.device_type = device_type
        self.fp32_functions = fp32_functions
        self._stacks: list[ExitStack] = []

    def __enter__(self) -> _PrecisionContext:
        stack = ExitStack()
        if self.precision != "fp32":
            stack.enter_context(torch.autocast(self.device_type, dtype=_DTYPES[self.precision]))
            if self.fp32_functions:
                stack.enter_context(FP32Functions())
        self._stacks.append(stack)
        return self

    def __exit__(self, *exc: object) -> bool | None:
        return self._stacks.pop().__exit__(*exc)


def autocast_context(precision: str, device: str | torch.device, *, fp32_functions: bool = True):
    """Context manager for the forward pass (and loss) under ``precision`` on ``device``.

    "fp32": does nothing. "bf16" / "fp16": ``torch.autocast(device.type, dtype)`` plus, with
    ``fp32_functions`` (default), :class:`FP32Functions` so softmax / cross-entropy / functional norms run in
    fp32 on every device. The returned object may be entered many times (one per micro-batch). Run
    ``backward()`` outside it. Pair with :func:`apply_precision_policy` for the module islands.
    """
    _check_precision(precision)
    if not isinstance(fp32_functions, bool):
        raise TypeError(f"fp32_functions must be a bool, got {fp32_functions!r}")
    return _PrecisionContext(precision, _device_type(device), fp32_functions)


def make_grad_scaler(precision: str, device: str | torch.device, **kwargs: Any) -> torch.amp.GradScaler:
    """``torch.amp.GradScaler(device.type, enabled=(precision == "fp16"), **kwargs)``.

    fp16 overflows where bf16 does not, so only fp16 scales the loss. A disabled scaler's ``scale(loss)`` is
    ``loss``, ``unscale_`` does nothing and ``step(opt)`` is ``opt.step()``. Works on CPU and CUDA.
    """
    _check_precision(precision)
    return torch.amp.GradScaler(_device_type(device), enabled=precision == "fp16", **kwargs)


# ---------------------------------------------------------------------------------------------- fp32 islands

_ISLAND_STATE = threading.local()  # per thread: id(module) -> stack of ExitStacks (re-entrant modules)


def _island_stacks() -> dict[int, list[ExitStack]]:
    stacks = getattr(_ISLAND_STATE, "stacks", None)
    if stacks is None:
        stacks = _ISLAND_STATE.stacks = {}
    return stacks


def _island_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    device_type = _first_device_type((*args, *kwargs.values()))
    if device_type is None:
        p = next(module.parameters(), None)
        device_type = p.device.type if p is not None else None
    _island_stacks().setdefault(id(module), []).append(_autocast_off(device_type))
    return tuple(_upcast(a) for a in args), {k: _upcast(v) for k, v in kwargs.items()}


def _island_post_hook(module: nn.Module, args: tuple, output: Any) -> None:
    stacks = _island_stacks()
    stack = stacks.get(id(module))
    if stack:
        stack.pop().close()
        if not stack:
            del stacks[id(module)]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def find_fp32_modules(
    model: nn.Module,
    *,
    head_names: Sequence[str] = ("lm_head",),
    extra_types: tuple[type[nn.Module], ...] = (),
) -> list[tuple[str, nn.Module]]:
    """The (qualified name, module) pairs the policy keeps in fp32, in ``named_modules`` order.

    Selected: normalization modules (by type, or a class name ending in RMSNorm / LayerNorm / GroupNorm,
    which covers Hugging Face's ``LlamaRMSNorm`` and the like), ``nn.Embedding`` / ``nn.EmbeddingBag``, the
    output head (``model.get_output_embeddings()`` where the model has it, and every module whose last name
    component is in ``head_names``), and instances of ``extra_types``. A selected module's children are
    not listed again (they already run inside it with autocast off).
    """
    if isinstance(head_names, str) or not all(isinstance(n, str) for n in head_names):
        raise TypeError(f"head_names must be a sequence of names, got {head_names!r}")
    if not isinstance(extra_types, tuple) or not all(isinstance(t, type) for t in extra_types):
        raise TypeError(f"extra_types must be a tuple of module classes, got {extra_types!r}")
    heads = output_head_ids(model, head_names)
    found: list[tuple[str, nn.Module]] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in covered):
            continue
        if (
            _is_norm(module)
            or isinstance(module, _EMBEDDING_TYPES)
            or id(module) in heads
            or (extra_types and isinstance(module, extra_types))
        ):
            found.append((name, module))
            covered.append(name)
    return found


class PrecisionPolicy:
    """What :func:`apply_precision_policy` did: ``precision``, ``dtype``, ``fp32_module_names``; ``remove()``.

    ``autocast(device)`` is :func:`autocast_context` for this precision.
    """

    def __init__(self, precision: str, names: list[str], handles: list[Any]):
        self.precision = precision
        self.dtype = _DTYPES[precision]
        self.fp32_module_names = tuple(names)
        self._handles = handles

    def autocast(self, device: str | torch.device, *, fp32_functions: bool = True):
        return autocast_context(self.precision, device, fp32_functions=fp32_functions)

    def remove(self) -> None:
        """Remove the island hooks (parameters stay fp32)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __repr__(self) -> str:
        return f"PrecisionPolicy({self.precision!r}, fp32 modules: {len(self.fp32_module_names)})"


def apply_precision_policy(
    model: nn.Module,
    precision: str,
    *,
    head_names: Sequence[str] = ("lm_head",),
    extra_types: tuple[type[nn.Module], ...] = (),
) -> PrecisionPolicy:
    """Make the modules of :func:`find_fp32_modules` fp32 islands for ``precision`` "bf16" / "fp16".

    Each island gets its floating parameters and buffers cast to fp32 (in place: the ``Parameter`` objects,
    and hence tied weights and optimizers built over them, stay the same), and hooks that upcast its fp16/bf16
    inputs and disable autocast around its forward. Call it before building the optimizer. "fp32" changes
    nothing and returns an empty policy. Applying twice does not stack hooks (already-hooked modules are
    skipped). Returns a :class:`PrecisionPolicy`; run the forward under ``policy.autocast(device)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_precision(precision)
    if precision == "fp32":
        return PrecisionPolicy(precision, [], [])
    names, handles = [], []
    for name, module in find_fp32_modules(model, head_names=head_names, extra_types=extra_types):
        if getattr(module, "_lowbit_fp32_island", False):
            continue
        with torch.no_grad():
            for t in (*module.parameters(), *module.buffers()):
                if t.is_floating_point() and t.dtype != torch.float32 and t.dtype != torch.float64:
                    t.data = t.data.float()
        handles.append(module.register_forward_pre_hook(_island_pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(_island_post_hook, always_call=True))
        module._lowbit_fp32_island = True
        names.append(name)
    island_names = set(names)
    handles.append(_IslandFlagHandle([m for n, m in model.named_modules() if n in island_names]))
    return PrecisionPolicy(precision, names, handles)


class _IslandFlagHandle:
    def __init__(self, modules: list[nn.Module]):
        self.modules = modules

    def remove(self) -> None:
        for m in self.modules:
            m.__dict__.pop("_lowbit_fp32_island", None)

"""Swap a model's linear layers for OneBit ones (SVID initialization); the 1-bit round-to-nearest baseline.

Which layers: by default every ``nn.Linear`` that lives inside an ``nn.ModuleList`` — the stack of
transformer blocks (``model.layers`` of Hugging Face LLaMA: q, k, v, o, gate, up, down projections;
``transformer.h`` of ``lowbit.models.GPT``: c_attn, c_proj, c_fc, c_proj). Embeddings, norms and the output
head sit outside the block list and stay in full precision. ``module_filter_fn(module, fqn) -> bool``
replaces the default choice; it is asked about every ``nn.Linear`` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..kernels.inductor_fix import patch_inductor_read_back
from ..quant.binary import binarize_absmean
from .layer import OneBitLinear
from .svid import METHODS, svid_error

__all__ = [
    "ConvertedLayer",
    "FilterFn",
    "apply_rtn_binarization",
    "cast_parameters",
    "convert_to_onebit",
    "onebit_layers",
    "pack_onebit",
    "select_linears",
    "unpack_onebit",
]

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class ConvertedLayer:
    """One converted layer: its shape and the SVID relative error ‖W − S ⊙ h·gᵀ‖_F / ‖W‖_F."""

    in_features: int
    out_features: int
    svid_error: float


def _block_prefixes(model: nn.Module) -> list[str]:
    return [name + "." for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name]


def select_linears(model: nn.Module, module_filter_fn: FilterFn | None = None) -> list[str]:
    """Fully qualified names of the ``nn.Linear`` modules the conversion would touch, in module order.

    Default: the ones inside an ``nn.ModuleList`` (the transformer blocks). A linear whose weight is shared
    with another module (a tied output head) is rejected with ValueError when selected, since converting
    one side would silently change the other.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if module_filter_fn is not None and not callable(module_filter_fn):
        raise TypeError(f"module_filter_fn must be callable (module, fqn) -> bool, got {module_filter_fn!r}")
    prefixes = _block_prefixes(model)
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    chosen = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        keep = module_filter_fn(m, name) if module_filter_fn is not None else name.startswith(tuple(prefixes))
        if not keep:
            continue
        sharers = owners.get(id(m.weight), [])
        if len(sharers) > 1:
            raise ValueError(f"linear {name!r} shares its weight with {sharers}; untie it or filter it out")
        chosen.append(name)
    return chosen


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert_to_onebit(
    model: nn.Module,
    method: str = "nmf",
    module_filter_fn: FilterFn | None = None,
    *,
    layer_norm: bool = True,
    eps: float = 1e-5,
    keep_magnitude: bool = True,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    **svid_kwargs,
) -> dict[str, ConvertedLayer]:
    """Replace the selected ``nn.Linear`` layers of ``model`` in place by SVID-initialized ``OneBitLinear``.

    Args:
        model: any module; its linears keep their device, the new parameters get ``dtype`` (default fp32).
        method: SVID method, "nmf" (default) or "svd".
        module_filter_fn: ``(module, fqn) -> bool`` over ``nn.Linear`` modules; default: those inside an
            ``nn.ModuleList`` (see the module docstring).
        layer_norm, eps: the OneBit layer's non-affine LayerNorm (see ``OneBitLinear``).
        keep_magnitude: start the latent weight at W (True, default) or at sign(W)·0.01 (the official start).
        progress: a tqdm bar over the layers.
        svid_kwargs: passed to ``svid`` (``max_iter``, ``tol``).

    Returns:
        ``{fqn: ConvertedLayer}`` in module order (empty when nothing matched). When a layer is converted,
        inductor gets the read-back barrier of :mod:`lowbit.kernels.inductor_fix`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    names = select_linears(model, module_filter_fn)
    from tqdm.auto import tqdm

    report: dict[str, ConvertedLayer] = {}
    for name in tqdm(names, desc="SVID", disable=not progress, dynamic_ncols=True):
        linear = model.get_submodule(name)
        layer = OneBitLinear.from_linear(
            linear, method, layer_norm=layer_norm, eps=eps, keep_magnitude=keep_magnitude, dtype=dtype,
            **svid_kwargs,
        )  # fmt: skip
        _set_submodule(model, name, layer)
        # error of the factors as stored (in ``dtype``)
        error = svid_error(linear.weight.detach(), layer.signs(), layer.g, layer.h)
        report[name] = ConvertedLayer(linear.in_features, linear.out_features, error)
    if report:
        patch_inductor_read_back()  # (a torch.compile race: lowbit.kernels.inductor_fix)
    return report


@torch.no_grad()
def apply_rtn_binarization(model: nn.Module, module_filter_fn: FilterFn | None = None) -> dict[str, float]:
    """The 1-bit round-to-nearest baseline, in place: each selected ``nn.Linear`` weight becomes
    sign(W) · mean_j |W_ij| (per output row), still a dense ``nn.Linear``; no training.

    Returns ``{fqn: relative error ‖W − W_1bit‖_F / ‖W‖_F}``.
    """
    errors: dict[str, float] = {}
    for name in select_linears(model, module_filter_fn):
        weight = model.get_submodule(name).weight
        signs, scale = binarize_absmean(weight)
        w1 = (signs.float() * scale).to(weight.dtype)
        denom = float(weight.double().norm())
        errors[name] = float((weight.double() - w1.double()).norm()) / denom if denom else 0.0
        weight.copy_(w1)
    return errors


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every floating parameter to ``dtype`` in place, leaving buffers (e.g. rotary tables) alone. A
    parameter shared by several modules (a tied head) stays shared."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.dtype.is_floating_point or p.dtype == dtype:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
            setattr(module, name, done[id(p)])
    return model


def onebit_layers(model: nn.Module) -> dict[str, OneBitLinear]:
    """``{fqn: layer}`` of every ``OneBitLinear`` in ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, OneBitLinear)}


def pack_onebit(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """``layer.pack(dtype)`` for every ``OneBitLinear`` (in place); returns ``model``."""
    for layer in onebit_layers(model).values():
        layer.pack(dtype)
    return model


def unpack_onebit(model: nn.Module, **kwargs) -> nn.Module:
    """``layer.unpack(**kwargs)`` for every ``OneBitLinear`` (in place); returns ``model``."""
    for layer in onebit_layers(model).values():
        layer.unpack(**kwargs)
    return model

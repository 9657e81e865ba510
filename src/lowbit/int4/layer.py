"""``Int4Linear``: an ``nn.Linear`` whose forward and backward products run on INT4 codes (``int4_linear``).

The full-precision master weight (and bias) stay the optimizer's parameters; the codes are made fresh
every step. Per-layer state beyond the parameters:

- ``input_scale``, ``weight_scale``: learned LSQ step sizes (0-dim fp32 parameters) when
  ``config.scale_mode == "lsq"``, initialized at the first forward from that batch (2·mean|v|/sqrt(7)).
- the Hadamard block size (``config.block_size``, or chosen at the first forward for "auto").
- a ``torch.Generator`` per device for the backward pass, seeded with ``seed`` (``convert_to_int4_training``
  derives one seed per layer from ``config.seed`` and the layer's name) mixed with the process's rank when
  ``torch.distributed`` is initialized (:func:`rank_seed`), so data-parallel ranks draw different streams.

Backend ("emulate", "triton", "auto"; ``config.backend``): "auto" is decided per device at the forward call
(Triton on CUDA when it is installed and the kernels support the layer, else the emulation); the reason is
logged at DEBUG and shown by ``repr(layer)``.

All of it is in ``state_dict`` (the block size, initialization flag and generator states as extra
state), so a checkpoint round trip continues the same trajectory.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import TRITON_MAX_BLOCK, Int4TrainingConfig
from .function import (
    Int4Spec,
    auto_backend_reason,
    block_size_candidates,
    hadamard_rotate,
    int4_linear,
    lsq_init_scale,
    resolve_backend,
    select_block_size,
    triton_unsupported_reason,
)

__all__ = ["Int4Linear", "rank_seed"]

logger = logging.getLogger(__name__)

_EXTRA_STATE_VERSION = 1
# Per-call seeds of the Triton path: (seed + calls · step + rank · rank step) mod 2^31 - 1 (a prime).
_SEED_MOD = 2**31 - 1
_SEED_STEP = 48271
_RANK_STEP = 1_000_003


class Int4Linear(nn.Linear):
    """INT4 fully quantized training replacement of ``nn.Linear`` (Xi et al. 2023).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        config: :class:`Int4TrainingConfig` (default: recipe "hq-lss").
        seed: seed of this layer's backward generator (default ``config.seed``).

    Input (..., in_features) of any leading shape, fp32 / bf16 / fp16 (also under ``torch.autocast``);
    output (..., out_features) in the input's dtype (the autocast dtype under autocast). A non-float input
    raises TypeError; an ``in_features`` with no valid Hadamard block raises ValueError at construction, and
    so does a shape the Triton kernels cannot run under ``backend="triton"`` (D_in, D_out multiples of 16).

    Attribute ``reference_draws`` (default False): on the Triton backend, draw the backward's random numbers
    from this layer's generator exactly as the emulation does (``int4_linear``), so both backends follow
    the same trajectory up to rounding; slower, for tests and debugging.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: Int4TrainingConfig | None = None,
        *,
        seed: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(config, seed)

    def _setup(self, config: Int4TrainingConfig | None, seed: int | None) -> None:
        config = Int4TrainingConfig() if config is None else config
        if not isinstance(config, Int4TrainingConfig):
            raise TypeError(f"config must be an Int4TrainingConfig, got {type(config).__name__}")
        self.config = config
        self.seed = config.seed if seed is None else int(seed)
        reason = invalid_block_reason(self.in_features, config)
        if reason is not None:
            raise ValueError(reason)
        self._triton_reason = triton_unsupported_reason(config, self.in_features, self.out_features)
        if config.backend == "triton":
            resolve_backend("triton", unsupported=self._triton_reason)  # raises what the kernels lack
        self.reference_draws = False
        self._last_backend: tuple[str, str | None] | None = None
        self.block_size: int | None = config.block_size if isinstance(config.block_size, int) else None
        self.scales_initialized = not config.uses_lsq
        if config.uses_lsq:
            device = self.weight.device
            self.input_scale = nn.Parameter(torch.ones((), dtype=torch.float32, device=device))
            self.weight_scale = nn.Parameter(torch.ones((), dtype=torch.float32, device=device))
        else:
            self.register_parameter("input_scale", None)
            self.register_parameter("weight_scale", None)
        self._generators: dict[str, torch.Generator] = {}
        self._pending_rng: dict[str, torch.Tensor] = {}
        # The Triton path's random source: [seed, calls so far] on the layer's device. A buffer (moved by
        # .to(), a static input of CUDA graphs) outside state_dict (its value is in the extra state).
        self.register_buffer("_rng_state", torch.tensor([self.seed % _SEED_MOD, 0], dtype=torch.int64,
                                                        device=self.weight.device), persistent=False)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: Int4TrainingConfig | None = None, *, seed: int | None = None
    ) -> Int4Linear:
        """An Int4Linear sharing ``linear``'s weight and bias Parameters (the same objects: an optimizer that
        holds them keeps working, and the fp master weight is kept)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._setup(config, seed)
        new.train(linear.training)
        return new

    # ------------------------------------------------------------------------------------------ state

    @property
    def spec(self) -> Int4Spec:
        """The :class:`Int4Spec` of the next call (block size resolved once "auto" has chosen)."""
        return Int4Spec.from_config(self.config, self.block_size)

    def generator(self, device: torch.device) -> torch.Generator:
        """This layer's backward generator on ``device`` (created on first use, seeded with
        ``rank_seed(self.seed)``: each distributed rank draws its own stream)."""
        gen = self._generators.get(str(device))
        return gen if gen is not None else self._new_generator(device)

    @torch.compiler.disable
    def _new_generator(self, device: torch.device) -> torch.Generator:
        # Outside any compiled graph: Dynamo cannot trace Generator creation, and tracing the seeding would
        # specialize on self.seed (an int attribute: static), one recompile per layer. Once per device.
        key = str(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(rank_seed(self.seed))
        pending = self._pending_rng.pop(key, None)
        if pending is not None:
            gen.set_state(pending)
        self._generators[key] = gen
        return gen

    def get_extra_state(self) -> dict[str, Any]:
        rng = {key: gen.get_state() for key, gen in self._generators.items()}
        rng.update({k: v for k, v in self._pending_rng.items() if k not in rng})
        return {
            "version": _EXTRA_STATE_VERSION,
            "block_size": self.block_size,
            "scales_initialized": self.scales_initialized,
            "seed": self.seed,
            "rank": _rank(),
            "rng": rng,
            "kernel_calls": int(self._rng_state[1]),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != _EXTRA_STATE_VERSION:
            raise ValueError(
                f"Int4Linear: unsupported extra state {type(state).__name__} (expected version 1)"
            )
        block = state["block_size"]
        if block is not None and self.in_features % block != 0:
            raise ValueError(
                f"Int4Linear: saved block_size {block} does not divide in_features={self.in_features}"
            )
        self.block_size = block
        self.scales_initialized = bool(state["scales_initialized"])
        self.seed = int(state["seed"])
        self._generators = {}
        # A generator state belongs to the rank that saved it: a rank loading another rank's state (one
        # checkpoint written by rank 0, read by all) starts its own stream instead of replaying rank 0's.
        same_rank = int(state.get("rank", 0)) == _rank()
        self._pending_rng = {k: v.cpu() for k, v in state.get("rng", {}).items()} if same_rank else {}
        with torch.no_grad():
            self._rng_state.copy_(torch.tensor([self.seed % _SEED_MOD, int(state.get("kernel_calls", 0))]))

    # ------------------------------------------------------------------------------------------ forward

    def backend_for(self, device: torch.device) -> str:
        """The backend of a call on ``device``: "emulate" or "triton" (``config.backend`` resolved; module
        docstring). Decided once per distinct backend, device and layer constraints (``_backend_choice``);
        "auto"'s choice is logged at DEBUG."""
        unsupported = triton_unsupported_reason(self.config, self.in_features, self.out_features,
                                                self.block_size)
        found = _backend_choice(self.config.backend, str(device), unsupported, self.in_features,
                                self.out_features)
        self._last_backend = found
        return found[0]

    @torch.no_grad()
    def _first_step(self, x2d: torch.Tensor) -> None:
        """Choose the "auto" block and initialize the LSQ scales from the first batch."""
        cfg = self.config
        if cfg.hadamard and self.block_size is None:
            # The Triton kernels rotate blocks of at most 128: keep "auto" within them where they may run.
            triton_possible = cfg.backend == "triton" or (
                cfg.backend == "auto" and auto_backend_reason(x2d.device, self._triton_reason) is None
            )
            self.block_size = select_block_size(
                x2d, self.weight, scale_mode=cfg.scale_mode, granularity=cfg.granularity,
                max_block=TRITON_MAX_BLOCK if triton_possible else None,
            )
        if not self.scales_initialized:
            self.input_scale.copy_(lsq_init_scale(hadamard_rotate(x2d, self.block_size)))
            self.weight_scale.copy_(lsq_init_scale(hadamard_rotate(self.weight, self.block_size)))
            self.scales_initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                "Int4Linear: input must be a floating-point tensor, got "
                f"{getattr(x, 'dtype', type(x).__name__)}"
            )
        if (self.config.hadamard and self.block_size is None) or not self.scales_initialized:
            self._first_step(x.reshape(-1, self.in_features))
        backend = self.backend_for(x.device)
        if backend == "triton":
            return self._forward_triton(x)
        return self._forward_with_generator(x, backend)

    def _forward_with_generator(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        # The randomness from the layer's Generator (the emulation; LSQ and reference draws on Triton).
        return int4_linear(
            x,
            self.weight,
            self.bias,
            spec=self.spec,
            input_scale=self.input_scale,
            weight_scale=self.weight_scale,
            generator=self.generator(x.device),
            backend=backend,
            reference_draws=self.reference_draws,
        )

    def _forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.uses_lsq or self.reference_draws:
            return self._forward_triton_opaque(x)
        # The kernels' custom ops: traced by torch.compile, no host sync. The backward's seed comes from the
        # device counter (advanced in place) mixed with the distributed rank, so every call, layer and rank
        # draws its own stream, also when replayed from a CUDA graph.
        state = self._rng_state
        seed = (state[0:1] + state[1:2] * _SEED_STEP + _rank() * _RANK_STEP) % _SEED_MOD
        with torch.no_grad():
            state[1:2].add_(1)
        return int4_linear(x, self.weight, self.bias, spec=self.spec, backend="triton", seed=seed)

    @torch.compiler.disable
    def _forward_triton_opaque(self, x: torch.Tensor) -> torch.Tensor:
        # LSQ and reference draws use the layer's Generator: an opaque call for torch.compile, which keeps
        # the Generator and seed out of compiled frames (the layers share one compiled forward instead of
        # recompiling per layer).
        return self._forward_with_generator(x, "triton")

    def extra_repr(self) -> str:
        block = self.block_size if self.block_size is not None else self.config.block_size
        backend = self.config.backend
        if self._last_backend is not None:  # what the last call ran, and why "auto" emulated
            ran, why = self._last_backend
            if backend == "auto":
                backend += f" -> {ran}" + (f" ({why})" if why else "")
        elif backend == "auto" and self._triton_reason is not None:
            backend += f" -> emulate ({self._triton_reason})"
        return (
            f"{super().extra_repr()}, recipe={self.config.recipe}, block_size={block}, "
            f"scale_mode={self.config.scale_mode}, backend={backend}"
        )


@torch.compiler.assume_constant_result
def _backend_choice(backend: str, device: str, unsupported: str | None, in_features: int,
                    out_features: int) -> tuple[str, str | None]:
    """(backend that runs, why "auto" emulates or None) for ``config.backend`` on ``device``.

    torch.compile runs it at trace time and keeps the result as a constant: the first call of a fresh model
    may be a compiled one (``lowbit bench int4-train``), and the decision (device checks, logging) must not
    break the graph there: a graph break inside the GPT's loop over its blocks made Dynamo skip the whole
    forward frame and run it eagerly. Cached, so each distinct decision is made (and logged) once."""
    return _backend_choice_cached(backend, device, unsupported, in_features, out_features)


@functools.cache
def _backend_choice_cached(backend: str, device: str, unsupported: str | None, in_features: int,
                           out_features: int) -> tuple[str, str | None]:
    ran = resolve_backend(backend, device, unsupported)
    why = auto_backend_reason(device, unsupported) if backend == "auto" else None
    logger.debug("Int4Linear(%d, %d) on %s: backend %s -> %s%s", in_features, out_features, device, backend,
                 ran, f" ({why})" if why else "")
    return ran, why


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_seed(seed: int) -> int:
    """``seed`` mixed with this process's ``torch.distributed`` rank (``seed`` itself on rank 0 and without
    distributed), so that every data-parallel rank draws its own stochastic rounding and sampling: ranks
    sharing one stream would make their rounding errors correlated, and averaging the gradients would not
    shrink them."""
    rank = _rank()
    if rank == 0:
        return seed
    # xor with an odd multiple of the rank (golden ratio, 64 bits): distinct ranks give distinct seeds.
    return (seed ^ (rank * 0x9E37_79B9_7F4A_7C15)) & 0x7FFF_FFFF_FFFF_FFFF


def invalid_block_reason(d_in: int, config: Int4TrainingConfig) -> str | None:
    """Why ``d_in`` cannot use ``config``'s Hadamard block (None when it can)."""
    if not config.hadamard:
        return None
    if config.block_size == "auto":
        if not block_size_candidates(d_in):
            return f"D_in={d_in} has no power-of-two Hadamard block >= 2 (block_size='auto')"
        return None
    if d_in % config.block_size != 0:
        return f"D_in={d_in} is not a multiple of the Hadamard block_size={config.block_size}"
    return None

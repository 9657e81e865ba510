"""OneBitLinear: a linear layer with a ±1 weight matrix and two full-precision scale vectors.

    y = LN( ((x ⊙ g) · Sᵀ) ⊙ h ) + bias                                  (Xu et al. 2024, eq. 6)

S ∈ {-1, +1}^(out×in), g (in_features,) scales the input, h (out_features,) the output, LN is a LayerNorm
over the out_features without affine parameters (as ``BitLinear`` in the official code), switchable off
(``layer_norm=False``: then y = ((x ⊙ g) · Sᵀ) ⊙ h + bias, which equals x·Wᵀ for W = S ⊙ h·gᵀ).

Two forms, the same output bit for bit (the forward is one function; only where S comes from differs):

- training form: a latent floating weight ``weight`` (out, in) whose sign is S (sign(0) = +1). The forward
  uses a straight-through estimator: d sign(w)/dw := 1 for |w| <= 1, 0 beyond (the clipped STE of
  BinaryConnect; the official code's 1.001 − tanh(w)² is the same to 0.1 % for the small |w| of LLM
  weights). g, h and bias are ordinary parameters.
- packed form: S as bits in the uint8 buffer ``weight_packed`` (out, ceil(in / 8)), 8 signs per byte along
  in_features as ``lowbit.quant.pack_bits`` lays them out, plus g, h (and bias) in any float dtype, e.g.
  fp16/bf16 after ``pack(torch.float16)``. On CUDA, when no gradient is needed (``torch.no_grad()``,
  inference) and autocast is off, the forward runs the fused kernel ``lowbit.kernels.onebit.onebit_matmul``
  (S read as bits, post-LN fused); elsewhere it unpacks S to the activation dtype (the reference math). The
  two agree within the kernel's derived bound (fp32 summation order and the output rounding).

The kernel call is cheap on the host: the int32 word view of ``weight_packed`` is made once (and again
only when the buffer is replaced or changed in place), and the launch parameters come from the kernels'
plan cache (``lowbit.kernels.onebit.onebit_linear_packed``). Under ``torch.compile`` the same call is the
custom op ``torch.ops.lowbit.onebit_linear`` (one graph node, no graph break; its fake gives the output
shape and dtype).

``pack()`` / ``unpack()`` switch in place. The LayerNorm runs in fp32 and is cast back to the dtype of the
product, so low-precision activations do not lose the normalization's accuracy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.binary import sign_pm1
from ..quant.packing import pack_bits, unpack_bits

__all__ = ["DEFAULT_LATENT_SCALE", "OneBitLinear", "onebit_linear", "sign_ste"]

#: Device types on which the packed forward uses ``lowbit.kernels.onebit`` (tests add "cpu" when the
#: kernels run in the Triton interpreter).
KERNEL_DEVICES: tuple[str, ...] = ("cuda",)
_KERNEL_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16))

_kernels_module = None


def _kernels():
    """lowbit.kernels.onebit, imported on first use (it imports Triton)."""
    global _kernels_module
    if _kernels_module is None:
        from ..kernels import onebit

        _kernels_module = onebit
    return _kernels_module


@torch.library.custom_op("lowbit::onebit_linear", mutates_args=())
def _onebit_linear_op(
    x: torch.Tensor,
    signs_packed: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    n: int,
    layernorm_eps: float | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """LN?(h ⊙ ((x ⊙ g) · Sᵀ)) from packed signs (uint8 ``pack_bits`` or int32 words), no bias: the packed
    layer's kernel forward as one opaque op for torch.compile. Inference only (no autograd formula)."""
    k = _kernels()
    words = k.as_int32_words(signs_packed, n)
    if words.stride(1) != 1:
        words = words.contiguous()
    return k.onebit_linear_packed(x, words, g.contiguous(), h.contiguous(), n, out_dtype=out_dtype,
                                  layernorm_eps=layernorm_eps)


@_onebit_linear_op.register_fake
def _(x, signs_packed, g, h, n, layernorm_eps, out_dtype):
    return x.new_empty((*x.shape[:-1], signs_packed.shape[0]), dtype=out_dtype)


#: Magnitude of the latent weight ``unpack()`` rebuilds (the official start checkpoint uses sign(W)·0.01).
DEFAULT_LATENT_SCALE = 1e-2


def sign_ste(w: torch.Tensor) -> torch.Tensor:
    """sign(w) (±1 in w's dtype, sign(0) = +1) forward; gradient 1 where |w| <= 1 and 0 elsewhere."""
    clipped = w.clamp(-1.0, 1.0)
    return clipped + (sign_pm1(w) - clipped).detach()


def onebit_linear(
    x: torch.Tensor,
    signs: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    layer_norm: bool = True,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Functional OneBit layer: ``LN(((x ⊙ g) · signsᵀ) ⊙ h) + bias`` (no LN when ``layer_norm`` is False).

    Args:
        x: (..., in) activations. signs: (out, in) ±1 in a floating dtype (cast to the dtype of x ⊙ g).
        g: (in,), h: (out,), bias: (out,) or None.
        layer_norm: apply a LayerNorm without affine parameters over the last dim, in fp32, eps ``eps``.

    Returns:
        (..., out); dtype follows PyTorch type promotion of x, g and h (under autocast the matmul runs in
        the autocast dtype).
    """
    xg = x * g  # (..., in)
    y = F.linear(xg, signs.to(xg.dtype)) * h  # (..., out)
    if layer_norm:
        y = F.layer_norm(y.float(), (y.shape[-1],), eps=eps).to(y.dtype)
    if bias is not None:
        y = y + bias
    return y


class OneBitLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` with a 1-bit weight (see the module docstring for the math).

    Args:
        in_features, out_features: sizes (>= 1).
        bias: learnable bias added after the LayerNorm (default False, as LLaMA projections).
        layer_norm: the non-affine LayerNorm of the official implementation (default True).
        eps: its epsilon (default 1e-5, ``nn.LayerNorm``'s).
        packed: build the packed form (zero bits) directly, e.g. as a shell to load a checkpoint into.
        device, dtype: of the float parameters (latent weight, g, h, bias).

    A fresh layer has a random latent weight (N(0, 1) · DEFAULT_LATENT_SCALE / sqrt(in_features)), g = h = 1
    and a zero bias. Use :meth:`from_linear` (SVID of a trained weight) or :meth:`from_svid` for a
    meaningful start.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        layer_norm: bool = True,
        eps: float = 1e-5,
        packed: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.layer_norm = bool(layer_norm)
        self.eps = float(eps)
        factory = {"device": device, "dtype": dtype}
        self.g = nn.Parameter(torch.ones(in_features, **factory))
        self.h = nn.Parameter(torch.ones(out_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        if packed:
            self.register_parameter("weight", None)
            self.register_buffer(
                "weight_packed",
                torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8, device=device),
            )
        else:
            w = torch.randn(out_features, in_features, **factory) * (DEFAULT_LATENT_SCALE / in_features**0.5)
            self.weight = nn.Parameter(w)
            self.register_buffer("weight_packed", None)

    # ------------------------------------------------------------------------------------------ builders

    @classmethod
    def from_svid(
        cls,
        signs: torch.Tensor,
        g: torch.Tensor,
        h: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        latent: torch.Tensor | None = None,
        layer_norm: bool = True,
        eps: float = 1e-5,
        dtype: torch.dtype = torch.float32,
    ) -> OneBitLinear:
        """Training-form layer from SVID factors.

        Args:
            signs: (out, in) ±1 (any dtype). g: (in,). h: (out,). bias: (out,) or None.
            latent: (out, in) latent weight; its signs must equal ``signs`` (sign(0) = +1). Default
                ``signs · DEFAULT_LATENT_SCALE``. Passing the original weight keeps its magnitudes, so the
                least confident signs flip first.
            dtype: of every float parameter (default fp32, the master copy for training).
        """
        if signs.ndim != 2:
            raise ValueError(f"signs must be 2-D (out_features, in_features), got {tuple(signs.shape)}")
        out_f, in_f = signs.shape
        if g.shape != (in_f,) or h.shape != (out_f,):
            raise ValueError(
                f"g must have shape ({in_f},) and h ({out_f},) for signs {tuple(signs.shape)}, "
                f"got {tuple(g.shape)} and {tuple(h.shape)}"
            )
        if bias is not None and bias.shape != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        layer = cls(
            in_f, out_f, bias is not None, layer_norm=layer_norm, eps=eps, device=signs.device, dtype=dtype
        )
        with torch.no_grad():
            if latent is None:
                layer.weight.copy_(signs.to(dtype) * DEFAULT_LATENT_SCALE)
            else:
                if latent.shape != signs.shape:
                    raise ValueError(
                        f"latent must have shape {tuple(signs.shape)}, got {tuple(latent.shape)}"
                    )
                if not torch.equal(sign_pm1(latent.detach()).to(torch.int8), signs.to(torch.int8)):
                    raise ValueError("latent's signs (sign(0) = +1) must equal signs")
                layer.weight.copy_(latent.detach().to(dtype))
            layer.g.copy_(g.detach().to(dtype))
            layer.h.copy_(h.detach().to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.detach().to(dtype))
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        method: str = "nmf",
        *,
        layer_norm: bool = True,
        eps: float = 1e-5,
        keep_magnitude: bool = True,
        dtype: torch.dtype = torch.float32,
        **svid_kwargs,
    ) -> OneBitLinear:
        """SVID-initialized layer replacing ``linear``: S = sign(W), |W| ≈ h gᵀ (see ``lowbit.onebit.svid``).

        ``keep_magnitude`` (default True) starts the latent weight at W itself (same signs, the least
        confident signs flip first); False uses sign(W)·DEFAULT_LATENT_SCALE as the official start checkpoint.
        """
        from .svid import svid

        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        signs, g, h = svid(w, method, **svid_kwargs)
        return cls.from_svid(
            signs,
            g,
            h,
            linear.bias,
            latent=w if keep_magnitude else None,
            layer_norm=layer_norm,
            eps=eps,
            dtype=dtype,
        )

    # ------------------------------------------------------------------------------------------ forms

    @property
    def is_packed(self) -> bool:
        return self.weight_packed is not None

    def signs(self) -> torch.Tensor:
        """S as an int8 ±1 (out, in) tensor, from either form."""
        if self.is_packed:
            return unpack_bits(self.weight_packed, self.in_features, dtype=torch.int8)
        return sign_pm1(self.weight.detach()).to(torch.int8)

    def dense_weight(self) -> torch.Tensor:
        """S ⊙ h·gᵀ (out, in) in the dtype of h: the weight the layer applies before its LayerNorm."""
        return self.signs().to(self.h.dtype) * self.h.detach()[:, None] * self.g.detach()[None, :]

    @torch.no_grad()
    def pack(self, dtype: torch.dtype | None = None) -> OneBitLinear:
        """Switch to the packed form in place (a no-op on the signs when packed already) and return self.

        ``dtype`` (e.g. torch.float16) also casts g, h and bias; their ``requires_grad`` is kept.
        """
        self.__dict__.pop("_words_cache", None)
        if not self.is_packed:
            packed = pack_bits(self.weight >= 0)  # bool: True = +1, so sign(0) = +1
            self.weight = None
            self.weight_packed = packed
        if dtype is not None:
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
            for name in ("g", "h", "bias"):
                p = getattr(self, name)
                if p is not None:
                    setattr(self, name, nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))
        return self

    @torch.no_grad()
    def unpack(self, latent_scale: float = DEFAULT_LATENT_SCALE) -> OneBitLinear:
        """Switch to the training form in place and return self. The latent weight is S · ``latent_scale``
        (> 0) in g's dtype: packing kept only the signs, not the latent magnitudes."""
        if (
            not isinstance(latent_scale, (int, float))
            or isinstance(latent_scale, bool)
            or not latent_scale > 0
        ):
            raise ValueError(f"latent_scale must be a number > 0, got {latent_scale!r}")
        self.__dict__.pop("_words_cache", None)
        if self.is_packed:
            w = unpack_bits(self.weight_packed, self.in_features, dtype=self.g.dtype) * latent_scale
            self.weight_packed = None
            self.weight = nn.Parameter(w)
        return self

    def _kernel_usable(self, x: torch.Tensor) -> bool:
        """The packed forward runs the fused 1-bit kernel when no gradient is needed, x is on CUDA (a device
        in ``KERNEL_DEVICES``) and autocast is off; elsewhere it unpacks S (the reference math)."""
        if not self.is_packed or x.device.type not in KERNEL_DEVICES:
            return False
        return self._kernel_ok(x, self.g, self.h, self.bias)

    @staticmethod
    def _kernel_ok(x: torch.Tensor, g: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None) -> bool:
        kd = _KERNEL_DTYPES
        if x.dtype not in kd or g.dtype not in kd or h.dtype not in kd:
            return False
        if torch.is_grad_enabled() and (
            x.requires_grad or g.requires_grad or h.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        return _kernels().triton_usable(x.device)

    def _kernel_words(self, wp: torch.Tensor | None = None) -> torch.Tensor:
        """``weight_packed`` as int32 words (``as_int32_words``: a view when rows are whole words), made once
        and kept until the buffer is replaced (``pack``, ``.to()``, assignment) or changed in place (its
        version counter, e.g. ``load_state_dict``)."""
        if wp is None:
            wp = self.weight_packed
        cache = self.__dict__.get("_words_cache")
        if cache is None or cache[0] is not wp or cache[1] != wp._version:
            words = _kernels().as_int32_words(wp, self.in_features)
            if words.stride(1) != 1:
                words = words.contiguous()
            cache = (wp, wp._version, words)
            self.__dict__["_words_cache"] = cache
        return cache[2]

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_words_cache", None)  # .to() / .cuda() replace the buffer: drop the old view
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        # (parameters and buffers read from their dicts: nn.Module.__getattr__ costs ~0.5 µs per access, and
        # this is the per-token path of decoding)
        wp = self._buffers["weight_packed"]
        if wp is not None and x.device.type in KERNEL_DEVICES:
            params = self._parameters
            g, h, bias = params["g"], params["h"], params.get("bias")
            if self._kernel_ok(x, g, h, bias):
                # the dtype the reference math gives: promotion of x, g and h (the LN keeps it)
                xd = x.dtype
                out_dtype = xd if g.dtype == xd and h.dtype == xd else torch.promote_types(
                    torch.promote_types(xd, g.dtype), h.dtype)
                eps = self.eps if self.layer_norm else None
                if torch.compiler.is_compiling():  # one graph node
                    y = torch.ops.lowbit.onebit_linear(x, wp, g, h, self.in_features, eps, out_dtype)
                else:  # eager: the cached words and launch plan, no argument checks
                    y = _kernels().onebit_linear_packed(x, self._kernel_words(wp), g.contiguous(),
                                                        h.contiguous(), self.in_features, out_dtype=out_dtype,
                                                        layernorm_eps=eps)
                return y if bias is None else y + bias
        if self.is_packed:
            signs = unpack_bits(self.weight_packed, self.in_features, dtype=x.dtype)
        else:
            signs = sign_ste(self.weight)
        return onebit_linear(x, signs, self.g, self.h, self.bias, layer_norm=self.layer_norm, eps=self.eps)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, layer_norm={self.layer_norm}, packed={self.is_packed}"
        )

"""lowbit.int4.layer and lowbit.int4.config: Int4Linear state (LSQ init, auto block, RNG), checkpoints,
autocast, and clear errors for bad configurations and inputs."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.nn as nn

from lowbit.int4 import Int4Linear, Int4TrainingConfig, hadamard_rotate, lsq_init_scale


def _step(layer: Int4Linear, x: torch.Tensor, grad: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(grad)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), grads


# ---------------------------------------------------------------------------------------------- config


def test_recipes_resolve_their_fields():
    paper = Int4TrainingConfig()
    assert (paper.recipe, paper.hadamard, paper.block_size, paper.lss, paper.grad_quantizer) == (
        "hq-lss",
        True,
        32,
        True,
        "bit_split",
    )
    assert (paper.scale_mode, paper.granularity) == ("absmax", "row")
    assert Int4TrainingConfig(scale_mode="lsq").granularity == "tensor"  # LSQ: one learned scale per tensor
    assert Int4TrainingConfig.named("hq").lss is False
    rtn = Int4TrainingConfig.named("rtn")
    assert (rtn.hadamard, rtn.block_size, rtn.grad_quantizer, rtn.scale_mode) == (
        False,
        None,
        "rtn",
        "absmax",
    )
    assert Int4TrainingConfig(**paper.to_dict()) == paper
    assert dataclasses.replace(paper, lss=False).lss is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        paper.lss = False


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"recipe": "int4"}, "recipe must be one of"),
        ({"recipe": "rtn", "block_size": 32}, "no Hadamard transform: block_size must be None"),
        ({"block_size": 24}, "power of two >= 2 or 'auto'"),
        ({"block_size": 1}, "power of two >= 2 or 'auto'"),
        ({"scale_mode": "minmax"}, "scale_mode must be one of"),
        ({"granularity": "group"}, "granularity must be one of"),
        ({"scale_mode": "lsq", "granularity": "row"}, "granularity must be 'tensor'"),
        ({"recipe": "rtn", "lss": True}, "does not split it"),
        ({"lss_keep_ratio": 0.0}, r"lss_keep_ratio must be a number in \(0, 1\]"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"recipe": "hq", "grad_quantizer": "rtn"}, "fixed by the recipe"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Int4TrainingConfig(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="D_in=48 is not a multiple of the Hadamard block_size=32"):
        Int4Linear(48, 8)
    with pytest.raises(ValueError, match="D_in=7 has no power-of-two Hadamard block"):
        Int4Linear(7, 8, config=Int4TrainingConfig(block_size="auto"))
    Int4Linear(48, 8, config=Int4TrainingConfig.named("rtn"))  # no Hadamard: any D_in
    layer = Int4Linear(64, 8)
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        layer(torch.ones(2, 64, dtype=torch.int64))
    with pytest.raises(TypeError, match="config must be an Int4TrainingConfig"):
        Int4Linear(64, 8, config={"recipe": "hq"})


def test_from_linear_shares_the_master_weight():
    lin = nn.Linear(64, 16)
    layer = Int4Linear.from_linear(lin)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert (layer.in_features, layer.out_features) == (64, 16)
    x = torch.randn(4, 64)
    y = layer(x)
    assert y.shape == (4, 16) and not torch.equal(y, lin(x))  # quantized (SQNR floors: test_convert.py)


def test_lsq_scales_initialize_from_the_first_batch_and_learn():
    torch.manual_seed(0)
    layer = Int4Linear(64, 16, config=Int4TrainingConfig(scale_mode="lsq"))
    assert not layer.scales_initialized
    x = torch.randn(3, 5, 64)
    layer(x).sum().backward()
    assert layer.scales_initialized
    assert torch.equal(layer.input_scale.detach(), lsq_init_scale(hadamard_rotate(x.reshape(-1, 64), 32)))
    assert torch.equal(layer.weight_scale.detach(), lsq_init_scale(hadamard_rotate(layer.weight, 32)))
    assert layer.input_scale.grad is not None and float(layer.input_scale.grad) != 0.0
    s0 = layer.input_scale.detach().clone()
    layer(torch.randn(3, 5, 64) * 10)  # later batches do not re-initialize
    assert torch.equal(layer.input_scale.detach(), s0)


def test_auto_block_is_chosen_once():
    torch.manual_seed(0)
    layer = Int4Linear(96, 8, config=Int4TrainingConfig(block_size="auto"))
    assert layer.block_size is None
    x = torch.randn(16, 96)
    x[:, 0] *= 100.0
    layer(x)
    chosen = layer.block_size
    assert chosen in (2, 4, 8, 16, 32) and 96 % chosen == 0
    layer(torch.randn(16, 96))
    assert layer.block_size == chosen


@pytest.mark.parametrize("overrides", [{}, {"scale_mode": "lsq", "block_size": "auto"}, {"recipe": "rtn"}])
def test_state_dict_round_trip_continues_the_same_trajectory(overrides):
    torch.manual_seed(0)
    cfg = Int4TrainingConfig(**overrides)
    a = Int4Linear(64, 16, config=cfg, seed=5)
    x, grad = torch.randn(8, 64), torch.randn(8, 16)
    _step(a, x, grad)  # initializes scales / block, advances the generator
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # what lowbit.trainer.load_checkpoint does
    b = Int4Linear(64, 16, config=cfg, seed=99)
    b.load_state_dict(state)
    assert b.block_size == a.block_size and b.seed == 5
    ya, ga = _step(a, x, grad)
    yb, gb = _step(b, x, grad)
    assert torch.equal(ya, yb)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)


def test_backward_is_reproducible_per_seed():
    torch.manual_seed(0)
    x, grad = torch.randn(32, 64), torch.randn(32, 16)
    w = torch.randn(16, 64)

    def grads(seed):
        layer = Int4Linear(64, 16, bias=False, seed=seed)
        layer.weight.data.copy_(w)
        return _step(layer, x, grad)[1]["weight"]

    assert torch.equal(grads(1), grads(1))
    assert not torch.equal(grads(1), grads(2))


def test_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    layer = Int4Linear(64, 16)
    x = torch.randn(2, 4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    # The input is read in bf16, as F.linear under autocast reads it (both backends: the same input to
    # quantize); inside, the codes and products are fp32 whatever autocast says, and the output is cast.
    assert torch.equal(y, layer(x.to(torch.bfloat16)).to(torch.bfloat16))
    assert not torch.equal(x, x.to(torch.bfloat16).float())  # (the cast is not a no-op here)


def test_extra_repr_and_bad_extra_state():
    layer = Int4Linear(64, 8)
    assert "recipe=hq-lss" in repr(layer) and "block_size=32" in repr(layer)
    with pytest.raises(ValueError, match="unsupported extra state"):
        layer.set_extra_state({"version": 99})

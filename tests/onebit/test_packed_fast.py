"""The packed OneBitLinear's fast kernel path: cached int32 words and launch plans (eager) and the custom op
``lowbit::onebit_linear`` (torch.compile). On the CPU the kernels run in the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1); tiny shapes keep that fast."""

import pytest
import torch
import torch.nn as nn

import lowbit.onebit.layer as layer_mod
from lowbit.onebit import OneBitLinear

pytest.importorskip("triton")


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    import lowbit.kernels.onebit as kernels

    if not kernels._INTERPRETED:
        pytest.skip("the kernels are compiled for CUDA in this process (no interpreter)")
    monkeypatch.setattr(layer_mod, "KERNEL_DEVICES", ("cpu",))
    return kernels


def _packed_layer(in_f, out_f, *, seed=0, dtype=torch.bfloat16, bias=True, layer_norm=True):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    return OneBitLinear.from_linear(lin, layer_norm=layer_norm).pack(dtype)


@pytest.mark.parametrize("in_f,layer_norm", [(70, True), (64, False)])  # 70: rows padded to words (a copy)
def test_eager_fast_path_equals_onebit_matmul(kernels_on_cpu, in_f, layer_norm):
    layer = _packed_layer(in_f, 24, layer_norm=layer_norm)
    x = torch.randn(2, 1, in_f, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        ref = kernels_on_cpu.onebit_matmul(x, layer.weight_packed, layer.g, layer.h, in_f,
                                           layernorm_eps=layer.eps if layer_norm else None) + layer.bias
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_words_are_converted_once_and_follow_the_buffer(kernels_on_cpu):
    layer = _packed_layer(70, 16, seed=1)
    other = _packed_layer(70, 16, seed=2)
    x = torch.randn(1, 70, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)
        words = layer._kernel_words()
        layer(x)
        assert layer._kernel_words() is words  # no conversion per call
        layer.load_state_dict(other.state_dict())  # in place: the version counter moves
        assert layer._kernel_words() is not words
        torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)
        layer.weight_packed = other.weight_packed.clone()  # a new buffer
        torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)
    layer.unpack()
    assert "_words_cache" not in layer.__dict__


def test_whole_word_rows_are_viewed_not_copied(kernels_on_cpu):
    layer = _packed_layer(64, 8)
    with torch.no_grad():
        assert layer._kernel_words().data_ptr() == layer.weight_packed.data_ptr()
        layer.to(torch.float32)  # _apply: the cache is dropped with the old buffers
        assert "_words_cache" not in layer.__dict__


def test_torch_compile_one_graph_without_breaks(kernels_on_cpu):
    """Under torch.compile the kernel forward is the custom op lowbit::onebit_linear: one graph, no break,
    the eager result bit for bit (fullgraph=True would raise on a break)."""
    layer = _packed_layer(70, 24, seed=3)
    x = torch.randn(1, 70, dtype=torch.bfloat16)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = layer(x)
            explain = torch._dynamo.explain(layer)(x)
            assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
            code = explain.graphs[0].code
            assert "torch.ops.lowbit.onebit_linear" in code
            compiled = torch.compile(layer, backend="eager", fullgraph=True)
            torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
            x3 = torch.randn(2, 3, 70, dtype=torch.bfloat16)
            torch.testing.assert_close(compiled(x3), layer(x3), rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_custom_op_passes_opcheck(kernels_on_cpu):
    """Schema, fake (meta) implementation and dispatch of lowbit::onebit_linear (uint8 and int32 signs)."""
    from lowbit.quant import pack_bits_int32

    layer = _packed_layer(70, 24, seed=4)
    g, h = layer.g.detach(), layer.h.detach()
    x = torch.randn(3, 70, dtype=torch.bfloat16)
    op = torch.ops.lowbit.onebit_linear.default
    torch.library.opcheck(op, (x, layer.weight_packed, g, h, 70, 1e-5, torch.bfloat16))
    signs = layer.signs() > 0
    torch.library.opcheck(op, (x[:1], pack_bits_int32(signs), g, h, 70, None, torch.float32))

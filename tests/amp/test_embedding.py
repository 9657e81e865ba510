"""shrink_embedding_grad: forward unchanged bit for bit, gradient through the lookup times alpha."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lowbit.amp import scale_grad, shrink_embedding_grad
from lowbit.models import GPT, GPTConfig


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=37, n_layer=1, n_head=2, n_embd=16, block_size=8))


def grads(model, x):
    model.zero_grad(set_to_none=True)
    logits, loss = model(x, x)
    loss.backward()
    return logits.detach(), {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.25])
def test_scale_grad_exact(alpha):
    x = torch.randn(5, 3, requires_grad=True)
    y = scale_grad(x, alpha)
    assert torch.equal(y, x)
    g = torch.randn(5, 3)
    y.backward(g)
    assert torch.equal(x.grad, g * alpha)


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_gpt_embedding_grad_shrunk_head_grad_kept(alpha):
    model = tiny_gpt()
    x = torch.randint(0, 37, (3, 8))
    logits_ref, g_full = grads(model, x)
    # the head's share of the tied weight's gradient: the same loss with the embedding outputs detached
    hooks = [
        m.register_forward_hook(lambda m, a, o: o.detach())
        for m in model.modules()
        if isinstance(m, nn.Embedding)
    ]
    _, g_head = grads(model, x)
    for h in hooks:
        h.remove()

    handle = shrink_embedding_grad(model, alpha)
    assert set(handle.module_names) == {"transformer.wte", "transformer.wpe"}
    logits, g = grads(model, x)
    assert torch.equal(logits, logits_ref)  # forward bit for bit unchanged
    w = "transformer.wte.weight"
    expected = g_head[w] + alpha * (g_full[w] - g_head[w])
    # two fp32 sums of the same terms in a different order: a few ulps of the largest magnitude
    torch.testing.assert_close(g[w], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        g["transformer.wpe.weight"], alpha * g_full["transformer.wpe.weight"], rtol=1e-6, atol=0
    )
    for name in g:  # everything past the embeddings is untouched
        if name not in (w, "transformer.wpe.weight"):
            assert torch.equal(g[name], g_full[name]), name

    handle.remove()
    _, g_again = grads(model, x)
    assert torch.equal(g_again[w], g_full[w])


def test_filter_and_alpha_one():
    model = tiny_gpt()
    h = shrink_embedding_grad(model, 0.1, module_filter_fn=lambda m, name: name.endswith("wte"))
    assert h.module_names == ("transformer.wte",)
    assert shrink_embedding_grad(model, 1.0).module_names == ()


@pytest.mark.parametrize("alpha", [0, -0.1, 1.5, True])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        shrink_embedding_grad(tiny_gpt(), alpha)

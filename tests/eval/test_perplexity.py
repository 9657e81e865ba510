import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.eval import IGNORE_INDEX, perplexity, sliding_windows

V = 11


class Bigram(nn.Module):
    """Logits depend on the current token only, so every window split gives the same per-token loss.

    ``style`` picks the output convention: "lowbit" (logits, loss), "hf" (object with .logits), "tensor".
    """

    def __init__(self, style="lowbit"):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(V, V)
        self.style = style
        self.config = SimpleNamespace(block_size=6)

    def forward(self, x, targets=None):
        logits = self.table(x)
        if self.style == "hf":
            return SimpleNamespace(logits=logits, loss=None)
        if self.style == "tensor":
            return logits
        return logits, None


def _reference(model, tokens):
    """Exact mean cross-entropy of the bigram model over the whole sequence, in float64."""
    logits = model.table.weight.double()[tokens[:-1]]
    return F.cross_entropy(logits, tokens[1:], reduction="mean").item()


TOKENS = torch.randint(V, (103,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("n", [2, 3, 10, 17, 103])
@pytest.mark.parametrize("block, stride", [(4, None), (4, 1), (4, 3), (8, 8), (200, None)])
def test_windows_score_each_target_once(n, block, stride):
    tokens = torch.arange(100, 100 + n)  # token value = position + 100, so positions can be read back
    x, y = sliding_windows(tokens, block, stride)
    t = min(block, n - 1)
    assert x.shape == y.shape == (x.shape[0], t)
    scored = y[y != IGNORE_INDEX] - 100
    assert sorted(scored.tolist()) == list(range(1, n))  # every target position 1..n-1 exactly once
    # targets are the inputs shifted by one
    assert torch.equal(y[y != IGNORE_INDEX], x[y != IGNORE_INDEX] + 1)


def test_windows_non_overlapping_by_default():
    x, y = sliding_windows(torch.arange(13), 4)
    assert x[:, 0].tolist() == [0, 4, 8]  # 12 targets = 3 windows of 4, no tail
    assert (y != IGNORE_INDEX).all()


@pytest.mark.parametrize(
    "tokens, kw, err, match",
    [
        (torch.arange(1), dict(block_size=4), ValueError, "at least 2 tokens"),
        (torch.arange(6).view(2, 3), dict(block_size=4), ValueError, "1-D"),
        (torch.rand(6), dict(block_size=4), TypeError, "integer"),
        (torch.arange(6), dict(block_size=0), ValueError, "block_size"),
        (torch.arange(6), dict(block_size=4, stride=5), ValueError, "stride"),
    ],
)
def test_windows_errors(tokens, kw, err, match):
    with pytest.raises(err, match=match):
        sliding_windows(tokens, **kw)


@pytest.mark.parametrize("style", ["lowbit", "hf", "tensor"])
@pytest.mark.parametrize(
    "block, stride, batch_size", [(6, None, 1), (6, 2, 4), (5, None, 64), (None, None, 3)]
)
def test_matches_full_sequence_loss(style, block, stride, batch_size):
    model = Bigram(style)
    res = perplexity(model, TOKENS, block_size=block, stride=stride, batch_size=batch_size)
    ref = _reference(model, TOKENS)
    # fp32 per-token terms (relative error ~1e-7 each) summed in float64
    assert res.loss == pytest.approx(ref, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(ref), rel=1e-6)
    assert res.tokens == TOKENS.numel() - 1


def test_batches_input_with_ignored_targets_and_max_batches():
    model = Bigram()
    x = TOKENS[:-1].view(6, 17)
    y = TOKENS[1:].view(6, 17).clone()
    y[:, :5] = IGNORE_INDEX
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    res = perplexity(model, batches)
    mask = y != IGNORE_INDEX
    ref = F.cross_entropy(model.table.weight.double()[x[mask]], y[mask]).item()
    assert res.loss == pytest.approx(ref, rel=1e-6) and res.tokens == int(mask.sum())
    first = perplexity(model, batches, max_batches=1)
    assert first.tokens == int(mask[:3].sum())


def test_uniform_model_has_ppl_vocab_size():
    class Uniform(nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, V)

    res = perplexity(Uniform(), TOKENS, block_size=8)
    assert res.loss == pytest.approx(math.log(V), rel=1e-7)  # exact up to fp32 log-sum-exp rounding
    assert res.ppl == pytest.approx(V, rel=1e-6)


def test_restores_training_mode_and_disables_dropout():
    model = nn.Sequential(nn.Embedding(V, 16), nn.Dropout(0.5), nn.Linear(16, V))
    model.train()
    a = perplexity(model, TOKENS, block_size=8)
    b = perplexity(model, TOKENS, block_size=8)
    assert a == b  # eval mode: dropout off, deterministic
    assert model.training


def test_bf16_autocast_applies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, 64), nn.Linear(64, V))
    fp32 = perplexity(model, TOKENS, block_size=8)
    bf16 = perplexity(model, TOKENS, block_size=8, precision="bf16")
    assert bf16.loss != fp32.loss  # the Linear ran in bf16
    # bf16 rounds the Linear's inputs and weights (relative 2^-8 each), so each logit moves by at most
    # about 2 * 2^-8 * sum_k |x_k w_k|; the cross-entropy moves by at most 2 * max |delta logit|.
    x = model[0].weight
    bound = 2 * 2 * 2**-8 * (x.abs() @ model[1].weight.abs().t()).max().item()
    assert abs(bf16.loss - fp32.loss) <= bound


def test_errors():
    model = Bigram()
    with pytest.raises(ValueError, match="precision"):
        perplexity(model, TOKENS, precision="fp8")
    with pytest.raises(ValueError, match="no target tokens"):
        perplexity(model, [])
    with pytest.raises(ValueError, match="block_size is required"):
        perplexity(nn.Embedding(V, V), TOKENS)
    with pytest.raises(ValueError, match=r"expected \(B, T, vocab\)"):
        perplexity(lambda_model(lambda x: torch.zeros(x.shape[0], V)), TOKENS, block_size=4)
    with pytest.raises(TypeError, match="model output"):
        perplexity(lambda_model(lambda x: "nope"), TOKENS, block_size=4)


def lambda_model(fn):
    class M(nn.Module):
        def forward(self, x):
            return fn(x)

    return M()

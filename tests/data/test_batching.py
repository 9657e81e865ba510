import io
import math

import pytest
import torch

from lowbit.data import TokenBatcher


def _stream(n: int) -> torch.Tensor:
    # token value == its position, so a window's start is its first value
    return torch.arange(n, dtype=torch.long)


@pytest.mark.parametrize(("n", "batch_size", "block_size"), [(1000, 4, 16), (9, 3, 8), (300, 1, 1)])
def test_sample_shapes_and_shift(n, batch_size, block_size):
    b = TokenBatcher(_stream(n), batch_size, block_size, generator=0)
    for _ in range(20):
        x, y = b.sample()
        assert x.shape == y.shape == (batch_size, block_size)
        assert x.dtype == y.dtype == torch.long
        # each row is a contiguous slice of the stream and y is x shifted by one
        starts = x[:, :1]
        assert torch.equal(x, starts + torch.arange(block_size))
        assert torch.equal(y, x + 1)
        assert int(starts.min()) >= 0 and int(y.max()) <= n - 1
    assert b.batches_drawn == 20


def test_sample_starts_are_uniform_over_all_valid_positions():
    # n - T = 4 valid starts {0, 1, 2, 3}; 4000 draws: each count ~ Binomial(4000, 1/4),
    # sd = sqrt(4000 * 1/4 * 3/4) = 27.4; allow 5 sd.
    n, T, B, draws = 12, 8, 100, 40
    b = TokenBatcher(_stream(n), B, T, generator=1)
    starts = torch.cat([b.sample()[0][:, 0] for _ in range(draws)])
    counts = torch.bincount(starts, minlength=n - T)
    assert counts.numel() == n - T  # nothing beyond the last valid start
    expected, sd = B * draws / (n - T), math.sqrt(B * draws * (1 / 4) * (3 / 4))
    assert (counts.float() - expected).abs().max() <= 5 * sd


def test_sample_is_deterministic_from_the_seed():
    tokens = torch.randint(0, 50, (5000,), generator=torch.Generator().manual_seed(0))
    a = TokenBatcher(tokens, 8, 32, generator=123)
    b = TokenBatcher(tokens, 8, 32, generator=torch.Generator().manual_seed(123))
    c = TokenBatcher(tokens, 8, 32, generator=124)
    for _ in range(5):
        xa, ya = a.sample()
        xb, yb = b.sample()
        xc, _ = c.sample()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)
    # no generator -> seed 0, still deterministic
    assert torch.equal(
        TokenBatcher(tokens, 8, 32).sample()[0], TokenBatcher(tokens, 8, 32, generator=0).sample()[0]
    )


@pytest.mark.parametrize("through_file", [False, True])
def test_resume_gives_identical_next_batches(through_file):
    tokens = torch.randint(0, 50, (5000,), generator=torch.Generator().manual_seed(0))
    a = TokenBatcher(tokens, 8, 32, generator=7)
    for _ in range(3):
        a.sample()
    state = a.state_dict()
    if through_file:
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
    expected = [a.sample() for _ in range(4)]

    b = TokenBatcher(tokens, 8, 32, generator=999)  # different seed: the state must override it
    b.load_state_dict(state)
    assert b.batches_drawn == 3
    for x_exp, y_exp in expected:
        x, y = b.sample()
        assert torch.equal(x, x_exp) and torch.equal(y, y_exp)


def test_load_state_dict_checks_shapes():
    tokens = _stream(1000)
    state = TokenBatcher(tokens, 8, 32).state_dict()
    with pytest.raises(ValueError, match="block_size"):
        TokenBatcher(tokens, 8, 16).load_state_dict(state)
    with pytest.raises(ValueError, match="num_tokens"):
        TokenBatcher(_stream(999), 8, 32).load_state_dict(state)
    with pytest.raises(ValueError, match="generator_state"):
        TokenBatcher(tokens, 8, 32).load_state_dict({"batch_size": 8})


@pytest.mark.parametrize(
    ("n", "batch_size", "block_size"), [(1000, 4, 16), (17, 2, 8), (16, 2, 8), (5, 3, 4)]
)
def test_eval_batches_cover_the_stream_without_overlap(n, batch_size, block_size):
    b = TokenBatcher(_stream(n), batch_size, block_size)
    batches = list(b.eval_batches())
    n_windows = (n - 1) // block_size
    assert b.num_eval_windows() == n_windows
    assert len(batches) == math.ceil(n_windows / batch_size)
    assert all(x.shape[0] == batch_size for x, _ in batches[:-1])
    x_all = torch.cat([x for x, _ in batches])
    y_all = torch.cat([y for _, y in batches])
    assert x_all.shape == (n_windows, block_size)
    # windows in order, back to back: every token of the first n_windows * T is an input exactly once
    assert torch.equal(x_all.flatten(), torch.arange(n_windows * block_size))
    assert torch.equal(y_all, x_all + 1)


@pytest.mark.parametrize("max_batches", [1, 3, 7])
def test_eval_batches_limited_are_spread_over_the_stream(max_batches):
    n, B, T = 10_001, 4, 10  # 1000 windows
    b = TokenBatcher(_stream(n), B, T)
    batches = list(b.eval_batches(max_batches))
    assert len(batches) == max_batches and all(x.shape == (B, T) for x, _ in batches)
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert torch.all(starts % T == 0)  # aligned to the non-overlapping grid
    assert torch.all(starts[1:] > starts[:-1])  # distinct, in order
    k, W = max_batches * B, 1000
    assert torch.equal(starts, torch.arange(k) * W // k * T)  # evenly spaced: floor(j * W / k)
    assert int(starts[-1]) >= (n - 1) - (W // k + 1) * T  # reaches the end of the stream
    assert len(list(b.eval_batches(10_000))) == math.ceil(W / B)  # more than there are: all


def test_eval_batches_are_deterministic_and_leave_the_generator_alone():
    tokens = torch.randint(0, 50, (3000,), generator=torch.Generator().manual_seed(0))
    b = TokenBatcher(tokens, 4, 16, generator=5)
    ref = TokenBatcher(tokens, 4, 16, generator=5)
    first = [x for x, _ in b.eval_batches(5)]
    second = [x for x, _ in b.eval_batches(5)]
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))
    assert torch.equal(b.sample()[0], ref.sample()[0])


def test_too_short_stream_is_a_clear_error():
    with pytest.raises(ValueError, match=r"block_size \+ 1 = 9"):
        TokenBatcher(_stream(8), 2, 8)
    TokenBatcher(_stream(9), 2, 8)  # exactly enough


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"tokens": torch.zeros(10, 2, dtype=torch.long)}, ValueError, "1-D"),
        ({"tokens": torch.zeros(100)}, TypeError, "integer"),
        ({"tokens": [1, 2, 3]}, TypeError, "tensor"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"block_size": 2.0}, ValueError, "block_size"),
        ({"generator": "seed"}, TypeError, "generator"),
    ],
)
def test_argument_errors(kwargs, exc, match):
    args = {"tokens": _stream(100), "batch_size": 2, "block_size": 4} | kwargs
    with pytest.raises(exc, match=match):
        TokenBatcher(args.pop("tokens"), args.pop("batch_size"), args.pop("block_size"), **args)


@pytest.mark.parametrize("max_batches", [0, -1, 1.5])
def test_bad_max_batches(max_batches):
    with pytest.raises(ValueError, match="max_batches"):
        next(TokenBatcher(_stream(100), 2, 4).eval_batches(max_batches))


def test_int32_tokens_become_long():
    x, _ = TokenBatcher(_stream(100).int(), 2, 4).sample()
    assert x.dtype == torch.long


@pytest.mark.gpu
def test_batches_land_on_cuda():
    b = TokenBatcher(_stream(1000), 4, 16, device="cuda")
    x, y = b.sample()
    assert x.is_cuda and y.is_cuda and torch.equal(y.cpu(), x.cpu() + 1)
    xe, _ = next(b.eval_batches(1))
    assert xe.is_cuda

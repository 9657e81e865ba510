import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.models import GPT, MODEL_NAMES, GPTConfig, build_model
from lowbit.models.gpt import INIT_STD

SMALL = GPTConfig(vocab_size=65, n_layer=2, n_head=4, n_embd=64, block_size=32)


def _model(config: GPTConfig = SMALL, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


def _ids(shape, vocab, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- config


def test_named_sizes_follow_the_contract():
    expected = {"small": (6, 6, 384, 256), "medium": (12, 12, 768, 1024), "350m": (24, 16, 1024, 1024)}
    for name, (n_layer, n_head, n_embd, block_size) in expected.items():
        cfg = GPTConfig.named(name, 100)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (
            n_layer,
            n_head,
            n_embd,
            block_size,
            100,
        )
        assert cfg.dropout == 0.0 and cfg.bias is False
    tiny = GPTConfig.named("tiny", 65)
    assert tiny.n_layer <= 4 and tiny.n_embd <= 128 and tiny.block_size >= 64
    assert GPTConfig.named("tiny", 65, block_size=64).block_size == 64


def test_named_unknown_lists_names():
    with pytest.raises(ValueError, match=r"'350m'.*'medium'.*'small'.*'tiny'"):
        GPTConfig.named("huge", 65)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SMALL.n_layer = 3


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("n_head", 5, "divisible"),
        ("vocab_size", 0, "vocab_size"),
        ("n_layer", 1.0, "n_layer"),
        ("dropout", 1.0, "dropout"),
        ("bias", 1, "bias"),
    ],
)
def test_config_checks(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(SMALL, **{field: value})


def test_build_model_names():
    assert MODEL_NAMES == ("gpt-tiny", "gpt-small", "gpt-medium", "gpt-350m", "gpt-1.3b")
    model = build_model("gpt-tiny", 65)
    assert model.config == GPTConfig.named("tiny", 65)
    assert build_model("gpt-tiny", 65, block_size=16).config.block_size == 16
    with pytest.raises(ValueError, match="gpt-tiny"):
        build_model("tiny", 65)


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("bias", [False, True])
def test_modules_and_parameter_count(bias):
    cfg = dataclasses.replace(SMALL, bias=bias)
    model = _model(cfg)
    V, C, L, P = cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.block_size
    assert isinstance(model.transformer.wte, nn.Embedding)
    for block in model.transformer.h:
        for lin, shape in (
            (block.attn.c_attn, (3 * C, C)),
            (block.attn.c_proj, (C, C)),
            (block.mlp.c_fc, (4 * C, C)),
            (block.mlp.c_proj, (C, 4 * C)),
        ):
            assert type(lin) is nn.Linear and lin.weight.shape == shape
            assert (lin.bias is not None) == bias
    assert isinstance(model.transformer.ln_f, nn.LayerNorm)
    assert type(model.lm_head) is nn.Linear and model.lm_head.bias is None
    # weights: embeddings + per block (qkv 3C^2, proj C^2, fc 4C^2, proj 4C^2, two LN weights) + ln_f
    n = V * C + P * C + L * (12 * C * C + 2 * C) + C
    if bias:  # qkv 3C, proj C, fc 4C, proj C, two LN biases 2C, ln_f bias C
        n += L * (3 * C + C + 4 * C + C + 2 * C) + C
    assert model.num_parameters() == n
    assert model.num_parameters(non_embedding=True) == n - V * C - P * C


def test_weight_tying():
    model = _model()
    assert model.lm_head.weight is model.transformer.wte.weight
    _, loss = model(_ids((2, 8), 65), _ids((2, 8), 65, seed=1))
    loss.backward()
    # one tensor, one gradient: contributions of the embedding lookup and of the head add up
    assert model.transformer.wte.weight.grad is model.lm_head.weight.grad
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_init_std_with_scaled_residual_projections():
    # Sample std of n iid N(0, s^2) values has standard error s / sqrt(2 n); allow 5 of them.
    cfg = dataclasses.replace(SMALL, n_layer=4)
    model = _model(cfg)

    def check(w, std):
        se = std / math.sqrt(2 * w.numel())
        assert abs(w.std().item() - std) <= 5 * se, (w.shape, w.std().item(), std)
        assert abs(w.mean().item()) <= 5 * std / math.sqrt(w.numel())

    residual_std = INIT_STD / math.sqrt(2 * cfg.n_layer)
    check(model.transformer.wte.weight, INIT_STD)
    check(model.transformer.wpe.weight, INIT_STD)
    for block in model.transformer.h:
        check(block.attn.c_attn.weight, INIT_STD)
        check(block.mlp.c_fc.weight, INIT_STD)
        check(block.attn.c_proj.weight, residual_std)
        check(block.mlp.c_proj.weight, residual_std)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize(("B", "T"), [(1, 1), (3, 7), (2, 32)])
def test_forward_shapes(B, T):
    model = _model()
    idx = _ids((B, T), 65)
    logits, loss = model(idx)
    assert logits.shape == (B, T, 65) and logits.dtype == torch.float32
    assert loss is None
    logits2, loss = model(idx, _ids((B, T), 65, seed=1))
    assert loss.shape == () and loss.dtype == torch.float32
    assert torch.equal(logits, logits2)
    assert model(idx.int())[0].shape == (B, T, 65)


@pytest.mark.parametrize("vocab_size", [65, 256, 1024])
def test_loss_at_init_is_near_log_vocab(vocab_size):
    # At init the logits are z_j = u . w_j with u = ln_f(h), |u|^2 = C exactly (no LN affine change
    # at init, no bias) and w_j ~ N(0, 0.02^2 I), so z_j ~ N(0, s2) with s2 = 0.02^2 C. For random
    # targets, E[CE] = E[logsumexp z] - E[z_t] ~= ln V + s2 / 2. Fluctuations: the mean of z_t
    # over N tokens has variance ~ s2 / N, logsumexp over V logits ~ s2 / V; allow 5 standard
    # errors of their sum.
    cfg = dataclasses.replace(SMALL, vocab_size=vocab_size)
    B, T = 32, 32
    s2 = INIT_STD**2 * cfg.n_embd
    se = math.sqrt(s2 / (B * T) + s2 / vocab_size)
    for seed in range(3):
        model = _model(cfg, seed=seed)
        _, loss = model(_ids((B, T), vocab_size, seed), _ids((B, T), vocab_size, seed + 100))
        assert abs(loss.item() - (math.log(vocab_size) + s2 / 2)) <= 5 * se


def test_loss_matches_cross_entropy_and_ignores_minus_one():
    model = _model()
    idx, targets = _ids((2, 10), 65), _ids((2, 10), 65, seed=1)
    targets[0, :3] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    ref = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("t_change", [0, 5, 31])
def test_causal_masking(t_change):
    # Changing token t must leave the logits of positions < t bit-identical: every row of a Linear
    # and LayerNorm depends only on its own position, and masked attention probabilities are
    # exactly 0, so the earlier rows run the same float operations on the same numbers.
    model = _model().eval()
    idx = _ids((3, 32), 65)
    idx2 = idx.clone()
    idx2[:, t_change] = (idx2[:, t_change] + 1) % 65
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(idx2)
    assert torch.equal(a[:, :t_change], b[:, :t_change])
    assert not torch.equal(a[:, t_change], b[:, t_change])


@pytest.mark.parametrize(
    ("idx", "targets", "exc", "match"),
    [
        (torch.zeros(2, 4), None, TypeError, "torch.long"),
        (torch.zeros(8, dtype=torch.long), None, ValueError, r"\(B, T\)"),
        (torch.zeros(1, 33, dtype=torch.long), None, ValueError, "block_size=32"),
        (torch.zeros(1, 0, dtype=torch.long), None, ValueError, "block_size"),
        (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), ValueError, "targets"),
        (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4), TypeError, "targets"),
        ([[1, 2]], None, TypeError, "idx"),
    ],
)
def test_forward_errors(idx, targets, exc, match):
    with pytest.raises(exc, match=match):
        _model()(idx, targets)


def test_dropout_only_in_training():
    model = _model(dataclasses.replace(SMALL, dropout=0.2))
    idx = _ids((2, 16), 65)
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_optimizer_steps_reduce_loss_on_a_fixed_batch():
    model = _model()
    idx, targets = _ids((4, 32), 65), _ids((4, 32), 65, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Random targets are memorized: ln 65 = 4.17 at init; a working model drops by > 1 nat in 25 steps.
    assert losses[-1] < losses[0] - 1.0
    assert all(math.isfinite(v) for v in losses)


# ---------------------------------------------------------------- generate


def test_generate_greedy_matches_manual_argmax_and_crops_context():
    model = _model().eval()
    prompt = _ids((2, 40), 65)  # longer than block_size = 32: context is cropped
    out = model.generate(prompt, 5, temperature=0)
    assert out.shape == (2, 45) and torch.equal(out[:, :40], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):
            logits, _ = model(seq[:, -32:])
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert torch.equal(model.generate(prompt, 5, top_k=1), out)  # top_k=1 sampling is greedy


def test_generate_sampling_is_reproducible_and_respects_top_k():
    model = _model().eval()
    prompt = _ids((4, 3), 65)
    a = model.generate(prompt, 20, temperature=1.5, top_k=3, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 20, temperature=1.5, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with torch.no_grad():
        logits, _ = model(a[:, :-1])  # 22 <= block_size tokens: the same contexts generate() saw
    # every generated token is among the 3 most likely at its position
    n_new = 20
    top3 = logits[:, -n_new:].topk(3, dim=-1).indices  # (B, n_new, 3)
    assert (top3 == a[:, -n_new:, None]).any(-1).all()
    c = model.generate(prompt, 20, temperature=1.5, generator=torch.Generator().manual_seed(1))
    assert c.shape == (4, 23)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
    ],
)
def test_generate_errors(kwargs, match):
    args = {"max_new_tokens": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        _model().generate(_ids((1, 3), 65), **args)


def test_tiny_model_trains_at_full_context():
    # The CPU-demo size at its full context and the demo's batch size: a few steps lower the loss.
    model = build_model("gpt-tiny", 65)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx, targets = _ids((32, 128), 65), _ids((32, 128), 65, seed=1)
    losses = []
    for _ in range(3):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.gpu
def test_cuda_forward_is_as_accurate_as_cpu():
    # fp32 on the GPU (cuBLAS, the fused SDPA kernels) against a float64 reference: its error may
    # be at most 2x the error of the same fp32 model on the CPU.
    model = _model().eval()
    idx = _ids((4, 32), 65)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(idx)[0]
        err_cpu = (model(idx)[0].double() - ref).abs().max().item()
        cuda_logits = copy.deepcopy(model).cuda()(idx.cuda())[0]
        err_cuda = (cuda_logits.double().cpu() - ref).abs().max().item()
    assert err_cuda <= 2 * err_cpu
    out = model.cuda().generate(
        idx[:, :4].cuda(), 8, top_k=5, generator=torch.Generator("cuda").manual_seed(0)
    )
    assert out.shape == (4, 12) and out.is_cuda


@pytest.mark.gpu
def test_cuda_bf16_autocast_training_step():
    model = _model().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx, targets = _ids((4, 32), 65).cuda(), _ids((4, 32), 65, seed=1).cuda()
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert loss.dtype == torch.float32 and losses[-1] < losses[0]

import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.data import TokenBatcher
from lowbit.eval import perplexity
from lowbit.trainer import (
    Callback,
    TrainConfig,
    load_checkpoint,
    make_optimizer,
    param_groups,
    read_metrics,
    register_optimizer,
    train,
)
from lowbit.trainer.loop import OPTIMIZERS

VOCAB = 16


class TinyLM(nn.Module):
    """Per-position LM (embedding -> MLP -> head) with dropout: fast, and dropout makes RNG state matter."""

    def __init__(self, dim: int = 32, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, x, y=None):
        h = self.drop(torch.relu(self.fc(self.emb(x))))
        logits = self.head(self.ln(h))
        loss = None if y is None else F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        return logits, loss


def _stream(n: int, seed: int) -> torch.Tensor:
    """Token stream with a learnable rule: the next token is (3 t + 1) mod 16 with probability 0.9."""
    g = torch.Generator().manual_seed(seed)
    out = [0]
    noise = torch.rand(n, generator=g)
    other = torch.randint(VOCAB, (n,), generator=g)
    for i in range(1, n):
        out.append((3 * out[-1] + 1) % VOCAB if noise[i] < 0.9 else int(other[i]))
    return torch.tensor(out)


TRAIN_TOKENS = _stream(4000, 0)
VAL_TOKENS = _stream(1000, 1)


def _batchers(batch_size=4, block_size=8, seed=123):
    return (
        TokenBatcher(TRAIN_TOKENS, batch_size, block_size, generator=seed),
        TokenBatcher(VAL_TOKENS, batch_size, block_size),
    )


def _config(**kw):
    base = dict(
        steps=8,
        batch_size=4,
        block_size=8,
        lr=1e-2,
        warmup_steps=2,
        eval_every=3,
        eval_batches=2,
        log_every=1,
        save_every=4,
        progress=False,
        seed=7,
        device="cpu",
    )
    base.update(kw)
    if "warmup_steps" not in kw:
        base["warmup_steps"] = min(2, base["steps"])
    return TrainConfig(**base)


class Recorder(Callback):
    def __init__(self, crash_on_eval_at=None):
        self.steps, self.losses, self.evals, self.started, self.ended = [], [], [], None, None
        self.crash_on_eval_at = crash_on_eval_at

    def on_train_start(self, *, model, optimizer, config, start_step):
        self.started = start_step

    def on_step_end(self, *, step, loss, grad_norm, lr, skipped):
        self.steps.append(step)
        self.losses.append(loss)

    def on_eval(self, *, step, val_loss, val_ppl):
        self.evals.append((step, val_loss, val_ppl))
        if step == self.crash_on_eval_at:
            raise KeyboardInterrupt("simulated crash")

    def on_train_end(self, *, result):
        self.ended = result


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps=0), "steps must be an int > 0"),
        (dict(steps=2.5), "steps must be an int > 0"),
        (dict(batch_size=0), "batch_size"),
        (dict(grad_accum=0), "grad_accum"),
        (dict(lr=0.0), "lr must be"),
        (dict(lr=float("nan")), "lr must be"),
        (dict(min_lr=1.0), r"min_lr must be a number in \[0, lr="),
        (dict(warmup_steps=9), r"warmup_steps must be an int in \[0, steps=8\]"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(betas=(0.9,)), "betas"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(grad_clip=-1.0), "grad_clip"),
        (dict(eval_every=-1), "eval_every"),
        (dict(save_every=-2), "save_every"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(device="gpu0"), "device must be 'auto' or a torch device"),
        (dict(progress="yes"), "progress must be a bool"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_config_defaults_resolved():
    cfg = TrainConfig(steps=50, lr=2e-3, betas=[0.8, 0.9])
    assert cfg.min_lr == pytest.approx(2e-4)
    assert cfg.warmup_steps == 5  # min(100, steps // 10)
    assert cfg.betas == (0.8, 0.9)
    assert TrainConfig(**cfg.to_dict()) == cfg  # round trip as stored in checkpoints
    assert cfg.tokens_per_step == cfg.batch_size * cfg.block_size * cfg.grad_accum


# --------------------------------------------------------------------------------------------- optimizers


def test_param_groups_decay_only_matrices():
    model = TinyLM()
    groups = param_groups(model, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (p.ndim >= 2), name
    tied = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert sum(len(g["params"]) for g in param_groups(tied, 0.1)) == 1  # a shared parameter appears once


def test_make_optimizer_registry():
    opt = make_optimizer("adamw", TinyLM(), 1e-3, 0.1, (0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="unknown optimizer 'nope'"):
        make_optimizer("nope", TinyLM(), 1e-3, 0.1)


def test_registered_optimizer_used_by_name(monkeypatch):
    monkeypatch.setitem(OPTIMIZERS, "sgd-test", None)
    register_optimizer("sgd-test", lambda groups, *, lr, betas: torch.optim.SGD(groups, lr=lr))
    seen = []
    cb = Callback()
    cb.on_train_start = lambda *, model, optimizer, config, start_step: seen.append(optimizer)
    tr, va = _batchers()
    train(TinyLM(), tr, va, _config(steps=2, optimizer="sgd-test"), callbacks=[cb])
    assert isinstance(seen[0], torch.optim.SGD)


def test_optimizer_factory_and_instance():
    tr, va = _batchers()
    groups_seen = []

    def factory(groups):
        groups_seen.extend(groups)
        return torch.optim.SGD(groups, lr=123.0)  # per-group lr (config.lr) wins over the default

    train(TinyLM(), tr, va, _config(steps=2), optimizer=factory)
    assert all(g["lr"] == 1e-2 for g in groups_seen)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train(model, *_batchers(), _config(steps=3, warmup_steps=0, min_lr=1e-3), optimizer=opt)
    assert opt.param_groups[0]["initial_lr"] == 0.05  # the schedule scaled the optimizer's own lr
    with pytest.raises(TypeError, match="optimizer must be"):
        train(TinyLM(), *_batchers(), _config(steps=1), optimizer=42)


# --------------------------------------------------------------------------------------------- training


def test_loss_goes_down_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    tr, va = _batchers(batch_size=8)
    cfg = _config(
        steps=60,
        batch_size=8,
        lr=3e-2,
        warmup_steps=5,
        eval_every=20,
        eval_batches=4,
        log_every=5,
        save_every=0,
        out_dir=str(tmp_path / "run"),
    )
    rec = Recorder()
    res = train(model, tr, va, cfg, callbacks=[rec])
    # Untrained loss is about log(16) = 2.77; the rule (next = 3t+1 mod 16 w.p. 0.9, else uniform) has
    # entropy H = -p log p - 15 q log q = 0.56 nats (p = 0.9 + 0.1/16, q = 0.1/16): well below log 16.
    assert rec.losses[0] > 2.3
    assert res.val_loss < 1.2 and res.train_loss < 1.2
    assert res.val_ppl == pytest.approx(math.exp(res.val_loss), rel=1e-12)
    assert res.step == 60 and rec.steps == list(range(1, 61))
    assert [e[0] for e in rec.evals] == [20, 40, 60]
    assert res.best_val_loss == min(e[1] for e in rec.evals)
    assert res.tokens == 60 * 8 * 8
    assert res.tokens_per_s > 0
    assert rec.started == 0 and rec.ended == res
    # the final evaluation is the perplexity of the validation windows
    ref = perplexity(model, va.eval_batches(4))
    assert res.val_loss == ref.loss
    # outputs
    assert res.checkpoint_path == tmp_path / "run" / "checkpoint.pt"
    ck = load_checkpoint(res.checkpoint_path)
    assert ck["step"] == 60 and ck["config"] == cfg.to_dict()
    assert res.plot_path.read_bytes().startswith(b"\x89PNG")
    records = read_metrics(res.metrics_path)
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train_lines] == list(range(5, 61, 5))
    for r in train_lines:
        assert set(r) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens"}
        assert r["tokens"] == r["step"] * 64 and r["tokens_per_s"] > 0
    # logged loss = mean of the step losses since the previous line
    assert train_lines[0]["loss"] == pytest.approx(sum(rec.losses[:5]) / 5, rel=1e-12)
    assert [(r["step"], r["val_loss"], r["val_ppl"]) for r in eval_lines] == rec.evals
    # lr logged is the one used at that step: step 60 is the last of the cosine -> min_lr
    assert train_lines[-1]["lr"] == pytest.approx(cfg.min_lr, rel=1e-12)


def test_no_out_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = train(TinyLM(), *_batchers(), _config(steps=3))
    assert res.metrics_path is None and res.plot_path is None and res.checkpoint_path is None
    assert list(tmp_path.iterdir()) == []


def test_no_val_batcher():
    res = train(TinyLM(), _batchers()[0], None, _config(steps=3))
    assert res.val_loss is None and res.val_ppl is None and res.best_val_loss is None


def test_grad_accum_equals_bigger_batch():
    """grad_accum=2 of B=4 sums (loss/2) over two micro-batches: the gradient of the mean over all 8 rows,
    the same as one batch of 8 rows drawn by the same generator calls (equal up to fp32 summation order)."""

    class Grads(Callback):
        def before_optimizer_step(self, *, step, model, optimizer, loss, grad_norm):
            self.grads = [p.grad.clone() for p in model.parameters()]
            self.loss = loss
            return False

    class Concat:  # one B=8 batch out of two B=4 draws of the same generator
        def __init__(self):
            self.inner = _batchers(batch_size=4)[0]

        def sample(self):
            (x1, y1), (x2, y2) = self.inner.sample(), self.inner.sample()
            return torch.cat([x1, x2]), torch.cat([y1, y2])

    results = []
    for accum, batcher, bs in ((2, _batchers(batch_size=4)[0], 4), (1, Concat(), 8)):
        torch.manual_seed(0)
        g = Grads()
        train(TinyLM(), batcher, None, _config(steps=1, grad_accum=accum, batch_size=bs), callbacks=[g])
        results.append(g)
    a, b = results
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    for ga, gb in zip(a.grads, b.grads):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_skip_step_leaves_parameters():
    class SkipEven(Callback):
        def __init__(self):
            self.skipped = []

        def before_optimizer_step(self, *, step, model, optimizer, loss, grad_norm):
            assert all(p.grad is not None for p in model.parameters())
            assert math.isfinite(grad_norm) and math.isfinite(loss)
            self.before = [p.detach().clone() for p in model.parameters()]
            return step % 2 != 0

        def on_step_end(self, *, step, loss, grad_norm, lr, skipped):
            self.skipped.append(skipped)

    class Check(Callback):
        def __init__(self, skipper):
            self.skipper = skipper

        def on_step_end(self, *, step, loss, grad_norm, lr, skipped):
            same = all(torch.equal(a, b) for a, b in zip(self.skipper.before, self._model.parameters()))
            assert same == skipped

        def on_train_start(self, *, model, optimizer, config, start_step):
            self._model = model

    skip = SkipEven()
    train(TinyLM(), *_batchers(), _config(steps=4), callbacks=[skip, Check(skip)])
    assert skip.skipped == [False, True, False, True]


def test_grad_clip_limits_update():
    class Norms(Callback):
        def __init__(self):
            self.after = []

        def before_optimizer_step(self, *, step, model, optimizer, loss, grad_norm):
            total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
            self.after.append((grad_norm, float(total)))

    n = Norms()
    train(TinyLM(), *_batchers(), _config(steps=3, grad_clip=1e-3), callbacks=[n])
    for before, after in n.after:
        assert before > 1e-3  # reported norm is the one before clipping
        assert after == pytest.approx(1e-3, rel=1e-4)  # clip_grad_norm_ scales by max_norm / (norm + 1e-6)


def test_custom_loss_fn():
    calls = []

    def loss_fn(model, batch):
        calls.append(batch[0].shape)
        logits, _ = model(batch[0])
        return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten()) * 2.0

    rec = Recorder()
    train(TinyLM(), *_batchers(), _config(steps=2, grad_accum=3), loss_fn=loss_fn, callbacks=[rec])
    assert calls == [torch.Size([4, 8])] * 6
    assert rec.losses[0] > 2 * 2.3  # the doubled loss is what the loop reports


def test_bf16_autocast_on_cpu():
    class DtypeProbe(TinyLM):
        def forward(self, x, y=None):
            self.seen = self.fc(self.emb(x)).dtype
            return super().forward(x, y)

    model = DtypeProbe()
    rec = Recorder()
    res = train(model, *_batchers(), _config(steps=3, precision="bf16"), callbacks=[rec])
    assert model.seen == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert all(math.isfinite(v) for v in rec.losses) and math.isfinite(res.val_loss)


# --------------------------------------------------------------------------------------------- resume


def _fresh_model(seed):
    torch.manual_seed(seed)  # a different init than the run's: the checkpoint must overwrite it
    return TinyLM(dropout=0.3)


def _run(out_dir, *, resume=None, crash_on_eval_at=None, init_seed=0, **kw):
    rec = Recorder(crash_on_eval_at)
    model = _fresh_model(init_seed)
    cfg = _config(grad_accum=2, out_dir=str(out_dir), **kw)
    try:
        res = train(model, *_batchers(), cfg, callbacks=[rec], resume=resume)
    except KeyboardInterrupt:
        res = None
    return model, rec, res


def _strip_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_resume_is_bit_exact(tmp_path):
    """8 steps straight == 8 steps that crash at step 6 (after the step-4 checkpoint), resumed with new
    objects and scrambled global RNGs: same losses, same weights, same optimizer state, same metrics."""
    full_model, full, _ = _run(tmp_path / "full")

    _, crashed, _ = _run(tmp_path / "resumed", crash_on_eval_at=6)
    assert crashed.steps == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 4
    torch.manual_seed(999)
    random.seed(999)
    model, resumed, res = _run(tmp_path / "resumed", resume="auto", init_seed=1)

    assert resumed.started == 4 and resumed.steps == [5, 6, 7, 8]
    assert resumed.losses == full.losses[4:]  # exact float equality
    for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    opt_full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["optimizer"]["state"]
    opt_res = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["optimizer"]["state"]
    for k in opt_full:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_full[k][key], opt_res[k][key])
    assert resumed.evals == full.evals[-2:]  # evaluations at steps 6 and 8
    assert res.best_val_loss == min(e[1] for e in full.evals)  # includes the step-3 eval before the crash
    assert _strip_timing(read_metrics(tmp_path / "resumed" / "metrics.jsonl")) == _strip_timing(
        read_metrics(tmp_path / "full" / "metrics.jsonl")
    )


def test_resume_finished_run_and_auto_without_checkpoint(tmp_path):
    _, first, res1 = _run(tmp_path / "a")
    assert first.started == 0  # "auto" with no checkpoint would also start fresh:
    _, fresh, _ = _run(tmp_path / "b", resume="auto")
    assert fresh.started == 0 and fresh.losses == first.losses
    _, again, res2 = _run(tmp_path / "a", resume=tmp_path / "a" / "checkpoint.pt")
    assert again.steps == [] and res2.step == 8
    assert res2.val_loss == res1.val_loss  # re-evaluated, not retrained
    assert len([r for r in read_metrics(res2.metrics_path) if "val_loss" in r]) == len(first.evals)


def test_resume_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume checkpoint not found"):
        train(TinyLM(), *_batchers(), _config(steps=1), resume=tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="needs config.out_dir"):
        train(TinyLM(), *_batchers(), _config(steps=1), resume="auto")


def test_resume_warns_on_changed_trajectory(tmp_path):
    _run(tmp_path / "w", steps=4)
    with pytest.warns(UserWarning, match=r"changed settings \['lr', 'min_lr'\]"):
        _run(tmp_path / "w", steps=4, lr=5e-3, resume="auto")


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def flaky_save(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if obj["step"] == 8:
            f.write(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        train(TinyLM(), *_batchers(), _config(out_dir=str(tmp_path)))
    assert calls == [4, 8]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]


class GeneratorOnlyBatcher:
    """A batcher without state_dict: the loop saves and restores its `.generator`."""

    def __init__(self):
        self.inner = _batchers()[0]
        self.generator = self.inner.generator

    def sample(self):
        return self.inner.sample()


def test_resume_with_generator_attribute_batcher(tmp_path):
    cfg = dict(steps=6, save_every=3, eval_every=0)
    torch.manual_seed(0)
    rec_full = Recorder()
    train(
        TinyLM(dropout=0.3),
        GeneratorOnlyBatcher(),
        None,
        _config(**cfg, out_dir=str(tmp_path / "f")),
        callbacks=[rec_full],
    )

    class CrashAt4(Callback):
        def on_step_end(self, *, step, loss, grad_norm, lr, skipped):
            if step == 4:
                raise KeyboardInterrupt

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train(
            TinyLM(dropout=0.3),
            GeneratorOnlyBatcher(),
            None,
            _config(**cfg, out_dir=str(tmp_path / "r")),
            callbacks=[CrashAt4()],
        )
    rec = Recorder()
    train(
        TinyLM(dropout=0.3),
        GeneratorOnlyBatcher(),
        None,
        _config(**cfg, out_dir=str(tmp_path / "r")),
        callbacks=[rec],
        resume="auto",
    )
    assert rec.losses == rec_full.losses[3:]


def test_duck_typed_callback_with_fewer_parameters():
    class Guard:  # no Callback base, older/narrower signature: gets only the keywords it names
        def __init__(self):
            self.seen = []

        def before_optimizer_step(self, step, model, optimizer):
            self.seen.append(step)
            return False  # skip every update

        def on_step_end(self, **kwargs):
            assert set(kwargs) == {"step", "loss", "grad_norm", "lr", "skipped"} and kwargs["skipped"]

    model = TinyLM()
    before = [p.detach().clone() for p in model.parameters()]
    guard = Guard()
    train(model, *_batchers(), _config(steps=3), callbacks=[guard])
    assert guard.seen == [1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_tokens_count_the_global_batch_of_a_data_parallel_batcher():
    """A RankSlicedBatcher (world_size W) gives this rank 1/W of each global batch: tokens count all W."""
    from lowbit.trainer.distributed import RankSlicedBatcher

    tr, va = _batchers(batch_size=4)
    sliced = RankSlicedBatcher(tr, rank=0, world_size=2)  # this rank sees 2 of the 4 rows
    torch.manual_seed(0)
    res = train(TinyLM(), sliced, va, _config(steps=3, eval_every=0))
    assert res.tokens == 3 * 4 * 8
    torch.manual_seed(0)
    res1 = train(TinyLM(), _batchers(batch_size=4)[0], va, _config(steps=3, eval_every=0))
    assert res1.tokens == 3 * 4 * 8

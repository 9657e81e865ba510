"""SpikeGuard: robust threshold, skipping without touching parameters or optimizer state, actions."""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch
import torch.nn as nn

from lowbit.amp import SpikeGuard, robust_threshold, rollback_from_checkpoint


def test_robust_threshold_formula():
    values = [1.0, 2.0, 3.0, 4.0, 100.0]
    # median 3, |v - 3| = 2, 1, 0, 1, 97 -> MAD 1: the outlier moves neither
    assert robust_threshold(values, k=6) == 3.0 + 6 * 1.0
    assert robust_threshold([2.0] * 5, k=6, rel_floor=0.01) == pytest.approx(2.0 + 6 * 0.02, rel=1e-15)
    assert robust_threshold([2.0] * 5, k=6) == 2.0
    with pytest.raises(ValueError, match="at least one"):
        robust_threshold([], k=1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=0), "window"),
        (dict(min_history=30, window=10), "min_history"),
        (dict(k=0), "k must"),
        (dict(action="panic"), "action must"),
        (dict(action="rollback"), "rollback_fn"),
        (dict(lr_factor=1.0), "lr_factor"),
        (dict(patience=5, reset_after=4), "reset_after"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpikeGuard(**kwargs)


def test_gaussian_noise_no_false_alarm_and_spike_caught():
    # k = 6 MADs is about 4 sigma: P(one Gaussian value above) = 3e-5, so 300 values all pass with
    # probability > 0.99; a value 50 sigma up is caught.
    g = torch.Generator().manual_seed(0)
    noise = (2.0 + 0.01 * torch.randn(300, generator=g)).tolist()
    guard = SpikeGuard(window=100, min_history=20)
    assert all(guard.observe(i, v, 1.0) for i, v in enumerate(noise))
    assert guard.metrics()["spikes"] == 0
    assert guard.classify(2.0 + 50 * 0.01, 1.0) == "loss_spike"
    assert guard.classify(2.0, 1.5) == "grad_spike"
    assert guard.classify(float("nan"), 1.0) == "nonfinite"
    assert guard.classify(2.0, float("inf")) == "nonfinite"


def test_threshold_needs_min_history_and_ignores_spikes():
    guard = SpikeGuard(window=10, min_history=5)
    for i in range(4):
        assert guard.observe(i, 1.0 + 0.01 * i, 1.0)
    assert guard.thresholds() == (None, None)
    assert guard.observe(4, 1e6, 1.0)  # no history yet: a finite value is accepted
    guard = SpikeGuard(window=10, min_history=5)
    for i in range(5):
        guard.observe(i, 1.0 + 0.01 * i, 1.0)
    before = guard.thresholds()
    assert not guard.observe(5, 1e6, 1.0)
    assert guard.thresholds() == before  # the spike did not enter the window
    loss_thr, _ = before
    values = [1.0 + 0.01 * i for i in range(5)]
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    assert loss_thr == pytest.approx(med + 6 * max(mad, 0.01 * med), rel=1e-12)


# --------------------------------------------------------------------------------- in a training loop


def make_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(32, 8)
    y = x.sum(dim=1, keepdim=True)
    return model, opt, x, y


def run_loop(model, opt, x, y, guard, steps, corrupt):
    """The trainer's step order: backward, clip (norm before clipping), callbacks, step, zero_grad."""
    snapshots = {}
    guard.on_train_start(model=model, optimizer=opt, config=None, start_step=0)
    for step in range(1, steps + 1):
        loss = nn.functional.mse_loss(model(x), y)
        loss = corrupt(step, loss)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
        snapshots[step] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        vote = guard.before_optimizer_step(
            step=step, model=model, optimizer=opt, loss=loss.item(), grad_norm=grad_norm
        )
        if vote is not False:
            opt.step()
        opt.zero_grad(set_to_none=True)
        guard.on_step_end(step=step, loss=loss.item(), grad_norm=grad_norm, lr=0.0, skipped=vote is False)
        snapshots[step] += (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), vote)
    return snapshots


def same_state(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("bad", ["nan", "inf", "spike"])
def test_skips_without_touching_params_or_optimizer_state(bad):
    bad_step = 30

    def corrupt(step, loss):
        if step != bad_step:
            return loss
        return {"nan": loss * float("nan"), "inf": loss * float("inf"), "spike": loss * 1e4}[bad]

    model, opt, x, y = make_problem()
    guard = SpikeGuard(window=50, min_history=10)
    snaps = run_loop(model, opt, x, y, guard, steps=bad_step + 5, corrupt=corrupt)
    model_before, opt_before, model_after, opt_after, vote = snaps[bad_step]
    assert vote is False
    assert same_state(model_before, model_after)
    assert same_state(opt_before, opt_after)
    assert opt_after["state"][0]["step"] == bad_step - 1  # Adam's step count did not advance
    # every other step updated the parameters
    for step in range(1, bad_step + 6):
        if step != bad_step:
            assert snaps[step][4] is None
            assert not same_state(snaps[step][0], snaps[step][2])
    all_finite = all(torch.isfinite(p).all() for p in model.parameters())
    assert all_finite
    m = guard.metrics()
    assert m["spikes"] == m["skipped_steps"] == 1
    assert m["nonfinite"] == (bad != "spike")
    assert [e.step for e in guard.events] == [bad_step]
    assert guard.events[0].kind == ("loss_spike" if bad == "spike" else "nonfinite")


def test_lower_lr_after_patience():
    model, opt, x, y = make_problem()
    guard = SpikeGuard(window=50, min_history=10, patience=2, action="lower_lr", lr_factor=0.5)
    seen_lrs = {}
    orig_step = opt.step

    def spy_step(*a, **k):
        seen_lrs[len(seen_lrs)] = opt.param_groups[0]["lr"]
        return orig_step(*a, **k)

    opt.step = spy_step
    bad = {20, 21}
    run_loop(model, opt, x, y, guard, steps=25, corrupt=lambda s, loss: loss * 1e4 if s in bad else loss)
    assert guard.metrics()["lr_reductions"] == 1 and guard.lr_scale == 0.5
    assert [e.kind for e in guard.events] == ["loss_spike", "loss_spike", "lower_lr"]
    lrs = list(seen_lrs.values())
    assert lrs[:19] == [1e-2] * 19 and lrs[19:] == [5e-3] * 4  # steps 22..25 run at half the rate
    assert opt.param_groups[0]["lr"] == 1e-2  # restored after each step (no scheduler here)


def test_lower_lr_with_lambda_scheduler():
    model, opt, x, y = make_problem()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    guard = SpikeGuard(window=50, min_history=10, patience=1, action="lower_lr", lr_factor=0.25)
    used = []
    guard.on_train_start(model=model, optimizer=opt)
    for step in range(1, 16):
        loss = nn.functional.mse_loss(model(x), y) * (1e4 if step == 12 else 1)
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
        vote = guard.before_optimizer_step(
            step=step, model=model, optimizer=opt, loss=loss.item(), grad_norm=gn
        )
        if vote is not False:
            used.append((step, opt.param_groups[0]["lr"]))
            opt.step()
        sched.step()
        opt.zero_grad()
        guard.on_step_end(step=step)
    expected = [(s, 1e-2 / s * (0.25 if s > 12 else 1.0)) for s in range(1, 16) if s != 12]
    assert [s for s, _ in used] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(used, expected):
        assert a == pytest.approx(b, rel=1e-12)


def test_rollback_from_checkpoint(tmp_path):
    model, opt, x, y = make_problem()
    path = tmp_path / "checkpoint.pt"
    guard = SpikeGuard(
        window=50,
        min_history=10,
        patience=2,
        action="rollback",
        rollback_fn=rollback_from_checkpoint(path),
        log_path=tmp_path / "spikes.jsonl",
    )

    def corrupt(step, loss):
        if step == 8:  # the "last good checkpoint"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        return loss * 1e4 if step in (15, 16) else loss

    snaps = run_loop(model, opt, x, y, guard, steps=16, corrupt=corrupt)
    saved = torch.load(path, weights_only=True)
    assert same_state(snaps[16][2], saved["model"])  # after step 16 the model is the checkpoint's
    assert same_state(snaps[16][3], saved["optimizer"])
    assert [e.kind for e in guard.events] == ["loss_spike", "loss_spike", "rollback"]
    lines = [json.loads(line) for line in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert [d["kind"] for d in lines] == ["loss_spike", "loss_spike", "rollback"]
    assert guard.metrics()["rollbacks"] == 1


def test_rollback_without_checkpoint_is_logged(tmp_path):
    guard = SpikeGuard(
        min_history=1,
        window=5,
        patience=1,
        action="rollback",
        rollback_fn=rollback_from_checkpoint(tmp_path / "missing.pt"),
    )
    model, opt, *_ = make_problem()
    guard.observe(1, 1.0, 1.0)
    assert not guard.observe(2, float("nan"), 1.0, model=model, optimizer=opt)
    assert [e.kind for e in guard.events] == ["nonfinite", "rollback_failed"]
    assert guard.metrics()["rollbacks"] == 0


def test_window_reset_after_lasting_shift():
    guard = SpikeGuard(window=20, min_history=5, patience=2, reset_after=4)
    for i in range(10):
        assert guard.observe(i, 1.0 + 0.001 * i, 1.0)
    # the scale jumps 10x for good: 4 skipped steps, then the statistics restart and training goes on
    votes = [guard.observe(10 + i, 10.0 + 0.001 * i, 1.0) for i in range(10)]
    assert votes == [False] * 4 + [True] * 6
    assert guard.metrics()["window_resets"] == 1


def test_grad_overflow_left_to_the_scaler():
    guard = SpikeGuard(min_history=1, count_grad_overflow=False)
    guard.observe(1, 1.0, 1.0)
    assert guard.observe(2, 1.0, float("inf"))  # not vetoed: GradScaler skips it
    assert not guard.observe(3, float("nan"), 1.0)  # a non-finite loss is still a spike
    m = guard.metrics()
    assert m["grad_overflows"] == 1 and m["spikes"] == 1 and m["nonfinite"] == 1


def test_state_dict_round_trip():
    guard = SpikeGuard(window=10, min_history=3, patience=1, action="lower_lr")
    for i, v in enumerate([1.0, 1.1, 0.9, 1.05, 50.0]):
        guard.observe(i, v, 1.0)
    other = SpikeGuard(window=10, min_history=3, patience=1, action="lower_lr")
    other.load_state_dict(guard.state_dict())
    assert other.thresholds() == guard.thresholds()
    assert other.metrics() == guard.metrics() and other.lr_scale == 0.5


def test_with_the_trainer(tmp_path):
    trainer = pytest.importorskip("lowbit.trainer")
    model, _, x, y = make_problem()

    class Batcher:
        def sample(self):
            return x, y

    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss = nn.functional.mse_loss(m(batch[0]), batch[1])
        return loss * float("nan") if calls["n"] == 12 else loss

    guard = SpikeGuard(window=20, min_history=5)
    config = trainer.TrainConfig(
        steps=15,
        warmup_steps=0,
        grad_clip=0.0,
        log_every=1,
        eval_every=0,
        progress=False,
        device="cpu",
        out_dir=str(tmp_path),
    )
    result = trainer.train(model, Batcher(), None, config, loss_fn=loss_fn, callbacks=[guard])
    assert result.step == 15
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [(e.step, e.kind) for e in guard.events] == [(12, "nonfinite")]

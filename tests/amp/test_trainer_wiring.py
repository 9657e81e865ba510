"""The amp pieces inside lowbit.trainer.train and the CLI: precision policy, GradScaler, SpikeGuard,
embedding-gradient shrink; `lowbit inspect`."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.cli import main
from lowbit.models import GPT, GPTConfig
from lowbit.trainer import TrainConfig, load_checkpoint, read_metrics, train


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=31, n_layer=1, n_head=2, n_embd=32, block_size=16))


class FixedBatcher:
    """The same batch every step (a memorization task); resumable."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 31, (4, 16), generator=g)

    def sample(self):
        return self.x, self.x

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def config(tmp_path, **kw):
    base = dict(
        steps=6,
        batch_size=4,
        block_size=16,
        lr=3e-3,
        warmup_steps=0,
        eval_every=0,
        log_every=1,
        progress=False,
        device="cpu",
        out_dir=str(tmp_path),
    )
    return TrainConfig(**{**base, **kw})


class DtypeSpy:
    def __init__(self, model):
        self.seen = {}
        for name in ("transformer.ln_f", "lm_head", "transformer.h.0.attn.c_attn"):
            module = dict(model.named_modules())[name]
            module.register_forward_hook(self.hook(name))

    def hook(self, name):
        def record(module, args, out):
            self.seen.setdefault(name, out.dtype)

        return record


@pytest.mark.parametrize("precision,low", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_policy_active_during_training_and_removed_after(tmp_path, precision, low):
    model = tiny_gpt()
    spy = DtypeSpy(model)
    res = train(model, FixedBatcher(), None, config(tmp_path, precision=precision))
    assert spy.seen == {
        "transformer.ln_f": torch.float32,
        "lm_head": torch.float32,
        "transformer.h.0.attn.c_attn": low,
    }
    assert len(model.transformer.ln_f._forward_pre_hooks) == 0  # the policy's hooks are gone
    lines = [r for r in read_metrics(res.metrics_path) if "loss" in r]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert ("loss_scale" in lines[0]) == (precision == "fp16")


def overflow_at_step_2():
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss = m(batch[0], batch[1])[1]
        # finite in fp32, but the fp16 backward overflows: the GradScaler skips the step and halves its scale
        return loss * 1e30 if calls["n"] == 2 else loss

    return loss_fn


class CrashAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, step, **_):
        if step == self.step:
            raise RuntimeError("crash")


def test_fp16_resume_restores_the_grad_scaler(tmp_path):
    full = tiny_gpt()
    cfg_full = config(tmp_path / "full", precision="fp16", save_every=3)
    train(full, FixedBatcher(), None, cfg_full, loss_fn=overflow_at_step_2())
    cfg = config(tmp_path / "part", precision="fp16", save_every=3)
    loss_fn = overflow_at_step_2()  # one counter for the crashed and the resumed run: step 2 only
    with pytest.raises(RuntimeError, match="crash"):
        train(tiny_gpt(), FixedBatcher(), None, cfg, loss_fn=loss_fn, callbacks=[CrashAt(5)])
    saved = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert saved["step"] == 3 and saved["grad_scaler"]["scale"] == 2.0**15  # halved by the overflow
    resumed = tiny_gpt()
    train(resumed, FixedBatcher(), None, cfg, loss_fn=loss_fn, resume="auto")
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    end_full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["grad_scaler"]
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["grad_scaler"] == end_full
    assert end_full["scale"] == 2.0**15


def test_spike_guard_in_the_trainer(tmp_path):
    model = tiny_gpt()
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss = m(batch[0], batch[1])[1]
        return loss * float("nan") if calls["n"] == 4 else loss

    res = train(model, FixedBatcher(), None, config(tmp_path, spike_guard="skip"), loss_fn=loss_fn)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    lines = [r for r in read_metrics(res.metrics_path) if "loss" in r]
    assert [r["spikes"] for r in lines] == [0, 0, 0, 1, 1, 1]
    events = [json.loads(s) for s in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert [(e["step"], e["kind"]) for e in events] == [(4, "nonfinite")]
    assert load_checkpoint(res.checkpoint_path)["spike_guard"]["counts"]["spikes"] == 1


def test_embedding_grad_scale_in_the_trainer(tmp_path):
    grads = {}

    class Grab:
        def __init__(self, key):
            self.key = key

        def before_optimizer_step(self, model, **_):
            grads[self.key] = model.transformer.wpe.weight.grad.clone()

    for scale in (1.0, 0.1):
        cfg = config(tmp_path / str(scale), steps=1, grad_clip=0.0, embedding_grad_scale=scale)
        model = tiny_gpt()
        train(model, FixedBatcher(), None, cfg, callbacks=[Grab(scale)])
        assert not model.transformer.wpe._forward_hooks  # removed after training
    # the position embedding's gradient flows only through the lookup: exactly alpha times, up to the
    # order of the fp32 sums over the batch
    torch.testing.assert_close(grads[0.1], 0.1 * grads[1.0], rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="embedding_grad_scale"):
        TrainConfig(embedding_grad_scale=0.0)
    with pytest.raises(ValueError, match="needs out_dir"):
        TrainConfig(spike_guard="rollback")


def test_cli_train_flags(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            "gpt-tiny",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--block-size",
            "32",
            "--eval-every",
            "0",
            "--eval-batches",
            "1",
            "--log-every",
            "1",
            "--precision",
            "fp16",
            "--embedding-grad-scale",
            "0.1",
            "--spike-guard",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    cfg = load_checkpoint(out / "checkpoint.pt")["config"]
    assert (cfg["precision"], cfg["embedding_grad_scale"], cfg["spike_guard"]) == ("fp16", 0.1, "skip")
    lines = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert "loss_scale" in lines[0] and "spikes" in lines[0]
    assert main(["train", "--spike-guard", "panic"]) == 2


def test_cli_inspect(tmp_path, capsys):
    code = main(
        [
            "inspect",
            "--model",
            "gpt-tiny",
            "--batches",
            "1",
            "--batch-size",
            "2",
            "--block-size",
            "32",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert len(report["layers"]) == 4 * 4 + 1 and report["model"] == "gpt-tiny"
    assert (tmp_path / "histogram.png").is_file() and (tmp_path / "sqnr.png").is_file()
    assert main(["inspect", "--model", "gpt-tiny", "--blocks", "x", "--out", str(tmp_path)]) == 2
    assert main(["inspect", "--model", "no-such-model", "--out", str(tmp_path)]) == 2

import copy
import math

import pytest
import torch

from lowbit.data import TokenBatcher
from lowbit.models import GPT, GPTConfig
from lowbit.onebit import (
    DistillConfig,
    DistillLoss,
    TimeBudget,
    convert_to_onebit,
    distill,
    find_blocks,
    forward_with_hidden,
    hidden_state_loss,
    logit_kl,
    set_trainable,
)
from lowbit.trainer import TrainConfig

V = 40


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()


# ---------------------------------------------------------------------------------------------- KD loss


def test_logit_kl_against_hand_computation():
    # Two tokens, three classes, τ = 2: KL(p ‖ q) = Σ p (log p − log q), times τ², averaged over tokens.
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]])
    t = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])
    tau = 2.0
    total = 0.0
    for i in range(2):
        zs = [v / tau for v in s[0, i].tolist()]
        zt = [v / tau for v in t[0, i].tolist()]
        ls = math.log(sum(math.exp(z) for z in zs))
        lt = math.log(sum(math.exp(z) for z in zt))
        p = [math.exp(z - lt) for z in zt]
        total += sum(pk * ((ztk - lt) - (zsk - ls)) for pk, ztk, zsk in zip(p, zt, zs))
    expected = tau**2 * total / 2
    got = logit_kl(s, t, tau)
    assert got.dtype == torch.float32
    # fp32: each log-probability is off by a few ulps of (|z| / τ + log V); the KL sums p-weighted
    # differences of two of them per class, then scales by τ²: bound 16 ulps of that magnitude, times τ².
    bound = tau**2 * 16 * 2.0**-24 * (float(torch.cat([s, t]).abs().max()) / tau + math.log(3))
    assert abs(float(got) - expected) <= bound


def test_logit_kl_zero_for_equal_logits_and_positive_otherwise():
    z = torch.randn(2, 5, 11)
    assert float(logit_kl(z, z)) == pytest.approx(0.0, abs=1e-6)
    assert float(logit_kl(z, z + torch.randn(2, 5, 11))) > 0


def test_hidden_state_loss_against_hand_computation():
    # One layer, two tokens: ‖a/‖a‖ − b/‖b‖‖², averaged over the tokens; then a second layer added.
    hs1 = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    ht1 = torch.tensor([[[0.0, 2.0], [0.0, -5.0]]])
    # token 0: (0.6, 0.8) vs (0, 1): 0.36 + 0.04 = 0.4; token 1: (1, 0) vs (0, -1): 2
    assert float(hidden_state_loss([hs1], [ht1])) == pytest.approx((0.4 + 2.0) / 2, rel=1e-6)
    hs2 = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    ht2 = torch.tensor([[[2.0, 2.0], [-1.0, 0.0]]])  # token 0 identical direction: 0; token 1 opposite: 4
    assert float(hidden_state_loss([hs1, hs2], [ht1, ht2])) == pytest.approx(1.2 + 2.0, rel=1e-6)


def test_losses_reject_mismatches():
    with pytest.raises(ValueError, match="same shape"):
        logit_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        logit_kl(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="must match"):
        hidden_state_loss([torch.zeros(1, 2)], [])
    with pytest.raises(ValueError, match="hidden state 0"):
        hidden_state_loss([torch.zeros(1, 2)], [torch.zeros(1, 3)])


def test_distill_loss_combines_the_parts():
    teacher, student = tiny_gpt(0), tiny_gpt(1)
    x = torch.randint(0, V, (2, 8))
    lf = DistillLoss(teacher, temperature=1.5, alpha=0.3)
    loss = lf(student, (x, x))
    lt, ht = forward_with_hidden(teacher, x)
    ls, hs = forward_with_hidden(student, x)
    expected = logit_kl(ls, lt, 1.5) + 0.3 * hidden_state_loss(hs, ht)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert set(lf.last) == {"kd", "hidden"}
    only_kd = DistillLoss(teacher, alpha=0.0)(student, x)
    torch.testing.assert_close(only_kd, logit_kl(ls, lt), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- capture


def test_forward_with_hidden_gpt_matches_manual_blocks():
    model = tiny_gpt()
    x = torch.randint(0, V, (2, 10))
    logits, hidden = forward_with_hidden(model, x)
    h = model.transformer.wte(x) + model.transformer.wpe(torch.arange(10))
    for i, block in enumerate(model.transformer.h):
        h = block(h)
        torch.testing.assert_close(hidden[i], h, rtol=0, atol=0)
    torch.testing.assert_close(logits, model(x)[0], rtol=0, atol=0)
    assert find_blocks(model) is model.transformer.h


def test_forward_with_hidden_hf_matches_output_hidden_states(make_tiny_llama):
    model = make_tiny_llama(layers=3)
    x = torch.randint(0, 96, (2, 9))
    logits, hidden = forward_with_hidden(model, x)
    ref = model(x, output_hidden_states=True)
    assert len(hidden) == 3 and find_blocks(model) is model.model.layers
    # HF's hidden_states: embeddings, then each block's output, the last one after the final norm.
    for i in range(2):
        torch.testing.assert_close(hidden[i], ref.hidden_states[i + 1], rtol=0, atol=0)
    torch.testing.assert_close(model.model.norm(hidden[2]), ref.hidden_states[3], rtol=0, atol=0)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- training


def _setup(seed=0):
    teacher = tiny_gpt(seed)
    student = copy.deepcopy(teacher)
    convert_to_onebit(student, layer_norm=False)
    tokens = torch.randint(0, V, (4000,), generator=torch.Generator().manual_seed(seed))
    return teacher, student, TokenBatcher(tokens, 4, 16, generator=seed)


def test_distill_lowers_the_loss_and_leaves_the_teacher_alone(tmp_path):
    teacher, student, data = _setup()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    fixed = data.sample()[0]
    loss_fn = DistillLoss(teacher)
    with torch.no_grad():
        before = float(loss_fn(student, fixed))
    cfg = DistillConfig(
        train=TrainConfig(
            steps=20,
            batch_size=4,
            block_size=16,
            lr=3e-3,
            warmup_steps=0,
            eval_every=0,
            save_every=0,
            progress=False,
            device="cpu",
            out_dir=str(tmp_path),
        ),
    )
    result = distill(teacher, student, data, cfg)
    with torch.no_grad():
        after = float(loss_fn(student, fixed))
    assert result.step == 20
    assert after < 0.7 * before  # 20 AdamW steps at lr 3e-3 on a tiny model: a clear drop, not noise
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_state[k], rtol=0, atol=0)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "metrics.jsonl").is_file()


def test_distill_resume_continues_the_same_trajectory(tmp_path):
    def run(out, stop_at=None, resume=None):
        teacher, student, data = _setup(3)
        cfg = DistillConfig(
            train=TrainConfig(
                steps=6,
                batch_size=4,
                block_size=16,
                lr=1e-3,
                warmup_steps=0,
                eval_every=0,
                save_every=3,
                progress=False,
                device="cpu",
                out_dir=str(out),
            ),
        )
        if stop_at is not None:
            with pytest.raises(_Stop):
                distill(teacher, student, data, cfg, callbacks=[_StopAt(stop_at)])
        else:
            distill(teacher, student, data, cfg, resume=resume)
        return student

    full = run(tmp_path / "full")
    run(tmp_path / "a", stop_at=4)  # interrupted after the step-3 checkpoint
    resumed = run(tmp_path / "a", resume=tmp_path / "a" / "checkpoint.pt")
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


class _Stop(Exception):
    pass


class _StopAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, *, step, **_):
        if step == self.step:
            raise _Stop


def test_time_budget_stops_and_reports(monkeypatch):
    teacher, student, data = _setup()
    val = TokenBatcher(torch.randint(0, V, (500,)), 4, 16)
    cfg = DistillConfig(
        time_budget_s=1e-9,
        train=TrainConfig(
            steps=50,
            batch_size=4,
            block_size=16,
            eval_every=0,
            eval_batches=2,
            save_every=0,
            progress=False,
            device="cpu",
        ),
    )
    result = distill(teacher, student, data, cfg, val_data=val)
    assert result.step == 1 and result.val_ppl is not None and math.isfinite(result.val_ppl)
    budget = TimeBudget(10.0)
    budget.on_train_start()
    budget.on_step_end(step=1)  # well inside the budget: no stop
    assert budget.stopped_at is None


def test_set_trainable():
    _, student, _ = _setup()
    n_onebit = sum(p.numel() for n, p in student.named_parameters() if ".attn." in n or ".mlp." in n)
    assert set_trainable(student, "onebit") == n_onebit
    assert (
        not student.transformer.wte.weight.requires_grad and not student.transformer.ln_f.weight.requires_grad
    )
    n_norms = set_trainable(student, "onebit+norms")
    assert student.transformer.ln_f.weight.requires_grad and not student.transformer.wte.weight.requires_grad
    assert not student.transformer.wpe.weight.requires_grad and n_norms > n_onebit
    assert set_trainable(student, "all") == sum(p.numel() for p in student.parameters())
    with pytest.raises(ValueError, match="trainable"):
        set_trainable(student, "some")
    with pytest.raises(ValueError, match="no OneBitLinear"):
        set_trainable(tiny_gpt(), "onebit")


def test_distill_config_checks():
    assert (
        DistillConfig().train.lr == 4e-4
        and DistillConfig().temperature == 1.0
        and DistillConfig().alpha == 1.0
    )
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        DistillConfig(alpha=-1)
    with pytest.raises(ValueError, match="trainable"):
        DistillConfig(trainable="x")
    with pytest.raises(ValueError, match="time_budget_s"):
        DistillConfig(time_budget_s=0)
    with pytest.raises(TypeError, match="TrainConfig"):
        DistillConfig(train={"steps": 3})
    teacher = tiny_gpt()
    with pytest.raises(ValueError, match="different modules"):
        distill(teacher, teacher, None)


# ------------------------------------------------------------------------------------------ under torchrun

DIST_WORKER = """
import json, sys
import torch, torch.distributed as dist
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[5])
from setup_distill import config, setup
from lowbit.onebit import distill

rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
for parallel in ("ddp", "fsdp2"):
    teacher, student, data = setup()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distill(teacher, student, data, config(f"{out}/{parallel}"), parallel=parallel)
    same = all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    if rank == 0:
        json.dump({"teacher_unchanged": same}, open(f"{out}/{parallel}.json", "w"))
dist.barrier()
dist.destroy_process_group()
"""

SETUP = f"""
import copy
import torch
from lowbit.data import TokenBatcher
from lowbit.models import GPT, GPTConfig
from lowbit.onebit import DistillConfig, convert_to_onebit
from lowbit.trainer import TrainConfig

def setup():
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(vocab_size={V}, n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    student = copy.deepcopy(teacher)
    convert_to_onebit(student, layer_norm=False)
    tokens = torch.randint(0, {V}, (4000,), generator=torch.Generator().manual_seed(0))
    return teacher, student, TokenBatcher(tokens, 8, 16, generator=0)   # the GLOBAL batch: 8 sequences

def config(out_dir):
    return DistillConfig(train=TrainConfig(steps=3, batch_size=8, block_size=16, lr=3e-3, warmup_steps=0,
                                           eval_every=0, log_every=1, save_every=0, progress=False,
                                           device="cpu", out_dir=out_dir))
"""


def test_distill_under_ddp_and_fsdp2_matches_single_process(tmp_path):
    """2 gloo CPU processes: the teacher replicated and frozen, the student wrapped with DDP, then sharded
    with FSDP2, each rank on 4 of the 8 sequences of every global batch. The loss (the mean over ranks of the
    per-rank mean KD + hidden-state losses, i.e. the global mean) follows the single-process run up to the
    order of the gradient sums: 1e-5 relative after 3 AdamW steps (see tests/trainer/test_distributed.py;
    a wrong slice or a missing gradient average moves it by > 1e-3)."""
    import json
    import os
    import subprocess
    import sys

    from lowbit.trainer import read_metrics

    (tmp_path / "setup_distill.py").write_text(SETUP)
    (tmp_path / "worker.py").write_text(DIST_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), "2", str(tmp_path / "store"),
                          str(tmp_path), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env)
        for r in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]

    sys.path.insert(0, str(tmp_path))
    try:
        from setup_distill import config, setup
    finally:
        sys.path.remove(str(tmp_path))
    teacher, student, data = setup()
    distill(teacher, student, data, config(str(tmp_path / "one")))
    want = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    for parallel in ("ddp", "fsdp2"):
        assert json.loads((tmp_path / f"{parallel}.json").read_text())["teacher_unchanged"]
        got = [r["loss"] for r in read_metrics(tmp_path / parallel / "metrics.jsonl") if "loss" in r]
        assert len(got) == len(want) == 3
        for g, w in zip(got, want):
            assert abs(g - w) <= 1e-5 * abs(w), (parallel, got, want)
        assert (tmp_path / parallel / "checkpoint.pt").is_file()
    assert want[-1] < want[0]

import random

import numpy as np
import pytest
import torch

from lowbit.trainer.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _payload(value):
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "w": torch.full((4,), float(value))}


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "ck.pt"  # parent folder created
    save_checkpoint(path, {**_payload(1), "nested": {"a": [1, 2.5, "x"], "t": (3, None)}})
    back = load_checkpoint(path)
    assert torch.equal(back["w"], torch.ones(4))
    assert back["nested"] == {"a": [1, 2.5, "x"], "t": (3, None)}
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck.pt"]  # no temporary file left


@pytest.mark.parametrize("fail_after_bytes", [0, 7, 4096])
def test_crash_mid_write_keeps_previous_file(tmp_path, monkeypatch, fail_after_bytes):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, _payload(1))
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # write everything, then "crash" after a prefix landed
        f.seek(fail_after_bytes)
        f.truncate()
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, _payload(2))
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a lowbit checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({**_payload(0), "version": CHECKPOINT_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match="version"):
        load_checkpoint(tmp_path / "new.pt")


def test_save_rejects_non_dict(tmp_path):
    with pytest.raises(TypeError, match="payload must be a dict"):
        save_checkpoint(tmp_path / "x.pt", [1, 2])


def _draws():
    return (torch.rand(5), random.random(), np.random.rand(3))


def test_rng_state_round_trip_through_file(tmp_path):
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    _draws()
    state = capture_rng_state()
    expected = _draws()
    save_checkpoint(tmp_path / "rng.pt", {**_payload(0), "rng": state})  # must survive weights_only loading
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = _draws()
    assert torch.equal(got[0], expected[0])
    assert got[1] == expected[1]
    np.testing.assert_array_equal(got[2], expected[2])

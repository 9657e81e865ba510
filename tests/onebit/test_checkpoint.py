import json

import pytest
import torch

from lowbit.data import CharTokenizer
from lowbit.models import GPT, GPTConfig
from lowbit.onebit import (
    OneBitLinear,
    cast_parameters,
    convert_to_onebit,
    load_onebit,
    load_onebit_tokenizer,
    onebit_bits_per_weight,
    onebit_layers,
    pack_onebit,
    read_onebit_config,
    save_onebit,
    size_report,
)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16)).eval()


def _converted_gpt(layer_norm=True):
    model = tiny_gpt()
    convert_to_onebit(model, layer_norm=layer_norm)
    with torch.no_grad():  # make g/h not exactly representable in fp16, so a dtype slip would show
        for m in onebit_layers(model).values():
            m.h.mul_(1.0 + 1e-4)
    return model


@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("prepare", ["training_form", "packed_fp16", "half_params"])
def test_gpt_save_load_exact(tmp_path, layer_norm, prepare):
    model = _converted_gpt(layer_norm)
    if prepare == "packed_fp16":
        pack_onebit(model, torch.float16)
    elif prepare == "half_params":
        pack_onebit(model)
        cast_parameters(model, torch.bfloat16)
    x = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        y = model(x)[0]
    save_onebit(model, tmp_path / "ck", tokenizer=CharTokenizer("abc"), extra={"note": 1})
    loaded = load_onebit(tmp_path / "ck")
    assert isinstance(loaded, GPT) and not loaded.training
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tie restored
    assert all(isinstance(m, OneBitLinear) and m.is_packed for m in onebit_layers(loaded).values())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], y, rtol=0, atol=0)
    loaded_state = loaded.state_dict()
    for k, a in model.state_dict().items():
        if k in loaded_state:  # everything but a training-form latent weight (saved packed)
            assert a.dtype == loaded_state[k].dtype, k
    assert load_onebit_tokenizer(tmp_path / "ck").vocab == "abc"
    assert read_onebit_config(tmp_path / "ck")["extra"] == {"note": 1}


def test_save_does_not_modify_the_model(tmp_path):
    model = _converted_gpt()
    save_onebit(model, tmp_path / "ck")
    assert not any(m.is_packed for m in onebit_layers(model).values())


def test_hf_llama_save_load_exact(tmp_path, make_tiny_llama):
    model = make_tiny_llama()
    convert_to_onebit(model)
    pack_onebit(model)
    cast_parameters(model, torch.float16)
    x = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        y = model(x).logits
    save_onebit(model, tmp_path / "ck")
    config = read_onebit_config(tmp_path / "ck")
    assert config["architecture"] == "hf" and config["tied"] == {
        "lm_head.weight": "model.embed_tokens.weight"
    }
    loaded = load_onebit(tmp_path / "ck")
    assert type(loaded) is type(model)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, y, rtol=0, atol=0)
    # the rotary table is a buffer: it kept its fp32 dtype on both sides
    assert loaded.model.rotary_emb.inv_freq.dtype == model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_overwrite_is_atomic_and_guarded(tmp_path):
    model = _converted_gpt()
    target = tmp_path / "ck"
    save_onebit(model, target)
    pack_onebit(model, torch.float16)
    save_onebit(model, target)  # replaces the previous checkpoint
    assert read_onebit_config(target)["format"] == "lowbit.onebit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folder left behind
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a OneBit checkpoint"):
        save_onebit(model, other)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError, match="not a folder"):
        save_onebit(model, other / "notes.txt")


def test_save_rejects_unconverted_and_unknown_models(tmp_path):
    with pytest.raises(ValueError, match="no OneBitLinear"):
        save_onebit(tiny_gpt(), tmp_path / "a")
    layer = torch.nn.Sequential(OneBitLinear(4, 4))
    with pytest.raises(TypeError, match="supports"):
        save_onebit(layer, tmp_path / "b")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_onebit(tmp_path / "missing")
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"format": "lowbit.checkpoint"}, ckpt)
    with pytest.raises(NotADirectoryError, match="lowbit train"):
        load_onebit(ckpt)
    with pytest.raises(ValueError, match="not a lowbit OneBit checkpoint"):
        load_onebit(tmp_path)
    (tmp_path / "onebit_config.json").write_text(json.dumps({"format": "something.else", "version": 1}))
    with pytest.raises(ValueError, match="format 'something.else'"):
        load_onebit(tmp_path)
    (tmp_path / "onebit_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_onebit(tmp_path)
    (tmp_path / "onebit_config.json").write_text(json.dumps({"format": "lowbit.onebit", "version": 99}))
    with pytest.raises(ValueError, match="newer"):
        load_onebit(tmp_path)


def test_load_rejects_tensors_that_do_not_fit(tmp_path):
    model = _converted_gpt()
    save_onebit(model, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "onebit_config.json").read_text())
    config["model_config"]["n_embd"] = 64
    (tmp_path / "ck" / "onebit_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit"):
        load_onebit(tmp_path / "ck")


def test_bits_per_weight_formula():
    # signs: 1 bit each (no padding when in % 8 == 0), g and h: 16 bits per entry
    assert onebit_bits_per_weight(4096, 4096) == 1 + 16 * (4096 + 4096) / 4096**2 == 1.0078125
    # SmolLM2-135M projections (hidden 576, intermediate 1536, 3 KV heads of 64)
    assert onebit_bits_per_weight(576, 576) == pytest.approx(1 + 16 * 1152 / 576**2)
    assert onebit_bits_per_weight(192, 576) == pytest.approx(1 + 16 * 768 / (192 * 576))
    assert onebit_bits_per_weight(1536, 576) == onebit_bits_per_weight(576, 1536)
    # padding: 13 inputs take 2 bytes = 16 bits per row
    assert onebit_bits_per_weight(1, 13, vector_bits=0) == 16 / 13
    assert onebit_bits_per_weight(2, 8, bias=True) == (16 + 16 * (8 + 2 + 2)) / 16


def test_size_report_matches_the_files(tmp_path):
    model = _converted_gpt()
    pack_onebit(model)
    cast_parameters(model, torch.float16)
    save_onebit(model, tmp_path / "ck")
    r = size_report(tmp_path / "ck")
    shapes = [(m.out_features, m.in_features) for m in onebit_layers(model).values()]
    assert r.onebit_weights == sum(o * i for o, i in shapes)
    # packed signs + fp16 g and h, exactly as the formula counts them (no bias in GPT(bias=False))
    expected_bits = sum(onebit_bits_per_weight(o, i) * o * i for o, i in shapes)
    assert r.onebit_bytes * 8 == pytest.approx(expected_bits)
    n_params = sum(p.numel() for p in tiny_gpt().parameters())  # tied head counted once
    assert r.total_params == n_params and r.fp16_bytes == 2 * n_params
    files = sum(p.stat().st_size for p in (tmp_path / "ck").iterdir())
    assert r.bytes_on_disk == files and r.ratio_to_fp16 == files / (2 * n_params)
    assert set(r.per_shape) == {"96×32", "32×32", "128×32", "32×128"}

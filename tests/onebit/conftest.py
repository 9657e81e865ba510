"""Shared fixtures: a tiny LLaMA (Hugging Face) with its own small BPE tokenizer saved to a local folder,
so the OneBit pipeline can be exercised end to end on the CPU in seconds (no hub, no GGUF parsing)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run tiny tensors: one intra-op thread avoids thread spin on a loaded 2-core CI runner (it
    made 20 tiny steps take 15 s instead of 1). Restored afterwards, so other test folders are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(vocab_size=96, hidden=32, layers=2, seed=0):
    transformers = pytest.importorskip("transformers", reason="the HF tests need transformers (lowbit[hf])")
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def make_tiny_llama():
    """Factory fixture: ``make_tiny_llama(vocab_size=96, hidden=32, layers=2, seed=0)``."""
    return tiny_llama


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """Folder with a tiny random LLaMA and a 128-token BPE tokenizer trained on Shakespeare text."""
    transformers = pytest.importorskip("transformers", reason="the HF tests need transformers (lowbit[hf])")
    tokenizers = pytest.importorskip("tokenizers", reason="the HF tests need tokenizers (lowbit[hf])")
    from lowbit.data import load_corpus

    text = load_corpus("shakespeare").train_text[:50_000]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=128,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    folder = tmp_path_factory.mktemp("tiny_llama")
    fast.save_pretrained(folder)
    model = tiny_llama(vocab_size=len(fast))
    model.save_pretrained(folder)
    return folder

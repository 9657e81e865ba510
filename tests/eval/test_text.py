"""lowbit.eval.text: sliding-window perplexity of a text, against a hand-rolled reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.data import CharTokenizer
from lowbit.eval import WindowBatches, encode_text, perplexity, text_perplexity
from lowbit.models import GPT, GPTConfig

TEXT = "to be or not to be that is the question whether tis nobler in the mind to suffer " * 3


def tiny_gpt(vocab, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, block_size=32)).eval()


def _reference_sliding_ppl(model, tokens, seq_len, stride):
    """Hand-rolled sliding-window scoring: every target once, with up to seq_len − 1 tokens of context."""
    nll, count, scored = 0.0, 0, 0  # scored: targets tokens[1 .. scored] already done
    n = tokens.numel()
    start = 0
    while scored < n - 1:
        end = min(start + seq_len, n - 1)
        begin = max(0, end - seq_len)
        x = tokens[begin:end]
        with torch.no_grad():
            logp = F.log_softmax(model(x[None])[0][0].double(), -1)
        for pos in range(begin, end):
            if pos + 1 > scored:
                nll -= float(logp[pos - begin, tokens[pos + 1]])
                count += 1
        scored = end
        start += stride
    return math.exp(nll / count), count


@pytest.mark.parametrize("seq_len,stride", [(32, 32), (32, 16), (20, 7)])
def test_text_perplexity_scores_each_target_once(seq_len, stride):
    tok = CharTokenizer.from_text(TEXT)
    model = tiny_gpt(tok.vocab_size)
    result = text_perplexity(model, tok, TEXT, seq_len, stride, batch_size=3, progress=False)
    ref_ppl, ref_count = _reference_sliding_ppl(model, encode_text(tok, TEXT), seq_len, stride)
    assert result.tokens == ref_count == len(TEXT) - 1
    # fp32 log-softmax per token vs float64: relative agreement of the mean NLL to ~1e-6
    assert result.ppl == pytest.approx(ref_ppl, rel=1e-5)


def test_text_perplexity_max_tokens_and_token_input():
    tok = CharTokenizer.from_text(TEXT)
    model = tiny_gpt(tok.vocab_size)
    tokens = encode_text(tok, TEXT)
    a = text_perplexity(model, tok, TEXT, 32, 16, max_tokens=100, progress=False)
    b = text_perplexity(model, None, tokens[:100], 32, 16, progress=False)
    c = perplexity(model, tokens[:100], block_size=32, stride=16)
    assert a.tokens == 99 and a == b and a.loss == pytest.approx(c.loss, rel=1e-12)
    with pytest.raises(ValueError, match="max_tokens"):
        text_perplexity(model, tok, TEXT, 32, max_tokens=1, progress=False)


def test_window_batches_match_text_perplexity():
    tok = CharTokenizer.from_text(TEXT)
    model = tiny_gpt(tok.vocab_size)
    tokens = encode_text(tok, TEXT)
    val = WindowBatches(tokens, 24, 12, batch_size=4)
    r1 = perplexity(model, val.eval_batches(None))
    r2 = text_perplexity(model, None, tokens, 24, 12, batch_size=4, progress=False)
    assert r1 == r2
    assert len(list(val.eval_batches(1))) == 1 and len(list(val.eval_batches(None))) == val.num_batches


def test_encode_text_raw_hf_style_tokenizer():
    class Raw:
        def encode(self, text, add_special_tokens=True, verbose=True):
            assert add_special_tokens is False
            return [ord(c) % 7 for c in text]

    assert encode_text(Raw(), "abc").tolist() == [ord(c) % 7 for c in "abc"]
    with pytest.raises(TypeError, match="str"):
        encode_text(Raw(), 3)
    with pytest.raises(TypeError, match="encode"):
        encode_text(object(), "abc")

import random

import numpy as np
import pytest
import torch

from lowbit.data import CharTokenizer, HFTokenizer, Tokenizer, encode_corpus, tokenizer_from_state_dict

TEXTS = [
    "To be, or not to be: that is the question.\n",
    "a",
    "caf\u00e9 na\u00efve \u00fcber \u4e2d\u6587 \U0001f600 \t\r\n",  # 2-4 byte UTF-8, control chars
]


# ---------------------------------------------------------------- CharTokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_char_round_trip_and_sorted_vocab(text):
    tok = CharTokenizer.from_text(text)
    assert tok.vocab == "".join(sorted(set(text)))
    assert tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert ids == [tok.vocab.index(c) for c in text]  # reference: position in the sorted vocabulary
    assert tok.decode(ids) == text
    assert isinstance(tok, Tokenizer)


def test_char_encode_matches_python_reference_on_random_text():
    rng = random.Random(0)
    alphabet = "abcXYZ \n\u00e9\u4e2d\U0001f600!"
    text = "".join(rng.choice(alphabet) for _ in range(5000))
    tok = CharTokenizer.from_text(text)
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    assert tok.encode(text) == [stoi[c] for c in text]
    assert tok.encode("") == []
    assert tok.decode([]) == ""


def test_char_vocab_order_given_explicitly_defines_ids():
    tok = CharTokenizer("zyx")
    assert tok.encode("xyz") == [2, 1, 0]
    assert tok.decode([0, 1, 2]) == "zyx"


def test_char_unknown_character_is_an_error_naming_it():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"outside the vocabulary.*'\*'"):
        tok.encode("ab*c")
    # characters beyond the largest or below the smallest code point of the vocabulary
    for text in ("\U0001f600", "\x00"):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.encode(text)


@pytest.mark.parametrize("bad", [[3], [-1], [0, 1, 99]])
def test_char_decode_out_of_range(bad):
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tok.decode(bad)


def test_char_decode_accepts_tensors_and_arrays():
    tok = CharTokenizer.from_text("hello world")
    ids = tok.encode("hello")
    assert tok.decode(torch.tensor(ids)) == "hello"
    assert tok.decode(np.array(ids)) == "hello"
    with pytest.raises(TypeError, match="integers"):
        tok.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="ints"):
        tok.decode([1.5])


@pytest.mark.parametrize(
    ("vocab", "exc", "msg"),
    [("", ValueError, "empty"), ("aba", ValueError, "repeated"), (["a", "b"], TypeError, "str")],
)
def test_char_constructor_errors(vocab, exc, msg):
    with pytest.raises(exc, match=msg):
        CharTokenizer(vocab)


def test_char_from_empty_text():
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.from_text("")


@pytest.mark.parametrize("text", TEXTS)
def test_char_state_dict_round_trip(text):
    tok = CharTokenizer.from_text(text)
    state = tok.state_dict()
    assert state == {"type": "char", "vocab": tok.vocab}
    tok2 = tokenizer_from_state_dict(state)
    assert isinstance(tok2, CharTokenizer)
    assert tok2.encode(text) == tok.encode(text)


@pytest.mark.parametrize(
    "state", [{}, {"type": "bpe"}, {"type": "char"}, {"type": "hf", "name_or_path": ""}, "x"]
)
def test_state_dict_errors(state):
    with pytest.raises(ValueError):
        tokenizer_from_state_dict(state)


def test_encode_corpus_char():
    text = TEXTS[0] * 10
    tok = CharTokenizer.from_text(text)
    tokens = encode_corpus(tok, text)
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert tokens.tolist() == tok.encode(text)


# ---------------------------------------------------------------- HFTokenizer


class _FakeHF:
    """Duck-typed stand-in recording the arguments HFTokenizer passes."""

    name_or_path = "some/local/dir"

    def __init__(self):
        self.calls = []

    def __len__(self):
        return 7

    def encode(self, text, add_special_tokens=True, verbose=True):
        self.calls.append(add_special_tokens)
        return ([0] if add_special_tokens else []) + [2 + (ord(c) % 5) for c in text]

    def decode(self, ids):
        return ",".join(map(str, ids))


def test_hf_wrapper_defaults_to_no_special_tokens():
    fake = _FakeHF()
    tok = HFTokenizer(fake)
    assert tok.encode("ab") == [2 + 97 % 5, 2 + 98 % 5]
    assert HFTokenizer(fake, add_special_tokens=True).encode("ab")[0] == 0
    assert fake.calls == [False, True]
    assert tok.vocab_size == 7
    assert tok.decode(torch.tensor([1, 2])) == "1,2"
    assert tok.state_dict() == {"type": "hf", "name_or_path": "some/local/dir", "add_special_tokens": False}
    assert isinstance(tok, Tokenizer)
    assert encode_corpus(tok, "ab").tolist() == [2 + 97 % 5, 2 + 98 % 5]


def test_hf_wrapper_errors():
    with pytest.raises(TypeError, match="Hugging Face tokenizer"):
        HFTokenizer(object())
    fake = _FakeHF()
    fake.name_or_path = ""
    with pytest.raises(ValueError, match="name_or_path"):
        HFTokenizer(fake).state_dict()


@pytest.fixture(scope="module")
def local_hf_dir(tmp_path_factory):
    """A small word-level HF tokenizer saved to a folder; it adds <s> when asked for special tokens."""
    pytest.importorskip("transformers", reason="HF tokenizers need transformers: pip install 'lowbit[hf]'")
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate("the cat sat on a mat".split())}}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", bos_token="<s>")
    folder = tmp_path_factory.mktemp("hf_tok")
    hf.save_pretrained(folder)
    return folder


def test_hf_local_folder_round_trip(local_hf_dir):
    from lowbit.models import load_hf_tokenizer

    tok = HFTokenizer(load_hf_tokenizer(local_hf_dir))
    assert tok.encode("the cat sat on a mat") == [2, 3, 4, 5, 6, 7]  # no <s>
    assert HFTokenizer(load_hf_tokenizer(local_hf_dir), add_special_tokens=True).encode("the cat") == [
        1,
        2,
        3,
    ]
    assert tok.decode([2, 3]) == "the cat"
    assert tok.vocab_size == 8
    state = tok.state_dict()
    assert state["name_or_path"] == str(local_hf_dir)
    tok2 = tokenizer_from_state_dict(state)
    assert isinstance(tok2, HFTokenizer)
    assert tok2.encode("a mat on the cat") == tok.encode("a mat on the cat")


def test_hf_smollm2_tokenizer_round_trip():
    pytest.importorskip("transformers", reason="HF tokenizers need transformers: pip install 'lowbit[hf]'")
    from lowbit.models import load_hf_tokenizer

    tok = HFTokenizer(load_hf_tokenizer("smollm2-135m"))
    text = "The capital of France is Paris.\nTo be, or not to be."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 49152
    state = tok.state_dict()
    assert state == {"type": "hf", "name_or_path": "smollm2-135m", "add_special_tokens": False}
    assert tokenizer_from_state_dict(state).encode(text) == ids
    # A corpus longer than model_max_length encodes in one piece.
    long_text = text * 2000
    assert encode_corpus(tok, long_text).tolist() == tok.encode(long_text)

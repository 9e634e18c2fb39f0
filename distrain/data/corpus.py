"""Text sources: the embedded standard-library corpus, a text file, a directory, a JSONL file.

Every reader yields documents (``str``) in a deterministic order, so preparing the same source twice
gives the same token stream, and stops once ``max_bytes`` of UTF-8 text have been yielded (0: no
cap) — the cap truncates the last document rather than skipping it, so a tiny cap still yields text.
Undecodable bytes in text files become U+FFFD instead of failing a whole corpus on one byte.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

STDLIB_SOURCE = "stdlib"
EOT_MARKER = "<|endoftext|>"

# Extensions read from a directory source; anything else (binaries, images, ...) is skipped.
TEXT_EXTENSIONS = frozenset({".txt", ".text", ".md", ".markdown", ".rst", ".py", ".pyi", ".tex", ".org", ".adoc"})

# Standard-library folders left out of the embedded corpus: third-party packages, test suites,
# deprecated/duplicated trees, and generated tables (codec maps, pydoc topics) that are not code.
_STDLIB_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
    "pydoc_data", "encodings", "ensurepip", "__pycache__", "lib-dynload",
})
_STDLIB_SKIP_PREFIXES = ("config-", "_sysconfigdata")  # build-machine specific files and folders

_BLOCK = 1 << 20  # characters/bytes per read when streaming a large file


class CorpusError(ValueError):
    """A source's content cannot be read as documents (bad JSONL line, no documents, ...)."""


class _Budget:
    """Remaining UTF-8 bytes under ``max_bytes``; trims the document that crosses the cap."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (0: no cap), got {max_bytes}")
        self.left: int | None = max_bytes or None

    @property
    def exhausted(self) -> bool:
        return self.left is not None and self.left <= 0

    def take(self, text: str) -> str:
        if self.left is None:
            return text
        raw = text.encode("utf-8")
        if len(raw) > self.left:
            # Cutting inside a multi-byte character drops that character instead of mangling it.
            raw = raw[: self.left]
            text = raw.decode("utf-8", errors="ignore")
            raw = text.encode("utf-8")
        self.left -= len(raw)
        return text


def _require(path: str | Path, what: str = "data source") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def _read_text(path: Path, limit: int | None) -> str:
    """Read a file as UTF-8, at most ``limit`` bytes (a character cut at the limit is dropped)."""
    with open(path, "rb") as f:
        raw = f.read() if limit is None else f.read(limit)
        final = limit is None or len(raw) < limit or not f.read(1)
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(raw, final=final)


def _capped(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    budget = _Budget(max_bytes)
    for doc in docs:
        if budget.exhausted:
            return
        doc = budget.take(doc)
        if doc:
            yield doc


def _read_files(files: Iterable[Path], max_bytes: int) -> Iterator[str]:
    """One document per file, reading no more bytes from disk than the cap still allows."""
    budget = _Budget(max_bytes)
    for path in files:
        if budget.exhausted:
            return
        doc = budget.take(_read_text(path, budget.left))
        if doc:
            yield doc


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The ``*.py`` files of the running interpreter's standard library that form the corpus.

    Sorted by relative POSIX path so the order does not depend on the filesystem.
    """
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder not found: {root}")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(_STDLIB_SKIP_PREFIXES)]
        for name in filenames:
            if name.endswith(".py") and not name.startswith(_STDLIB_SKIP_PREFIXES):
                full = Path(dirpath) / name
                found.append((full.relative_to(root).as_posix(), full))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def directory_files(path: str | Path) -> list[Path]:
    """Text files under ``path`` (recursively, hidden entries skipped), sorted by relative path."""
    root = _require(path)
    if not root.is_dir():
        raise NotADirectoryError(f"data source is not a directory: {root}")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in TEXT_EXTENSIONS:
                full = Path(dirpath) / name
                found.append((full.relative_to(root).as_posix(), full))
    if not found:
        raise CorpusError(f"{root}: no text files found (looked for {', '.join(sorted(TEXT_EXTENSIONS))})")
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def iter_stdlib(max_bytes: int = 0) -> Iterator[str]:
    """The embedded default corpus: one document per standard-library source file."""
    return _read_files(stdlib_files(), max_bytes)


def iter_directory(path: str | Path, max_bytes: int = 0) -> Iterator[str]:
    """One document per text file under ``path``."""
    return _read_files(directory_files(path), max_bytes)


def _has_marker(path: Path) -> bool:
    """Whether the file contains ``<|endoftext|>`` (scanned in blocks; stops at the first hit)."""
    marker = EOT_MARKER.encode()
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            window = tail + chunk
            if marker in window:
                return True
            tail = window[-(len(marker) - 1) :]
    return False


def _paragraphs(f: TextIO) -> Iterator[str]:
    buf: list[str] = []
    for line in f:
        if line.strip():
            buf.append(line)
        elif buf:
            yield "".join(buf)
            buf = []
    if buf:
        yield "".join(buf)


def _eot_parts(f: TextIO) -> Iterator[str]:
    rest = ""
    while chunk := f.read(_BLOCK):
        parts = (rest + chunk).split(EOT_MARKER)
        rest = parts.pop()  # may end in a partial marker: completed by the next block
        yield from parts
    yield rest


def _split_stream(f: TextIO, eot: bool) -> Iterator[str]:
    for part in _eot_parts(f) if eot else _paragraphs(f):
        if part.strip():
            yield part.strip("\r\n")


def split_text(text: str) -> list[str]:
    """Documents of a single text file: split on ``<|endoftext|>`` when present, else on blank lines.

    Surrounding line breaks are dropped; indentation and line endings inside a document are kept.
    """
    return list(_split_stream(io.StringIO(text, newline=""), EOT_MARKER in text))


def iter_text_file(path: str | Path, max_bytes: int = 0) -> Iterator[str]:
    """Documents of one text file (see :func:`split_text`), streamed: a large file is never loaded whole."""
    p = _require(path)
    if not p.is_file():
        raise CorpusError(f"data source is not a regular file: {p}")

    def docs() -> Iterator[str]:
        eot = _has_marker(p)
        with open(p, encoding="utf-8", errors="replace", newline="") as f:
            yield from _split_stream(f, eot)

    return _capped(docs(), max_bytes)


def iter_jsonl(path: str | Path, text_key: str = "text", max_bytes: int = 0) -> Iterator[str]:
    """The ``text_key`` field of each JSON object line; blank lines are skipped.

    A line that is not JSON, not an object, lacks the key or holds a non-string raises
    :class:`CorpusError` naming the file and the 1-based line number.
    """
    p = _require(path)

    def records() -> Iterator[str]:
        with open(p, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{p}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise CorpusError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                if text_key not in rec:
                    keys = ", ".join(sorted(map(str, rec))[:10]) or "none"
                    raise CorpusError(f"{where}: record has no key {text_key!r} (keys: {keys})")
                value = rec[text_key]
                if not isinstance(value, str):
                    raise CorpusError(f"{where}: {text_key!r} must be a string, got {type(value).__name__}")
                yield value

    return _capped(records(), max_bytes)


def check_source(source: str) -> None:
    """Cheap checks a run makes before it creates anything: a directory holds a text file, a file is
    text (no NUL bytes, valid UTF-8 in its first 64 KB). Raises ``CorpusError`` naming the problem."""
    kind = source_kind(source)
    if kind == "directory":
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
            if any(not n.startswith(".") and Path(n).suffix.lower() in TEXT_EXTENSIONS for n in filenames):
                return
        raise CorpusError(f"{source}: no text files found (looked for {', '.join(sorted(TEXT_EXTENSIONS))})")
    if kind in ("file", "jsonl"):
        with open(source, "rb") as f:
            head = f.read(1 << 16)
        if not head.strip():
            raise CorpusError(f"{source}: the file is empty")
        text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
        # the reader replaces the odd undecodable byte (a Latin-1 accent); a binary file is mostly that
        if b"\0" in head or text.count("\ufffd") > 0.1 * max(1, len(text)):
            raise CorpusError(f"{source}: not text (NUL bytes or mostly invalid UTF-8 in its first "
                              f"{len(head)} bytes); give a text file, a directory of text files or a .jsonl file")


def source_kind(source: str) -> str:
    """``stdlib``, ``jsonl``, ``directory`` or ``file``; a missing path raises FileNotFoundError."""
    if source == STDLIB_SOURCE:
        return "stdlib"
    p = _require(source)
    if p.is_dir():
        return "directory"
    if p.name.lower().endswith(".jsonl"):
        return "jsonl"
    return "file"


def iter_documents(source: str, *, text_key: str = "text", max_bytes: int = 0) -> Iterator[str]:
    """Documents of ``source``: ``"stdlib"`` or a path to a text file, a directory or a ``.jsonl``."""
    kind = source_kind(source)
    if kind == "stdlib":
        return iter_stdlib(max_bytes)
    if kind == "directory":
        return iter_directory(source, max_bytes)
    if kind == "jsonl":
        return iter_jsonl(source, text_key, max_bytes)
    return iter_text_file(source, max_bytes)


def source_fingerprint(source: str) -> str:
    """A hash identifying the source's content without reading it: each file's path, size and mtime.

    The stdlib corpus is identified by interpreter version and its files' relative paths and sizes
    (its mtimes vary between installs of the same version and say nothing about content).
    """
    kind = source_kind(source)
    h = hashlib.sha256(kind.encode())
    if kind == "stdlib":
        root = stdlib_root()
        h.update(sys.version.encode())
        for f in stdlib_files():
            h.update(f"{f.relative_to(root).as_posix()}\0{f.stat().st_size}\n".encode())
        return h.hexdigest()
    p = Path(source).expanduser().resolve()
    h.update(str(p).encode())
    files = directory_files(p) if kind == "directory" else [p]
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p).as_posix() if kind == 'directory' else ''}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()

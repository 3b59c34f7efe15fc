"""Documents for ``text`` shards from the corpora people have: plain text and JSON lines, either
compressed, and folders of them.

Inputs, by suffix: ``.txt`` (plain UTF-8), ``.jsonl`` and ``.json`` (one JSON object per line,
the document in its ``text_field``), each optionally ``.gz`` (gzip) or ``.zst`` (Zstandard, needs
the ``zstandard`` package). A folder is read recursively in sorted order, files of those suffixes
only; how many others it held is printed. A named file of another suffix is read as plain text.

Documents as the source implies them: one per JSON record; a ``.txt`` file is one document
(``documents="file"``), or one per non-empty line (``"line"``), or one per paragraph, the blocks
between blank lines (``"paragraph"``). Blank documents are not written. Keys are the file's path
(from the folder given, suffixes dropped), then, but for a whole file, the document's first line.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, TextIO

from tqdm import tqdm

from .shards import safe_key

__all__ = ["DOCUMENTS", "TEXT_SUFFIXES", "text_documents"]

DOCUMENTS = ("file", "line", "paragraph")
Documents = Literal["file", "line", "paragraph"]
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
COMPRESSIONS = (".gz", ".zst")
# One document per file holds the file in memory and in one sample; past this (on disk) a
# corpus is almost certainly many documents concatenated.
MAX_FILE_DOCUMENT_BYTES = 256 << 20
Sample = tuple[str, dict]


def _format(path: Path) -> tuple[str | None, str | None]:
    """(format suffix or None, compression suffix or None) of a file name: ``a.jsonl.gz`` -> (.jsonl, .gz)."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    fmt = suffixes[-1] if suffixes and suffixes[-1] in TEXT_SUFFIXES else None
    return fmt, compression


def _stem(path: Path) -> str:
    """The file name without its format and compression suffixes: ``wiki.de.jsonl.gz`` -> ``wiki.de``."""
    fmt, compression = _format(path)
    name = path.name[: len(path.name) - len(compression or "")]
    return name[: len(name) - len(fmt or Path(name).suffix)] or path.name


def _zstd_reader(f) -> io.BufferedReader:
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"{f.name} is Zstandard-compressed and reading it needs the zstandard package: "
                         f"pip install zstandard (or the project's zstd extra)") from None
    return io.BufferedReader(_ZstdFrames(f, zstandard))


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of consecutive Zstandard frames. A file that ends inside a frame
    is an ``EOFError`` (zstandard's own stream reader returns nothing then, which would make
    a truncated corpus an empty one)."""

    def __init__(self, raw, zstandard):
        self._raw, self._new = raw, zstandard.ZstdDecompressor().decompressobj
        self._frame, self._in_frame = self._new(), False
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a Zstandard frame: it is truncated")
                return 0
            self._out, self._pos = self._decompress(chunk), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame.eof:
                self._frame = self._new()
            out.append(self._frame.decompress(data))
            self._in_frame = not self._frame.eof
            data = self._frame.unused_data if self._frame.eof else b""
        return b"".join(out)


def _decompression_errors() -> tuple[type[Exception], ...]:
    try:
        import zstandard
    except ImportError:
        return gzip.BadGzipFile, EOFError
    return gzip.BadGzipFile, EOFError, zstandard.ZstdError


@contextmanager
def _open(path: Path) -> Iterator[TextIO]:
    """The file's text, decompressed by its suffix."""
    _, compression = _format(path)
    with open(path, "rb") as raw:
        binary = gzip.GzipFile(fileobj=raw) if compression == ".gz" else \
            _zstd_reader(raw) if compression == ".zst" else raw
        with io.TextIOWrapper(binary, encoding="utf-8") as text:
            yield text


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a text file; bad bytes are an error naming the line."""
    line_no = 0
    try:
        with _open(path) as f:
            for line_no, line in enumerate(f, start=1):
                yield line_no, line.removesuffix("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{line_no + 1}: not UTF-8 text ({e.reason}); a compressed file needs its "
                         f".gz or .zst suffix") from None
    except _decompression_errors() as e:
        raise ValueError(f"{path}: cannot be decompressed as its suffix says ({e})") from None


def _text_files(paths: list[str | Path]) -> Iterator[tuple[Path, str]]:
    """(file, key base) of every input: named files as they are, folders' known files sorted."""
    for path in map(Path, paths):
        if path.is_file():
            yield path, _stem(path)
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"text input {path} not found")
        files = sorted(p for p in path.rglob("*") if p.is_file())
        known = [p for p in files if _format(p)[0] is not None]
        if len(known) < len(files):
            others = [str(p.relative_to(path)) for p in files if _format(p)[0] is None]
            tqdm.write(f"{path}: ignored {len(others)} file(s) that are not {'/'.join(TEXT_SUFFIXES)} "
                       f"(optionally .gz/.zst), e.g. {', '.join(others[:3])}", file=sys.stderr)
        if not known:
            raise FileNotFoundError(f"no {'/'.join(TEXT_SUFFIXES)} files (optionally .gz/.zst) under {path}")
        for file in known:
            yield file, str(Path(path.resolve().name) / file.relative_to(path).parent / _stem(file))


def _json_documents(path: Path, text_field: str, lang_field: str | None) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text, language or None) of each record of a JSON-lines file."""
    for line_no, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not a JSON object ({e}); a {_format(path)[0]} text input holds "
                             f"one JSON object per line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: {line.strip()[:40]} is not a JSON object with a "
                             f"{text_field!r} field")
        for field, flag in ((text_field, "--text-field"), (lang_field, "--lang-field")):
            if field is None or isinstance(record.get(field), str):
                continue
            found = f"has no {field!r} field" if field not in record else \
                f"holds {json.dumps(record[field])[:40]} in {field!r}, not a string"
            raise ValueError(f"{path}:{line_no}: the record {found}; its keys are {sorted(record)} "
                             f"({flag} names the field to read)")
        yield line_no, record[text_field], record[lang_field] if lang_field else None


def _plain_documents(path: Path, documents: Documents) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each document of a plain text file."""
    if documents == "file":
        size = path.stat().st_size
        if size > MAX_FILE_DOCUMENT_BYTES:
            raise ValueError(f"{path} is {size / 2**20:.0f} MiB, too large for one document (at most "
                             f"{MAX_FILE_DOCUMENT_BYTES >> 20} MiB); pass --documents line or paragraph")
        yield 1, "\n".join(line for _, line in _lines(path))
        return
    block: list[str] = []
    start = 0
    for line_no, line in _lines(path):
        if not line.strip():
            if block:
                yield start, "\n".join(block)
            block = []
        elif documents == "line":
            yield line_no, line
        else:
            start = start if block else line_no
            block.append(line)
    if block:
        yield start, "\n".join(block)


def text_documents(paths: list[str | Path], *, documents: Documents = "file", text_field: str = "text",
                   lang: str | None = None, lang_field: str | None = None,
                   per_line: bool | None = None) -> Iterator[Sample]:
    """Documents from text files and folders (see the module docstring).

    Args:
        paths: files and folders.
        documents: how a ``.txt`` file splits into documents: ``file``, ``line`` or ``paragraph``.
            JSON lines give one document per record whatever this says.
        text_field: the JSON records' field holding the document.
        lang: every document's language, kept as its ``json`` ``{"lang": lang}`` (LM evaluation
            reports perplexity per language).
        lang_field: the JSON records' field holding each one's language (``lang`` where it is empty).
        per_line: the older spelling of ``documents``: True is ``line``, False ``file``.
    """
    if per_line is not None:
        documents = "line" if per_line else "file"
    if documents not in DOCUMENTS:
        raise ValueError(f"documents={documents!r}; expected one of {', '.join(DOCUMENTS)}")
    bases: dict[str, Path] = {}
    for path, base in _text_files(paths):
        base = safe_key(base)
        if base in bases:
            raise ValueError(f"{bases[base]} and {path} give the same sample keys ({base!r}); "
                             f"put them in one folder or rename one")
        bases[base] = path
        if _format(path)[0] in (".jsonl", ".json"):
            for line_no, text, record_lang in _json_documents(path, text_field, lang_field):
                if text.strip():
                    meta = record_lang or lang
                    yield f"{base}_{line_no:08d}", {"txt": text, **({"json": {"lang": meta}} if meta else {})}
            continue
        for line_no, text in _plain_documents(path, documents):
            if text.strip():
                key = base if documents == "file" else f"{base}_{line_no:08d}"
                yield key, {"txt": text, **({"json": {"lang": lang}} if lang else {})}

"""Reading user files with errors that name the file and the line: Lhotse JSONL cut manifests and text files.

Lhotse's lazy JSONL reader raises a bare ``JSONDecodeError`` (whose "line 1 column 40" is a position inside the
broken line) and Python a bare ``UnicodeDecodeError``; neither names the file. These readers raise
``InputFileError`` (a ``ValueError``) as ``path:line: what is wrong``.

They also resume in O(1): ``iter_from(position)`` yields ``(item, position after it)``, the position being a
byte offset (a file list: ``[file index, byte offset]``), which the sampler stores in its checkpoint instead of
re-reading the epoch (a ``.gz`` file seeks by decompressing up to the offset). After a seek, errors name the byte
offset instead of the line.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

from lhotse.serialization import deserialize_item

__all__ = ["InputFileError", "ManifestCuts", "TextFile", "read_lines", "check_text_file"]


class InputFileError(ValueError):
    """A file that cannot be read as what it should be; the message starts with ``path:line``."""


def _open(path):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def _lines(path, offset: int = 0) -> Iterator[tuple[str, str, int]]:
    """``(where, text, offset after the line)`` from byte ``offset``; ``where`` is ``path:line`` (from the start)
    or ``path (byte N)`` (after a seek). A line that is not UTF-8 is an error."""
    seeked = bool(offset)
    with _open(path) as f:
        if seeked:
            f.seek(offset)
        for number, raw in enumerate(f, 1):
            where = f"{path} (byte {offset})" if seeked else f"{path}:{number}"
            offset += len(raw)
            try:
                yield where, raw.decode("utf-8"), offset
            except UnicodeDecodeError as e:
                raise InputFileError(f"{where}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at "
                                     f"column {e.start + 1}); re-encode the file as UTF-8") from None


def read_lines(path) -> Iterator[tuple[int, str]]:
    """``(line number from 1, text)`` of a UTF-8 file (``.gz`` too); a line that is not UTF-8 is an error."""
    for number, (_, text, _) in enumerate(_lines(path), 1):
        yield number, text


class TextFile:
    """A text file's lines (blank ones included), re-iterable and resumable (``iter_from``)."""

    def __init__(self, path):
        self.path = str(path)

    def __iter__(self):
        return (text for text, _ in self.iter_from(None))

    def iter_from(self, position: int | None):
        return ((text.rstrip("\r\n"), offset) for _, text, offset in _lines(self.path, position or 0))


def check_text_file(path) -> int:
    """Read a whole text file once: an error naming file and line for non-UTF-8 bytes, an error for a missing or
    blank file; returns its non-blank lines."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (text, one sentence per line)")
    n = sum(1 for _, line in read_lines(path) if line.strip())
    if not n:
        raise InputFileError(f"{path}: empty (text, one sentence per line)")
    return n


class ManifestCuts:
    """A Lhotse JSONL cut manifest, read lazily and re-iterable; a line that is not a JSON cut is an error naming
    the file and its line number."""

    def __init__(self, path):
        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"{self.path}: no such cut manifest")

    def __iter__(self):
        return (cut for cut, _ in self.iter_from(None))

    def iter_from(self, position: int | None):
        """``(cut, byte offset after it)`` from byte ``position`` (None: the start)."""
        for where, line, offset in _lines(self.path, position or 0):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputFileError(f"{where}: not a JSON object ({e.msg} at column {e.colno})") from None
            try:
                if not isinstance(data, dict):
                    raise TypeError(f"a JSON {type(data).__name__}")
                cut = deserialize_item(data)
            except Exception as e:  # Lhotse's from_dict: KeyError / TypeError / ValueError on a malformed cut
                raise InputFileError(f"{where}: not a Lhotse cut ({type(e).__name__}: {e})") from None
            yield cut, offset

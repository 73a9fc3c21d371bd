"""Reading user files with errors that name the file and the line: Lhotse JSONL cut manifests and text files.

Lhotse's lazy JSONL reader raises a bare ``JSONDecodeError`` (whose "line 1 column 40" is a position inside the
broken line) and Python a bare ``UnicodeDecodeError``; neither names the file. These readers raise
``InputFileError`` (a ``ValueError``) as ``path:line: what is wrong``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

from lhotse.serialization import deserialize_item

__all__ = ["InputFileError", "ManifestCuts", "read_lines", "check_text_file"]


class InputFileError(ValueError):
    """A file that cannot be read as what it should be; the message starts with ``path:line``."""


def _open(path):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def read_lines(path) -> Iterator[tuple[int, str]]:
    """``(line number from 1, text)`` of a UTF-8 file (``.gz`` too); a line that is not UTF-8 is an error."""
    with _open(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputFileError(f"{path}:{number}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at "
                                     f"column {e.start + 1}); re-encode the file as UTF-8") from None


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
        for number, line in read_lines(self.path):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputFileError(f"{self.path}:{number}: not a JSON object ({e.msg} at column {e.colno})") from None
            try:
                if not isinstance(data, dict):
                    raise TypeError(f"a JSON {type(data).__name__}")
                cut = deserialize_item(data)
            except Exception as e:  # Lhotse's from_dict: KeyError / TypeError / ValueError on a malformed cut
                raise InputFileError(f"{self.path}:{number}: not a Lhotse cut ({type(e).__name__}: {e})") from None
            yield cut

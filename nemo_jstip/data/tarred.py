"""Cuts whose audio lives in tar shards (Lhotse Shar, NeMo tarred manifests), read in the DataLoader workers.

Both formats pair a metadata stream (Shar ``cuts.NNNNNN.jsonl[.gz]``; NeMo JSON-lines manifests) with tar shards of
audio files. Lhotse's and NeMo's own readers stream each tar in the process that iterates the cuts, which here is
the sampler's (the main process): every clip's bytes would pass through the sampler's shuffle buffer and buckets and
be pickled to the workers. Here the sampler reads the metadata only. When the reader enters a shard it indexes the
shard's tar from its member headers (one header read per member, no audio bytes: O(members) per shard and epoch),
and each cut carries ``custom["jstip_tar_audio"] = [tar path, byte offset, size]``; ``load_tar_audio`` in a worker
reads exactly those bytes. Tars must be uncompressed (both writers make them so). Resume is O(one shard): a
position is (shard, byte offset into its metadata file).
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Callable

from lhotse import AudioSource, MonoCut, Recording, SupervisionSegment
from lhotse.utils import fastcopy

from nemo_jstip.data.manifest import InputFileError, ManifestCuts, TextFile

__all__ = ["TAR_AUDIO_KEY", "tar_index", "SharCuts", "NemoTarredCuts", "load_tar_audio"]

TAR_AUDIO_KEY = "jstip_tar_audio"

log = logging.getLogger(__name__)


def tar_index(path) -> dict[str, tuple[int, int]]:
    """Member name -> (byte offset of its data, size), read from the member headers only. A tar cut short keeps
    the members before the cut (a warning names the tar; the cuts of the rest then count as missing audio)."""
    index = {}
    try:
        with tarfile.open(path, "r:") as tar:  # "r:" refuses a compressed tar, which cannot be read at an offset
            try:
                for m in tar:
                    if m.isfile():
                        index[m.name] = (m.offset_data, m.size)
            except tarfile.TarError as e:
                log.warning("%s: unreadable after %d members (%s); the cuts of the rest count as missing audio",
                            path, len(index), e)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such audio tar shard") from None
    except tarfile.TarError as e:
        raise InputFileError(f"{path}: not an uncompressed tar ({e})") from None
    return index


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


class _Shards:
    """Metadata files paired with audio tars; ``iter_from`` yields ``(cut, [shard, offset])`` with each cut's tar
    location attached. Subclasses say how a metadata file is read (``_items``), which tar member a cut's audio is
    (``_key``) and what a member's name is keyed by (``_member_key``, None: not audio)."""

    def __init__(self, meta: list, tars: list, tag: Callable):
        if not meta:
            raise FileNotFoundError("no metadata shards given")
        if len(meta) != len(tars):
            raise InputFileError(f"{len(meta)} metadata shards but {len(tars)} audio tars: {meta[0].path} ... / "
                                 f"{tars[0] if tars else 'none'} ...")
        self.meta, self.tars, self.tag = meta, [str(t) for t in tars], tag

    def __iter__(self):
        return (cut for cut, _ in self.iter_from(None))

    def iter_from(self, position):
        first, offset = position if position is not None else (0, None)
        for k in range(first, len(self.meta)):
            index = {key: loc for name, loc in tar_index(self.tars[k]).items()
                     if (key := self._member_key(name)) is not None}
            for cut, after in self._items(k, offset if k == first else None):
                loc = index.get(self._key(cut))
                custom = {**(cut.custom or {}), TAR_AUDIO_KEY: [self.tars[k], *loc] if loc else None}
                yield self.tag(fastcopy(cut, custom=custom)), [k, after]


class SharCuts(_Shards):
    """A Lhotse Shar directory with a ``recording`` field: ``cuts.NNNNNN.jsonl[.gz]`` + ``recording.NNNNNN.tar``
    (audio member ``<cut id>.<format>`` beside its ``<cut id>.json`` manifest). Other fields are not read."""

    def __init__(self, shar_path, tag: Callable):
        root = Path(shar_path)
        meta = sorted(root.glob("cuts.*.jsonl*"))
        if not meta:
            raise FileNotFoundError(f"{root}: no cuts.NNNNNN.jsonl[.gz] shards (a Lhotse Shar directory)")
        tars = [root / f"recording.{p.name.split('.')[1]}.tar" for p in meta]
        if missing := [str(t) for t in tars if not t.is_file()]:
            raise FileNotFoundError(f"{root}: Shar cut shards without their recording tar: {', '.join(missing)}")
        super().__init__([ManifestCuts(p) for p in meta], tars, tag)

    @staticmethod
    def _member_key(name: str) -> str | None:
        return None if name.endswith((".json", ".nodata", ".nometa")) else _stem(name)

    def _items(self, k: int, offset):
        return self.meta[k].iter_from(offset)

    @staticmethod
    def _key(cut) -> str:
        return cut.id


class NemoTarredCuts(_Shards):
    """NeMo tarred ASR data: manifest shards of JSON lines (``audio_filepath``, ``duration``, ``text``, optional
    ``lang`` and other keys, kept in the supervision's ``custom``) + tar shards holding each ``audio_filepath``'s
    basename. The manifests carry no sampling rate and no word alignments: ``sampling_rate`` is given (as NeMo's
    tarred datasets take ``sample_rate``), and these cuts can train ``asr`` and ``text`` streams, not
    ``interleaved`` ones. Segments of a longer file (``offset``) are refused with the file and line."""

    def __init__(self, manifest_filepath, tarred_audio_filepaths, sampling_rate: int, tag: Callable):
        from nemo.collections.common.data.lhotse.nemo_adapters import expand_sharded_filepaths

        meta = [TextFile(p) for p in expand_sharded_filepaths(manifest_filepath)]
        for m in meta:
            if not os.path.isfile(m.path):
                raise FileNotFoundError(f"{m.path}: no such NeMo manifest shard")
        super().__init__(meta, expand_sharded_filepaths(tarred_audio_filepaths), tag)
        self.sampling_rate = int(sampling_rate)

    @staticmethod
    def _member_key(name: str) -> str:
        return os.path.basename(name)

    @staticmethod
    def _key(cut) -> str:
        return os.path.basename(cut.recording.sources[0].source)

    def _items(self, k: int, offset):
        path = self.meta[k].path
        for number, (line, after) in enumerate(self.meta[k].iter_from(offset), 1):
            if line.strip():
                where = f"{path}:{number}" if offset is None else f"{path} (line {number} after byte {offset})"
                yield self._cut(line, where), after

    def _cut(self, line: str, where: str) -> MonoCut:
        try:
            entry = json.loads(line)
            audio, duration = entry.pop("audio_filepath"), float(entry.pop("duration"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputFileError(f"{where}: not a NeMo manifest entry with audio_filepath and duration "
                                 f"({type(e).__name__}: {e})") from None
        if entry.pop("offset", 0):
            raise InputFileError(f"{where}: segments of a longer file (offset) are not read from tarred shards")
        cut_id = os.path.splitext(os.path.basename(audio))[0]
        rate = self.sampling_rate
        # the source names the member (for messages); load_tar_audio replaces it with the member's bytes
        rec = Recording(id=cut_id, sources=[AudioSource(type="shar", channels=[0], source=audio)], sampling_rate=rate,
                        num_samples=round(duration * rate), duration=duration)
        sup = SupervisionSegment(id=cut_id, recording_id=cut_id, start=0.0, duration=duration, channel=0,
                                 text=entry.pop("text", ""), language=entry.pop("lang", None), custom=entry or None)
        return MonoCut(id=cut_id, start=0.0, duration=duration, channel=0, recording=rec, supervisions=[sup])


def load_tar_audio(cut):
    """``cut`` with its recording read from its tar member into memory, if it has one; raises ``FileNotFoundError``
    (the tar or the member is missing) or ``OSError`` (a short read) naming the tar."""
    custom = cut.custom or {}
    if TAR_AUDIO_KEY not in custom:
        return cut
    if custom[TAR_AUDIO_KEY] is None:
        raise FileNotFoundError(f"no audio member for cut {cut.id} in its shard's tar")
    path, offset, size = custom[TAR_AUDIO_KEY]
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: {len(data)} of {size} bytes at offset {offset} (truncated tar)")
    rec = cut.recording
    source = AudioSource(type="memory", channels=rec.sources[0].channels, source=data)
    return fastcopy(cut, recording=fastcopy(rec, sources=[source]))

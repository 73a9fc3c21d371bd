"""``JSTIPModel.transcribe``: greedy ASR of audio files or a Lhotse CutSet, as NeMo's ASR models offer it.

Each input becomes one mono cut at the encoder's sampling rate (other rates are resampled, multi-channel audio is
downmixed) and is decoded with the evaluation's prompt (audio first, the transcript as the continuation). An input
that cannot be used (missing, unreadable, truncated, no audio) does not stop the rest: its result carries ``error``
(what is wrong, naming the file) and an empty ``text``. Results come back in input order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

import torch
from lhotse import CutSet, Recording
from lhotse.cut import Cut

log = logging.getLogger(__name__)
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".sph")


@dataclasses.dataclass
class Transcription:
    """One input's result: ``id`` (the cut id, or the file's stem), ``audio`` (the file, when known), ``text``
    (the hypothesis), ``error`` (None when decoded), ``reference`` (a cut's transcript, when it has one)."""

    id: str
    text: str = ""
    audio: str | None = None
    error: str | None = None
    reference: str | None = None


def _source(cut: Cut) -> str | None:
    rec = getattr(cut, "recording", None)
    return next((str(s.source) for s in getattr(rec, "sources", []) if s.type == "file"), None)


def _prepare(cut: Cut, sample_rate: int) -> Cut:
    """A mono cut at ``sample_rate`` whose audio was read once here (a truncated or corrupt file fails now, by name)."""
    if not cut.has_recording:
        raise ValueError("has no audio")
    if cut.num_channels and cut.num_channels > 1:  # the mean of the channels (Lhotse's downmix sums and clips)
        cut = cut.perturb_volume(1 / cut.num_channels).to_mono(mono_downmix=True)
    if cut.sampling_rate != sample_rate:
        cut = cut.resample(sample_rate)
    audio = cut.load_audio()
    expected = cut.num_samples
    if audio.shape[-1] != expected:  # Lhotse tolerates a few samples of header/decoder disagreement
        raise ValueError(f"holds {audio.shape[-1]} samples, its header promises {expected} (truncated?)")
    return cut


def _cuts(audio) -> Iterator[tuple[str, str | None, Cut | Exception]]:
    """``(id, file, cut or the error)`` per input, lazily: paths are opened one at a time."""
    if isinstance(audio, CutSet):
        yield from ((cut.id, _source(cut), cut) for cut in audio)
        return
    for path in [audio] if isinstance(audio, (str, Path)) else audio:
        path = str(path)
        try:
            rec = Recording.from_file(path)
        except Exception as e:  # missing file, not audio, unsupported format
            yield Path(path).stem, path, e
            continue
        yield Path(path).stem, path, rec.to_cut()


def _error(file: str | None, e: BaseException) -> str:
    first = str(e).split("\n[extra info]")[0].strip().splitlines()
    return f"{file or 'cut'}: {type(e).__name__}: {first[0] if first else ''}".rstrip(": ")


def _batches(items: Iterable, batch_size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def transcribe(model, audio: str | Path | Iterable[str | Path] | CutSet, batch_size: int = 4,
               max_new_tokens: int = 256) -> list[Transcription]:
    """Greedy transcripts of ``audio`` (file paths, or a CutSet) in input order; see the module docstring."""
    from nemo_jstip.data.dataset import DatasetConfig, JSTIPDataset
    from nemo_jstip.data.examples import ExampleBuilder
    from nemo_jstip.data.interleave import InterleaveConfig
    from nemo_jstip.modules.generate import decode_text, greedy_generate

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from omegaconf import OmegaConf

    interleave = OmegaConf.to_container(model.cfg.get("interleave") or {}, resolve=True)
    dataset = JSTIPDataset(ExampleBuilder(model.tokenizer, model.frame_spec, InterleaveConfig(**interleave)),
                           DatasetConfig(prompt=True, strict=True))
    tok, sr = model.tokenizer, model.frame_spec.sample_rate
    was_training, results = model.training, []
    model.eval()
    try:
        for chunk in _batches(_cuts(audio), batch_size):
            good = []
            for id, file, cut in chunk:
                reference = " ".join(s.text or "" for s in cut.supervisions).strip() if isinstance(cut, Cut) else ""
                result = Transcription(id=id, audio=file, reference=reference or None)
                results.append(result)
                try:
                    if isinstance(cut, Exception):
                        raise cut
                    good.append((result, _prepare(cut, sr)))
                except Exception as e:
                    result.error = _error(file, e)
                    log.warning("transcribe: skipped %s", result.error)
            if not good:
                continue
            batch = model._to_device(dataset[[c for _, c in good]])
            ids = greedy_generate(model.stage, batch, max_new_tokens, tok.eos_token_id,
                                  tok.pad_token_id or tok.eos_token_id)
            for (result, _), text in zip(good, decode_text(tok, ids), strict=True):
                result.text = text
    finally:
        model.train(was_training)
    return results


def expand_inputs(spec: str) -> list[str] | CutSet:
    """The CLI's ``audio=``: an audio file, a folder (its audio files, recursively, sorted), a Lhotse cut manifest
    (``.jsonl``/``.jsonl.gz`` with cut records) or a NeMo manifest (lines with ``audio_filepath``)."""
    path = Path(spec)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        from lhotse.serialization import open_best

        with open_best(path) as f:
            first = next((line for line in f if line.strip()), "")
        try:
            record = json.loads(first)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line 1 is not JSON ({e.msg})") from None
        if "audio_filepath" in record:
            with open_best(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            return [str((path.parent / r["audio_filepath"]) if not Path(r["audio_filepath"]).is_absolute()
                        else r["audio_filepath"]) for r in rows]
        return CutSet.from_file(path)
    return [spec]

"""Add word alignments to a Lhotse cut manifest by forced alignment with an existing aligner.

    python -m nemo_jstip.prep.align in=CUTS.jsonl[.gz] out=OUT.jsonl[.gz] backend=pocketsphinx|nemo_ctc \
        [model=PATH.nemo|NAME] [on_failure=drop|keep] [batch_size=8] [device=cpu] ...

JSTIP needs `supervision.alignment["word"]` on every training cut; real corpora rarely ship it. Each supervision's
transcript (split on whitespace; those words are the symbols) is aligned to its span of the recording, and the word
times are stored recording-relative (as Lhotse stores alignments: `cut.start + supervision.start + t`), in order,
non-overlapping and inside the recording. Backends:
  pocketsphinx  CMU Sphinx with its bundled US-English acoustic model and CMUdict (pocketsphinx>=5.0.4);
                words missing from CMUdict get pronunciations from espeak-ng (mapped to CMU phones) or letters.
  nemo_ctc      any NeMo CTC (or hybrid RNNT/CTC) ASR model, through NeMo's forced-aligner utilities
                (`nemo.collections.asr.parts.utils.aligner_utils`, as NeMo's speechlm2 ForceAligner uses them).
A cut whose supervision cannot be aligned (unreadable audio, empty transcript, a word the aligner cannot map, no
path found) is logged with its id and the reason, then dropped (`on_failure=drop`) or written without any word
alignment (`on_failure=keep`). A summary line ends the run. See docs/alignment.md for measured accuracy and speed.
"""

from __future__ import annotations

import ctypes
import logging
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterable, Iterator

import numpy as np
from omegaconf import MISSING, OmegaConf

log = logging.getLogger(__name__)

Times = list[tuple[float, float]]  # per word (start, end) in seconds from the start of the audio given


class AlignmentFailed(Exception):
    """One utterance could not be aligned; the message says why (the caller adds the cut id)."""


@dataclass
class AlignConfig:
    input: str = MISSING  # CLI: in=
    output: str = MISSING  # CLI: out=
    backend: str = "pocketsphinx"  # pocketsphinx | nemo_ctc
    on_failure: str = "drop"  # drop | keep (keep: the failed cut is written without alignment["word"])
    # pocketsphinx
    beam: float = 1e-80  # beam, wbeam and pbeam: pocketsphinx's default 1e-48 lost 2 of 600 corpus cuts
    g2p: str = "espeak"  # pronunciations for words not in CMUdict: espeak | letters
    # nemo_ctc
    model: str | None = None  # a .nemo file, or a pretrained name for ASRModel.from_pretrained
    batch_size: int = 8
    device: str | None = None  # default: cuda if available


# ---------------------------------------------------------------------------------------------------- pocketsphinx

# espeak-ng's ASCII phoneme names (English voices) -> CMU/ARPAbet phones of pocketsphinx's en-us model.
# Stress marks and ';' (palatalisation) are stripped; unknown names retry without a trailing #, digit or -.
_ESPEAK_TO_CMU = {
    "p": "P", "b": "B", "t": "T", "d": "D", "k": "K", "g": "G", "f": "F", "v": "V", "T": "TH", "D": "DH",
    "s": "S", "z": "Z", "S": "SH", "Z": "ZH", "tS": "CH", "dZ": "JH", "m": "M", "n": "N", "N": "NG",
    "l": "L", "r": "R", "w": "W", "j": "Y", "h": "HH", "x": "K", "?": "T", "C": "HH",
    "a": "AE", "aa": "AE", "a#": "AH", "A:": "AA", "A@": "AA R", "0": "AA", "O": "AO", "O:": "AO", "O@": "AO R",
    "o@": "AO R", "OI": "OY", "aI": "AY", "aI@": "AY AH", "aI3": "AY ER", "aU": "AW", "aU@": "AW ER",
    "@": "AH", "@L": "AH L", "3": "ER", "3:": "ER", "e@": "EH R", "E": "EH", "e": "EY", "eI": "EY",
    "i": "IY", "i:": "IY", "i@": "IY AH", "i@3": "IH R", "I": "IH", "o": "OW", "oU": "OW", "U": "UH",
    "U@": "UH R", "u": "UW", "u:": "UW", "u@": "UW AH", "V": "AH",
}  # fmt: skip
# Last resort: one phone (sequence) per letter, so that any word of Latin letters gets *some* pronunciation.
_LETTER_TO_CMU = {
    "a": "AE", "b": "B", "c": "K", "d": "D", "e": "EH", "f": "F", "g": "G", "h": "HH", "i": "IH", "j": "JH",
    "k": "K", "l": "L", "m": "M", "n": "N", "o": "AA", "p": "P", "q": "K", "r": "R", "s": "S", "t": "T",
    "u": "AH", "v": "V", "w": "W", "x": "K S", "y": "Y", "z": "Z",
}  # fmt: skip


def espeak_to_cmu(phonemes: str) -> list[str]:
    """Map espeak-ng's '|'-separated ASCII phonemes (words separated by spaces) to CMU phones."""
    out = []
    for p in phonemes.replace(" ", "|").split("|"):
        p = re.sub(r"[',%=;]", "", p)
        cmu = _ESPEAK_TO_CMU.get(p) or _ESPEAK_TO_CMU.get(re.sub(r"[#\d-]+$", "", p))
        if cmu:
            out += cmu.split()
    return out


def letters_to_cmu(word: str) -> list[str]:
    return [ph for c in word.lower() for ph in _LETTER_TO_CMU.get(c, "").split()]


class EspeakG2P:
    """Pronunciations from espeak-ng's own letter-to-sound rules (en-us), mapped to CMU phones."""

    def __init__(self, voice: str = "en-us"):
        from nemo_jstip.prep.espeak import Espeak

        self.espeak, self.voice = Espeak(), voice

    def __call__(self, word: str) -> list[str]:
        return espeak_to_cmu("|".join(self.espeak.phonemes(word, self.voice)))


class PocketsphinxAligner:
    """Word-level forced alignment with pocketsphinx (>= 5): `set_align_text` decodes against a linear grammar of the
    transcript (optional silences and fillers between words, alternative pronunciations). `bestpath` is off: its
    lattice rescoring moves word ends (and breaks a second, phone-level pass); the Viterbi path alone is as exact."""

    sampling_rate = 16000
    frame_rate = 100

    def __init__(self, beam: float = 1e-80, g2p: str = "espeak"):
        try:
            from pocketsphinx import Decoder
        except ImportError as e:
            raise ImportError("backend=pocketsphinx needs `pip install 'pocketsphinx>=5.0.4,<6'`") from e

        self.beam = beam
        self.decoder = Decoder(lm=None, beam=beam, wbeam=beam, pbeam=beam, bestpath=False, loglevel="FATAL")
        if g2p == "espeak":
            self.g2p = EspeakG2P()
        elif g2p == "letters":
            self.g2p = letters_to_cmu
        else:
            raise ValueError(f"g2p={g2p!r}: expected espeak or letters")
        self.oov: Counter[str] = Counter()  # dictionary key -> occurrences (tokens aligned with a g2p pronunciation)
        self.g2p_words: set[str] = set()  # dictionary keys added with a g2p pronunciation

    def _key(self, word: str) -> str:
        """CMUdict entry for `word`, adding a g2p pronunciation when it has none."""
        key = word.lower()
        if key in self.g2p_words:
            self.oov[key] += 1
        elif self.decoder.lookup_word(key) is None:
            phones = self.g2p(key) or letters_to_cmu(key)
            if not phones:
                raise AlignmentFailed(f"no pronunciation for word {word!r}")
            self.decoder.add_word(key, " ".join(phones), True)
            self.g2p_words.add(key)
            self.oov[key] += 1
        return key

    def align(self, audio: np.ndarray, words: list[str]) -> Times:
        keys = [self._key(w) for w in words]
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
        try:
            self.decoder.set_align_text(" ".join(keys))
            self.decoder.start_utt()
            self.decoder.process_raw(pcm, full_utt=True)
            self.decoder.end_utt()
        except RuntimeError as e:
            raise AlignmentFailed(f"pocketsphinx: {e}") from e
        if self.decoder.hyp() is None:
            raise AlignmentFailed(f"pocketsphinx found no path through the transcript (beam={self.beam:g})")
        found = [(re.sub(r"\(\d+\)$", "", s.word), s.start_frame, s.end_frame + 1) for s in self.decoder.seg()]
        found = [x for x in found if x[0] in keys]  # drop <s>, </s>, <sil>, fillers: never transcript words
        if [x[0] for x in found] != keys:
            raise AlignmentFailed(f"aligned words {[x[0] for x in found]} differ from the transcript")
        return [(s / self.frame_rate, e / self.frame_rate) for _, s, e in found]

    def align_batch(self, audios: list[np.ndarray], transcripts: list[list[str]]) -> list[Times | AlignmentFailed]:
        out = []
        for audio, words in zip(audios, transcripts):
            try:
                out.append(self.align(audio, words))
            except AlignmentFailed as e:
                out.append(e)
        return out


# -------------------------------------------------------------------------------------------------------- nemo_ctc


class NemoCtcAligner:
    """Viterbi forced alignment on a NeMo CTC model's log-probs, with NeMo's own aligner utilities (the NeMo Forced
    Aligner code): `get_batch_variables` (transcribe + token graph), `viterbi_decoding`, `add_t_start_end_to_utt_obj`.
    Word times are quantised to the model's output frame (window_stride x subsampling: 80 ms for FastConformer)."""

    def __init__(self, model, batch_size: int = 8, device: str | None = None):
        import torch
        from nemo.collections.asr.models import ASRModel, EncDecCTCModel, EncDecHybridRNNTCTCModel

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(model, str):
            if model.endswith(".nemo"):
                model = ASRModel.restore_from(model, map_location=self.device)
            else:  # a pretrained name: downloads from NGC / Hugging Face
                model = ASRModel.from_pretrained(model, map_location=self.device)
        if isinstance(model, EncDecHybridRNNTCTCModel):  # align with its CTC head
            model.change_decoding_strategy(decoder_type="ctc")
        elif not isinstance(model, EncDecCTCModel):
            raise ValueError(f"{type(model).__name__} is not a NeMo CTC or hybrid RNNT/CTC model")
        self.model = model.to(self.device).eval()
        self.sampling_rate = int(model.cfg.preprocessor.sample_rate)
        self.timestep = float(model.cfg.preprocessor.window_stride) * model.encoder.subsampling_factor
        self.batch_size = batch_size

    def _model_word(self, word: str) -> str:
        """`word` as the model can spell it (as is, else lower-cased), or AlignmentFailed."""
        m = self.model
        for w in (word, word.lower()):
            if hasattr(m, "tokenizer"):
                unk = getattr(m.tokenizer, "unk_id", None)
                ids = m.tokenizer.text_to_ids(w)
                if ids and (unk is None or unk not in ids):
                    return w
            elif all(c in m.decoder.vocabulary for c in w):
                return w
        raise AlignmentFailed(f"word {word!r} has characters the model's vocabulary lacks")

    def align_batch(self, audios: list[np.ndarray], transcripts: list[list[str]]) -> list[Times | AlignmentFailed]:
        out = []
        for i in range(0, len(audios), self.batch_size):
            out += self._align(audios[i : i + self.batch_size], transcripts[i : i + self.batch_size])
        return out

    def _align(self, audios: list[np.ndarray], transcripts: list[list[str]]) -> list[Times | AlignmentFailed]:
        from nemo.collections.asr.parts.utils.aligner_utils import (
            Segment,
            Word,
            add_t_start_end_to_utt_obj,
            get_batch_variables,
            viterbi_decoding,
        )

        results: list[Times | AlignmentFailed | None] = [None] * len(audios)
        texts, todo = [], []
        for i, words in enumerate(transcripts):
            try:
                texts.append(" ".join(self._model_word(w) for w in words))
                todo.append(i)
            except AlignmentFailed as e:
                results[i] = e
        if todo:
            log_probs, y, T, U, utts, dt = get_batch_variables(
                audio=[audios[i] for i in todo],
                model=self.model,
                segment_separators=None,  # one segment: transcripts are plain words, "." is no boundary
                gt_text_batch=texts,
                output_timestep_duration=self.timestep,
                verbose=False,
            )
            paths = viterbi_decoding(log_probs, y, T, U, viterbi_device=self.device)
            for i, utt, path, t in zip(todo, utts, paths, T.tolist()):
                utt = add_t_start_end_to_utt_obj(utt, path, dt)
                words = [w for s in utt.segments_and_tokens if isinstance(s, Segment) for w in s.words_and_tokens]
                words = [w for w in words if isinstance(w, Word)]
                if not words:  # get_utt_obj leaves it empty when the transcript has more tokens than frames
                    results[i] = AlignmentFailed(f"transcript has more tokens than the audio's {t} output frames")
                elif len(words) != len(transcripts[i]) or any(w.t_start < 0 for w in words):
                    results[i] = AlignmentFailed(f"aligned words {[w.text for w in words]} differ from the transcript")
                else:
                    results[i] = [(w.t_start, w.t_end) for w in words]
        return results


# ------------------------------------------------------------------------------------------------------- manifests


@dataclass
class AlignStats:
    cuts: int = 0
    aligned: int = 0
    failed: int = 0
    words: int = 0
    audio_s: float = 0.0
    reasons: Counter = field(default_factory=Counter)  # reason (without the cut id) -> cuts


def _load(cut, sup, sampling_rate: int) -> tuple[np.ndarray, float]:
    """Mono audio of the supervision's span of the recording (clipped to it), and that span's recording-relative
    start. The whole supervision is aligned even when a windowed cut shows only part of it."""
    rec = cut.recording
    start = max(0.0, cut.start + sup.start)
    end = min(rec.duration, cut.start + sup.end)
    if end <= start:
        raise AlignmentFailed(f"supervision {sup.id!r} lies outside its recording ({rec.duration:.2f} s)")
    if rec.sampling_rate != sampling_rate:
        rec = rec.resample(sampling_rate)
    try:
        audio = rec.load_audio(channels=cut.channel, offset=start, duration=end - start)
    except Exception as e:
        first_line = re.sub(r"\s*Details:$", "", str(e).strip().split("\n")[0])  # Lhotse lists every backend tried
        raise AlignmentFailed(f"cannot read audio: {type(e).__name__}: {first_line}") from e
    return (audio.mean(axis=0) if audio.ndim > 1 else audio).astype(np.float32), start


def _check(times: Times, duration: float) -> Times:
    """Clip to the audio, remove any overlap; every word must keep a positive duration."""
    out, prev_end = [], 0.0
    for s, e in times:
        s, e = max(s, prev_end), min(e, duration)
        if not e > s:
            raise AlignmentFailed(f"word {len(out)} got no duration ({s:.3f}-{e:.3f} s of {duration:.3f} s)")
        out.append((s, e))
        prev_end = e
    return out


def _align_chunk(cuts: list, aligner) -> tuple[dict, dict]:
    """Word alignments {(cut index, supervision index): [AlignmentItem]} and failures {cut index: reason}."""
    from lhotse import MonoCut
    from lhotse.supervision import AlignmentItem

    jobs, errors = [], {}  # jobs: (cut index, supervision index, audio, words, recording-relative offset)
    for ci, c in enumerate(cuts):
        if not isinstance(c, MonoCut) or c.recording is None:
            errors[ci] = f"{type(c).__name__} without a single recording: align the MonoCuts before mixing"
        elif not c.supervisions:
            errors[ci] = "no supervisions"
        for si, sup in enumerate(c.supervisions if ci not in errors else []):
            try:
                words = (sup.text or "").split()
                if not words:
                    raise AlignmentFailed(f"supervision {sup.id!r} has an empty transcript")
                jobs.append((ci, si, *_load(c, sup, aligner.sampling_rate), words))
            except AlignmentFailed as e:
                errors.setdefault(ci, str(e))
    results = aligner.align_batch([j[2] for j in jobs], [j[4] for j in jobs]) if jobs else []
    aligned = {}
    for (ci, si, audio, offset, words), times in zip(jobs, results):
        try:
            if isinstance(times, AlignmentFailed):
                raise times
            duration = len(audio) / aligner.sampling_rate
            times = _check(times, duration)
            # a 0.1 ms grid (as the corpus): contiguous words stay contiguous; never past the end of the audio
            last = math.floor((offset + duration) * 1e4 + 1e-6)
            ticks = [(min(round((offset + s) * 1e4), last), min(round((offset + e) * 1e4), last)) for s, e in times]
            if any(e <= s for s, e in ticks):
                raise AlignmentFailed("a word shorter than 0.1 ms")
            aligned[ci, si] = [AlignmentItem(w, s / 1e4, (e - s) / 1e4) for w, (s, e) in zip(words, ticks)]
        except AlignmentFailed as e:
            errors.setdefault(ci, str(e))
    return aligned, errors


def align_cuts(cuts: Iterable, aligner, on_failure: str = "drop", stats: AlignStats | None = None,
               chunk: int = 32) -> Iterator:
    """Yield `cuts` in order, each supervision with `alignment["word"]` (see the module docstring); a failed cut is
    logged and dropped, or (on_failure="keep") yielded with no word alignment on any of its supervisions.

    `aligner` has `sampling_rate` and `align_batch(audios, transcripts) -> [times | AlignmentFailed]`; cuts are
    read lazily, `chunk` at a time, so that a batching backend sees several utterances at once."""
    if on_failure not in ("drop", "keep"):
        raise ValueError(f"on_failure={on_failure!r}: expected drop or keep")
    stats = stats if stats is not None else AlignStats()
    it = iter(cuts)
    while buffer := list(islice(it, chunk)):
        aligned, errors = _align_chunk(buffer, aligner)
        for ci, c in enumerate(buffer):
            stats.cuts += 1
            stats.audio_s += c.duration
            if ci in errors:
                stats.failed += 1
                stats.reasons[re.sub(r"'[^']*'|\d+(\.\d+)?", "_", errors[ci])] += 1
                log.warning(f"cut {c.id}: {errors[ci]} ({'dropped' if on_failure == 'drop' else 'kept unaligned'})")
                if on_failure == "drop":
                    continue
            else:
                stats.aligned += 1
            for si, sup in enumerate(c.supervisions):
                items = None if ci in errors else aligned[ci, si]
                rest = {k: v for k, v in (sup.alignment or {}).items() if k != "word"}
                sup.alignment = {**rest, "word": items} if items else (rest or None)
                stats.words += len(items or [])
            yield c


def make_aligner(cfg: AlignConfig):
    if cfg.backend == "pocketsphinx":
        return PocketsphinxAligner(beam=cfg.beam, g2p=cfg.g2p)
    if cfg.backend == "nemo_ctc":
        if not cfg.model:
            raise ValueError("backend=nemo_ctc needs model=PATH.nemo (or a pretrained model name)")
        return NemoCtcAligner(cfg.model, batch_size=cfg.batch_size, device=cfg.device)
    raise ValueError(f"backend={cfg.backend!r}: expected pocketsphinx or nemo_ctc")


def run(cfg: AlignConfig) -> AlignStats:
    from lhotse import CutSet

    aligner, stats, t0 = make_aligner(cfg), AlignStats(), time.time()
    with CutSet.open_writer(cfg.output) as writer:
        for cut in align_cuts(CutSet.from_jsonl_lazy(cfg.input), aligner, cfg.on_failure, stats,
                              chunk=max(32, cfg.batch_size)):
            writer.write(cut)
    dt = time.time() - t0
    oov = getattr(aligner, "oov", None)
    print(
        f"aligned {stats.aligned}/{stats.cuts} cuts ({stats.words} words) with {cfg.backend} in {dt:.1f} s "
        f"({stats.audio_s / max(dt, 1e-9):.0f}x real time); failed {stats.failed}"
        + (f" ({'dropped' if cfg.on_failure == 'drop' else 'kept unaligned'}: "
           + "; ".join(f"{n} x {r}" for r, n in stats.reasons.most_common()) + ")" if stats.failed else "")
        + (f"; {sum(oov.values())} OOV words ({len(oov)} types) pronounced by g2p={cfg.g2p}" if oov is not None else "")
        + f" -> {cfg.output}"
    )
    return stats


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = OmegaConf.from_dotlist(list(argv if argv is not None else sys.argv[1:]))
    for short, long in (("in", "input"), ("out", "output")):
        if short in overrides:
            overrides[long] = overrides.pop(short)
    cfg = OmegaConf.merge(OmegaConf.structured(AlignConfig), overrides)
    if missing := [k for k in ("input", "output") if OmegaConf.is_missing(cfg, k)]:
        short = {"input": "in=", "output": "out="}
        raise SystemExit(f"missing {' and '.join(short[k] for k in missing)}; usage: "
                         "python -m nemo_jstip.prep.align in=CUTS.jsonl[.gz] out=OUT.jsonl[.gz] [backend=...]")
    run(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()

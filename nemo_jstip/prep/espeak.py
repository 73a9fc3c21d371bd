"""Speech with exact word timings from libespeak-ng (ctypes), for the embedded corpus.

espeak-ng reports a WORD event (with its sample position) when each input word starts and PHONEME events
as it goes, pause phonemes included. A word therefore spans from its WORD event to the next WORD event, the
first pause phoneme after its last sounding phoneme, or the end of the utterance, whichever comes first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import numpy as np

# espeak_EVENT_TYPE and API constants from speak_lib.h
_EV_LIST_TERMINATED, _EV_WORD, _EV_END, _EV_MSG_TERMINATED, _EV_PHONEME = 0, 1, 5, 6, 7
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_PAUSE_PHONEMES = {"_", "_:", "_!", "_^", "_|", "||"}


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character offset in the input
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms
        ("sample", ctypes.c_int),  # samples at the native rate
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class EspeakError(RuntimeError):
    pass


@dataclass
class Utterance:
    audio: np.ndarray  # int16 samples at `sampling_rate`
    sampling_rate: int
    word_times: list[tuple[float, float]]  # (start, end) in seconds, one per input word


class Espeak:
    """One libespeak-ng instance (the library is process-global: create one per process)."""

    def __init__(self):
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self._lib = ctypes.CDLL(name)
        except OSError as e:
            raise EspeakError(
                f"cannot load libespeak-ng ({e}); install the Debian package `espeak-ng` (make demo/test do it as root)"
            ) from e
        self.sampling_rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS)
        if self.sampling_rate <= 0:
            raise EspeakError("espeak_Initialize failed (is espeak-ng-data installed?)")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, str]] = []
        self._cb = _Callback(self._on_audio)  # keep a reference: ctypes callbacks must outlive the C side
        self._lib.espeak_SetSynthCallback(self._cb)
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self._lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]

    def _on_audio(self, wav, n, events):
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EV_LIST_TERMINATED:
            e = events[i]
            name = e.id.string.decode("ascii", "replace") if e.type == _EV_PHONEME else ""
            self._events.append((e.type, e.text_position, e.sample, name))
            i += 1
        return 0

    def synthesize(self, words: list[str], voice: str, rate: int = 160, pitch: int = 50, pitch_range: int = 50) -> Utterance:
        """Speak `words` (joined by spaces) and return the audio and each word's (start, end) in seconds."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise EspeakError(f"unknown espeak-ng voice {voice!r}")
        for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
            self._lib.espeak_SetParameter(param, int(value), 0)
        text = " ".join(words)
        data = text.encode("utf-8") + b"\0"
        self._chunks, self._events = [], []
        if self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None) != 0:
            raise EspeakError(f"espeak_Synth failed for {text!r}")
        self._lib.espeak_Synchronize()
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return Utterance(audio, self.sampling_rate, self._word_times(words, len(audio)))

    def phonemes(self, word: str, voice: str | None = None) -> list[str]:
        """espeak-ng's phonemes for `word` (ASCII mnemonics, stress marks kept), by the current or given voice."""
        if voice is not None and self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise EspeakError(f"unknown espeak-ng voice {voice!r}")
        text = ctypes.c_char_p(word.encode("utf-8") + b"\0")
        out = self._lib.espeak_TextToPhonemes(ctypes.byref(text), _CHARS_UTF8, ord("|") << 8) or b""
        return [p for p in out.decode("utf-8", "replace").replace(" ", "|").split("|") if p.strip("',")]

    def _word_times(self, words: list[str], num_samples: int) -> list[tuple[float, float]]:
        # 1-based character offset of each word in the synthesized text
        offsets, pos = [], 1
        for w in words:
            offsets.append(pos)
            pos += len(w.encode("utf-8")) + 1
        index = {o: i for i, o in enumerate(offsets)}
        # groups of words espeak-ng speaks under one WORD event ("to be" often is one): [first, start, end, phonemes]
        groups: list[list] = []
        sounding = False  # has the current group produced a non-pause phoneme yet
        for etype, tpos, sample, name in self._events:
            closes = etype in (_EV_WORD, _EV_END, _EV_MSG_TERMINATED) or (
                etype == _EV_PHONEME and name in _PAUSE_PHONEMES and sounding
            )
            if closes and groups and groups[-1][2] is None:
                groups[-1][2] = sample
            if etype == _EV_WORD and tpos == 0:  # espeak-ng sometimes closes a message with an empty word
                continue
            if etype == _EV_WORD:
                if tpos not in index:
                    raise EspeakError(f"word event at character {tpos} matches no word of {' '.join(words)!r}")
                groups.append([index[tpos], sample, None, []])
                sounding = False
            elif etype == _EV_PHONEME and name not in _PAUSE_PHONEMES and groups and groups[-1][2] is None:
                sounding = True
                groups[-1][3].append(sample)
        if not groups or groups[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(groups, groups[1:])):
            raise EspeakError(f"word events out of order for {' '.join(words)!r}")
        if groups[-1][2] is None:
            groups[-1][2] = num_samples
        times = []
        for g, (first, start, end, phones) in enumerate(groups):
            last = groups[g + 1][0] if g + 1 < len(groups) else len(words)
            bounds = [start] + self._split_merged(words[first:last], phones) + [end]
            times += list(zip(bounds[:-1], bounds[1:]))
        sr = self.sampling_rate
        return [(s / sr, e / sr) for s, e in times]

    def _split_merged(self, words: list[str], phones: list[int]) -> list[int]:
        """Inner boundaries of words spoken under one event: at the phoneme where each word starts, by counting
        each word's phonemes (exact when the counts agree, proportional otherwise)."""
        if len(words) == 1:
            return []
        counts = np.cumsum([max(1, len(self.phonemes(w))) for w in words])
        if len(phones) < len(words):
            raise EspeakError(f"cannot split merged words {words}: only {len(phones)} phonemes")
        if counts[-1] != len(phones):
            counts = np.round(counts * len(phones) / counts[-1]).astype(int)
        cuts = np.clip(counts[:-1], np.arange(1, len(words)), len(phones) - len(words) + np.arange(1, len(words)))
        return [phones[int(i)] for i in cuts]

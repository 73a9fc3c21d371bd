"""JSTIP span planner: cut an aligned utterance into alternating speech/text spans (docs/method.md#interleaving).

A plan depends only on (seed, epoch, cut id) and the config, so every data-parallel rank and every resumed run
draws the same spans for the same cut, and a new epoch draws new ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from lhotse.cut import Cut

from nemo_jstip.data.frames import AlignmentError, FrameSpec, Silence
from nemo_jstip.metrics import normalize

__all__ = ["AlignmentError", "InterleaveConfig", "Span", "Plan", "read_alignment", "match_words", "make_rng", "split_words",
           "plan_spans", "plan_cut"]

SPEECH, TEXT = "speech", "text"


@dataclass
class InterleaveConfig:
    """Every JSTIP interleaving option; defaults are ours (the paper's recipe is not public)."""

    mode: Literal["word", "segment", "mixed"] = "mixed"
    word_prob: float = 0.5  # mixed mode: P(word-level), else segment-level
    span_dist: Literal["binomial", "poisson", "uniform"] = "binomial"  # word-level span length in words
    binomial_n: int = 39  # max(1, Binomial(39, 0.1)): SpiRit-LM's ~4 words per span
    binomial_p: float = 0.1
    poisson_lam: float = 4.0  # max(1, Poisson(lam))
    uniform_lo: int = 1  # Uniform{lo..hi}, both inclusive
    uniform_hi: int = 8
    num_segments: int | tuple[int, ...] = (2, 3)  # segment-level: a fixed count, or drawn uniformly from these
    first: Literal["random", "speech", "text"] = "random"
    silence: Silence = "split"  # inter-word silence at a speech/text boundary goes left / right / is split
    markers: bool = True  # wrap every speech span (ASR audio too) in the two marker tokens
    speech_start: str = "<|speech_start|>"
    speech_end: str = "<|speech_end|>"
    loss: Literal["all_text", "text_after_speech"] = "all_text"
    seed: int = 0

    def __post_init__(self):  # catch YAML typos when the config is built, not inside a DataLoader worker
        allowed = dict(mode=("word", "segment", "mixed"), span_dist=("binomial", "poisson", "uniform"),
                       first=("random", "speech", "text"), silence=("left", "right", "split"),
                       loss=("all_text", "text_after_speech"))
        bad = {k: getattr(self, k) for k, v in allowed.items() if getattr(self, k) not in v}
        if bad:
            raise ValueError(f"invalid InterleaveConfig {bad}; allowed: {allowed}")


@dataclass(frozen=True)
class Span:
    """Words [start, end) in one modality; speech spans also carry their encoder frames [f0, f1)."""

    modality: Literal["speech", "text"]
    start: int
    end: int
    frames: tuple[int, int] | None = None


@dataclass
class Plan:
    """A cut's words, its spans in order, its total encoder frames and the level the spans were drawn at."""

    words: list[str]
    spans: list[Span]
    num_frames: int
    level: Literal["word", "segment"]


def read_alignment(cut: Cut) -> tuple[list[str], np.ndarray]:
    """Transcript words and their (N, 2) [start, end] times in seconds from the cut's start.

    Lhotse keeps alignment times recording-relative (windowing a cut does not move them): we subtract
    ``cut.start``. Alignment words need not equal the transcript's: they are matched after normalisation
    (``match_words``), and a group of words the aligner wrote differently ("twenty five" / "25") becomes one word
    whose time covers its items. Raises ``AlignmentError`` naming the cut when they cannot be matched.
    """
    if len(cut.supervisions) != 1:
        raise AlignmentError(f"cut {cut.id}: expected one supervision, got {len(cut.supervisions)}")
    sup = cut.supervisions[0]
    words = (sup.text or "").split()
    if not words:
        raise AlignmentError(f"cut {cut.id}: empty transcript")
    items = (sup.alignment or {}).get("word")
    if not items:
        raise AlignmentError(f"cut {cut.id}: no word alignment")
    symbols = [it.symbol for it in items]
    times = np.array([(it.start, it.start + it.duration) for it in items], dtype=np.float64) - cut.start
    if symbols == words:
        return words, times
    try:
        groups = match_words(words, symbols)
    except AlignmentError as e:
        raise AlignmentError(f"cut {cut.id}: {e}") from None
    return ([" ".join(words[i0:i1]) for i0, i1, _, _ in groups],
            np.array([(times[j0, 0], times[j1 - 1, 1]) for _, _, j0, j1 in groups], dtype=np.float64))


@lru_cache(maxsize=1 << 16)
def _norm(text: str) -> str:
    """The evaluation's normaliser (nemo_jstip.metrics: Whisper's English one), spaces removed; cached, since
    words repeat."""
    return normalize(text).replace(" ", "")


def match_words(words: list[str], symbols: list[str], max_group: int = 3) -> list[tuple[int, int, int, int]]:
    """Pair transcript ``words`` with alignment ``symbols`` after normalisation (case, punctuation, number and
    abbreviation spelling: the evaluation's normaliser). Returns groups ``(i0, i1, j0, j1)``: words[i0:i1] are
    what symbols[j0:j1] say, in order, covering every word; a group has at most ``max_group`` on either side.
    Symbols that normalise to nothing (silence, ``<eps>``, punctuation) are dropped; such words join their
    neighbour's group. Raises ``AlignmentError`` at the first words that match nothing."""
    wi = [i for i, w in enumerate(words) if _norm(w)]
    sj = [j for j, x in enumerate(symbols) if _norm(x)]
    groups, a, b = [], 0, 0  # a, b: positions in wi, sj
    while a < len(wi) and b < len(sj):
        for x, y in sorted(((x, y) for x in range(1, max_group + 1) for y in range(1, max_group + 1)), key=sum):
            if a + x > len(wi) or b + y > len(sj):
                continue
            left = " ".join(words[i] for i in wi[a : a + x])
            right = " ".join(symbols[j] for j in sj[b : b + y])
            if _norm(left) == _norm(right):
                groups.append([wi[a], wi[a + x - 1] + 1, sj[b], sj[b + y - 1] + 1])
                a, b = a + x, b + y
                break
        else:
            break
    if a < len(wi) or b < len(sj) or not groups:
        i = wi[a] if a < len(wi) else len(words)
        j = sj[b] if b < len(sj) else len(symbols)
        raise AlignmentError(f"alignment words differ from the transcript at word {i} even after normalisation "
                             f"({symbols[j:j + 2]} vs {words[i:i + 2]}; {len(symbols)} vs {len(words)} words)")
    groups[0][0], groups[-1][1] = 0, len(words)  # leading / trailing words that normalise to nothing
    for g, nxt in zip(groups, groups[1:]):
        g[1] = nxt[0]  # a word that normalises to nothing between two groups joins the earlier one
    return [tuple(g) for g in groups]


def make_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, key); stable across processes (unlike ``hash()``)."""
    digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, digest])


def split_words(n: int, cfg: InterleaveConfig, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """Draw span boundaries 0 = b_0 < ... < b_k = n for n words; returns (level, boundaries)."""
    level = cfg.mode if cfg.mode != "mixed" else ("word" if rng.random() < cfg.word_prob else "segment")
    if level == "segment":
        choices = cfg.num_segments
        k = min(choices if isinstance(choices, int) else int(rng.choice(list(choices))), n)
        cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False))
    elif level == "word":
        if cfg.span_dist == "binomial":
            lengths = rng.binomial(cfg.binomial_n, cfg.binomial_p, size=n)
        elif cfg.span_dist == "poisson":
            lengths = rng.poisson(cfg.poisson_lam, size=n)
        elif cfg.span_dist == "uniform":
            lengths = rng.integers(cfg.uniform_lo, cfg.uniform_hi + 1, size=n)
        else:
            raise ValueError(f"unknown span_dist {cfg.span_dist!r}")
        ends = np.cumsum(np.maximum(lengths, 1))  # n draws of >= 1 word always cover n words
        cuts = ends[ends < n]
    else:
        raise ValueError(f"unknown mode {cfg.mode!r}")
    return level, np.concatenate([[0], cuts, [n]]).astype(np.int64)


def plan_spans(word_frames: np.ndarray, cfg: InterleaveConfig, rng: np.random.Generator) -> tuple[str, list[Span]]:
    """Spans over words with frame ranges ``word_frames`` ((N, 2), from ``FrameSpec.word_frames``)."""
    level, b = split_words(len(word_frames), cfg, rng)
    speech = cfg.first == "speech" if cfg.first != "random" else bool(rng.random() < 0.5)
    spans = []
    for i, j in zip(b[:-1].tolist(), b[1:].tolist()):
        frames = (int(word_frames[i, 0]), int(word_frames[j - 1, 1])) if speech else None
        spans.append(Span(SPEECH if speech else TEXT, i, j, frames))
        speech = not speech
    return level, spans


def plan_cut(cut: Cut, cfg: InterleaveConfig, spec: FrameSpec, epoch: int = 0) -> Plan:
    """The interleaving plan of an aligned cut; raises ``AlignmentError`` (naming the cut) on bad input."""
    words, times = read_alignment(cut)
    num_samples = spec.num_samples(cut.duration)
    try:
        frames = spec.word_frames(times, num_samples, silence=cfg.silence)
    except AlignmentError as e:
        raise AlignmentError(f"cut {cut.id}: {e}") from None
    level, spans = plan_spans(frames, cfg, make_rng(cfg.seed, epoch, cut.id))
    return Plan(words, spans, spec.num_frames(num_samples), level)

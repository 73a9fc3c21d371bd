"""ASR / interleaved / text-only examples -> token ids, audio placeholder layout and labels (docs/method.md#example-layouts).

Runs in DataLoader workers and returns numpy arrays, so the model only gathers encoder frames into the
placeholder positions and applies a masked cross-entropy. Layouts (``[...]`` only with ``cfg.markers``):

    ASR          BOS [<speech_start>] <audio> x T [<speech_end>] transcript EOS
    interleaved  BOS span_1 ... span_k EOS, a speech span is [<speech_start>] <audio> x frames [<speech_end>]
    text         BOS text EOS

Prompts for decoding (``prompt_only=True``) stop where the model starts generating: the ASR prompt is
``BOS [<speech_start>] <audio> x T [<speech_end>]``, the text prompt ``BOS text``; they have no targets.
``ExampleBuilder.prompt`` wraps either input in a text template (``"Question: {input}\nAnswer:"`` for spoken QA);
the plain template ``"{input}"`` gives exactly those two prompts.

Shift convention: ``labels[t]`` is the target predicted at position t, i.e. ``input_ids[t + 1]`` when that
token is a loss target, else -100 (the last position never has a target). Targets are text tokens only (and
EOS after a loss-bearing text span); BOS, markers and audio placeholders are never targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
from lhotse.cut import Cut
from transformers import PreTrainedTokenizerBase

from nemo_jstip.data.frames import AlignmentError, FrameSpec
from nemo_jstip.data.interleave import SPEECH, TEXT, InterleaveConfig, Plan, Span, plan_cut

IGNORE = -100
AUDIO_TOKEN = "<|audio|>"


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, cfg: InterleaveConfig, audio: str = AUDIO_TOKEN) -> int:
    """Add the audio placeholder and speech markers to ``tokenizer`` if missing; returns how many were added.

    Call once when building the model (then resize the LLM's embeddings to ``len(tokenizer)`` and save the
    tokenizer with the model), never in DataLoader workers. Added as special tokens: never split, and
    ``decode(..., skip_special_tokens=True)`` drops them.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys([audio, cfg.speech_start, cfg.speech_end]) if t not in vocab]
    return tokenizer.add_tokens(missing, special_tokens=True) if missing else 0


@dataclass(frozen=True)
class TokenIds:
    """Ids of BOS, EOS, the audio placeholder and the speech markers in one tokenizer."""

    bos: int
    eos: int
    audio: int
    speech_start: int
    speech_end: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, cfg: InterleaveConfig, audio: str = AUDIO_TOKEN):
        """BOS falls back to EOS for tokenizers without one (GPT-2/Qwen style); the others must exist."""
        vocab = tokenizer.get_vocab()
        missing = [t for t in (audio, cfg.speech_start, cfg.speech_end) if t not in vocab]
        if missing or tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer lacks {missing or 'an EOS token'}; call add_special_tokens() first")
        eos = tokenizer.eos_token_id
        bos = eos if tokenizer.bos_token_id is None else tokenizer.bos_token_id
        return cls(bos, eos, vocab[audio], vocab[cfg.speech_start], vocab[cfg.speech_end])


@dataclass
class Example:
    """One training sequence; ``cost`` (its length) is what token-budget samplers count."""

    id: str
    kind: str  # "asr" | "interleaved" | "text"
    input_ids: np.ndarray  # int64 (L,), one placeholder id per speech frame
    audio_frame_index: np.ndarray  # int64 (L,), encoder frame filling each placeholder position, else -1
    labels: np.ndarray  # int64 (L,), labels[t] = input_ids[t + 1] where that is a target, else -100
    loss_mask: np.ndarray  # bool (L,), labels != -100
    span_bounds: np.ndarray  # int64 (S, 2), positions [p0, p1) of each span's frames/tokens (markers excluded)
    spans: list[Span] = field(default_factory=list)
    num_frames: int = 0  # placeholder positions
    num_text_tokens: int = 0  # text tokens, without BOS/EOS/markers

    @property
    def cost(self) -> int:
        return len(self.input_ids)


class _Piece(NamedTuple):
    """A run of positions: BOS/EOS, a marker, a speech span's placeholders or a text span's tokens."""

    ids: Sequence[int]
    frames: np.ndarray | None = None  # encoder frame of each placeholder (speech spans only)
    target: bool = False  # its tokens are loss targets
    content: bool = False  # a span's frames/tokens, not BOS/EOS/markers


def example_cost(num_frames: int, num_text_tokens: int, num_speech_spans: int, markers: bool) -> int:
    """``len(input_ids)`` of any layout, without tokenising or encoding anything."""
    return 2 + num_frames + num_text_tokens + 2 * markers * num_speech_spans


class ExampleBuilder:
    """Builds examples with one tokenizer, frame spec and interleaving config (one per DataLoader worker)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, spec: FrameSpec, cfg: InterleaveConfig, audio: str = AUDIO_TOKEN
    ):
        self.tokenizer, self.spec, self.cfg = tokenizer, spec, cfg
        self.ids = TokenIds.from_tokenizer(tokenizer, cfg, audio)

    def asr_cost(self, duration: float, num_text_tokens: int) -> int:
        """Exact cost of an ASR example from the audio duration and the transcript's token count."""
        num_frames = self.spec.num_frames(self.spec.num_samples(duration))
        return example_cost(num_frames, num_text_tokens, 1, self.cfg.markers)

    def asr(self, cut: Cut, prompt_only: bool = False) -> Example:
        """Audio first (every encoder frame), then the transcript; loss on transcript + EOS.

        ``prompt_only``: only ``BOS [<speech_start>] <audio> x T [<speech_end>]``, the decoding prompt (no targets;
        the transcript is not needed and not checked).
        """
        words = " ".join(s.text or "" for s in cut.supervisions).split()
        num_frames = self.spec.num_frames(self.spec.num_samples(cut.duration))
        if not num_frames or not (words or prompt_only):
            problem = "audio shorter than one encoder frame" if not num_frames else "empty transcript"
            raise AlignmentError(f"cut {cut.id}: {problem}")
        if prompt_only:
            speech = Span(SPEECH, 0, len(words), (0, num_frames))
            return self._finish(cut.id, "asr", self._speech(speech), [speech], eos_target=False, eos=False)
        spans = [Span(SPEECH, 0, len(words), (0, num_frames)), Span(TEXT, 0, len(words))]
        text = self.tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
        return self._finish(cut.id, "asr", [*self._speech(spans[0]), _Piece(text, None, True, True)], spans, True)

    def interleaved(self, cut: Cut, epoch: int = 0) -> Example:
        """Spans of ``plan_cut(cut)`` in order; loss on text spans per ``cfg.loss``."""
        plan: Plan = plan_cut(cut, self.cfg, self.spec, epoch)
        # Span texts keep the space before every word but the utterance's first, so that with a space-prefix BPE
        # (GPT-2/Llama-3 byte-level, SentencePiece) the text spans tokenise exactly as inside the whole sentence.
        text = [s for s in plan.spans if s.modality == TEXT]
        strings = [(" " if s.start else "") + " ".join(plan.words[s.start : s.end]) for s in text]
        tokens = iter(self.tokenizer(strings, add_special_tokens=False)["input_ids"] if strings else [])
        pieces, seen_speech, target = [], False, False
        for span in plan.spans:
            if span.modality == SPEECH:
                pieces += self._speech(span)
                seen_speech, target = True, False
            else:
                target = self.cfg.loss == "all_text" or seen_speech
                pieces.append(_Piece(next(tokens), None, target, True))
        return self._finish(cut.id, "interleaved", pieces, plan.spans, eos_target=target)

    def text(self, text: str, id: str = "", prompt_only: bool = False) -> Example:
        """A text-only LM example; loss on every token and EOS. ``prompt_only``: ``BOS text``, no targets."""
        tokens = self.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"text example {id!r} is empty")
        piece, spans = _Piece(tokens, None, not prompt_only, True), [Span(TEXT, 0, len(text.split()))]
        return self._finish(id, "text", [piece], spans, eos_target=not prompt_only, eos=not prompt_only)

    def prompt(self, source: Cut | str, template: str = "{input}", id: str = "") -> Example:
        """A decoding prompt ``BOS template`` whose ``{input}`` is a cut's speech or a text, so that one prompt
        serves a spoken input and, with its transcript as ``source``, the text-input upper bound.

        A text input is tokenised inside the filled template (as the LLM reads text); around speech the template
        text is tokenised on each side, the whitespace before ``{input}`` dropped (with space-prefix BPE the space
        belongs to the first word, which the speech replaces). Template text belongs to no span, like the markers.
        """
        before, sep, after = template.partition("{input}")
        if not sep or "{input}" in after:
            raise ValueError(f"prompt template needs one {{input}}, got {template!r}")
        if isinstance(source, str):
            return self.text(before + source.strip() + after, id, prompt_only=True)
        plain = self.asr(source, prompt_only=True)
        if template == "{input}":
            return plain
        ends = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (before.rstrip(), after)]
        pieces = [*([_Piece(ends[0])] if ends[0] else []), *self._speech(plain.spans[0]),
                  *([_Piece(ends[1])] if ends[1] else [])]
        return self._finish(source.id, "asr", pieces, plain.spans, eos_target=False, eos=False)

    def _speech(self, span: Span) -> list[_Piece]:
        f0, f1 = span.frames
        audio = _Piece(np.full(f1 - f0, self.ids.audio), np.arange(f0, f1), content=True)
        if not self.cfg.markers:
            return [audio]
        return [_Piece([self.ids.speech_start]), audio, _Piece([self.ids.speech_end])]

    def _finish(
        self, id: str, kind: str, pieces: list[_Piece], spans: list[Span], eos_target: bool, eos: bool = True
    ) -> Example:
        """Concatenate the pieces between BOS and EOS; labels are the next position's id where it is a target."""
        pieces = [_Piece([self.ids.bos]), *pieces, *([_Piece([self.ids.eos], target=eos_target)] if eos else [])]
        sizes = np.array([len(p.ids) for p in pieces])
        input_ids = np.concatenate([np.asarray(p.ids, dtype=np.int64) for p in pieces])
        frames = np.concatenate([np.full(n, -1) if p.frames is None else p.frames for n, p in zip(sizes, pieces)])
        labels = np.full_like(input_ids, IGNORE)
        labels[:-1] = np.where(np.repeat([p.target for p in pieces], sizes)[1:], input_ids[1:], IGNORE)
        content = np.array([p.content for p in pieces])
        audio = np.array([p.frames is not None for p in pieces])
        ends = np.cumsum(sizes)
        return Example(
            id=id,
            kind=kind,
            input_ids=input_ids,
            audio_frame_index=frames.astype(np.int64),
            labels=labels,
            loss_mask=labels != IGNORE,
            span_bounds=np.stack([ends - sizes, ends], axis=1)[content],
            spans=spans,
            num_frames=int(sizes[audio].sum()),
            num_text_tokens=int(sizes[content & ~audio].sum()),
        )

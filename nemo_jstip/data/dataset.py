"""JSTIPDataset: one sampler batch of items -> the tensors the model consumes (runs in DataLoader workers).

The whole sequence layout is decided here, so the model never loops over tokens in Python: it encodes ``audio``,
then fills every placeholder with one gather ``enc[audio_item[m], audio_frame[m]]`` where ``m = audio_item >= 0``,
and applies a masked cross-entropy. The contract (``B`` rows: one example each unless packed; ``A`` examples with
speech, ``L`` padded length):

Training mode (``DatasetConfig.prompt=False``), sequences RIGHT-padded; a batch the sampler packed
(``MixedBatch.pack_length``) holds several examples per row, one after another, each with its own labels as alone
(attention stays within an example: ``segment_ids``), in the rows the sampler chose (``pack_rows``):

==================  =========  ========  ===================================================================
key                 dtype      shape     meaning
==================  =========  ========  ===================================================================
input_ids           int64      [B, L]    token ids; ``<|audio|>`` at placeholders; ``pad_id`` after the end
labels              int64      [B, L]    ``labels[b, t]`` = target predicted at t (``input_ids[b, t+1]``), else -100
loss_mask           float32    [B, L]    ``labels != -100`` (never 1 on padding)
audio_item          int64      [B, L]    row of ``audio`` whose encoder frame fills the position, -1 elsewhere
audio_frame         int64      [B, L]    that row's encoder+adapter frame, -1 elsewhere
seq_lens            int64      [B]       real length of each row (``L - seq_lens`` is padding)
segment_ids         int64      [B, L]    packed batches only: the example each position belongs to, -1 on padding
audio               float32    [A, T]    waveforms at ``FrameSpec.sample_rate``, zero-padded; ``None`` if
                                         ``load_audio=False``. Row ``a`` is the a-th example with speech.
audio_lens          int64      [A]       samples per row
audio_num_frames    int64      [A]       ``FrameSpec.num_frames(audio_lens)``: frames the encoder+adapter emit
cut_ids, kinds      list[str]  B         item ids; the kind actually built (a fallback shows as "asr")
texts               list[str]  B         reference transcript (speech) or the text line (text)
entities, domains   lists      B         ``supervision.custom["entities"]`` / ``["domain"]`` ([] / None for text)
position            tuple|None           ``MixedBatch.position``: pass to ``sampler.mark_consumed``
token_stats         dict[int]            real / padded / loss / audio tokens, examples per kind
problems            dict[int]            bad-input events in this batch (code -> count), see ``PROBLEMS``
==================  =========  ========  ===================================================================

Prompt mode (``prompt=True``, decoding): the same keys except labels / loss_mask; sequences are LEFT-padded so
every row's next token is at position L, with ``attention_mask`` bool [B, L] (True = real token, the Hugging Face
convention), ``position_ids`` int64 [B, L] (0 at each row's first real token) and ``prompt_lens`` int64 [B]
(= seq_lens). Speech items become ASR prompts ``BOS [<speech_start>] <audio> x T [<speech_end>]``, text items
``BOS text``; ``prompt_template`` wraps both in text (``ExampleBuilder.prompt``), and ``prompt_text_input`` feeds a
cut's transcript as text instead of its audio (no audio is loaded; the text-input upper bound of spoken QA).

``L`` is a multiple of ``pad_to_multiple``: ``TP * CP * 2`` with sequence or context parallelism (Megatron splits
the sequence into 2*CP chunks over TP ranks), 16 for FP8 GEMMs, 1 otherwise. A batch whose items were all dropped
as bad input has B = 0 (skip the step, still call ``mark_consumed``).

Bad input: see ``PROBLEMS``. ``strict=True`` raises ``BadInputError`` naming the cut (and file); the lenient default
counts the event (``dataset.stats``, per process; ``batch["problems"]``, per batch so the main process can sum
over workers), logs it once per (problem, item) and applies the fallback.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

import numpy as np
import soundfile as sf
import torch
from lhotse.cut import Cut

from nemo_jstip.data.examples import IGNORE, Example, ExampleBuilder, example_cost
from nemo_jstip.data.interleave import TEXT
from nemo_jstip.data.sampler import COST_KEY, KIND_KEY, SAMPLER_PROBLEMS, STREAM_KEY, pack_rows
from nemo_jstip.data.tarred import TAR_AUDIO_KEY, load_tar_audio

__all__ = ["DatasetConfig", "JSTIPDataset", "BadInputError", "PROBLEMS", "CostFn", "make_cost_fn", "kind_of"]

log = logging.getLogger(__name__)

# code -> (what went wrong, what the lenient mode does). docs/data.md renders the same table.
PROBLEMS = {  # in the order the dataset checks them; the first that applies wins
    "empty_transcript": ("empty transcript or text line", "dropped"),
    "audio_too_short": ("audio shorter than one encoder+adapter frame", "dropped"),
    "sample_rate": ("audio sampling rate differs from FrameSpec.sample_rate", "resampled on load (Lhotse)"),
    "no_alignment": ("interleaved cut without a word alignment", "built as ASR"),
    "alignment_mismatch": ("alignment words differ from the transcript, even after normalisation", "built as ASR"),
    "alignment_order": ("alignment words out of order, overlapping, negative or non-finite", "built as ASR"),
    "alignment_beyond_audio": ("alignment times outside the audio (beyond 20 ms tolerance)", "built as ASR"),
    "bad_alignment": ("other unusable alignment (more words than encoder frames, several supervisions)",
                      "built as ASR"),
    "unencodable_text": ("text the tokenizer cannot encode (unknown-token ids, or no tokens for a span)", "dropped"),
    "cost_over_budget": ("example longer than the cost the sampler budgeted (tokenizer not additive over spans)",
                         "kept (the batch may exceed max_tokens)"),
    "missing_audio": ("audio file missing", "dropped"),
    "manifest_sample_rate": ("audio file's sampling rate differs from the manifest's recording.sampling_rate",
                             "dropped"),
    "unreadable_audio": ("audio corrupt or not as long as the manifest says", "dropped"),
    "multi_channel": ("audio with several channels", "downmixed (mean of the channels)"),
    **SAMPLER_PROBLEMS,
}
DROPPED = frozenset(c for c, (_, action) in PROBLEMS.items() if action.startswith("dropped"))

_ALIGNMENT_CODES = (  # AlignmentError messages of interleave.read_alignment / FrameSpec.word_frames -> code
    ("no word alignment", "no_alignment"),
    ("differ from the transcript", "alignment_mismatch"),
    ("out of order or overlap", "alignment_order"),
    ("negative duration or non-finite", "alignment_order"),
    ("exceed the audio", "alignment_beyond_audio"),
)


class Problems(Counter):
    """One batch's bad-input events: code -> count, plus the dropped items (``dropped``: item id -> "code: why")
    and the counts per source stream (``by_source``: stream name -> code -> count)."""

    def __init__(self):
        super().__init__()
        self.dropped: dict[str, str] = {}
        self.by_source: dict[str, Counter] = {}
        self.source = "?"  # the stream of the item being built


def _source(item) -> str:
    return str((getattr(item, "custom", None) or {}).get(STREAM_KEY) or "?")


class BadInputError(ValueError):
    """Strict mode: an item the dataset cannot use as requested; ``code`` is a key of ``PROBLEMS``."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{message} [{code}: {PROBLEMS[code][0]}; lenient mode: {PROBLEMS[code][1]}]")
        self.code = code


@dataclass
class DatasetConfig:
    """Options of ``JSTIPDataset`` (the ``dataset:`` section of the data config)."""

    strict: bool = False  # raise on bad input instead of counting + falling back
    pad_to_multiple: int = 1  # TP*CP*2 with SP/CP, 16 for FP8, else 1
    load_audio: bool = True  # False: layout only (``audio`` None, audio files not checked), for tools and benchmarks
    prompt: bool = False  # decoding prompts, left-padded, no labels
    prompt_template: str = "{input}"  # prompt mode: text around the input, e.g. "Question: {input}\nAnswer:"
    prompt_text_input: bool = False  # prompt mode: a cut's transcript as text tokens instead of its audio

    def __post_init__(self):
        if int(self.pad_to_multiple) < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {self.pad_to_multiple}")
        if self.prompt_template.count("{input}") != 1:
            raise ValueError(f"prompt_template needs one {{input}}, got {self.prompt_template!r}")


def kind_of(item) -> str:
    """The item's kind: the sampler's tag, else "asr" for a cut and "text" for anything else (a NeMo
    ``TextExample``), so the dataset also serves plain Lhotse / NeMo samplers."""
    kind = (getattr(item, "custom", None) or {}).get(KIND_KEY)
    return kind or ("asr" if isinstance(item, Cut) else "text")


def _transcript(cut: Cut) -> str:
    return " ".join(" ".join(s.text or "" for s in cut.supervisions).split())


def _text(item) -> str:
    """A text item's text, whitespace collapsed within lines: a line break is kept (a prompt-formatted text such
    as ``Question: ...\nAnswer: ...`` must read as the evaluation's prompt does), blank lines dropped."""
    raw = _transcript(item) if isinstance(item, Cut) else str(item.text)  # a cut tagged text: its transcript
    return "\n".join(line for line in (" ".join(x.split()) for x in raw.splitlines()) if line)


class CostFn:
    """The sampler's ``cost_fn``: an upper bound of an item's final sequence length, from metadata only.

    ASR and text costs are exact (``example_cost`` of the token count; no audio is read). An interleaved item's
    plan depends on the epoch, which ``cost_fn(item)`` is not given. Two modes:

    * ``exact=False``: charge its ASR cost, which bounds every plan of every epoch: relative to ASR, each text span
      drops its words' frames (>= 1 per word) and each speech span drops its words' tokens (>= 1 per word when span
      tokenisation is additive, as with space-prefix BPE), while each speech span beyond the first adds 2 markers;
      with n_s <= n_t + 1 speech/text spans, ASR - interleaved >= n_t - n_s + 2 >= 1. Safe with any sampler, but
      loose (~1.5x on the demo corpus: text spans are shorter than their audio), which costs padding.
    * ``exact=True`` (what ``build_dataloader`` uses): the exact length of the item's plan for the epoch of the
      sampler it follows (read at each call, 0 before ``follow``: the sampler estimates its buckets at
      epoch 0 in its constructor); the ASR cost when the cut cannot be planned (the dataset then builds ASR).
      The sampler batches an item in the epoch it costed it in, and ``MixedBatch.epoch`` tells the dataset.

    Either way a bad item's fallback never exceeds its cost, and the dataset checks every example against its cost
    (``cost_over_budget``). With ``prompt`` (a prompt-mode ``DatasetConfig``) the cost is the prompt's exact length,
    whose template may outgrow the ASR bound. Tokenises one string (or an item's spans) per item; picklable.
    """

    def __init__(self, builder: ExampleBuilder, exact: bool = False, prompt: DatasetConfig | None = None):
        self.builder, self.exact, self.prompt = builder, exact, prompt
        self.sampler = None

    def follow(self, sampler) -> "CostFn":
        """Read the epoch from ``sampler.epoch`` (exact mode)."""
        self.sampler = sampler
        return self

    def num_tokens(self, text: str) -> int:
        return len(self.builder.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def __call__(self, item) -> int:
        kind = kind_of(item)
        if self.prompt is not None:
            text = _text(item) if kind == "text" else _transcript(item)
            try:
                return self.builder.prompt(item if kind != "text" and not self.prompt.prompt_text_input else text,
                                           self.prompt.prompt_template).cost
            except ValueError:  # AlignmentError, empty text: the dataset drops it; fall through to a cost anyway
                pass
        if kind == "text":
            return example_cost(0, self.num_tokens(_text(item)), 0, self.builder.cfg.markers)
        if kind == "interleaved" and self.exact:
            try:
                return self.builder.interleaved(item, self.sampler.epoch if self.sampler is not None else 0).cost
            except (ValueError, TypeError):  # AlignmentError or a malformed alignment: the dataset builds ASR
                pass
        return self.builder.asr_cost(item.duration, self.num_tokens(_transcript(item)))


def make_cost_fn(builder: ExampleBuilder, exact: bool = False, prompt: DatasetConfig | None = None) -> CostFn:
    """``cost_fn`` for ``build_sampler`` / ``InterleavingSampler``; see ``CostFn``. With ``exact=True`` call
    ``cost_fn.follow(sampler)`` right after building the sampler."""
    return CostFn(builder, exact, prompt if prompt is not None and prompt.prompt else None)


class _Row(NamedTuple):
    example: Example
    cut: Cut | None  # the cut to load audio from (None for text)
    text: str
    entities: list
    domain: str | None
    cost: int | None = None  # the sampler's cost of the item (what packing lays out by)


class JSTIPDataset(torch.utils.data.Dataset):
    """Lhotse-style dataset: ``dataset[items]`` with ``items`` a ``MixedBatch`` (or any list of cuts / text items)."""

    def __init__(self, builder: ExampleBuilder, cfg: DatasetConfig | None = None, epoch: int = 0):
        self.builder, self.cfg, self.spec = builder, cfg or DatasetConfig(), builder.spec
        self.epoch = epoch  # for item lists that are not a MixedBatch (which carries its own epoch)
        tok = builder.tokenizer
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else builder.ids.eos)
        self.unk_id = tok.unk_token_id
        self.stats: Counter[str] = Counter()  # bad-input events seen by this process
        self._logged: set[tuple[str, str]] = set()
        self._worker_ready = False

    # ---- items -> examples (bad-input policy lives here) ----
    def _bad(self, code: str, item_id: str, detail: str, problems: Counter) -> None:
        message = f"cut {item_id}: {detail}"
        if self.cfg.strict:
            raise BadInputError(code, message)
        problems[code] += 1
        self.stats[code] += 1
        if isinstance(problems, Problems):
            problems.by_source.setdefault(problems.source, Counter())[code] += 1
            if code in DROPPED:
                problems.dropped[item_id] = f"{code}: {detail}"
        if (code, item_id) not in self._logged:
            self._logged.add((code, item_id))
            log.warning("%s -> %s [%s]", message, PROBLEMS[code][1], code)

    def _unencodable(self, ex: Example) -> str | None:
        text = [(p0, p1) for s, (p0, p1) in zip(ex.spans, ex.span_bounds.tolist()) if s.modality == TEXT]
        if any(p1 == p0 for p0, p1 in text):
            return "a text span encodes to no tokens"
        if self.unk_id is not None and text:
            n = int(sum((ex.input_ids[p0:p1] == self.unk_id).sum() for p0, p1 in text))
            if n:
                return f"{n} unknown-token ids ({self.builder.tokenizer.unk_token!r}) in the encoded text"
        return None

    def example(self, item, epoch: int | None = None) -> Example | None:
        """The example ``item`` becomes under the bad-input policy (None: dropped); no audio is read."""
        row = self._row(item, self.epoch if epoch is None else epoch, Problems())
        return None if row is None else row.example

    def _text_row(self, item, text: str, id: str, problems: Counter, entities=(), domain=None) -> _Row | None:
        """A text line, or a cut's transcript standing in for its audio (``prompt_text_input``)."""
        if not text:
            return self._bad("empty_transcript", id, "empty transcript" if isinstance(item, Cut) else "empty text line",
                             problems)
        try:
            b, cfg = self.builder, self.cfg
            ex = b.prompt(text, cfg.prompt_template, id) if cfg.prompt else b.text(text, id)
        except ValueError:
            return self._bad("unencodable_text", id, f"text {text[:40]!r} encodes to no tokens", problems)
        if why := self._unencodable(ex):
            return self._bad("unencodable_text", id, f"text {text[:40]!r}: {why}", problems)
        return self._check_cost(item, _Row(ex, None, text, list(entities), domain), problems)

    def _row(self, item, epoch: int, problems: Problems) -> _Row | None:
        kind, prompt, b = kind_of(item), self.cfg.prompt, self.builder
        problems.source = _source(item)
        if kind == "text":
            text = _text(item)
            id = getattr(item, "id", None) or f"text:{text[:30]}"  # a NeMo TextExample has no id
            return self._text_row(item, text, id, problems)

        cut, text = item, _transcript(item)
        sup = (cut.supervisions[0].custom or {}) if cut.supervisions else {}
        if prompt and self.cfg.prompt_text_input:
            return self._text_row(cut, text, cut.id, problems, sup.get("entities") or [], sup.get("domain"))
        if not text and not prompt:
            return self._bad("empty_transcript", cut.id, "empty transcript", problems)
        if self.spec.num_frames(self.spec.num_samples(cut.duration)) == 0:
            return self._bad("audio_too_short", cut.id, f"{cut.duration:.4f} s is shorter than one encoder frame "
                             f"({self.spec.hop_seconds:.3f} s hop)", problems)
        if cut.sampling_rate != self.spec.sample_rate:
            self._bad("sample_rate", cut.id, f"audio {_files(cut)} is {cut.sampling_rate} Hz, the encoder takes "
                      f"{self.spec.sample_rate} Hz (resample the manifest offline: CutSet.resample)", problems)
            cut = cut.resample(self.spec.sample_rate)
        ex = None
        if prompt:
            ex = b.prompt(cut, self.cfg.prompt_template)
        elif kind == "interleaved":
            try:
                ex = b.interleaved(cut, epoch)
            except (ValueError, TypeError) as e:  # AlignmentError, or a malformed alignment item
                msg = str(e).removeprefix(f"cut {cut.id}: ")
                code = next((c for key, c in _ALIGNMENT_CODES if key in msg), "bad_alignment")
                self._bad(code, cut.id, f"cannot interleave: {msg}", problems)
        ex = ex or b.asr(cut)
        if not prompt and (why := self._unencodable(ex)):
            return self._bad("unencodable_text", cut.id, f"transcript {text[:40]!r}: {why}", problems)
        return self._check_cost(item, _Row(ex, cut, text, list(sup.get("entities") or []), sup.get("domain")),
                                problems)

    def _check_cost(self, item, row: _Row, problems: Counter) -> _Row:
        budget = (getattr(item, "custom", None) or {}).get(COST_KEY)
        if budget is not None and row.example.cost > budget:
            self._bad("cost_over_budget", row.example.id, f"{row.example.kind} example of {row.example.cost} tokens, "
                      f"sampler cost {budget}", problems)
        return row._replace(cost=budget)

    def _load_audio(self, row: _Row, problems: Problems) -> np.ndarray | None:
        cut = row.cut
        problems.source = _source(cut)
        if missing := [s.source for s in _sources(cut) if s.type == "file" and not os.path.isfile(s.source)]:
            return self._bad("missing_audio", cut.id, f"no such audio file {', '.join(missing)}", problems)
        try:
            cut = load_tar_audio(cut)
        except FileNotFoundError as e:
            return self._bad("missing_audio", cut.id, str(e), problems)
        except OSError as e:
            return self._bad("unreadable_audio", cut.id, str(e), problems)
        try:
            audio = cut.load_audio()
        except Exception as e:  # soundfile / ffmpeg / lhotse errors: the message names the reason
            if why := _rate_mismatch(cut):
                return self._bad("manifest_sample_rate", cut.id, why, problems)
            # Lhotse's AudioLoadingError lists each backend's failure, then dumps the call's arguments: keep the former
            lines = str(e).split("\n[extra info]")[0].splitlines()
            why = " | ".join(ln.strip() for ln in lines if ln.strip() and not ln.startswith("Set LHOTSE_"))
            return self._bad("unreadable_audio", cut.id, f"cannot read {_files(cut)}: {type(e).__name__}: {why}",
                             problems)
        if audio.ndim == 2 and audio.shape[0] > 1:
            self._bad("multi_channel", cut.id, f"{_files(cut)} has {audio.shape[0]} channels", problems)
            audio = audio.mean(axis=0, keepdims=True)
        expected = self.spec.num_samples(cut.duration)
        if audio.ndim != 2 or audio.shape[1] != expected:
            return self._bad("unreadable_audio", cut.id, f"{_files(cut)} gave audio of shape {tuple(audio.shape)}, "
                             f"expected (1, {expected}) for {cut.duration} s", problems)
        return audio[0]

    # ---- the batch ----
    def __getitem__(self, items: Iterable) -> dict[str, Any]:
        if not self._worker_ready and torch.utils.data.get_worker_info() is not None:
            # Hugging Face tokenizers run batch encodes on a rayon thread pool that does not survive fork(). They
            # turn it off in forked children, unless TOKENIZERS_PARALLELISM is set, which importing NeMo does
            # (nemo/lightning/base.py sets it to True): a worker would then deadlock on its first encode once the
            # main process has tokenised (cost_fn does). Workers are single-threaded by design; read per call.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            self._worker_ready = True
        epoch = getattr(items, "epoch", self.epoch)
        problems = Problems()
        rows = [r for r in (self._row(it, epoch, problems) for it in items) if r is not None]
        audio = None
        if self.cfg.load_audio:
            loaded = [(r, None if r.cut is None else self._load_audio(r, problems)) for r in rows]
            rows = [r for r, a in loaded if r.cut is None or a is not None]
            waves = [a for _, a in loaded if a is not None]
        speech = np.array([r.cut is not None for r in rows], dtype=bool)
        audio_lens = torch.tensor([self.spec.num_samples(r.cut.duration) for r in rows if r.cut is not None],
                                  dtype=torch.int64)
        if self.cfg.load_audio:
            audio = torch.zeros(len(waves), max((len(w) for w in waves), default=0), dtype=torch.float32)
            for a, w in enumerate(waves):
                audio[a, : len(w)] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        pack = None if self.cfg.prompt else getattr(items, "pack_length", None)
        costs = [r.example.cost if r.cost is None else r.cost for r in rows]
        batch = self._collate([r.example for r in rows], speech, pack_rows(costs, pack) if pack else None)
        batch.update(
            audio=audio,
            audio_lens=audio_lens,
            audio_num_frames=self.spec.num_frames_batch(audio_lens),
            cut_ids=[r.example.id for r in rows],
            kinds=[r.example.kind for r in rows],
            texts=[r.text for r in rows],
            entities=[r.entities for r in rows],
            domains=[r.domain for r in rows],
            position=getattr(items, "position", None),
            problems=dict(problems),
            problems_by_source={k: dict(v) for k, v in problems.by_source.items()},
            dropped=problems.dropped,
        )
        batch["token_stats"].update(Counter(batch["kinds"]))
        return batch

    def _collate(self, examples: list[Example], speech: np.ndarray, packed: list[int] | None = None) -> dict[str, Any]:
        """Pad the examples into [B, L] arrays with index arithmetic (no per-token Python). ``packed``: the row of
        each example (examples of a row follow each other; ``segment_ids`` tells them apart), else one per row."""
        lens = np.array([len(ex.input_ids) for ex in examples], dtype=np.int64)
        row = np.asarray(packed if packed is not None else np.arange(len(examples)), dtype=np.int64)
        B, m = int(row.max(initial=-1)) + 1, int(self.cfg.pad_to_multiple)
        row_lens = np.bincount(row, weights=lens, minlength=B).astype(np.int64)
        order = np.argsort(row, kind="stable")  # examples grouped by row, in their order within it
        offset = np.empty(len(examples), dtype=np.int64)  # where each example starts in its row
        offset[order] = np.cumsum(lens[order]) - lens[order] - (np.cumsum(row_lens) - row_lens)[row[order]]
        L = -(-int(row_lens.max(initial=0)) // m) * m
        rows = np.repeat(row, lens)
        starts = np.cumsum(lens) - lens
        cols = np.arange(int(lens.sum())) - np.repeat(starts - offset, lens)
        if self.cfg.prompt:
            cols += np.repeat(L - lens, lens)  # left padding
        frame = _cat(examples, "audio_frame_index")
        audio_row = np.where(speech, np.cumsum(speech) - 1, -1)  # row of `audio` for each example

        def grid(values, fill, dtype=np.int64):
            out = np.full((B, L), fill, dtype=dtype)
            out[rows, cols] = values
            return torch.from_numpy(out)

        out = dict(
            input_ids=grid(_cat(examples, "input_ids"), self.pad_id),
            audio_item=grid(np.where(frame >= 0, np.repeat(audio_row, lens), -1), -1),
            audio_frame=grid(frame, -1),
            seq_lens=torch.from_numpy(row_lens),
        )
        if packed is not None:
            out["segment_ids"] = grid(np.repeat(np.arange(len(examples)), lens), -1)
        if self.cfg.prompt:
            mask = grid(np.ones(len(rows), dtype=bool), False, bool)
            out.update(attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_(min=0),
                       prompt_lens=torch.from_numpy(lens.copy()))
            loss = 0
        else:
            out["labels"] = grid(_cat(examples, "labels"), IGNORE)
            out["loss_mask"] = (out["labels"] != IGNORE).to(torch.float32)
            loss = int(out["loss_mask"].sum())
        real = int(lens.sum())
        out["token_stats"] = dict(real_tokens=real, padded_tokens=B * L, loss_tokens=loss,
                                  audio_tokens=int((frame >= 0).sum()),
                                  text_tokens=sum(ex.num_text_tokens for ex in examples))
        return out


def _cat(examples: list[Example], key: str) -> np.ndarray:
    return np.concatenate([getattr(ex, key) for ex in examples] or [np.zeros(0, dtype=np.int64)]).astype(np.int64)


def _sources(cut: Cut) -> list:
    return list(getattr(getattr(cut, "recording", None), "sources", None) or [])


def _files(cut: Cut) -> str:
    """The audio file(s) behind a cut, for error messages."""
    sources = [str(s.source) for s in _sources(cut) if s.type in ("file", "url", "command")]
    if tar := ((cut.custom or {}).get(TAR_AUDIO_KEY) or [None])[0]:
        sources.append(f"{tar} (member of cut {cut.id})")
    return ", ".join(sources) or f"(recording of cut {cut.id})"


def _rate_mismatch(cut: Cut) -> str | None:
    """Why a cut's audio failed to load when its file's sampling rate is not the manifest's (Lhotse itself then
    reports a sample-count divergence as its own bug), else None."""
    rec = cut.recording
    declared = next((t.source_sampling_rate for t in rec.transforms or [] if hasattr(t, "source_sampling_rate")),
                    rec.sampling_rate)
    for s in _sources(cut):
        try:
            actual = sf.info(s.source).samplerate if s.type == "file" else None
        except Exception:  # a format soundfile cannot open: no verdict
            actual = None
        if actual is not None and actual != declared:
            return (f"{s.source} is {actual} Hz, the manifest's recording {rec.id!r} says sampling_rate={declared} "
                    f"(num_samples={rec.num_samples}, duration={rec.duration}): fix these three fields of the "
                    f"recording (Recording.from_file reads them from the file)")
    return None

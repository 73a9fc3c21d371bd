import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemo_jstip.data.examples import IGNORE, ExampleBuilder, TokenIds, add_special_tokens, example_cost
from nemo_jstip.data.frames import AlignmentError, FrameSpec
from nemo_jstip.data.interleave import InterleaveConfig

SPEC = FrameSpec()


def aligned_cut(make_cut, words, offset=0.0, id="cut-0"):
    """Words of 0.25 s with 0.05 s pauses, after 0.2 s of leading silence."""
    times = [(0.2 + 0.3 * i, 0.45 + 0.3 * i) for i in range(len(words))]
    return make_cut(words, times, round(times[-1][1] + 0.3, 3), offset=offset, id=id)


def check_layout(ex, ids: TokenIds):
    """Invariants of every example: placeholders <-> frames, labels = shifted inputs on text targets only."""
    audio = ex.input_ids == ids.audio
    assert ((ex.audio_frame_index >= 0) == audio).all()
    assert ex.num_frames == audio.sum() and ex.cost == len(ex.input_ids)
    assert ex.input_ids[0] == ids.bos and ex.input_ids[-1] == ids.eos and ex.labels[-1] == IGNORE
    t = np.flatnonzero(ex.labels != IGNORE)
    assert (ex.loss_mask == (ex.labels != IGNORE)).all()
    assert (ex.labels[t] == ex.input_ids[t + 1]).all()
    special = np.isin(ex.input_ids, [ids.audio, ids.speech_start, ids.speech_end, ids.bos])
    assert not special[t + 1].any()  # placeholders, markers and BOS are never targets
    speech = [s.frames for s in ex.spans if s.modality == "speech"]
    expected = np.concatenate([np.arange(*f) for f in speech]) if speech else np.zeros(0)
    assert (ex.audio_frame_index[audio] == expected).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 30),
    seed=st.integers(0, 1000),
    cfg=st.builds(
        InterleaveConfig,
        mode=st.sampled_from(["word", "segment", "mixed"]),
        markers=st.booleans(),
        loss=st.sampled_from(["all_text", "text_after_speech"]),
        first=st.sampled_from(["random", "speech", "text"]),
    ),
)
def test_interleaved_example(jstip_tokenizer, make_cut, vocabulary, n, seed, cfg):
    tok, ids = jstip_tokenizer, TokenIds.from_tokenizer(jstip_tokenizer, cfg)
    words = list(np.random.default_rng(seed).choice(vocabulary, size=n))
    cut = aligned_cut(make_cut, words, offset=seed % 3 * 0.7, id=f"cut-{seed}")
    ex = ExampleBuilder(tok, SPEC, cfg).interleaved(cut, epoch=seed)
    check_layout(ex, ids)
    assert ex.kind == "interleaved" and len(ex.span_bounds) == len(ex.spans)
    assert ex.num_frames == sum(f1 - f0 for f0, f1 in (s.frames for s in ex.spans if s.modality == "speech"))
    n_speech = sum(s.modality == "speech" for s in ex.spans)
    assert ex.cost == example_cost(ex.num_frames, ex.num_text_tokens, n_speech, cfg.markers)

    seen_speech, has_loss, targets = False, False, []
    for span, (p0, p1) in zip(ex.spans, ex.span_bounds):
        if span.modality == "speech":
            seen_speech, has_loss = True, False
            assert (ex.input_ids[p0:p1] == ids.audio).all() and p1 - p0 == span.frames[1] - span.frames[0]
            assert (ex.input_ids[p0 - 1] == ids.speech_start) == cfg.markers
            continue
        assert tok.decode(ex.input_ids[p0:p1]).strip() == " ".join(words[span.start : span.end])
        has_loss = cfg.loss == "all_text" or seen_speech
        targets += list(range(p0, p1)) if has_loss else []
    targets += [len(ex.input_ids) - 1] if has_loss else []  # EOS after a loss-bearing text span
    assert np.flatnonzero(ex.loss_mask).tolist() == [t - 1 for t in targets]

    # Span-wise tokenisation (leading space on non-initial spans) concatenates to the whole sentence's tokens.
    text = [ex.input_ids[p0:p1] for s, (p0, p1) in zip(ex.spans, ex.span_bounds) if s.modality == "text"]
    if len(text) == len(ex.spans):
        assert np.concatenate(text).tolist() == tok(" ".join(words), add_special_tokens=False)["input_ids"]


def test_span_tokens_concatenate_to_sentence_tokens(jstip_tokenizer, vocabulary):
    rng = np.random.default_rng(1)
    for _ in range(50):
        words = list(rng.choice(vocabulary, size=int(rng.integers(2, 25))))
        cuts = np.unique(np.r_[0, np.sort(rng.integers(1, len(words), size=3)), len(words)])
        spans = [(" " if i else "") + " ".join(words[i:j]) for i, j in zip(cuts[:-1], cuts[1:])]
        pieces = jstip_tokenizer(spans, add_special_tokens=False)["input_ids"]
        assert sum(pieces, []) == jstip_tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("markers", [True, False])
def test_asr_example(jstip_tokenizer, make_cut, markers):
    cfg = InterleaveConfig(markers=markers)
    ids = TokenIds.from_tokenizer(jstip_tokenizer, cfg)
    words = "doctor patel prescribed twenty milligrams of atorvastatin".split()
    cut = aligned_cut(make_cut, words, offset=2.0)
    builder = ExampleBuilder(jstip_tokenizer, SPEC, cfg)
    ex = builder.asr(cut)
    check_layout(ex, ids)
    frames = SPEC.num_frames(SPEC.num_samples(cut.duration))
    text = jstip_tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    assert ex.num_frames == frames and ex.num_text_tokens == len(text)
    assert ex.audio_frame_index[ex.audio_frame_index >= 0].tolist() == list(range(frames))
    head = [ids.bos] + [ids.speech_start] * markers + [ids.audio] * frames + [ids.speech_end] * markers
    assert ex.input_ids.tolist() == head + text + [ids.eos]
    # loss covers exactly the transcript and EOS, predicted from the position before each
    assert ex.labels.tolist() == [IGNORE] * (len(head) - 1) + text + [ids.eos, IGNORE]
    assert builder.asr_cost(cut.duration, len(text)) == ex.cost


def test_text_example(jstip_tokenizer):
    ids = TokenIds.from_tokenizer(jstip_tokenizer, InterleaveConfig())
    ex = ExampleBuilder(jstip_tokenizer, SPEC, InterleaveConfig()).text("the loan interest rate", id="t1")
    check_layout(ex, ids)
    assert ex.num_frames == 0 and (ex.audio_frame_index == -1).all()
    assert ex.labels.tolist() == ex.input_ids[1:].tolist() + [IGNORE]
    assert jstip_tokenizer.decode(ex.input_ids[1:-1]) == "the loan interest rate"
    assert ex.cost == example_cost(0, ex.num_text_tokens, 0, True)
    with pytest.raises(ValueError, match="empty"):
        ExampleBuilder(jstip_tokenizer, SPEC, InterleaveConfig()).text("  ")


def test_text_after_speech_policy(jstip_tokenizer, make_cut):
    words = "please check my account balance and statement".split()
    cfg = InterleaveConfig(mode="segment", num_segments=3, first="text", loss="text_after_speech", markers=False)
    ex = ExampleBuilder(jstip_tokenizer, SPEC, cfg).interleaved(aligned_cut(make_cut, words))
    (t0, t1), _, (u0, u1) = ex.span_bounds
    assert [s.modality for s in ex.spans] == ["text", "speech", "text"]
    assert not ex.loss_mask[: t1].any() and ex.loss_mask[u0 - 1 : u1].all()  # ... + EOS


def test_special_tokens(tokenizer):
    cfg = InterleaveConfig()
    with pytest.raises(ValueError, match="add_special_tokens"):
        TokenIds.from_tokenizer(tokenizer, cfg)
    n = len(tokenizer)
    assert add_special_tokens(tokenizer, cfg) == 3 and len(tokenizer) == n + 3
    assert add_special_tokens(tokenizer, cfg) == 0
    ids = TokenIds.from_tokenizer(tokenizer, cfg)
    assert len({ids.audio, ids.speech_start, ids.speech_end, ids.bos, ids.eos}) == 5
    # special tokens are never split and are dropped by skip_special_tokens
    assert tokenizer("<|audio|><|audio|>", add_special_tokens=False)["input_ids"] == [ids.audio] * 2
    marked = tokenizer("<|speech_start|> the bank")["input_ids"]
    assert tokenizer.decode(marked, skip_special_tokens=True) == " the bank"
    other = dataclasses.replace(cfg, speech_start="<|a|>", speech_end="<|b|>")
    assert add_special_tokens(tokenizer, other, audio="<|audio|>") == 2


def test_bad_cut_raises_alignment_error(jstip_tokenizer, make_cut):
    builder = ExampleBuilder(jstip_tokenizer, SPEC, InterleaveConfig())
    cut = aligned_cut(make_cut, ["a", "b"], id="bad-1")
    cut.supervisions[0].text = ""
    for make in (builder.asr, builder.interleaved):
        with pytest.raises(AlignmentError, match="cut bad-1: empty transcript"):
            make(cut)

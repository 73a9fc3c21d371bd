import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.interleave import AlignmentError, InterleaveConfig, make_rng, plan_cut, read_alignment

SPEC = FrameSpec()
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def alignments(draw, max_words=40, separated=False):
    """(words, cut-relative [start, end] times, cut duration, window offset into the recording).

    ``separated``: pauses of at least one frame, so no two words share a frame."""
    n = draw(st.integers(1, max_words))
    dur = draw(st.lists(st.floats(0.01, 0.8), min_size=n, max_size=n))
    gaps = [0.08, 0.1, 0.15, 0.6] if separated else [0.0, 0.0, 0.02, 0.15, 0.6]
    gap = draw(st.lists(st.sampled_from(gaps), min_size=n, max_size=n))
    starts = np.cumsum(np.array(gap) + np.r_[0.0, dur[:-1]])
    times = np.round(np.stack([starts, starts + dur], 1), 3)
    duration = round(float(times[-1, 1]) + draw(st.sampled_from([0.05, 0.3] if separated else [0.0, 0.05, 0.3])), 3)
    offset = draw(st.sampled_from([0.0, 0.0, 1.234, 7.5]))
    return [f"w{i}" for i in range(n)], times, duration, offset


configs = st.builds(
    InterleaveConfig,
    mode=st.sampled_from(["word", "segment", "mixed"]),
    span_dist=st.sampled_from(["binomial", "poisson", "uniform"]),
    uniform_lo=st.integers(1, 3),
    uniform_hi=st.integers(3, 6),
    num_segments=st.sampled_from([(2, 3), 2, 3, (4,)]),
    first=st.sampled_from(["random", "speech", "text"]),
    silence=st.sampled_from(["left", "right", "split"]),
    seed=st.integers(0, 2**32 - 1),
)


@SETTINGS
@given(alignments(), configs, st.integers(0, 1000))
def test_plan_invariants(make_cut, al, cfg, epoch):
    words, times, duration, offset = al
    cut = make_cut(words, times, duration, offset=offset)
    total = SPEC.num_frames(SPEC.num_samples(duration))
    if len(words) > total:
        with pytest.raises(AlignmentError, match=f"cut {cut.id}: .*encoder frames"):
            plan_cut(cut, cfg, SPEC, epoch)
        return
    plan = plan_cut(cut, cfg, SPEC, epoch)
    assert plan.words == words and plan.num_frames == total
    np.testing.assert_allclose(read_alignment(cut)[1], times, atol=1e-6)  # window offset removed

    spans = plan.spans
    assert [(s.start, s.end) for s in spans] == list(zip([0] + [s.end for s in spans[:-1]], [s.end for s in spans]))
    assert spans[0].start == 0 and spans[-1].end == len(words) and all(s.end > s.start for s in spans)
    assert all(a.modality != b.modality for a, b in zip(spans, spans[1:]))
    if cfg.first != "random":
        assert spans[0].modality == cfg.first
    speech = [s.frames for s in spans if s.modality == "speech"]
    assert all(s.frames is None for s in spans if s.modality == "text")
    assert all(0 <= f0 < f1 <= total for f0, f1 in speech)
    assert all(a[1] <= b[0] for a, b in zip(speech, speech[1:]))

    wf = SPEC.word_frames(times, SPEC.num_samples(duration), silence=cfg.silence)
    assert (wf[:, 1] > wf[:, 0]).all() and (wf[1:, 0] == wf[:-1, 1]).all() and wf.min() >= 0 and wf.max() <= total
    assert speech == [(int(wf[s.start, 0]), int(wf[s.end - 1, 1])) for s in spans if s.modality == "speech"]

    if plan.level == "segment":
        choices = [cfg.num_segments] if isinstance(cfg.num_segments, int) else cfg.num_segments
        assert len(spans) in [min(k, len(words)) for k in choices]
    if plan.level == "word" and cfg.span_dist == "uniform":
        lengths = [s.end - s.start for s in spans]
        assert max(lengths) <= cfg.uniform_hi and min(lengths[:-1], default=cfg.uniform_lo) >= cfg.uniform_lo
    assert plan_cut(cut, cfg, SPEC, epoch) == plan  # deterministic per (seed, epoch, cut id)


@SETTINGS
@given(alignments(max_words=12, separated=True))
def test_word_frames_follow_the_times_when_words_are_a_frame_apart(al):
    """Without crowding, word i covers at least [floor(start/h), ceil(end/h)) and only gap frames beyond it."""
    _, times, duration, _ = al
    h = SPEC.hop_seconds
    lo, hi = np.floor(times[:, 0] / h + 1e-6).astype(int), np.ceil(times[:, 1] / h - 1e-6).astype(int)
    total = SPEC.num_frames(SPEC.num_samples(duration))
    assume(not ((lo[1:] < hi[:-1]).any() or hi[-1] > total or (hi - lo < 1).any()))
    for silence in ("left", "right", "split"):
        wf = SPEC.word_frames(times, SPEC.num_samples(duration), silence=silence)
        assert (wf[:, 0] <= lo).all() and (wf[:, 1] >= hi).all() and wf[0, 0] == lo[0] and wf[-1, 1] == hi[-1]
        assert (wf[1:, 0] <= lo[1:]).all() and (wf[:-1, 1] >= hi[:-1]).all()
        if silence == "left":
            assert (wf[1:, 0] == lo[1:]).all()
        if silence == "right":
            assert (wf[:-1, 1] == hi[:-1]).all()


def test_epochs_and_seeds_change_the_plan(make_cut):
    times = np.array([(0.3 * i, 0.3 * i + 0.25) for i in range(20)])
    cut = make_cut([f"w{i}" for i in range(20)], times, 6.2)
    cfg = InterleaveConfig()
    plans = [plan_cut(cut, cfg, SPEC, epoch).spans for epoch in range(10)]
    assert any(p != plans[0] for p in plans)
    assert plan_cut(cut, dataclasses.replace(cfg, seed=1), SPEC).spans != plans[0] or plans[0] != plans[1]
    assert make_rng(0, 3, "x").integers(1 << 30) == make_rng(0, 3, "x").integers(1 << 30)  # no hash() salt


def test_config_rejects_unknown_options():
    with pytest.raises(ValueError, match="span_dist"):
        InterleaveConfig(span_dist="geometric")


def test_mixed_mode_draws_both_levels(make_cut):
    times = np.array([(0.3 * i, 0.3 * i + 0.25) for i in range(20)])
    cut = make_cut([f"w{i}" for i in range(20)], times, 6.2)
    levels = {plan_cut(cut, InterleaveConfig(mode="mixed"), SPEC, e).level for e in range(20)}
    assert levels == {"word", "segment"}


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(words=["a", "x", "c"]), "differ from the transcript at word 1"),
        (dict(words=["a", "b"]), "differ from the transcript"),
        (dict(text=""), "empty transcript"),
        (dict(times=[(0.1, 0.3), (0.05, 0.08), (0.5, 0.6)]), "out of order"),
        (dict(times=[(0.1, 0.3), (0.5, 0.6), (0.7, 1.6)]), "exceed the audio"),
        (dict(duration=0.005), "shorter than one encoder frame"),
    ],
)
def test_bad_input_raises_alignment_error_naming_the_cut(make_cut, change, match):
    words, times, duration = ["a", "b", "c"], [(0.1, 0.3), (0.4, 0.6), (0.7, 0.9)], 1.0
    times, duration = change.get("times", times), change.get("duration", duration)
    cut = make_cut(change.get("words", words), times if duration > 0.01 else [(0.0, 0.001)] * 3, duration, id="bad-7")
    if "text" in change:
        cut.supervisions[0].text = change["text"]
    elif "words" in change:
        cut.supervisions[0].text = " ".join(words)
    with pytest.raises(AlignmentError, match=f"cut bad-7: .*{match}"):
        plan_cut(cut, InterleaveConfig(), SPEC)


def _retext(cut, text: str, symbols: dict[int, str] | None = None):
    """A copy of ``cut`` with transcript ``text`` and alignment items renamed at ``symbols`` (index -> symbol)."""
    from lhotse.utils import fastcopy

    sup = cut.supervisions[0]
    items = [it._replace(symbol=(symbols or {}).get(k, it.symbol)) for k, it in enumerate(sup.alignment["word"])]
    return fastcopy(cut, supervisions=[fastcopy(sup, text=text, alignment={"word": items})])


def test_alignment_matches_the_transcript_after_normalisation(tiny_corpus):
    """A real cut whose transcript has capitals, punctuation and a written number while the aligner wrote digits."""
    from lhotse import CutSet

    digits = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}

    def number_at(words):  # a lone number word, not the first or last
        return next((k for k in range(1, len(words) - 1) if words[k] in digits and words[k - 1] not in digits
                     and words[k + 1] not in digits and words[k + 1] != "hundred"), None)

    cuts = [c for name in ("medical_test", "banking_test", "medical_dev", "banking_dev")
            for c in CutSet.from_file(tiny_corpus / f"{name}_cuts.jsonl")]
    cut = next(c for c in cuts if number_at(c.supervisions[0].text.split()) is not None)
    words = cut.supervisions[0].text.split()
    k = number_at(words)
    text = " ".join([words[0].capitalize() + ","] + words[1:-1] + [words[-1] + "."])
    user = _retext(cut, text, {k: digits[words[k]]})
    got, times = read_alignment(user)
    assert got == text.split()  # the transcript's own words, with the aligner's times
    np.testing.assert_allclose(times, read_alignment(cut)[1])
    plan = plan_cut(user, InterleaveConfig(), SPEC)
    assert plan.words == text.split() and plan.spans[-1].end == len(words)


def test_a_number_the_aligner_wrote_as_one_token_becomes_one_word(make_cut):
    cut = make_cut(["i", "took", "25", "pills", "<eps>"], [(0, .2), (.2, .5), (.5, .9), (1.0, 1.3), (1.3, 1.5)], 2.0)
    cut = _retext(cut, "I took twenty-five pills!")
    words, times = read_alignment(cut)
    assert words == ["I", "took", "twenty-five", "pills!"]
    cut = _retext(cut, "I took twenty five pills")
    words, times = read_alignment(cut)
    assert words == ["I", "took", "twenty five", "pills"] and times[2].tolist() == [0.5, 0.9]
    assert times[3].tolist() == [1.0, 1.3]  # "<eps>" (nothing after normalisation) is dropped


def test_words_that_differ_after_normalisation_are_still_an_error(make_cut):
    cut = make_cut(["give", "metformin", "now"], [(0, .3), (.3, .8), (.9, 1.2)], 1.5)
    with pytest.raises(AlignmentError, match=r"cut cut-0: alignment words differ from the transcript at word 1 even "
                                             r"after normalisation \(\['metformin', 'now'\] vs \['Ramipril', 'now.'\]"):
        read_alignment(_retext(cut, "Give Ramipril now."))

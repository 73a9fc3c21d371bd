"""python -m nemo_jstip.data.show on the tiny corpus: span rendering, loss marks, batch statistics."""
import re

import pytest
from lhotse import CutSet

from nemo_jstip.data.examples import ExampleBuilder
from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.interleave import InterleaveConfig
from nemo_jstip.data.show import main, render, speech_use


def test_render_shows_spans_frames_and_targets(tiny_corpus, jstip_tokenizer):
    builder = ExampleBuilder(jstip_tokenizer, FrameSpec(), InterleaveConfig(mode="word"))
    for cut in CutSet.from_file(tiny_corpus / "medical_dev_cuts.jsonl").subset(first=4):
        words = cut.supervisions[0].text.split()
        for ex in (builder.asr(cut), builder.interleaved(cut, epoch=1), builder.asr(cut, prompt_only=True)):
            line = render(ex, jstip_tokenizer, words)
            assert line.startswith("<bos> [") and line.count("*") == ex.loss_mask.sum()
            speech = re.findall(r"\[S: ([^|]*) \| (\d+) frames\]", line)
            assert sum(int(k) for _, k in speech) == ex.num_frames
            assert [w for s, _ in speech for w in s.split()] == [
                w for s in ex.spans if s.modality == "speech" for w in words[s.start : s.end]]
            assert line.count("[T: ") == sum(s.modality == "text" for s in ex.spans)
            assert line.endswith(("<eos>", "<eos>*")) == (ex.input_ids[-1] == builder.ids.eos)


def test_cli_on_tiny_corpus(tiny_corpus, capsys):
    main([f"manifest={tiny_corpus / 'general_train_cuts.jsonl'}", f"text={tiny_corpus / 'medical_text.txt'}",
          "n=2", "batches=3", "kind=mixed"])
    out = capsys.readouterr().out
    assert "trained here" in out and "[S: " in out and " frames] [T: " in out and "*" in out
    assert out.count("  asr ") == 2 and out.count("  interleaved ") == 2 and out.count("  text ") == 2
    batches = re.findall(r"batch \d+: (\d+) examples \(([^)]*)\), L=(\d+), (\d+) real / (\d+) padded", out)
    assert len(batches) == 3
    for n, kinds, L, real, padded in batches:
        assert int(n) == sum(int(x.split()[1]) for x in kinds.split(", "))
        assert int(padded) == int(n) * int(L) >= int(real)
    total = re.search(r"total: (\d+) examples .*?, (\d+) real / (\d+) padded tokens, padding share ([\d.]+)%", out)
    assert int(total[1]) == sum(int(b[0]) for b in batches) and int(total[2]) == sum(int(b[3]) for b in batches)
    assert float(total[4]) == pytest.approx(100 * (1 - int(total[2]) / int(total[3])), abs=0.06)


def test_cli_usage():
    with pytest.raises(SystemExit, match="bad argument"):
        main(["manifest=x.jsonl", "kinds=asr"])
    with pytest.raises(SystemExit, match="usage|python -m"):
        main(["kind=asr"])


def test_speech_use_counts_frames_that_a_target_follows(tiny_corpus, jstip_tokenizer):
    cuts = list(CutSet.from_file(tiny_corpus / "medical_dev_cuts.jsonl").subset(first=6))
    build = lambda **kw: ExampleBuilder(  # noqa: E731
        jstip_tokenizer, FrameSpec(), InterleaveConfig(mode="word", binomial_n=60, **kw))
    asr = speech_use([build().asr(c) for c in cuts])
    assert asr == {"examples": 6, "no_target": 0.0, "target_after_speech": 1.0, "speech_frames_used": 1.0}
    # one span per utterance (spans of ~60 words): all speech -> nothing to learn; all text -> no speech at all
    speech_only = speech_use([build(binomial_p=1.0, first="speech").interleaved(c) for c in cuts])
    assert speech_only["no_target"] == 1.0 and speech_only["speech_frames_used"] == 0.0
    text_only = speech_use([build(binomial_p=1.0, first="text").interleaved(c) for c in cuts])
    assert text_only == {"examples": 6, "no_target": 0.0, "target_after_speech": 0.0, "speech_frames_used": 0.0}
    # one-word spans starting with speech: every speech span but a trailing one is followed by text
    examples = [build(binomial_p=0.0, first="speech").interleaved(c) for c in cuts]
    u = speech_use(examples)
    assert u["target_after_speech"] == 1.0 and u["no_target"] == 0.0
    trailing = sum(s.end - s.start for ex in examples for s in ex.spans[-1:] if s.modality == "speech")
    assert 0.5 < u["speech_frames_used"] < 1.0 if trailing else u["speech_frames_used"] == 1.0


def test_cli_prints_speech_use(tiny_corpus, capsys):
    main([f"manifest={tiny_corpus / 'general_train_cuts.jsonl'}", "n=0", "batches=1", "stats=8", "kind=mixed"])
    out = capsys.readouterr().out
    asr = re.search(r"speech use, asr \((\d+) examples\): ([\d.]+)% without .*?, ([\d.]+)% of speech frames", out)
    assert asr and int(asr[1]) == 8 and float(asr[2]) == 0.0 and float(asr[3]) == 100.0
    assert re.search(r"speech use, interleaved \(8 examples\)", out) and "[S: " not in out

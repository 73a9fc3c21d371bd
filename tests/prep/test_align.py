import logging
import re
from pathlib import Path

import numpy as np
import pytest
from lhotse import CutSet

from nemo_jstip.prep.align import AlignStats, NemoCtcAligner, PocketsphinxAligner, align_cuts, espeak_to_cmu, main


def stripped(corpus: Path, names=("general_test", "medical_test", "banking_test", "qa_test")) -> tuple[CutSet, dict]:
    """The corpus cuts without alignments, and their exact espeak-ng word times by cut id."""
    cuts = CutSet.from_cuts(c for n in names for c in CutSet.from_file(corpus / f"{n}_cuts.jsonl"))
    truth = {c.id: [(a.start, a.end) for a in c.supervisions[0].alignment["word"]] for c in cuts}
    for c in cuts:
        c.supervisions[0].alignment = None
    return cuts, truth


def assert_valid(cut):
    """Every word aligned, symbols == transcript, in order, positive, inside the supervision and the recording."""
    for sup in cut.supervisions:
        words = sup.alignment["word"]
        assert [w.symbol for w in words] == sup.text.split(), cut.id
        assert all(w.duration > 0 for w in words), cut.id
        assert all(a.end <= b.start + 1e-9 for a, b in zip(words, words[1:])), cut.id
        lo, hi = max(0.0, cut.start + sup.start), min(cut.recording.duration, cut.start + sup.end)
        assert lo - 1e-9 <= words[0].start and words[-1].end <= hi + 1e-9, (cut.id, words[0], words[-1], lo, hi)


def boundary_errors(cuts, truth) -> np.ndarray:
    return np.array(
        [abs(a.start - s) for c in cuts for a, (s, _) in zip(c.supervisions[0].alignment["word"], truth[c.id])]
        + [abs(a.end - e) for c in cuts for a, (_, e) in zip(c.supervisions[0].alignment["word"], truth[c.id])]
    )


def test_pocketsphinx_cli_realigns_the_corpus(tiny_corpus, tmp_path, capsys):
    cuts, truth = stripped(tiny_corpus)
    cuts.to_file(tmp_path / "in.jsonl.gz")
    main([f"in={tmp_path / 'in.jsonl.gz'}", f"out={tmp_path / 'out.jsonl.gz'}", "backend=pocketsphinx"])
    summary = capsys.readouterr().out
    out = CutSet.from_file(tmp_path / "out.jsonl.gz")
    assert [c.id for c in out] == [c.id for c in cuts], summary
    for c in out:
        assert_valid(c)
    err = boundary_errors(out, truth)
    # measured on the default corpus: mean 0.016 s, median 0.010 s, 94% within 50 ms (docs/alignment.md)
    assert err.mean() < 0.05 and np.median(err) < 0.03, (err.mean(), np.median(err))
    assert f"aligned {len(cuts)}/{len(cuts)} cuts" in summary and "failed 0" in summary
    assert int(re.search(r"(\d+) OOV words", summary).group(1)) > 0  # drug and person names need g2p


def test_windowed_cut_gives_recording_relative_times(tiny_corpus):
    cuts, truth = stripped(tiny_corpus, ["general_test"])
    cut = cuts[0]
    window = cut.truncate(offset=0.4, duration=cut.duration - 0.6, keep_excessive_supervisions=True)
    assert window.start == pytest.approx(0.4) and window.supervisions[0].start == pytest.approx(-0.4)
    (out,) = align_cuts([window], PocketsphinxAligner())
    assert_valid(out)
    assert out.supervisions[0].alignment["word"][-1].end > window.duration  # whole supervision, recording times
    assert boundary_errors([out], {out.id: truth[cut.id]}).mean() < 0.05


def test_failures_are_counted_and_reported(tiny_corpus, tmp_path, caplog):
    good, broken, empty = stripped(tiny_corpus, ["general_test"])[0].subset(first=3)
    (tmp_path / "broken.flac").write_bytes(b"not audio")
    broken.recording.sources[0].source = str(tmp_path / "broken.flac")
    empty.supervisions[0].text = " "
    for on_failure, expected in (("drop", [good.id]), ("keep", [good.id, broken.id, empty.id])):
        stats = AlignStats()
        with caplog.at_level(logging.WARNING):
            out = list(align_cuts([good, broken, empty], PocketsphinxAligner(), on_failure, stats))
        assert [c.id for c in out] == expected
        assert (stats.cuts, stats.aligned, stats.failed) == (3, 1, 2)
        assert f"cut {broken.id}: cannot read audio" in caplog.text
        assert f"cut {empty.id}: supervision {empty.supervisions[0].id!r} has an empty transcript" in caplog.text
        assert_valid(out[0])
        assert all(c.supervisions[0].alignment is None for c in out[1:])
        caplog.clear()


def test_espeak_phonemes_map_to_cmu_phones():
    assert espeak_to_cmu("h|@|l|'oU w|'3:|l|d") == ["HH", "AH", "L", "OW", "W", "ER", "L", "D"]
    assert espeak_to_cmu("s|'I|p|r|@|f|l|,0|k|s|a#|s|,I|n")[-3:] == ["S", "IH", "N"]


def tiny_ctc_model(tmp_path: Path, texts: list[str], kind: str):
    """A randomly initialised FastConformer CTC model (BPE or characters) built from config, saved as .nemo."""
    from omegaconf import OmegaConf

    from nemo.collections.asr.models import EncDecCTCModel, EncDecCTCModelBPE

    cfg = {
        "sample_rate": 16000,
        "preprocessor": {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
                         "sample_rate": 16000, "features": 64, "window_size": 0.025, "window_stride": 0.01},
        "encoder": {"_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": 64, "n_layers": 1,
                    "d_model": 32, "n_heads": 2, "subsampling": "dw_striding", "subsampling_factor": 4,
                    "subsampling_conv_channels": 16, "ff_expansion_factor": 2, "conv_kernel_size": 9},
        "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": 32, "num_classes": -1},
    }  # fmt: skip
    if kind == "bpe":
        from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

        (tmp_path / "text.txt").write_text("\n".join(texts) + "\n")
        create_spt_model(str(tmp_path / "text.txt"), 64, -1, True, "bpe", output_dir=str(tmp_path / "tok"))
        cfg["tokenizer"] = {"dir": str(tmp_path / "tok"), "type": "bpe"}
        model = EncDecCTCModelBPE(cfg=OmegaConf.create(cfg))
    else:
        vocab = [" "] + list("abcdefghijklmnopqrstuvwxyz'")
        cfg["decoder"] |= {"num_classes": len(vocab), "vocabulary": vocab}
        model = EncDecCTCModel(cfg=OmegaConf.create(cfg))
    model.save_to(str(tmp_path / f"{kind}.nemo"))
    return tmp_path / f"{kind}.nemo"


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_nemo_ctc_mechanics(tiny_corpus, tmp_path, kind, capsys):
    cuts, _ = stripped(tiny_corpus, ["general_test", "medical_test"])
    cuts = cuts.subset(first=6)
    model = tiny_ctc_model(tmp_path, [c.supervisions[0].text for c in cuts], kind)
    cuts.to_file(tmp_path / "in.jsonl")
    main([f"in={tmp_path / 'in.jsonl'}", f"out={tmp_path / 'out.jsonl'}", "backend=nemo_ctc", f"model={model}",
          "batch_size=4", "device=cpu"])
    out = CutSet.from_file(tmp_path / "out.jsonl")
    assert [c.id for c in out] == [c.id for c in cuts], capsys.readouterr().out
    for c in out:
        assert_valid(c)
    # words the model cannot spell, and more tokens than output frames, are reported failures
    unspellable, too_long = cuts[0], cuts[1]
    unspellable.supervisions[0].text = "take 20 mg"
    too_long.supervisions[0].text = " ".join(["zebra"] * 300)
    stats = AlignStats()
    assert list(align_cuts([unspellable, too_long], NemoCtcAligner(str(model), device="cpu"), stats=stats)) == []
    assert stats.failed == 2 and "word _ has characters the model's vocabulary lacks" in stats.reasons
    assert "transcript has more tokens than the audio's _ output frames" in stats.reasons


def test_nemo_ctc_with_the_committed_ctc_model(tiny_corpus, tmp_path, capsys):
    """The offline path a user has: the project's pretrained character CTC model aligns real corpus speech."""
    model = Path(__file__).parents[2] / "pretrained" / "encoder" / "asr_ctc.nemo"
    cuts, truth = stripped(tiny_corpus, ["general_test", "medical_test"])
    cuts.to_file(tmp_path / "in.jsonl")
    main([f"in={tmp_path / 'in.jsonl'}", f"out={tmp_path / 'out.jsonl'}", "backend=nemo_ctc", f"model={model}",
          "batch_size=8", "device=cpu"])
    out = CutSet.from_file(tmp_path / "out.jsonl")
    assert len(out) == len(cuts), capsys.readouterr().out
    for c in out:
        assert_valid(c)
    err = boundary_errors(out, truth)
    # measured on 600 corpus cuts: mean 0.069 s (starts) / 0.026 s (ends), 94% within 100 ms (docs/alignment.md)
    assert err.mean() < 0.08 and (err < 0.1).mean() > 0.85, (err.mean(), (err < 0.1).mean())

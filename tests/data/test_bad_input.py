"""Every row of the bad-input table (docs/data.md), strict and lenient, on modified copies of real tiny-corpus cuts."""
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet, Recording
from lhotse.utils import fastcopy

from nemo_jstip.data.dataset import PROBLEMS, BadInputError, DatasetConfig, JSTIPDataset
from nemo_jstip.data.examples import ExampleBuilder, add_special_tokens
from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.interleave import InterleaveConfig
from nemo_jstip.data.sampler import COST_KEY, KIND_KEY, SAMPLER_PROBLEMS, STREAM_KEY, TextItem

SPEC = FrameSpec()
DOCS = Path(__file__).parents[2] / "docs" / "data.md"


@pytest.fixture(scope="module")
def corpus_cuts(tiny_corpus):
    return CutSet.from_file(tiny_corpus / "general_train_cuts.jsonl").subset(first=2).to_eager()


def tag(cut, kind, **custom):
    return fastcopy(cut, custom={**(cut.custom or {}), KIND_KEY: kind, **custom})


def with_sup(cut, **changes):
    return fastcopy(cut, supervisions=[fastcopy(cut.supervisions[0], **changes)])


def realign(cut, fn):
    return with_sup(cut, alignment={"word": fn(list(cut.supervisions[0].alignment["word"]))})


def swap_times(w):
    w[1], w[2] = w[1]._replace(start=w[2].start), w[2]._replace(start=w[1].start)
    return w


def overlap(w):
    w[2] = w[2]._replace(start=w[1].start + 0.01)
    return w


def two_supervisions(cut):
    sup = cut.supervisions[0]
    half = fastcopy(sup, id=sup.id + "-b", start=sup.duration / 2, duration=sup.duration / 2)
    return fastcopy(cut, supervisions=[fastcopy(sup, duration=sup.duration / 2), half])


def missing_file(cut, tmp):
    rec = cut.recording
    src = fastcopy(rec.sources[0], source=str(tmp / "missing.flac"))
    return fastcopy(cut, recording=fastcopy(rec, sources=[src]))


def corrupt_file(cut, tmp):
    path = tmp / "corrupt.flac"
    data = Path(cut.recording.sources[0].source).read_bytes()
    path.write_bytes(data[: len(data) // 3])  # a truncated FLAC
    rec = cut.recording
    return fastcopy(cut, recording=fastcopy(rec, sources=[fastcopy(rec.sources[0], source=str(path))]))


def resampled_copy(cut, tmp):
    path = tmp / "22k.flac"
    sf.write(path, cut.resample(22050).load_audio()[0], 22050)
    return fastcopy(cut, recording=Recording.from_file(path, recording_id=cut.recording.id))


def wrong_rate_in_manifest(cut, tmp):
    """The file is 22.05 kHz, the manifest's recording still says 16 kHz (a manifest written by hand)."""
    path = tmp / "22k_as_16k.flac"
    sf.write(path, cut.resample(22050).load_audio()[0], 22050)
    rec = cut.recording
    return fastcopy(cut, recording=fastcopy(rec, sources=[fastcopy(rec.sources[0], source=str(path))]))


def stereo_copy(cut, tmp):
    """A two-channel file (the second channel at half level) read as a MultiCut, as Lhotse makes one for stereo."""
    path = tmp / "stereo.flac"
    mono = cut.load_audio()[0]
    sf.write(path, np.stack([mono, 0.5 * mono], axis=1), cut.sampling_rate)
    multi = Recording.from_file(path, recording_id=cut.recording.id).to_cut()
    return fastcopy(multi, id=cut.id, supervisions=cut.supervisions)


def word_level_tokenizer(words):
    """A non-byte-level tokenizer with an unknown token: words outside ``words`` become [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def letters_only_tokenizer():
    """A BPE without unknown token or byte fallback: characters it never saw vanish (an empty encoding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["abcdefghijklmnopqrstuvwxyz"], trainers.BpeTrainer(special_tokens=["<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@dataclass
class Case:
    code: str
    make: Callable  # (good cut, tmp_path) -> bad item
    lenient: str  # "asr" (built as ASR), "dropped", "kept", "resampled"
    tokenizer: Callable | None = None  # (good cut, other cut) -> tokenizer, when the case needs a special one
    in_message: str = ""  # besides the cut id


CASES = {
    "no_alignment": Case("no_alignment", lambda c, t: tag(with_sup(c, alignment=None), "interleaved"), "asr"),
    "alignment_mismatch": Case("alignment_mismatch", lambda c, t: tag(
        realign(c, lambda w: [w[0]._replace(symbol="zebra"), *w[1:]]), "interleaved"), "asr", in_message="zebra"),
    "out_of_order": Case("alignment_order", lambda c, t: tag(realign(c, swap_times), "interleaved"), "asr"),
    "overlapping": Case("alignment_order", lambda c, t: tag(realign(c, overlap), "interleaved"), "asr"),
    "beyond_audio": Case("alignment_beyond_audio", lambda c, t: tag(
        realign(c, lambda w: [x._replace(start=x.start + 1.0) for x in w]), "interleaved"), "asr"),
    "two_supervisions": Case("bad_alignment", lambda c, t: tag(two_supervisions(c), "interleaved"), "asr"),
    "empty_transcript_asr": Case("empty_transcript", lambda c, t: tag(with_sup(c, text=" "), "asr"), "dropped"),
    "empty_transcript_interleaved": Case(
        "empty_transcript", lambda c, t: tag(with_sup(c, text=""), "interleaved"), "dropped"),
    "empty_text_line": Case("empty_transcript", lambda c, t: TextItem("domain:7", "  ", {KIND_KEY: "text"}), "dropped"),
    "too_short": Case("audio_too_short", lambda c, t: tag(c.truncate(duration=0.005), "asr"), "dropped"),
    "missing_file": Case("missing_audio", lambda c, t: tag(missing_file(c, t), "asr"), "dropped", in_message="missing.flac"),
    "manifest_sample_rate": Case("manifest_sample_rate", lambda c, t: tag(wrong_rate_in_manifest(c, t), "asr"),
                                 "dropped", in_message="22k_as_16k.flac is 22050 Hz, the manifest's recording"),
    "stereo": Case("multi_channel", lambda c, t: tag(stereo_copy(c, t), "interleaved"), "downmixed",
                   in_message="stereo.flac has 2 channels"),
    "corrupt_file": Case("unreadable_audio", lambda c, t: tag(corrupt_file(c, t), "interleaved"), "dropped",
                         in_message="corrupt.flac"),
    "sample_rate": Case("sample_rate", lambda c, t: tag(resampled_copy(c, t), "interleaved"), "resampled",
                        in_message="22050 Hz"),
    "unknown_tokens": Case("unencodable_text", lambda c, t: tag(with_sup(c, text=c.supervisions[0].text + " zzyzx",
                                                                        alignment=None), "asr"), "dropped",
                           tokenizer=lambda *cs: word_level_tokenizer(w for c in cs for w in c.supervisions[0].text.split()),
                           in_message="1 unknown-token ids ('[UNK]')"),
    "empty_encoding": Case("unencodable_text", lambda c, t: TextItem("domain:3", "日本語 テキスト", {KIND_KEY: "text"}),
                           "dropped", tokenizer=lambda *cs: letters_only_tokenizer(), in_message="no tokens"),
    "cost_over_budget": Case("cost_over_budget", lambda c, t: tag(c, "interleaved", **{COST_KEY: 5}), "kept"),
}


def make_dataset(case: Case, cuts, tokenizer, strict: bool) -> JSTIPDataset:
    if case.tokenizer is not None:
        tokenizer = case.tokenizer(*cuts)
        add_special_tokens(tokenizer, InterleaveConfig())
    return JSTIPDataset(ExampleBuilder(tokenizer, SPEC, InterleaveConfig()), DatasetConfig(strict=strict))


def test_every_problem_has_a_case_and_a_docs_row():
    assert {c.code for c in CASES.values()} | set(SAMPLER_PROBLEMS) == set(PROBLEMS)
    section = DOCS.read_text().split("## Bad input")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert set(rows) == set(PROBLEMS)


@pytest.mark.parametrize("name", CASES)
def test_lenient(name, corpus_cuts, jstip_tokenizer, tmp_path, caplog):
    case, (good, other) = CASES[name], corpus_cuts
    bad = case.make(other, tmp_path)
    bad.custom[STREAM_KEY] = "src"
    dataset = make_dataset(case, corpus_cuts, jstip_tokenizer, strict=False)
    with caplog.at_level(logging.WARNING, logger="nemo_jstip.data.dataset"):
        batch = dataset[[tag(good, "asr"), bad]]
        dataset[[bad]]  # the same problem again: counted, not logged again
    assert batch["problems"] == {case.code: 1} and dataset.stats == {case.code: 2}
    logged = [r for r in caplog.records if bad.id in r.getMessage()]
    assert len(logged) == 1 and case.code in logged[0].getMessage()

    assert batch["problems_by_source"] == {"src": {case.code: 1}}
    B = len(batch["cut_ids"])
    assert batch["input_ids"].shape[0] == B and batch["audio"].shape[0] == len(batch["audio_lens"])
    if case.lenient == "dropped":
        assert batch["cut_ids"] == [good.id] and batch["audio"].shape[0] == 1
        assert list(batch["dropped"]) == [bad.id] and batch["dropped"][bad.id].startswith(f"{case.code}: ")
        assert case.in_message in batch["dropped"][bad.id]
        return
    assert batch["dropped"] == {}
    assert batch["cut_ids"] == [good.id, bad.id] and batch["audio"].shape[0] == 2
    n = SPEC.num_samples(bad.duration)
    assert batch["audio_lens"][1] == n and batch["audio_num_frames"][1] == SPEC.num_frames(n)
    assert batch["kinds"][1] == ("asr" if case.lenient == "asr" else bad.custom[KIND_KEY])
    if case.lenient in ("resampled", "downmixed"):  # the 22.05 kHz copy at 16 kHz / the channel mean: the original
        orig = other.load_audio()[0]
        assert np.corrcoef(batch["audio"][1, :n].numpy(), orig)[0, 1] > 0.99
        assert batch["kinds"][1] == "interleaved"
    if case.lenient == "downmixed":
        assert np.abs(batch["audio"][1, :n].numpy() - 0.75 * orig).max() < 1e-3


@pytest.mark.parametrize("name", CASES)
def test_strict(name, corpus_cuts, jstip_tokenizer, tmp_path):
    case, (good, other) = CASES[name], corpus_cuts
    bad = case.make(other, tmp_path)
    dataset = make_dataset(case, corpus_cuts, jstip_tokenizer, strict=True)
    dataset[[tag(good, "asr")]]  # good input passes
    with pytest.raises(BadInputError, match=re.escape(f"cut {bad.id}:")) as e:
        dataset[[tag(good, "asr"), bad]]
    assert e.value.code == case.code and case.in_message in str(e.value)
    assert PROBLEMS[case.code][0] in str(e.value)


def test_all_dropped_gives_an_empty_batch(corpus_cuts, jstip_tokenizer):
    dataset = JSTIPDataset(ExampleBuilder(jstip_tokenizer, SPEC, InterleaveConfig()), DatasetConfig(pad_to_multiple=8))
    b = dataset[[tag(with_sup(c, text=""), "asr") for c in corpus_cuts]]
    assert b["input_ids"].shape == b["labels"].shape == b["audio_item"].shape == (0, 0)
    assert b["audio"].shape[0] == 0 and b["cut_ids"] == [] and b["problems"] == {"empty_transcript": 2}
    assert b["token_stats"]["real_tokens"] == b["token_stats"]["padded_tokens"] == 0

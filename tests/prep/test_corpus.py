import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from lhotse import CutSet

from nemo_jstip.prep.corpus import CorpusConfig, build_corpus, is_complete, main
from nemo_jstip.prep.sentences import spoken_number
from tests.conftest import TINY_SIZES, tiny_corpus_config

GENERAL_PARTS = [k for k in TINY_SIZES if k.endswith("_carrier") or k == "general_words"]  # inside general_train
SPOKEN = [k for k, v in TINY_SIZES.items() if v and not k.endswith("_text") and k not in GENERAL_PARTS]


def load(corpus: Path, name: str) -> CutSet:
    return CutSet.from_file(corpus / f"{name}_cuts.jsonl")


def digest(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("name", SPOKEN)
def test_manifests_load_and_audio_matches(tiny_corpus, name):
    cuts = load(tiny_corpus, name)
    extra = sum(TINY_SIZES[k] for k in GENERAL_PARTS) if name == "general_train" else 0
    assert len(cuts) == TINY_SIZES[name] + extra
    for cut in cuts:
        audio = cut.load_audio()
        assert audio.shape == (1, cut.num_samples) and cut.sampling_rate == 16000
        assert np.abs(audio).max() > 0.1


@pytest.mark.parametrize("name", SPOKEN)
def test_alignments_inside_recording_in_order_and_equal_transcript(tiny_corpus, name):
    for cut in load(tiny_corpus, name):
        (sup,) = cut.supervisions
        words = sup.alignment["word"]
        assert [w.symbol for w in words] == sup.text.split(), cut.id
        assert sup.text == sup.text.lower() and "  " not in sup.text
        for a, b in zip(words, words[1:]):
            assert a.end <= b.start + 1e-9, (cut.id, a, b)
        assert all(w.duration > 0 and w.start >= 0 and w.end <= cut.duration + 1e-9 for w in words), cut.id


@pytest.mark.parametrize("name", [n for n in SPOKEN if n.startswith(("medical", "banking"))])
def test_entity_spans_point_at_their_words(tiny_corpus, name):
    mentions = 0
    for cut in load(tiny_corpus, name):
        sup = cut.supervisions[0]
        words = sup.text.split()
        assert sup.custom["domain"] == name.split("_")[0]
        for e in sup.custom["entities"]:
            assert " ".join(words[e["start"] : e["end"]]) == e["text"], cut.id
            mentions += 1
    assert mentions >= len(load(tiny_corpus, name))  # every domain template has at least one entity


def test_word_times_match_the_audio(tiny_corpus):
    """Speech energy lies inside the aligned words; the padding before the first word is near-silent."""
    for cut in load(tiny_corpus, "medical_test"):
        x = cut.load_audio()[0]
        words = cut.supervisions[0].alignment["word"]
        lead = x[: int(words[0].start * 16000)]
        speech = x[int(words[0].start * 16000) : int(words[-1].end * 16000)]
        assert len(lead) > 0.04 * 16000
        assert np.sqrt(np.mean(lead**2)) < 0.25 * np.sqrt(np.mean(speech**2)), cut.id


def test_entity_overlap_between_text_dev_and_test(tiny_corpus):
    def mentions(name):
        if name.endswith("_text"):
            rows = [json.loads(line) for line in (tiny_corpus / f"{name}.jsonl").read_text().splitlines()]
            return {e["text"] for r in rows for e in r["entities"]}
        return {e["text"] for c in load(tiny_corpus, name) for e in c.supervisions[0].custom["entities"]}

    partition = json.loads((tiny_corpus / "entities.json").read_text())
    for d in ("medical", "banking"):
        text, dev, test = mentions(f"{d}_text"), mentions(f"{d}_dev"), mentions(f"{d}_test")
        assert test - dev - text, f"{d}: test must have entities seen nowhere"
        assert (test & text) - dev, f"{d}: test must have entities seen only in domain text"
        assert not (test & dev) - text, f"{d}: dev/test share only entities the text has too"
        test_only = {e for groups in partition[d].values() for e in groups["test_only"]}
        assert test & test_only and not test_only & (text | dev)
        for c in load(tiny_corpus, f"{d}_test"):
            for e in c.supervisions[0].custom["entities"]:
                assert e["seen_in_text"] == (e["text"] in text)
    general = " " + " ".join(c.supervisions[0].text for c in load(tiny_corpus, "general_train")) + " "
    every_entity = {e for d in partition.values() for groups in d.values() for g in groups.values() for e in g}
    assert not [e for e in every_entity if f" {e} " in general], "general ASR data must not contain domain entities"


def test_general_speech_carries_domain_words_but_no_entities(tiny_corpus):
    """Carrier sentences (domain templates with generic slot values) and common-word sequences are in general_train,
    without entity labels (the test above checks that no entity is spoken there)."""
    from nemo_jstip.prep.sentences import load_domain

    train = load(tiny_corpus, "general_train")
    for d in ("medical", "banking"):
        carriers = [c.supervisions[0] for c in train if c.supervisions[0].custom.get("carrier") == d]
        assert len(carriers) == TINY_SIZES[f"{d}_carrier"]
        generic = {w for values in load_domain(d)["generic"].values() for v in values for w in v.split()}
        for sup in carriers:
            assert sup.custom["domain"] == "general" and sup.custom["entities"] == []
            assert generic & set(sup.text.split()), sup.text  # a generic value fills an entity slot
    words = [c.supervisions[0] for c in train if c.supervisions[0].custom.get("words")]
    assert len(words) == TINY_SIZES["general_words"]
    assert all(s.custom["entities"] == [] and 4 <= len(s.text.split()) <= 10 for s in words)
    plain = [c for c in train if c.supervisions[0].custom.get("carrier") is None and not c.supervisions[0].custom.get("words")]
    assert len(plain) == TINY_SIZES["general_train"]


def test_sentences_of_splits_are_distinct(tiny_corpus):
    for d in ("medical", "banking"):
        text = set((tiny_corpus / f"{d}_text.txt").read_text().splitlines())
        assert len(text) == TINY_SIZES[f"{d}_text"]
        for split in ("dev", "test"):
            assert not text & {c.supervisions[0].text for c in load(tiny_corpus, f"{d}_{split}")}


def test_voices_held_out_and_varied(tiny_corpus):
    cfg = CorpusConfig()
    for name in SPOKEN:
        variants = {c.supervisions[0].speaker.split("+")[1] for c in load(tiny_corpus, name)}
        allowed = cfg.train_variants if name.endswith(("_train", "_textspeech")) else cfg.eval_variants
        assert variants <= set(allowed), name
    speakers = {c.supervisions[0].speaker for c in load(tiny_corpus, "general_train")}
    assert len(speakers) >= 6


def test_synthetic_pairs_speak_the_domain_text(tiny_corpus):
    text = (tiny_corpus / "medical_text.txt").read_text().splitlines()
    assert [c.supervisions[0].text for c in load(tiny_corpus, "medical_textspeech")] == text[:3]


def test_spoken_qa_has_answers(tiny_corpus):
    for cut in load(tiny_corpus, "qa_test"):
        custom = cut.supervisions[0].custom
        assert custom["question"] == cut.supervisions[0].text and custom["answers"]


def test_same_seed_same_corpus_and_complete_folder_reused(tmp_path):
    cfg = tiny_corpus_config(tmp_path / "c", sizes={"general_train": 150, "medical_text": 20, "medical_test": 5, "qa_test": 2})
    build_corpus(cfg)
    first = digest(tmp_path / "c")
    build_corpus(tiny_corpus_config(tmp_path / "c", sizes=cfg.sizes, num_workers=1), force=True)
    assert digest(tmp_path / "c") == first  # manifests and audio, byte for byte, whatever num_workers is
    stamp = tmp_path / "c" / ".complete"
    mtime = stamp.stat().st_mtime_ns
    build_corpus(cfg)  # complete: reused, not rebuilt
    assert stamp.stat().st_mtime_ns == mtime
    stamp.unlink()  # an interrupted build has no stamp: rebuilt
    build_corpus(cfg)
    assert is_complete(cfg) and digest(tmp_path / "c") == first
    other = tiny_corpus_config(tmp_path / "c", sizes=cfg.sizes, seed=7)
    assert not is_complete(other)
    build_corpus(other)
    assert digest(tmp_path / "c") != first


def test_cli_overrides_and_table(tmp_path, capsys):
    main([f"out_dir={tmp_path / 'd'}", "sizes.general_train=3", "sizes.medical_text=10", "sizes.qa_test=1", "num_workers=1",
          "sizes.general_words=2", "sizes.medical_carrier=1", "sizes.banking_carrier=1"])
    out = capsys.readouterr().out
    assert "| general_train | 3 |" in out and (tmp_path / "d" / ".complete").exists()


def test_word_sequence_espeak_cannot_time_is_skipped_not_fatal(tmp_path):
    """A real espeak-ng failure (this voice merges the word events of this sequence): dropped when skippable."""
    from nemo_jstip.prep import corpus
    from nemo_jstip.prep.espeak import EspeakError

    corpus._init_worker()
    job = corpus._Job("w-0", ["humans", "par", "practice", "background"], "en-us-nyc", 160, 50, 30.0, (0.1, 0.1), 0.5,
                      0, str(tmp_path / "w.flac"), skippable=True)
    (out,) = corpus._synthesize_chunk(([job], 16000))
    assert isinstance(out, str) and "out of order" in out
    job.skippable = False
    with pytest.raises(EspeakError, match="out of order"):
        corpus._synthesize_chunk(([job], 16000))


def test_domain_words_are_the_everyday_words():
    from nemo_jstip.prep.sentences import domain_words, load_domain

    words = domain_words(load_domain("medical"))
    assert {"patient", "prescribed", "twice", "nausea"} <= set(words)  # template words and fillers
    assert not {w for w in words if w.startswith(("<", "{"))} and "metformin" not in words and len(set(words)) == len(words)


def test_word_sequences_cover_the_list_and_avoid_forbidden_phrases():
    from nemo_jstip.prep.sentences import word_sequences

    words = ["two", "hundred", "units", "red", "blue", "green"]
    sents = word_sequences(words, 200, np.random.default_rng(0), lengths=(2, 4), forbidden={"two hundred units", "red blue"})
    texts = [" " + s.text + " " for s in sents]
    assert len(sents) == 200 and {w for s in sents for w in s.words} == set(words)
    assert not [t for t in texts if " two hundred units " in t or " red blue " in t]


def test_spoken_numbers():
    assert spoken_number(20) == "twenty"
    assert spoken_number(2.5) == "two point five"
    assert spoken_number(1234) == "one thousand two hundred and thirty four"

"""Lhotse Shar and NeMo tarred inputs for ``jstip_cuts``: the same cuts and batches as from JSONL, clips read in the
workers from their tar members, resume mid-shard, clear errors for broken shards."""
import json
import os
import tarfile
from collections import Counter
from itertools import islice

import numpy as np
import pytest
from lhotse import CutSet

from nemo_jstip.data import nemo_types
from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.manifest import InputFileError
from nemo_jstip.data.tarred import TAR_AUDIO_KEY

SAMPLER = {"max_tokens": 400, "num_buckets": 2, "seed": 3}


def cfg(entry: dict, num_workers: int = 0) -> dict:
    return {"input_cfg": [{"type": "jstip_cuts", "weight": 1.0, **entry}], "sampler": SAMPLER,
            "loader": {"num_workers": num_workers}}


def epoch(entry: dict, tokenizer, num_workers: int = 0) -> list[dict]:
    return list(nemo_types.build_dataloader(cfg(entry, num_workers), tokenizer, FrameSpec()))


@pytest.fixture(scope="module")
def shar(tiny_corpus, tmp_path_factory):
    """The corpus's general-train cuts as Lhotse Shar: flac recordings, shards of 6 cuts."""
    out = tmp_path_factory.mktemp("shar")
    cuts = CutSet.from_file(tiny_corpus / "general_train_cuts.jsonl").map(
        lambda c: c.with_recording_path_prefix(str(tiny_corpus)) if not os.path.isabs(c.recording.sources[0].source)
        else c)
    cuts.to_shar(out, fields={"recording": "flac"}, shard_size=6)
    return out


def same(a: list[dict], b: list[dict]) -> None:
    assert [x["cut_ids"] for x in a] == [x["cut_ids"] for x in b]
    for x, y in zip(a, b):
        assert np.array_equal(x["input_ids"], y["input_ids"]) and np.array_equal(x["audio_item"], y["audio_item"])
        np.testing.assert_allclose(x["audio"], y["audio"], atol=1e-4)  # 16-bit flac of the same 16-bit wav
        assert x["problems"] == y["problems"] == {}


@pytest.mark.parametrize("kind", ["asr", "interleaved"])
def test_shar_gives_the_jsonl_batches(tiny_corpus, shar, jstip_tokenizer, kind):
    jsonl = epoch({"cuts_path": str(tiny_corpus / "general_train_cuts.jsonl"), "kind": kind}, jstip_tokenizer)
    from_shar = epoch({"shar_path": str(shar), "kind": kind}, jstip_tokenizer, num_workers=1)
    assert len(jsonl) > 3
    same(jsonl, from_shar)
    assert {k for b in from_shar for k in b["kinds"]} == {kind}


def test_the_sampler_reads_no_audio_and_resumes_mid_shard(shar, jstip_tokenizer):
    entry = {"shar_path": str(shar), "kind": "asr"}
    full = list(nemo_types.build_dataloader(cfg(entry), jstip_tokenizer, FrameSpec()).sampler)
    for batch in full:  # items hold the tar location, not the clip's bytes
        for cut in batch:
            assert cut.recording.sources[0].type == "shar" and cut.custom[TAR_AUDIO_KEY][0].endswith(".tar")
    interrupted = nemo_types.build_dataloader(cfg(entry), jstip_tokenizer, FrameSpec()).sampler
    head = list(islice(interrupted, 3))
    state = interrupted.state_dict()
    assert state["pipeline"] is not None and json.loads(json.dumps(state))  # stored positions, JSON-safe
    assert [c.id for b in head for c in b] == [c.id for b in full[:3] for c in b]
    resumed = nemo_types.build_dataloader(cfg(entry), jstip_tokenizer, FrameSpec()).sampler
    resumed.load_state_dict(state)
    assert [[c.id for c in b] for b in resumed] == [[c.id for c in b] for b in full[3:]]


def test_broken_shar_members_are_named_and_counted(shar, tmp_path, jstip_tokenizer):
    broken = tmp_path / "shar"
    broken.mkdir()
    for f in shar.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.name == "recording.000001.tar" else data)
    batches = epoch({"shar_path": str(broken), "kind": "asr"}, jstip_tokenizer)
    problems = sum((Counter(b["problems"]) for b in batches), start=Counter())
    assert 0 < problems["missing_audio"] + problems["unreadable_audio"] < 6
    (broken / "recording.000002.tar").unlink()
    with pytest.raises(FileNotFoundError, match="recording.000002.tar"):
        epoch({"shar_path": str(broken), "kind": "asr"}, jstip_tokenizer)


@pytest.fixture(scope="module")
def nemo_tarred(tiny_corpus, tmp_path_factory):
    """The general-train cuts as NeMo tarred ASR data: 2 manifest shards + 2 tars of wav files."""
    out = tmp_path_factory.mktemp("nemo_tarred")
    cuts = list(CutSet.from_file(tiny_corpus / "general_train_cuts.jsonl"))
    half = len(cuts) // 2
    for k, part in enumerate((cuts[:half], cuts[half:])):
        with open(out / f"manifest_{k}.json", "w") as m, tarfile.open(out / f"audio_{k}.tar", "w") as tar:
            for c in part:
                src = c.recording.sources[0].source
                src = src if os.path.isabs(src) else str(tiny_corpus / src)
                tar.add(src, arcname=f"{c.id}.wav")
                m.write(json.dumps({"audio_filepath": f"{c.id}.wav", "duration": c.duration,
                                    "text": c.supervisions[0].text, "lang": "en"}) + "\n")
    return out


def test_nemo_tarred_gives_the_jsonl_examples(tiny_corpus, nemo_tarred, jstip_tokenizer):
    entry = {"manifest_filepath": str(nemo_tarred / "manifest__OP_0..1_CL_.json"),
             "tarred_audio_filepaths": str(nemo_tarred / "audio__OP_0..1_CL_.tar"), "sampling_rate": 16000}
    jsonl = epoch({"cuts_path": str(tiny_corpus / "general_train_cuts.jsonl"), "kind": "asr"}, jstip_tokenizer)
    tarred = epoch({**entry, "kind": "asr"}, jstip_tokenizer, num_workers=1)
    same(jsonl, tarred)
    with pytest.raises(ValueError, match="no word alignments"):
        epoch({**entry, "kind": "interleaved"}, jstip_tokenizer)
    with pytest.raises(InputFileError, match=r"2 metadata shards but 1 audio tars: .*manifest_0.json"):
        epoch({**entry, "tarred_audio_filepaths": str(nemo_tarred / "audio_0.tar"), "kind": "asr"}, jstip_tokenizer)
    with (nemo_tarred / "manifest_1.json").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(InputFileError, match=r"manifest_1.json:\d+: not a NeMo manifest entry"):
        epoch({**entry, "kind": "asr"}, jstip_tokenizer)

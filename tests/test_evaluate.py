"""The evaluation accounts for every cut: fault-injected copies of real tiny-corpus cuts (a missing and a truncated
audio file), annotations checked before decoding, hypotheses streamed per batch, strict JSON, data parallelism."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lhotse import CutSet
from lhotse.utils import fastcopy

from nemo_jstip import evaluate as ev

ROOT = Path(__file__).parents[1]


def strict_json(path: Path) -> dict:
    def refuse(name):
        raise ValueError(f"{name} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def six_cuts(corpus: Path, tmp: Path, plain_entities: bool = False) -> tuple[Path, list[str]]:
    """6 real medical cuts with their audio copied to ``tmp``: the 3rd one's file deleted, the 5th one's truncated."""
    cuts = []
    for i, cut in enumerate(CutSet.from_file(corpus / "medical_test_cuts.jsonl").subset(first=6)):
        rec = cut.recording
        path = tmp / f"{cut.id}.flac"
        shutil.copy(rec.sources[0].source, path)
        if i == 2:
            path.unlink()
        if i == 4:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        sup = cut.supervisions[0]
        custom = dict(sup.custom)
        if plain_entities:
            custom["entities"] = [e["text"] for e in custom["entities"]]
        cut = fastcopy(cut, recording=fastcopy(rec, sources=[fastcopy(rec.sources[0], source=str(path))]),
                       supervisions=[fastcopy(sup, custom=custom)])
        cuts.append(cut)
    manifest = tmp / "cuts.jsonl"
    CutSet(cuts).to_file(manifest)
    return manifest, [c.id for c in cuts]


def run_eval(nemo, manifest, out, nproc: int = 1) -> str:
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    args = [sys.executable, *launch, str(ROOT / "examples/jstip_eval.py"), f"model={nemo}", f"data.manifest={manifest}",
            f"output_dir={out}", "max_new_tokens=4", "qa.max_new_tokens=4", "data.max_tokens=400"]
    proc = subprocess.run(args, cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def check_accounts(out: Path, ids: list[str]) -> dict:
    metrics = strict_json(out / "metrics.json")
    rows = [json.loads(line) for line in (out / "hypotheses.jsonl").read_text().splitlines()]
    assert metrics["num_utterances"] == 4 and metrics["num_skipped"] == 2 and metrics["num_cuts"] == 6
    assert [r["cut_id"] for r in rows] == [i for k, i in enumerate(ids) if k not in (2, 4)]  # manifest order
    assert set(metrics["skipped"]) == {ids[2], ids[4]}
    assert metrics["skipped"][ids[2]].startswith("missing_audio: no such audio file")
    assert metrics["skipped"][ids[4]].startswith("unreadable_audio: ") and f"{ids[4]}.flac" in metrics["skipped"][ids[4]]
    assert metrics["skipped_by_reason"] == {"missing_audio": 1, "unreadable_audio": 1}
    assert metrics["wer_covers"].startswith("4 of 6 cuts") and metrics["wer_utterances"] == 4
    assert metrics["wer"] is not None and metrics["entity_accuracy"] is not None and metrics["entity_mentions"] > 4
    assert not list(out.glob("hypotheses.dp*.jsonl"))
    return metrics


def test_eval_accounts_for_every_cut(tiny_corpus, good_nemo, tmp_path):
    manifest, ids = six_cuts(tiny_corpus, tmp_path)
    report = run_eval(good_nemo, manifest, tmp_path / "eval")
    metrics = check_accounts(tmp_path / "eval", ids)
    assert set(metrics["entity_accuracy_by_type"]) >= {"drug"}
    assert "## Skipped cuts (2)" in report and ids[2] in report


def test_eval_data_parallel_with_plain_string_entities(tiny_corpus, good_nemo, tmp_path):
    """Two real processes (gloo), each decoding a share; rank 0 writes one metrics.json. Entities as plain strings
    (untyped: in the overall accuracy, not in the per-type one)."""
    manifest, ids = six_cuts(tiny_corpus, tmp_path, plain_entities=True)
    run_eval(good_nemo, manifest, tmp_path / "eval", nproc=2)
    metrics = check_accounts(tmp_path / "eval", ids)
    assert metrics["entity_accuracy_by_type"] == {}


def write_cuts(tiny_corpus, tmp_path, change) -> Path:
    cuts = list(CutSet.from_file(tiny_corpus / "medical_test_cuts.jsonl").subset(first=3))
    cuts[1] = change(cuts[1])
    path = tmp_path / "cuts.jsonl"
    CutSet(cuts).to_file(path)
    return path


def with_custom(**kw):
    return lambda c: fastcopy(c, supervisions=[fastcopy(c.supervisions[0], custom={**c.supervisions[0].custom, **kw})])


@pytest.mark.parametrize("change, message", [
    (with_custom(entities=["ramipril", 5]), r"supervisions\[0\].custom\['entities'\]\[1\] must be a non-empty string"),
    (with_custom(entities="ramipril"), r"custom\['entities'\] must be a list"),
    (with_custom(entities=[{"type": "drug"}]), r"\[0\] must be a non-empty string or a dict with a non-empty 'text'"),
    (with_custom(entities=[{"text": "x", "type": 3}]), r"\['type'\] must be a string"),
    (with_custom(domain=["medical"]), r"custom\['domain'\] must be a string"),
    (with_custom(answers="paris"), r"supervisions\[0\].custom\['answers'\] must be a list of non-empty strings"),
    (lambda c: fastcopy(c, id="medical-test-00000"), "the id appears twice"),
])
def test_annotations_are_checked_before_decoding(tiny_corpus, tmp_path, change, message):
    path = write_cuts(tiny_corpus, tmp_path, change)
    with pytest.raises(ValueError, match=message) as e:
        ev.check_manifest(path)
    assert str(path) in str(e.value)
    if "twice" not in message:
        assert "cut medical-test-00001" in str(e.value)


def test_plain_string_entities_pass_the_check(tiny_corpus, tmp_path):
    path = write_cuts(tiny_corpus, tmp_path, with_custom(entities=["ramipril", {"text": "doctor osei"}]))
    assert ev.check_manifest([path]) == [f"medical-test-0000{i}" for i in range(3)]


def test_bad_manifest_line_is_named(tiny_corpus, tmp_path):
    path = tmp_path / "cuts.jsonl"
    lines = (tiny_corpus / "medical_test_cuts.jsonl").read_text().splitlines()[:4]
    path.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=f"{path}:3: not a JSON object"):
        ev.check_manifest(path)


def test_no_references_give_no_wer_and_strict_json(tmp_path):
    rows = [{"cut_id": f"c{i}", "reference": "", "hypothesis": "some words", "domain": "general",
             "entities": ["words"]} for i in range(3)]
    metrics = ev.write_outputs(rows, 12.0, tmp_path, skipped={"c9": "too_long: asr item of 900 tokens > 400"})
    on_disk = strict_json(tmp_path / "metrics.json")
    assert on_disk == metrics
    assert metrics["wer"] is None and metrics["wer_note"].startswith("not computable")
    assert metrics["wer_utterances"] == 0 and metrics["num_cuts"] == 4 and metrics["num_skipped"] == 1
    assert metrics["wer_covers"].startswith("0 of 4 cuts") and "3 decoded without a reference" in metrics["wer_covers"]
    assert metrics["entity_accuracy"] == 1.0 and metrics["skipped_by_reason"] == {"too_long": 1}


def test_hypotheses_are_written_as_decoded(monkeypatch, tmp_path):
    """A crash in the second batch leaves the first batch's rows on disk."""

    class Loader(list):
        sampler = type("S", (), {"dropped": {}})()

    def batch(ids, dropped=None):
        import torch

        return {"cut_ids": ids, "texts": ["a b"] * len(ids), "domains": [None] * len(ids), "entities": [[]] * len(ids),
                "audio_lens": torch.tensor([16000] * len(ids)), "dropped": dropped or {}}

    def decode(model, loader, max_new_tokens):
        yield batch(["c0", "c1"], {"c2": "missing_audio: no such audio file x.flac"}), ["a b", "a"]
        raise RuntimeError("out of memory")

    model = type("M", (), {"frame_spec": type("F", (), {"sample_rate": 16000})()})()
    monkeypatch.setattr(ev, "eval_loader", lambda *a, **k: Loader())
    monkeypatch.setattr(ev, "_decode", decode)
    skipped = {}
    with pytest.raises(RuntimeError, match="out of memory"):
        ev.transcribe(model, "unused.jsonl", skipped=skipped, stream_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "hypotheses.jsonl").read_text().splitlines()]
    assert [r["cut_id"] for r in rows] == ["c0", "c1"] and rows[1]["hypothesis"] == "a"
    assert skipped == {"c2": "missing_audio: no such audio file x.flac"}

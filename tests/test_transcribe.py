"""``JSTIPModel.transcribe`` and examples/jstip_transcribe.py on real corpus audio: file paths at other rates and
channel counts, a CutSet, and broken files among good ones."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet, Recording

from nemo_jstip.parallel.dist import spawn
from nemo_jstip.transcribe import _prepare, expand_inputs

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def audio_files(tiny_corpus, tmp_path_factory):
    """Three corpus cuts' audio as: 16 kHz mono wav (as is), 8 kHz flac, 16 kHz stereo wav (both channels the
    same), plus a truncated flac, a text file named .wav and a missing path."""
    out = tmp_path_factory.mktemp("audio")
    cuts = CutSet.from_file(tiny_corpus / "general_test_cuts.jsonl").to_eager()
    first, second, third = cuts[0], cuts[1], cuts[2]
    a = first.load_audio()[0]
    sf.write(out / "mono.wav", a, 16000)
    sf.write(out / "low.flac", second.resample(8000).load_audio()[0], 8000)
    sf.write(out / "stereo.wav", np.stack([a, a], axis=1), 16000)
    data = (out / "low.flac").read_bytes()  # FLAC states its length (a cut-off WAV reads as a shorter file)
    (out / "truncated.flac").write_bytes(data[: len(data) // 2])
    (out / "notes.wav").write_text("not audio\n")
    return {"cuts": CutSet.from_cuts([first, second, third]), "dir": out,
            "paths": [out / "mono.wav", out / "low.flac", out / "stereo.wav", out / "truncated.flac",
                      out / "notes.wav", out / "missing.wav"]}


def test_prepare_resamples_and_downmixes(audio_files):
    low = _prepare(Recording.from_file(audio_files["dir"] / "low.flac").to_cut(), 16000)
    assert low.sampling_rate == 16000 and low.load_audio().shape == (1, low.num_samples)
    stereo = Recording.from_file(audio_files["dir"] / "stereo.wav").to_cut()
    assert stereo.num_channels == 2
    mono = _prepare(stereo, 16000)
    np.testing.assert_allclose(mono.load_audio()[0], sf.read(audio_files["dir"] / "mono.wav", dtype="float32")[0],
                               atol=1e-4)
    with pytest.raises(Exception, match="truncated|samples|load"):
        _prepare(Recording.from_file(audio_files["dir"] / "truncated.flac").to_cut(), 16000)


def test_expand_inputs(audio_files, tiny_corpus, tmp_path):
    assert expand_inputs(str(audio_files["dir"])) == sorted(
        str(p) for p in audio_files["paths"][:5])
    assert isinstance(expand_inputs(str(tiny_corpus / "general_test_cuts.jsonl")), CutSet)
    nemo = tmp_path / "nemo_manifest.json"
    nemo.write_text(json.dumps({"audio_filepath": "a.wav", "duration": 1.0, "text": "x"}) + "\n")
    assert expand_inputs(str(nemo)) == [str(tmp_path / "a.wav")]


def _transcribe(nemo: str, paths: list[str], cuts_path: str) -> dict:
    from nemo_jstip.models.jstip_model import JSTIPModel
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel()
    model = JSTIPModel.restore_from(nemo).train()
    files = model.transcribe(paths, batch_size=2, max_new_tokens=6)
    cuts = model.transcribe(CutSet.from_file(cuts_path), batch_size=3, max_new_tokens=6)
    return {"files": [vars(r) for r in files], "cuts": [vars(r) for r in cuts], "training": model.training}


def test_transcribe_paths_and_cutset(good_nemo, audio_files, tmp_path):
    cuts_path = tmp_path / "cuts.jsonl"
    audio_files["cuts"].to_file(cuts_path)
    (got,) = spawn(_transcribe, 1, str(good_nemo), [str(p) for p in audio_files["paths"]], str(cuts_path),
                   timeout_s=300)
    files, cuts = got["files"], got["cuts"]
    assert [r["audio"] for r in files] == [str(p) for p in audio_files["paths"]]  # input order, one result each
    assert [r["id"] for r in cuts] == list(audio_files["cuts"].ids)
    mono, low, stereo, truncated, notes, missing = files
    for r in (mono, low, stereo, *cuts):
        assert r["error"] is None and r["text"], r
    for r in (truncated, notes, missing):  # named, the rest still transcribed
        assert r["text"] == "" and r["error"].startswith(r["audio"]), r
    # the same audio gives the same hypothesis: a file and its cut; a stereo copy after the downmix
    assert mono["text"] == cuts[0]["text"] == stereo["text"]
    assert [r["reference"] for r in cuts] == [c.supervisions[0].text for c in audio_files["cuts"]]
    assert mono["reference"] is None
    assert got["training"]  # the caller's mode is given back


def test_transcribe_script(good_nemo, audio_files, tmp_path):
    out = tmp_path / "hyps.jsonl"
    run = subprocess.run([sys.executable, str(ROOT / "examples/jstip_transcribe.py"), f"model={good_nemo}",
                          f"audio={audio_files['dir']}", f"output={out}", "max_new_tokens=4"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["audio"]).name for r in rows] == ["low.flac", "mono.wav", "notes.wav", "stereo.wav", "truncated.flac"]
    errors = {Path(r["audio"]).name for r in rows if r["error"]}
    assert errors == {"notes.wav", "truncated.flac"}
    assert "2 of 5 inputs could not be read" in run.stdout + run.stderr


def test_transcribe_script_on_a_manifest_prints_the_reference(good_nemo, tiny_corpus, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "examples/jstip_transcribe.py"), f"model={good_nemo}",
                          f"audio={tiny_corpus / 'general_test_cuts.jsonl'}", "limit=1", "max_new_tokens=4"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    first = next(iter(CutSet.from_file(tiny_corpus / "general_test_cuts.jsonl")))
    assert f"  reference:  {first.supervisions[0].text}" in run.stdout and run.stdout.count("hypothesis:") == 1

"""Bad files name the file and the line: a broken manifest line, a line that is not a cut, non-UTF-8 text; on
copies of real tiny-corpus files."""
import pytest
from lhotse import CutSet

from nemo_jstip.data.manifest import InputFileError, ManifestCuts, check_text_file
from nemo_jstip.data.nemo_types import build_dataloader
from nemo_jstip.data.frames import FrameSpec


def broken_copy(src, dst, line: int, text: str):
    lines = src.read_text().splitlines()
    lines[line - 1] = text
    dst.write_text("\n".join(lines) + "\n")
    return dst


def test_manifest_reads_like_lhotse_and_names_a_bad_line(tiny_corpus, tmp_path):
    src = tiny_corpus / "general_train_cuts.jsonl"
    assert [c.to_dict() for c in ManifestCuts(src)] == [c.to_dict() for c in CutSet.from_file(src)]
    line = src.read_text().splitlines()[6]
    cases = {"cut with a missing comma": (line.replace(', "', ' "', 1), r":7: not a JSON object \(Expecting ',' delimiter at column \d+\)"),
             "a JSON list": ("[1, 2]", r":7: not a Lhotse cut \(TypeError: a JSON list\)"),
             "a dict that is no cut": ('{"type": "MonoCut", "id": "x"}', r":7: not a Lhotse cut \(")}
    for name, (text, error) in cases.items():
        bad = broken_copy(src, tmp_path / "cuts.jsonl", 7, text)
        cuts = ManifestCuts(bad)
        with pytest.raises(InputFileError, match=f"{bad}{error}"):
            list(cuts)
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such cut manifest"):
        ManifestCuts(tmp_path / "nope.jsonl")


def test_bad_manifest_line_fails_before_training(tiny_corpus, tmp_path, jstip_tokenizer):
    """The sampler reads the first items to estimate its buckets when the loader is built: a bad line there is
    found then, named by file and line, not inside the first training step."""
    bad = broken_copy(tiny_corpus / "general_train_cuts.jsonl", tmp_path / "cuts.jsonl", 9, '{"id": "truncated", "dur')
    cfg = {"input_cfg": [{"type": "jstip_cuts", "cuts_path": str(bad), "kind": "asr"}],
           "sampler": {"max_tokens": 4096, "num_buckets": 2}}
    with pytest.raises(InputFileError, match=f"{bad}:9: not a JSON object"):
        build_dataloader(cfg, jstip_tokenizer, FrameSpec())


def test_non_utf8_text_file_names_file_and_line(tiny_corpus, tmp_path, jstip_tokenizer):
    text = tmp_path / "domain.txt"
    lines = (tiny_corpus / "medical_text.txt").read_bytes().splitlines()
    text.write_bytes(b"\n".join(lines[:4] + ["caf\u00e9 au lait".encode("cp1252")] + lines[4:]) + b"\n")
    assert check_text_file(tiny_corpus / "medical_text.txt") == len(lines)
    with pytest.raises(InputFileError, match=f"{text}:5: not UTF-8 text"):
        check_text_file(text)
    cfg = {"input_cfg": [{"type": "jstip_cuts", "cuts_path": str(tiny_corpus / "general_train_cuts.jsonl"),
                          "kind": "asr"}, {"type": "jstip_text", "paths": str(text)}],
           "sampler": {"max_tokens": 4096, "num_buckets": 1}}
    with pytest.raises(InputFileError, match=f"{text}:5: not UTF-8 text"):
        build_dataloader(cfg, jstip_tokenizer, FrameSpec())

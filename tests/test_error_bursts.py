"""``benchmarks/error_bursts.py``: per-utterance error counts and the burst table over seeds, from run folders."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("error_bursts", ROOT / "benchmarks" / "error_bursts.py")
error_bursts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(error_bursts)


def test_utterance_errors_and_bursts():
    rows = [dict(reference="the cat sat on the mat", hypothesis="the cat sat on the mat"),
            dict(reference="the cat sat on the mat", hypothesis="a dog ran off the mat and away"),  # 4 sub + 2 ins
            dict(reference="one two three", hypothesis="one three")]  # 1 deletion
    errors = error_bursts.utterance_errors(rows)
    assert errors == [0, 6, 1]
    assert error_bursts.bursts(errors, 4) == dict(errors=7, bursts=1, in_bursts=6, elsewhere=1)
    assert error_bursts.bursts(errors, 1) == dict(errors=7, bursts=2, in_bursts=7, elsewhere=0)


def test_table_means_over_seeds_for_one_domain(tmp_path, capsys):
    hyps = {2: ["a b c d e", "x"], 3: ["a b c d e", "a b c d e"]}  # seed 2: one burst of 5 errors
    for seed, (h_gen, h_med) in hyps.items():
        d = tmp_path / f"joint_6k_s{seed}" / "eval_test"
        d.mkdir(parents=True)
        rows = [dict(reference="p q r s t", hypothesis=h_gen, domain="general"),
                dict(reference="a b c d e", hypothesis=h_med, domain="medical")]
        (d / "hypotheses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    error_bursts.main(["--out", str(tmp_path), "--seeds", "2,3", "--systems", "joint@6k,asr_only@6k",
                       "--splits", "dev,test"])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| test")]
    assert lines == ["| test | joint@6k | 2 | 1 | 5.0 ± 0.0 | 1.0 ± 0.0 | 5.0 ± 0.0 | 0.0 ± 0.0 |"]
    error_bursts.main(["--out", str(tmp_path), "--seeds", "2,3", "--systems", "joint@6k", "--domain", "medical"])
    out = capsys.readouterr().out
    assert "| test | joint@6k | 2 | 1 | 2.5 ± 3.5 | 0.5 ± 0.7 | 2.5 ± 3.5 | 0.0 ± 0.0 |" in out

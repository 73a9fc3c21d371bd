"""Plots and the comparison table from fake evaluation outputs and a real TensorBoard event file."""
import json

import pytest

from nemo_jstip.evaluate import write_outputs
from nemo_jstip.plots import main, read_scalars


def fake_metrics(entity, qa, qa_text):
    return {"num_utterances": 10, "wer": 0.2, "entity_accuracy": entity, "num_qa": 4, "qa_accuracy": qa,
            "qa_text_accuracy": qa_text,
            "domains": {"medical": {"num_utterances": 5, "wer": 0.1, "entity_accuracy": entity},
                        "general": {"num_utterances": 5, "wer": 0.3, "entity_accuracy": None}}}


@pytest.fixture(scope="module")
def tb_log(tmp_path_factory):
    from torch.utils.tensorboard import SummaryWriter

    log = tmp_path_factory.mktemp("tb") / "jstip" / "2026-01-01_00-00-00"
    with SummaryWriter(log) as w:
        for step in range(0, 30, 5):
            w.add_scalar("train_loss", 6.0 - 0.1 * step, step)
            w.add_scalar("lr", 1e-3, step)
        w.add_scalar("val_loss", 4.0, 29)
    return log.parent


def test_read_scalars_from_events_and_csv(tb_log, tmp_path):
    curves = read_scalars(tb_log)
    assert [s for s, _ in curves["train_loss"]] == [0, 5, 10, 15, 20, 25] and curves["val_loss"] == [(29, 4.0)]
    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss,val_loss\n0,9,5.5,\n0,9,,4.5\n0,19,5.0,\n")
    assert read_scalars(tmp_path) == {"train_loss": [(9, 5.5), (19, 5.0)], "val_loss": [(9, 4.5)]}


def test_compare_cli_writes_plots_and_table(tb_log, tmp_path):
    for name, m in {"asr": fake_metrics(0.25, 0.0, 0.5), "jstip": fake_metrics(0.5, 0.25, 0.75)}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    out = tmp_path / "cmp"
    md = main([f"asr={tmp_path / 'asr'}", str(tmp_path / "jstip"), "--logs", f"jstip={tb_log}", "--out", str(out)])
    for png in ("entity_accuracy.png", "qa_accuracy.png", "loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 5000
        assert f"({png})" in md.read_text()
    text = md.read_text()
    assert ("| system | utterances | WER % | general WER % | medical WER % | entity acc % | medical entity acc % "
            "| QA % | QA text % |") in text
    assert "| jstip | 10 | 20.0 | 30.0 | 10.0 | 50.0 | 50.0 | 25.0 | 75.0 |" in text and "| asr |" in text


def test_report_references_its_plots(tb_log, tmp_path):
    rows = [
        {"cut_id": "m", "reference": "give metformin", "hypothesis": "give metformin", "domain": "medical",
         "entities": [{"text": "metformin", "type": "drug"}]},
        {"cut_id": "q", "reference": "what color is grass", "hypothesis": "what color is grass", "domain": "qa",
         "entities": [], "question": "what color is grass", "answers": ["green"], "answer": "blue",
         "answer_text": "green"},
    ]
    metrics = write_outputs(rows, 10.0, tmp_path, name="t", log_dir=tb_log)
    assert metrics["qa_accuracy"] == 0.0 and metrics["qa_text_accuracy"] == 1.0 and metrics["num_qa"] == 1
    report = (tmp_path / "report.md").read_text()
    assert "| text (upper bound) | 1 | 100.0 |" in report and "blue (wrong)" in report
    for png in ("entity_accuracy.png", "qa_accuracy.png", "loss.png"):
        assert (tmp_path / png).stat().st_size > 0 and f"({png})" in report

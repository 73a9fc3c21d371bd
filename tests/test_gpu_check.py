"""benchmarks/gpu_check.sh (the prepared single-GPU run) without a GPU: its record step assembles gpu_check.json from a
finished run's files.
The whole script at tiny size on the CPU is `bash benchmarks/gpu_check.sh OUT --dry-run` (minutes; needs the carried
corpus, see docs/perf.md)."""
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks/gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _finished_run(work: Path, out: Path) -> None:
    """The files a GPU run leaves: junit XML, bench JSON, two TensorBoard runs (steps 0-19, then 20-29), eval."""
    from torch.utils.tensorboard import SummaryWriter

    (work / "junit.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.a" name="test_ok"/><testcase classname="tests.a" name="test_ok2"/>'
        '<testcase classname="tests.b" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.c" name="test_err"><error message="y"/></testcase>'
        '<testcase classname="tests.c" name="test_skip"><skipped message="z"/></testcase>'
        "</testsuite></testsuites>")
    result = {"config": "local-bf16-params", "label": "local-bf16-params 8x1x2048", "step_ms": 364.5,
              "tokens_per_s": 44945.2, "mfu": 0.302, "mfu_pct": 30.2, "peak_mem_gib": 49.1, "tflops_per_s": 298.0,
              "warmup_s": 4.0}
    (work / "bench_1_plain.json").write_text(json.dumps(
        {"device": "NVIDIA H200", "results": [result, {"config": "te-bf16-params", "skipped": "no TE"}]}))
    for first, last, loss in ((0, 19, 12.0), (20, 29, 9.0)):
        writer = SummaryWriter(str(work / f"exp/jstip_gpu_1b/version_{first}"))
        for step in range(first, last + 1):
            writer.add_scalar("train_loss", loss - 0.1 * (step - first), step)
        writer.close()
        os.utime(next((work / f"exp/jstip_gpu_1b/version_{first}").iterdir()), (first, first))  # oldest first
    (work / "eval").mkdir()
    (work / "eval/metrics.json").write_text(json.dumps({"num_utterances": 6, "wer": 1.0, "rtfx": 50.0}))
    (work / "eval/hypotheses.jsonl").write_text(json.dumps({"cut_id": "a", "hypothesis": "x", "reference": "y"}) + "\n")
    (work / "steps.tsv").write_text("tests\t0\t120\ntrain_to_20\t0\t70\n")
    (out / "train.log").write_text("...\nPEAK_MEM_GIB 38.25\n...\nPEAK_MEM_GIB 40.50\n")


def test_record_from_a_finished_run(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    _finished_run(work, out)
    env = os.environ | {"PY": sys.executable, "GPU_CHECK_WORK": str(work), "GPU_CHECK_COMMIT": "abc1234"}
    run = subprocess.run(["bash", str(SCRIPT), str(out), "--record-only"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rec = json.loads((out / "gpu_check.json").read_text())
    assert {"date", "device", "commit", "tests", "bench", "train_1b"} <= set(rec) and rec["commit"] == "abc1234"
    assert rec["tests"] | {"failed_ids": None} == {"passed": 2, "failed": 1, "errors": 1, "skipped": 1,
                                                   "failed_ids": None, "interrupted": False}
    assert rec["tests"]["failed_ids"] == ["tests.b::test_bad", "tests.c::test_err"]
    assert rec["bench"][0] == {"config": "local-bf16-params 8x1x2048", "step_ms": 364.5, "tokens_per_s": 44945,
                               "mfu": 0.302, "peak_mem_gib": 49.1, "tflops_per_s": 298.0, "warmup_s": 4.0}
    assert rec["bench"][1] == {"config": "te-bf16-params", "skipped": "no TE"}
    train = rec["train_1b"]
    assert (train["steps"], train["resumed"], train["steps_per_run"]) == (30, True, [[0, 19], [20, 29]])
    assert (train["loss_first"], train["loss_last"], train["peak_mem_gib"]) == (12.0, 8.1, 40.5)
    assert rec["eval"] == {"num_utterances": 6, "wer": 1.0, "rtfx": 50.0}
    assert rec["steps"]["train_to_20"] == {"exit": 0, "seconds": 70}
    assert json.loads((out / "eval.json").read_text())["hypotheses"][0]["cut_id"] == "a"

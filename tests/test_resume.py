"""Exact resume: a training run SIGKILLed while it writes a checkpoint, started again with the same command,
continues the uninterrupted run's loss curve exactly (weights, optimizer, LR schedule, RNG and sampler restored, the
half-written checkpoint ignored)."""
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nemo_jstip.prep.tokenizer import main as make_tokenizer
from tests.test_examples import ROOT, TINY

# Runs examples/jstip_train.py, SIGKILLing itself inside the step-6 checkpoint save (its shards written, the
# folder not yet in place): what a preemption during a save looks like.
KILL_IN_STEP6_SAVE = """
import os, runpy, signal, sys, torch
saves, real_save = [], torch.save
def save(obj, *args, **kwargs):
    if isinstance(obj, dict) and "layout" in obj:  # rank 0's trainer state, the last file of a checkpoint
        saves.append(1)
        if len(saves) == 3:  # step 3 wrote two files (periodic, last); die in the step-6 one
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, *args, **kwargs)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _train(corpus, exp_dir, *extra, kill_in_step6_save=False):
    args = [str(ROOT / "examples/jstip_train.py"), f"data.corpus_dir={corpus}", f"exp_manager.exp_dir={exp_dir}",
            "model_out=null", "trainer.max_steps=7", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=3", "model.train_ds.loader.num_workers=1",
            "model.train_ds.sampler.max_tokens=1024", *TINY, *extra]
    cmd = [sys.executable, "-c", KILL_IN_STEP6_SAVE, *args] if kill_in_step6_save else [sys.executable, *args]
    exp_dir.mkdir(parents=True, exist_ok=True)
    # output to a file, not a pipe: a SIGKILLed run leaves helper processes (dist-checkpointing's multiprocessing
    # manager) that would hold a pipe open; its own process group is cleaned up afterwards
    with open(exp_dir / "stdout.log", "a+") as out, open(exp_dir / "stderr.log", "a+") as err:
        proc = subprocess.Popen(cmd, cwd=exp_dir.parent, stdout=out, stderr=err, start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, code, "", err.read())


def _losses(exp_dir) -> list[dict[int, float]]:
    """train_loss by step, one dict per run (TensorBoard event file), oldest first."""
    runs = []
    for f in sorted(Path(exp_dir).rglob("events.out.tfevents*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(f))
        acc.Reload()
        runs.append({e.step: e.value for e in acc.Scalars("train_loss")} if "train_loss" in acc.Tags()["scalars"] else {})
    return runs


def test_sigkill_during_save_then_resume_continues_exactly(tiny_corpus, tmp_path):
    make_tokenizer([f"corpus_dir={tiny_corpus}", "vocab_size=300"])
    ref = _train(tiny_corpus, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-4000:]
    (reference,) = _losses(tmp_path / "ref")
    assert sorted(reference) == list(range(7))

    killed = _train(tiny_corpus, tmp_path / "run", kill_in_step6_save=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    ckpts = tmp_path / "run" / "jstip_tiny" / "checkpoints"
    assert list(ckpts.glob(".*step=6*.partial"))  # the save that was killed: staged, never put in place
    assert not [c for c in ckpts.glob("*step=6*") if c.is_dir() and not c.name.startswith(".")]

    resumed = _train(tiny_corpus, tmp_path / "run")  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    _, second = _losses(tmp_path / "run")  # the killed run's own log is cut short (TensorBoard flushes lazily)
    assert sorted(second) == [3, 4, 5, 6]  # continued from the step-3 checkpoint, not from scratch, not from step 6
    for step, loss in second.items():
        assert loss == reference[step], (step, loss, reference[step])


def test_tensor_parallel_run_resumes_exactly(tiny_corpus, tmp_path):
    """TP=2 under Lightning (2 gloo processes): rank 0 gathers both shards into the checkpoint, each rank takes its
    own back, and the resumed run's losses equal an uninterrupted run's."""
    make_tokenizer([f"corpus_dir={tiny_corpus}", "vocab_size=300"])
    tp2 = ["trainer.devices=2", "trainer.accelerator=cpu", "strategy.tensor_model_parallel_size=2",
           "exp_manager.checkpoint_callback_params.every_n_train_steps=2", "model.train_ds.loader.num_workers=0"]
    for exp, steps in (("ref", 4), ("run", 2), ("run", 4)):  # "run": stop at step 2, then the same command to 4
        out = _train(tiny_corpus, tmp_path / exp, *tp2, f"trainer.max_steps={steps}")
        assert out.returncode == 0, out.stderr[-4000:]
    (reference,) = _losses(tmp_path / "ref")
    first, second = _losses(tmp_path / "run")
    assert sorted(reference) == [0, 1, 2, 3] and sorted(first) == [0, 1] and sorted(second) == [2, 3]
    for step, loss in {**first, **second}.items():
        assert loss == reference[step], (step, loss, reference[step])


def test_resume_at_another_layout(tiny_corpus, tmp_path):
    """Stopped at step 2 at TP=2 (2 processes), the same command at TP=1 (so DP=2) continues at step 2: the
    checkpoint is a folder of shards, resharded on load; the training sampler continues in the same epoch."""
    make_tokenizer([f"corpus_dir={tiny_corpus}", "vocab_size=300"])
    common = ["trainer.devices=2", "trainer.accelerator=cpu", "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
              "model.train_ds.loader.num_workers=0"]
    first = _train(tiny_corpus, tmp_path / "run", *common, "strategy.tensor_model_parallel_size=2", "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-4000:]
    step2 = tmp_path / "run" / "jstip_tiny" / "checkpoints" / "jstip_tiny--step=2-last"
    assert (step2 / "weights" / ".metadata").is_file() and len(list(step2.glob("rank_*.pt"))) == 2
    second = _train(tiny_corpus, tmp_path / "run", *common, "strategy.tensor_model_parallel_size=1", "trainer.max_steps=4")
    assert second.returncode == 0, second.stderr[-4000:]
    log = (tmp_path / "run" / "stdout.log").read_text() + second.stderr
    assert "parallel layout: tp=1 pp=1 cp=1 dp=2 sequence_parallel=False distributed_optimizer=False" in log
    assert "saved at parallel layout: tp=2 pp=1 cp=1 dp=1" in log and "resharding" in log
    _, resumed = _losses(tmp_path / "run")
    assert sorted(resumed) == [2, 3]

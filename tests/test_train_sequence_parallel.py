"""``strategy.sequence_parallel=true`` from the command line: a TP=2 Lightning run (2 gloo processes) logs the
layout with sequence parallelism, pads its batches to a multiple of TP, and logs the losses of the same run
without it."""
from nemo_jstip.prep.tokenizer import main as make_tokenizer
from tests.test_resume import _losses, _train


def test_sequence_parallel_run_logs_the_losses_of_tp2(tiny_corpus, tmp_path):
    make_tokenizer([f"corpus_dir={tiny_corpus}", "vocab_size=300"])
    tp2 = ["trainer.devices=2", "trainer.accelerator=cpu", "strategy.tensor_model_parallel_size=2",
           "trainer.max_steps=3", "model.train_ds.loader.num_workers=0"]
    losses = {}
    for name, sp in (("sp", "true"), ("plain", "false")):
        out = _train(tiny_corpus, tmp_path / name, *tp2, f"strategy.sequence_parallel={sp}")
        assert out.returncode == 0, out.stderr[-4000:]
        log = (tmp_path / name / "stdout.log").read_text() + out.stderr
        assert f"parallel layout: tp=2 pp=1 cp=1 dp=1 sequence_parallel={sp.title()} " in log
        assert ("dataset.pad_to_multiple 1 -> 2" in log) == (sp == "true")
        (losses[name],) = _losses(tmp_path / name)
    assert sorted(losses["sp"]) == [0, 1, 2]
    for step, loss in losses["plain"].items():
        assert abs(losses["sp"][step] - loss) <= 1e-5 * loss, (step, losses["sp"][step], loss)

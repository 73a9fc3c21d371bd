"""A few hundred steps of a tiny model overfit a handful of demo utterances; greedy decoding then reproduces them."""
import torch
from lhotse import CutSet
from omegaconf import OmegaConf

from nemo_jstip.parallel.dist import spawn
from nemo_jstip.prep.tokenizer import train_tokenizer
from tests.conftest import PERCEPTION


def _overfit(cfg: dict, manifest: str, steps: int) -> list[dict]:
    from nemo_jstip.evaluate import transcribe
    from nemo_jstip.models.jstip_model import JSTIPModel

    torch.manual_seed(0)
    cfg = OmegaConf.create(cfg)
    model = JSTIPModel(cfg)
    model.setup_training_data(cfg.train_ds)
    model.setup_optimization(cfg.optim)
    # the LR falls to 0 over the last third: each step draws new interleavings of the four cuts (mode mixed), and
    # at a constant LR the last step's model is wherever that step's draw put it
    decay = torch.optim.lr_scheduler.LambdaLR(model._optimizer, lambda s: min(1.0, 3 * (1 - s / steps)))
    batches, losses = iter(model._train_dl), []
    for _ in range(steps):  # what training_step does, without a Trainer
        losses.append(model.engine.train_step([model._to_device(next(batches))])["loss"])
        decay.step()
    rows, _ = transcribe(model, manifest, max_new_tokens=64)
    return losses, rows


def test_overfit_then_decode(tiny_corpus, tmp_path):
    cuts = CutSet.from_file(tiny_corpus / "general_train_cuts.jsonl").subset(first=4)
    manifest = str(tmp_path / "four.jsonl")
    cuts.to_file(manifest)
    train_tokenizer([c.supervisions[0].text for c in cuts], 300, tmp_path / "tok")
    cfg = {
        "tokenizer": {"path": str(tmp_path / "tok")},
        "perception": PERCEPTION,
        "llm": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
                "layer_spec": "local", "train_mode": "full"},
        "interleave": {"mode": "mixed"},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0}, "max_grad_norm": 1.0,
        "train_ds": {"input_cfg": [{"type": "jstip_cuts", "cuts_path": manifest, "kind": "asr", "repeat": True}],
                     "sampler": {"max_tokens": 4096, "num_buckets": 1, "seed": 0}},
    }
    ((losses, rows),) = spawn(_overfit, 1, cfg, manifest, 180, timeout_s=600)
    assert losses[-1] < 0.1 < losses[0] / 10
    assert len(rows) == 4
    for r in rows:
        assert r["hypothesis"] == r["reference"], r

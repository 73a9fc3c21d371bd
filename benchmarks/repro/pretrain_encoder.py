"""CTC-pretrain the speech encoder on the general ASR data: the acoustic prior of the small-scale reproduction.

    python -m benchmarks.repro.pretrain_encoder corpus_dir=data/demo_corpus [out=FILE.nemo] [steps=1500 ...]

JSTIP starts from a pretrained speech encoder (the paper's is a CTC/RNNT-trained Conformer); trained from scratch
inside the speech-LLM, our tiny encoder never learns to listen within the steps a 2-core CPU affords (the LLM's
text prior wins, docs/results.md, "Settings chosen on dev"). So, as with the LLM, the encoder is pretrained here: NeMo's own ``EncDecCTCModel``
(character vocabulary) with exactly the recipe's preprocessor and encoder, trained by Lightning on the general
training cuts only (no domain entity is ever heard), through NeMo's Lhotse dataloading, with SpecAugment. The
.nemo loads into a JSTIP recipe with ``model.perception.init_from_nemo=FILE`` (its config is checked key by key).
``pretrain.json`` next to it holds the greedy CTC WER/CER on every dev set and the time.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

LABELS = list(" abcdefghijklmnopqrstuvwxyz'")  # the corpus transcripts' alphabet (lowercase spoken forms)


@dataclass
class EncoderPretrainConfig:
    corpus_dir: str = "data/demo_corpus"
    out: str | None = None  # default: {corpus_dir}/asr_ctc/asr_ctc.nemo
    recipe: str = "jstip_repro"  # a config under conf/: its model.perception preprocessor/encoder are trained
    seed: int = 0
    threads: int = 2
    steps: int = 4000  # ~6 epochs of the 11 h general_train, 33-43 min on 2 cores; dev WER/CER in docs/results.md
    batch_duration: float = 60.0  # seconds of audio per batch
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 1e-3
    spec_augment: dict = field(default_factory=lambda: dict(freq_masks=2, freq_width=12, time_masks=4, time_width=0.05))
    num_workers: int = 1


def _perception(recipe: str) -> tuple[dict, dict]:
    """The recipe's preprocessor and encoder sections, composed as the training script composes them."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).parents[2] / "conf"), version_base=None):
        p = compose(config_name=recipe).model.perception
    return OmegaConf.to_container(p.preprocessor, resolve=True), OmegaConf.to_container(p.encoder, resolve=True)


def build_model(cfg: EncoderPretrainConfig, corpus: Path, trainer=None):
    from nemo.collections.asr.models import EncDecCTCModel

    pre, enc = _perception(cfg.recipe)
    data = dict(use_lhotse=True, labels=LABELS, sample_rate=pre["sample_rate"], batch_duration=cfg.batch_duration,
                num_workers=cfg.num_workers, seed=cfg.seed, shuffle_buffer_size=2000)
    model_cfg = dict(
        sample_rate=pre["sample_rate"], labels=LABELS,
        preprocessor={"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor", **pre},
        spec_augment={"_target_": "nemo.collections.asr.modules.SpectrogramAugmentation", **cfg.spec_augment},
        encoder={"_target_": "nemo.collections.asr.modules.ConformerEncoder", **enc},
        decoder={"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": enc["d_model"],
                 "num_classes": len(LABELS), "vocabulary": LABELS},
        train_ds={**data, "cuts_path": str(corpus / "general_train_cuts.jsonl"), "shuffle": True},
        validation_ds={**data, "cuts_path": str(corpus / "general_dev_cuts.jsonl"), "shuffle": False},
        optim=dict(name="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, betas=[0.9, 0.98],
                   sched=dict(name="CosineAnnealing", warmup_steps=cfg.warmup, min_lr=cfg.lr / 30)),
    )
    return EncDecCTCModel(OmegaConf.create(model_cfg), trainer=trainer)


def evaluate(model, corpus: Path) -> dict:
    """Greedy CTC WER/CER on every dev set (never a test set)."""
    from lhotse import CutSet
    from nemo.collections.asr.metrics.wer import word_error_rate

    from nemo_jstip.metrics import wer

    out = {}
    model.eval()
    for path in sorted(corpus.glob("*_dev_cuts.jsonl")):
        cuts = CutSet.from_file(path)
        refs = [c.supervisions[0].text for c in cuts]
        hyps = [h.text for h in model.transcribe([c.recording.sources[0].source for c in cuts], batch_size=16,
                                                 verbose=False)]
        out[path.name.removesuffix("_cuts.jsonl")] = {"wer": wer(refs, hyps)["wer"],
                                                      "cer": word_error_rate(hyps, refs, use_cer=True),
                                                      "example": [refs[0], hyps[0]]}
    return out


def pretrain(cfg: EncoderPretrainConfig) -> dict:
    import lightning.pytorch as pl

    torch.set_num_threads(cfg.threads)
    corpus = Path(cfg.corpus_dir)
    out = Path(cfg.out or corpus / "asr_ctc" / "asr_ctc.nemo")
    out.parent.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=cfg.steps, val_check_interval=cfg.steps // 3,
                         check_val_every_n_epoch=None, limit_val_batches=10, log_every_n_steps=50, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0, gradient_clip_val=1.0,
                         default_root_dir=str(out.parent))
    model = build_model(cfg, corpus, trainer)
    t0 = time.time()
    trainer.fit(model)
    train_s = time.time() - t0
    model.save_to(str(out))
    report = {"config": asdict(cfg), "train_seconds": round(train_s, 1),
              "parameters": sum(p.numel() for p in model.encoder.parameters()), "dev": evaluate(model, corpus)}
    (out.parent / "pretrain.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict:
    cfg = OmegaConf.merge(OmegaConf.structured(EncoderPretrainConfig),
                          OmegaConf.from_dotlist(sys.argv[1:] if argv is None else argv))
    report = pretrain(OmegaConf.to_object(cfg))
    for name, m in report["dev"].items():
        print(f"{name:14s} WER {100 * m['wer']:6.1f}%  CER {100 * m['cer']:6.1f}%   e.g. {m['example'][1]!r}")
    print(f"train {report['train_seconds'] / 60:.1f} min, encoder {report['parameters'] / 1e6:.2f}M parameters")
    return report


if __name__ == "__main__":
    main()

"""Evaluate a JSTIP .nemo on a Lhotse manifest: WER, entity accuracy (per domain / type / mention), RTFx, and
zero-shot spoken QA (speech and text-input accuracy) on cuts that carry ``custom.answers``.

    python examples/jstip_eval.py model=PATH.nemo data.manifest=CUTS.jsonl output_dir=DIR [log_dir=TB_DIR]
writes DIR/metrics.json, DIR/hypotheses.jsonl, DIR/report.md and its PNG plots (README "Evaluation").
"""
from pathlib import Path

from nemo.core.config import hydra_runner

from nemo_jstip import JSTIPModel
from nemo_jstip.evaluate import evaluate, write_outputs


@hydra_runner(config_path="../conf", config_name="jstip_eval")
def main(cfg):
    model = JSTIPModel.restore_from(cfg.model)
    rows, rtfx = evaluate(model, cfg.data.manifest, cfg.max_new_tokens, cfg.data.max_tokens, cfg.qa.template,
                          cfg.qa.max_new_tokens)
    metrics = write_outputs(rows, rtfx, cfg.output_dir, name=cfg.get("name", ""), log_dir=cfg.get("log_dir"))
    print(Path(cfg.output_dir, "report.md").read_text())
    return metrics


if __name__ == "__main__":
    main()

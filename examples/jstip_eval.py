"""Evaluate a JSTIP .nemo on a Lhotse manifest: WER, entity accuracy (per domain / type / mention), RTFx.

    python examples/jstip_eval.py model=PATH.nemo data.manifest=CUTS.jsonl output_dir=DIR
writes DIR/metrics.json, DIR/hypotheses.jsonl and DIR/report.md (README "Evaluation").
"""
from pathlib import Path

from nemo.core.config import hydra_runner

from nemo_jstip import JSTIPModel
from nemo_jstip.evaluate import transcribe, write_outputs


@hydra_runner(config_path="../conf", config_name="jstip_eval")
def main(cfg):
    model = JSTIPModel.restore_from(cfg.model)
    rows, rtfx = transcribe(model, cfg.data.manifest, cfg.max_new_tokens, cfg.data.max_tokens)
    metrics = write_outputs(rows, rtfx, cfg.output_dir, name=cfg.get("name", ""))
    print(Path(cfg.output_dir, "report.md").read_text())
    return metrics


if __name__ == "__main__":
    main()

"""Evaluate a JSTIP .nemo on a Lhotse manifest: WER, entity accuracy (per domain / type / mention), RTFx, and
zero-shot spoken QA (speech and text-input accuracy) on cuts that carry ``custom.answers``.

    python examples/jstip_eval.py model=PATH.nemo data.manifest=CUTS.jsonl output_dir=DIR [log_dir=TB_DIR]
writes DIR/metrics.json (with every cut accounted for: ``num_skipped``, ``skipped``), DIR/hypotheses.jsonl
(appended batch by batch while decoding), DIR/report.md and its PNG plots (README "Evaluation").
Data parallel (each process decodes a share): torchrun --nproc_per_node=N examples/jstip_eval.py ...
A model too big for one device: torchrun --nproc_per_node=N examples/jstip_eval.py tensor_model_parallel_size=N ...
(N processes = TP x DP).
"""
from pathlib import Path

import torch
from nemo.core.config import hydra_runner

from nemo_jstip import JSTIPModel
from nemo_jstip.evaluate import evaluate, write_outputs
from nemo_jstip.parallel.dist import init_parallel


@hydra_runner(config_path="../conf", config_name="jstip_eval")
def main(cfg):
    init_parallel(tp=cfg.tensor_model_parallel_size)  # the other factor of the world size is data parallel
    model = JSTIPModel.restore_from(cfg.model)  # resharded to this TP size
    rows, rtfx, skipped = evaluate(model, cfg.data.manifest, cfg.max_new_tokens, cfg.data.max_tokens, cfg.qa.template,
                                   cfg.qa.max_new_tokens, stream_dir=cfg.output_dir)
    if torch.distributed.get_rank() == 0:
        write_outputs(rows, rtfx, cfg.output_dir, name=cfg.get("name", ""), log_dir=cfg.get("log_dir"), skipped=skipped)
        print(Path(cfg.output_dir, "report.md").read_text())


if __name__ == "__main__":
    main()

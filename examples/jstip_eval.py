"""Evaluate a JSTIP .nemo on a Lhotse manifest: WER, entity accuracy (per domain / type / mention), RTFx, and
zero-shot spoken QA (speech and text-input accuracy) on cuts that carry ``custom.answers``.

    python examples/jstip_eval.py model=PATH.nemo data.manifest=CUTS.jsonl output_dir=DIR [log_dir=TB_DIR]
writes DIR/metrics.json, DIR/hypotheses.jsonl, DIR/report.md and its PNG plots (README "Evaluation").
A model too big for one device: torchrun --nproc_per_node=N examples/jstip_eval.py tensor_model_parallel_size=N ...
"""
from pathlib import Path

import torch
from nemo.core.config import hydra_runner

from nemo_jstip import JSTIPModel
from nemo_jstip.evaluate import evaluate, write_outputs
from nemo_jstip.parallel.dist import init_parallel


@hydra_runner(config_path="../conf", config_name="jstip_eval")
def main(cfg):
    init_parallel(tp=cfg.tensor_model_parallel_size)  # one model replica: every process decodes the same batches
    if torch.distributed.get_world_size() != cfg.tensor_model_parallel_size:
        raise ValueError(f"launch exactly tensor_model_parallel_size={cfg.tensor_model_parallel_size} processes")
    model = JSTIPModel.restore_from(cfg.model)  # resharded to this TP size
    rows, rtfx = evaluate(model, cfg.data.manifest, cfg.max_new_tokens, cfg.data.max_tokens, cfg.qa.template,
                          cfg.qa.max_new_tokens)
    if torch.distributed.get_rank() == 0:
        write_outputs(rows, rtfx, cfg.output_dir, name=cfg.get("name", ""), log_dir=cfg.get("log_dir"))
        print(Path(cfg.output_dir, "report.md").read_text())


if __name__ == "__main__":
    main()

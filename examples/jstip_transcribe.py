"""Transcribe audio with a JSTIP .nemo (greedy), as NeMo's ASR models do.

    python examples/jstip_transcribe.py model=PATH.nemo audio=FILE|DIR|MANIFEST [output=FILE.jsonl] [batch_size=8]
        [limit=N]
DIR: its audio files, recursively; MANIFEST: a Lhotse cut manifest or a NeMo manifest (``audio_filepath``).
Any sampling rate (resampled) and channel count (downmixed). Prints each input's hypothesis (and a cut's reference
beside it); ``output`` gets one JSON line per input (``id``, ``audio``, ``text``, ``error``, ``reference``). An
unreadable input gets an error line, the rest are still transcribed. ``limit``: the first N inputs only.
"""
import json
import logging
from pathlib import Path

from lhotse import CutSet
from nemo.core.config import hydra_runner

from nemo_jstip import JSTIPModel
from nemo_jstip.parallel.dist import init_parallel
from nemo_jstip.transcribe import expand_inputs


@hydra_runner(config_path="../conf", config_name="jstip_transcribe")
def main(cfg):
    init_parallel()
    model = JSTIPModel.restore_from(cfg.model)
    inputs = expand_inputs(str(cfg.audio))
    if cfg.limit is not None:
        inputs = inputs.subset(first=cfg.limit) if isinstance(inputs, CutSet) else inputs[: cfg.limit]
    results = model.transcribe(inputs, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.output, "w") as f:
            for r in results:
                f.write(json.dumps(vars(r)) + "\n")
    for r in results:
        print(f"{r.id}\n  hypothesis: {r.text}" if r.error is None else f"{r.id}\n  ERROR {r.error}")
        if r.reference is not None:
            print(f"  reference:  {r.reference}")
    if failed := sum(r.error is not None for r in results):
        logging.warning(f"{failed} of {len(results)} inputs could not be read (their lines say why)")


if __name__ == "__main__":
    main()

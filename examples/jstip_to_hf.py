"""Export a JSTIP .nemo for Hugging Face and NeMo users: the LLM as a HF folder (LoRA merged, tokenizer with JSTIP's
added tokens), the preprocessor + encoder as a NeMo ASR-style .nemo, the adapter, and a README on how they fit.

    python examples/jstip_to_hf.py model=PATH.nemo output_dir=DIR

One process: the .nemo is restored at TP=1 (from any saved layout), so the whole model is in this process's memory.
"""
import sys

from omegaconf import OmegaConf

from nemo_jstip import JSTIPModel
from nemo_jstip.models.export import export_to_hf
from nemo_jstip.parallel.dist import init_parallel


def main(argv: list[str]) -> None:
    args = OmegaConf.from_cli(argv)
    if not (args.get("model") and args.get("output_dir")):
        raise SystemExit(__doc__)
    init_parallel()
    out = export_to_hf(JSTIPModel.restore_from(args.model), args.output_dir)
    print(f"wrote {out}/llm, {out}/perception, {out}/README.md")


if __name__ == "__main__":
    main(sys.argv[1:])

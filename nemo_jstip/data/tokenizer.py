"""A byte-level BPE tokenizer trained offline, for tiny LLMs (the tests, ``data.show``) where no hub is reachable.

Real recipes use the pretrained LLM's own HF tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000, out_dir: str | Path | None = None):
    """A GPT-2 style byte-level BPE (the space belongs to the next word) with ``<|bos|>``/``<|eos|>``; saved as a
    HF tokenizer folder when ``out_dir`` is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|eos|>")
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf

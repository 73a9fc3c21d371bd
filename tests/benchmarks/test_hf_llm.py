"""hf_llm: an HF LLM saved for a recipe, with JSTIP's special tokens and embeddings resized around the mean."""
import json

import pytest
import torch

from benchmarks.repro.hf_llm import main


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny tied-embedding Llama (SmolLM2's layout) with a BPE tokenizer, as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_jstip.prep.tokenizer import train_tokenizer

    words = "what is the capital of france paris question answer two plus four".split()
    tok = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))], vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    path = tmp_path_factory.mktemp("src")
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path, model.get_input_embeddings().weight.detach().clone()


def test_export_adds_the_tokens_with_mean_resized_rows(hf_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, emb = hf_folder
    info = main([f"src={src}", f"out_dir={tmp_path / 'out'}"])
    vocab = emb.shape[0]
    assert info["vocab"] == vocab and info["tokens"] == vocab + 3 and 0 <= info["qa_text_accuracy"] <= 1
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert len(tok) == model.config.vocab_size == vocab + 3 and {"<|audio|>"} <= set(tok.get_vocab())
    new = model.get_input_embeddings().weight.detach()
    assert torch.equal(new[:vocab], emb) and torch.equal(model.get_output_embeddings().weight, new)  # still tied
    added = new[vocab:]
    assert added.norm(dim=1).min() > 0 and torch.cdist(added, added).masked_fill(torch.eye(3, dtype=bool), 1).min() > 0
    assert (added.mean(0) - emb.mean(0)).abs().max() < 5 * emb.std()  # around the old rows, not zeros or outliers
    assert json.loads((tmp_path / "out" / "export.json").read_text()) == info
    stamp = (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns
    assert main([f"src={src}", f"out_dir={tmp_path / 'out'}"]) == info  # kept
    assert (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns == stamp


def test_export_names_a_bad_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a .gguf file nor an HF folder"):
        main([f"src={tmp_path}", f"out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()

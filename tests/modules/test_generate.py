"""Greedy decoding with a KV cache: equal to decoding without a cache, independent of the other rows of a
left-padded batch, EOS stops and pads, and TP=2 (with and without sequence parallelism) gives the TP=1 tokens
(2 real gloo processes).

One spawn of 2 processes builds a tiny JSTIPModel (speech perception + Megatron GPT with the weights of a random
tiny HF Llama) at TP=2, at TP=2 with sequence parallelism and then at TP=1, decodes a batch of 2 speech and 2 text
prompts of 4 different lengths, and returns everything the tests below compare.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from nemo_jstip.modules.generate import decode_text, greedy_generate
from nemo_jstip.parallel.dist import spawn

MAX_NEW = 8
TEXT_PROMPTS = ("the patient was", "doctor patel prescribed twenty milligrams of atorvastatin")


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_corpus, tmp_path_factory) -> Path:
    from lhotse import CutSet

    from nemo_jstip.prep.tokenizer import train_tokenizer

    texts = [c.supervisions[0].text for c in CutSet.from_file(tiny_corpus / "general_train_cuts.jsonl")]
    texts += (tiny_corpus / "medical_text.txt").read_text().splitlines()
    out = tmp_path_factory.mktemp("generate") / "tokenizer"
    train_tokenizer(texts, 300, out)
    return out


def tiny_hf_llama(vocab_size: int):
    """A random tiny HF Llama (GQA 4/2 heads); weights large enough that greedy outputs vary by prompt."""
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           initializer_range=0.05, tie_word_embeddings=False)
    model = T.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def build_model(tokenizer_dir: str, hf):
    """A JSTIPModel at the current parallel sizes with ``hf``'s LLM weights (perception: seeded init)."""
    from omegaconf import OmegaConf

    from nemo_jstip.models.jstip_model import JSTIPModel
    from nemo_jstip.modules.hf_import import llm_config_from_hf, load_hf_weights

    llm = dataclasses.asdict(llm_config_from_hf(hf.config, layer_spec="local"))
    llm["lora_targets"] = list(llm["lora_targets"])
    cfg = OmegaConf.create({
        "tokenizer": {"path": tokenizer_dir},
        "perception": {
            "preprocessor": {"sample_rate": 16000, "features": 40, "window_size": 0.025, "window_stride": 0.01,
                             "n_fft": 512},
            "encoder": {"feat_in": 40, "n_layers": 1, "d_model": 32, "n_heads": 2, "subsampling": "dw_striding",
                        "subsampling_factor": 8, "subsampling_conv_channels": 32, "ff_expansion_factor": 2,
                        "conv_kernel_size": 9,
                        # NeMo's default all-reduces over WORLD in each encoder forward; only rank 0 decodes at TP=1
                        "sync_max_audio_length": False},
            "adapter": {"type": "mlp", "stack": 1, "hidden_size": 64, "output_size": 64},
        },
        "llm": llm,
        "interleave": {"mode": "mixed"},
    })
    model = JSTIPModel(cfg)
    load_hf_weights(model.stage.gpt, hf, model.llm_cfg)
    return model.eval()


def naive_greedy(stage, batch: dict, steps: int):
    """Reference without a cache: re-run the whole left-padded sequence each step, argmax of the last position."""
    from nemo_jstip.modules.llm import gather_logits

    ext, real = dict(batch), batch["attention_mask"]
    B = real.shape[0]
    tokens, scores = [], []
    for _ in range(steps):
        S = ext["input_ids"].shape[1]
        mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None] | ~real[:, None, None, :]
        mask.diagonal(dim1=-2, dim2=-1).fill_(False)
        with torch.no_grad():
            logits = stage.gpt(None, None, mask, decoder_input=stage.embed(ext))  # no inference context
        best, token = gather_logits(logits, stage.vocab_size)[:, -1].max(dim=-1)
        tokens.append(token)
        scores.append(best)
        minus1 = torch.full((B, 1), -1)
        ext["input_ids"] = torch.cat([ext["input_ids"], token[:, None]], 1)
        ext["audio_item"] = torch.cat([ext["audio_item"], minus1], 1)
        ext["audio_frame"] = torch.cat([ext["audio_frame"], minus1], 1)
        real = torch.cat([real, torch.ones(B, 1, dtype=torch.bool)], 1)
    return torch.stack(tokens, 1), torch.stack(scores, 1)


def decode_everything(corpus: str, tokenizer_dir: str) -> dict | None:
    """Rank body (2 processes): TP=2 decoding on both ranks, then TP=1 checks on rank 0."""
    import torch.distributed as dist
    from lhotse import CutSet
    from transformers import AutoTokenizer

    from nemo_jstip.data.dataset import DatasetConfig, JSTIPDataset
    from nemo_jstip.data.examples import ExampleBuilder, add_special_tokens
    from nemo_jstip.data.interleave import InterleaveConfig
    from nemo_jstip.data.sampler import KIND_KEY, TextItem
    from nemo_jstip.parallel.dist import init_parallel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    add_special_tokens(tok, InterleaveConfig(mode="mixed"))
    hf = tiny_hf_llama(len(tok))
    cuts = sorted(CutSet.from_file(Path(corpus) / "general_train_cuts.jsonl"), key=lambda c: c.duration)
    items = [cuts[0], TextItem("t0", TEXT_PROMPTS[0], {KIND_KEY: "text"}), cuts[-1],
             TextItem("t1", TEXT_PROMPTS[1], {KIND_KEY: "text"})]

    def prompts(model):
        return JSTIPDataset(ExampleBuilder(model.tokenizer, model.frame_spec, model.interleave_cfg),
                            DatasetConfig(prompt=True))

    init_parallel(tp=2)
    tp2 = build_model(tokenizer_dir, hf)
    perception = {k: v.clone() for k, v in tp2.stage.perception.state_dict().items()}
    eos = tp2.tokenizer.eos_token_id
    batch = prompts(tp2)[items]
    tp2_tokens, tp2_scores = greedy_generate(tp2.stage, batch, MAX_NEW, eos, eos, return_scores=True)

    init_parallel(tp=2, sequence_parallel=True)
    sp = build_model(tokenizer_dir, hf)
    sp.stage.perception.load_state_dict(perception)
    sp_tokens, sp_scores = greedy_generate(sp.stage, batch, MAX_NEW, eos, eos, return_scores=True)
    sp_restored = sp.stage.config.sequence_parallel and sp.stage.gpt.embedding.word_embeddings.reduce_scatter_embeddings

    init_parallel(tp=1)  # world size 2: TP=1 x DP=2; only rank 0 goes on
    if dist.get_rank() != 0:
        return {"tp2": tp2_tokens, "sp": sp_tokens}
    model = build_model(tokenizer_dir, hf)
    model.stage.perception.load_state_dict(perception)
    stage, ds = model.stage, prompts(model)
    batch = ds[items]
    tokens, scores = greedy_generate(stage, batch, MAX_NEW, eos, eos, return_scores=True)
    naive_tokens, naive_scores = naive_greedy(stage, batch, MAX_NEW)
    alone = [greedy_generate(stage, ds[[item]], MAX_NEW, eos, eos)[0] for item in items]

    # EOS: swap the output rows of EOS and a token the model emits, so EOS is chosen exactly where that token was
    stop = int(tokens[0, 1])
    weight = stage.gpt.output_layer.weight
    with torch.no_grad():
        weight[[eos, stop]] = weight[[stop, eos]]
    eos_tokens = greedy_generate(stage, batch, MAX_NEW, eos, -1)
    eos_alone = greedy_generate(stage, ds[[items[0]]], MAX_NEW, eos, -1)
    return dict(
        tp2=tp2_tokens, tp2_scores=tp2_scores, sp=sp_tokens, sp_scores=sp_scores, sp_restored=sp_restored,
        tokens=tokens, scores=scores, naive=naive_tokens,
        naive_scores=naive_scores, alone=alone, prompt_lens=batch["prompt_lens"], eos=eos, stop=stop,
        eos_tokens=eos_tokens, eos_alone=eos_alone, texts=decode_text(model.tokenizer, tokens),
    )


@pytest.fixture(scope="module")
def decoded(tiny_corpus, tokenizer_dir) -> dict:
    rank0, rank1 = spawn(decode_everything, 2, str(tiny_corpus), str(tokenizer_dir), timeout_s=240)
    assert torch.equal(rank0["tp2"], rank1["tp2"])  # both TP ranks decode the same tokens
    assert torch.equal(rank0["sp"], rank1["sp"])
    return rank0


def test_kv_cache_matches_decoding_without_cache(decoded):
    lens = decoded["prompt_lens"].tolist()
    assert len(set(lens)) == 4, lens  # left padding differs per row
    tokens = decoded["tokens"]
    assert tokens.shape == (4, MAX_NEW) and tokens.dtype == torch.long
    assert len({tuple(r) for r in tokens.tolist()}) == 4  # not degenerate: every prompt decodes differently
    assert decoded["eos"] not in tokens  # (so the EOS test below knows what to expect)
    assert torch.equal(tokens, decoded["naive"])
    torch.testing.assert_close(decoded["scores"], decoded["naive_scores"], atol=1e-4, rtol=1e-4)
    assert len(decoded["texts"]) == 4 and all(isinstance(t, str) for t in decoded["texts"])


def test_rows_do_not_depend_on_the_batch(decoded):
    for i, alone in enumerate(decoded["alone"]):
        assert torch.equal(alone, decoded["tokens"][i]), i


def test_eos_stops_and_pads(decoded):
    tokens, eos, stop = decoded["tokens"], decoded["eos"], decoded["stop"]
    expected = torch.where(tokens == stop, eos, tokens)
    ends = [(r == eos).nonzero()[0, 0].item() + 1 if (r == eos).any() else MAX_NEW for r in expected]
    for i, end in enumerate(ends):
        expected[i, end:] = -1  # pad_id
    expected = expected[:, : max(ends)]  # stops once every row is done
    assert ends[0] <= 2 and max(ends) > ends[0]  # row 0 stops early, another row goes on
    assert torch.equal(decoded["eos_tokens"], expected)
    assert torch.equal(decoded["eos_alone"], expected[:1, : ends[0]])  # a batch that is all done stops at once


def test_tp2_matches_tp1(decoded):
    assert torch.equal(decoded["tp2"], decoded["tokens"])
    torch.testing.assert_close(decoded["tp2_scores"], decoded["scores"], atol=1e-4, rtol=1e-4)


def test_tp2_with_sequence_parallelism_matches_tp1(decoded):
    """Generation runs with SP off (a decode step has one position) and puts it back afterwards."""
    assert torch.equal(decoded["sp"], decoded["tokens"])
    torch.testing.assert_close(decoded["sp_scores"], decoded["scores"], atol=1e-4, rtol=1e-4)
    assert decoded["sp_restored"]


def test_decode_text_and_input_checks(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = tok.eos_token_id
    a = tok("the patient", add_special_tokens=False)["input_ids"]
    b = tok("was given", add_special_tokens=False)["input_ids"]
    ids = torch.full((2, len(a) + len(b) + 2), eos)
    ids[0, : len(a)] = torch.tensor(a)
    ids[1, : len(b)] = torch.tensor(b)
    ids[1, len(b) + 1] = a[0]  # after EOS: dropped
    assert decode_text(tok, ids) == ["the patient", "was given"]
    assert decode_text(tok, [[tok.bos_token_id, *a]]) == ["the patient"]  # lists too; specials dropped

    right_padded = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
                    "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)}
    with pytest.raises(ValueError, match="LEFT-padded"):
        greedy_generate(None, right_padded, 4, eos, eos)
    no_mask = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "seq_lens": torch.tensor([4, 2])}
    with pytest.raises(ValueError, match="attention_mask"):
        greedy_generate(None, no_mask, 4, eos, eos)

"""HF Llama-family -> Megatron GPT import: configs, tensor layouts, round trip, and fp32 logit parity with HF."""

import pytest
import torch

from nemo_jstip.modules.hf_import import hf_to_megatron, llm_config_from_hf, megatron_to_hf
from nemo_jstip.modules.llm import LLMConfig
from nemo_jstip.parallel.dist import spawn

KINDS = ("llama", "tied", "qwen2", "qwen3", "llama3_rope")
VOCAB = 300  # pads to 384 (TP=1) and 512 (TP=2): exercises the zero vocab rows


def tiny_hf(kind: str, seed: int = 0):
    """A random tiny HF model (fp32, eval); norms and biases perturbed so that every weight matters."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    if kind == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**common, tie_word_embeddings=False))
    elif kind == "tied":  # SmolLM2's shape of config
        model = T.LlamaForCausalLM(T.LlamaConfig(**common, tie_word_embeddings=True))
    elif kind == "llama3_rope":
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
        model = T.LlamaForCausalLM(T.LlamaConfig(**{**common, "max_position_embeddings": 16384}, rope_parameters=rope))
    elif kind == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**common, tie_word_embeddings=False))
    elif kind == "qwen3":  # head_dim 32 != hidden / heads
        model = T.Qwen3ForCausalLM(T.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_config_from_hf():
    llama = llm_config_from_hf(tiny_hf("tied").config)
    assert (llama.num_layers, llama.hidden_size, llama.ffn_hidden_size) == (2, 64, 96)
    assert (llama.num_attention_heads, llama.num_query_groups, llama.kv_channels) == (4, 2, 16)
    assert llama.tie_embeddings and not llama.add_qkv_bias and not llama.qk_layernorm and llama.norm_eps == 1e-6
    assert llm_config_from_hf(tiny_hf("qwen2").config).add_qkv_bias
    qwen3 = llm_config_from_hf(tiny_hf("qwen3").config, train_mode="lora")
    assert qwen3.qk_layernorm and qwen3.kv_channels == 32 and qwen3.train_mode == "lora"
    rope = llm_config_from_hf(tiny_hf("llama3_rope").config)
    assert rope.rope_scaling and rope.rope_scaling_factor == 8.0 and rope.rotary_base == 500000.0


def test_config_rejects_what_megatron_would_compute_differently():
    import transformers as T

    base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(NotImplementedError, match="mlp_bias"):
        llm_config_from_hf(T.LlamaConfig(**base, mlp_bias=True))
    with pytest.raises(NotImplementedError, match="rope_type"):
        llm_config_from_hf(T.LlamaConfig(**base, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)))
    with pytest.raises(NotImplementedError, match="sliding"):
        llm_config_from_hf(T.Qwen2Config(**base, use_sliding_window=True, sliding_window=16, max_window_layers=0))


def test_tp_layouts():
    """Megatron's fused layouts, checked on a TP=2 shard against the HF tensors directly."""
    hf = tiny_hf("qwen2")
    cfg = llm_config_from_hf(hf.config)
    sd = hf.state_dict()
    rank1 = hf_to_megatron(hf, cfg, tp_rank=1, tp_size=2)
    d, attn = 16, "decoder.layers.0.self_attention."
    q, k, v = (sd[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    # rank 1 holds query group 1 (of 2): q heads 2, 3 then k head 1 then v head 1
    expected = torch.cat([q[2 * d : 4 * d], k[d : 2 * d], v[d : 2 * d]])
    assert torch.equal(rank1[f"{attn}linear_qkv.weight"], expected)
    qb = sd["model.layers.0.self_attn.q_proj.bias"]
    assert torch.equal(rank1[f"{attn}linear_qkv.bias"][: 2 * d], qb[2 * d : 4 * d])
    gate, up = sd["model.layers.0.mlp.gate_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(rank1["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate[48:], up[48:]]))
    assert torch.equal(rank1[f"{attn}linear_proj.weight"], sd["model.layers.0.self_attn.o_proj.weight"][:, 32:])
    emb = rank1["embedding.word_embeddings.weight"]  # padded to 512 rows: rank 1 holds rows 256..511
    assert emb.shape == (256, 64) and torch.equal(emb[: VOCAB - 256], sd["model.embed_tokens.weight"][256:])
    assert not emb[VOCAB - 256 :].any()
    fused = hf_to_megatron(hf, cfg, fused_norms=True, layers=[(0, 1)], post_process=False)
    assert torch.equal(fused[f"{attn}linear_qkv.layer_norm_weight"], sd["model.layers.1.input_layernorm.weight"])
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in fused and "output_layer.weight" not in fused


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip(kind, tp):
    hf = tiny_hf(kind)
    cfg = llm_config_from_hf(hf.config)
    back = megatron_to_hf([hf_to_megatron(hf, cfg, tp_rank=r, tp_size=tp) for r in range(tp)], cfg)
    sd = {k: v for k, v in hf.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def logit_parity(tp: int) -> dict:
    """Rank body: every tiny kind through HF and through Megatron at this TP; the max abs logit difference."""
    from nemo_jstip.modules.hf_import import load_hf_weights
    from nemo_jstip.modules.llm import build_llm, gather_logits
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(tp=tp)
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(64).expand(2, 64)
    diffs = {}
    for kind in KINDS:
        hf = tiny_hf(kind)
        cfg = llm_config_from_hf(hf.config, layer_spec="local")
        model = build_llm(cfg).eval()
        load_hf_weights(model, hf, cfg)
        dev = next(model.parameters()).device  # Megatron builds on the GPU when there is one; HF stays on the CPU
        with torch.no_grad():
            ours = gather_logits(model(ids.to(dev), pos.to(dev), None), VOCAB).cpu()
            diffs[kind] = (ours - hf(ids).logits).abs().max().item()
    return diffs


@pytest.mark.parametrize("tp", [1, 2])
def test_logit_parity_with_hf(tp):
    for rank_diffs in spawn(logit_parity, tp, tp):
        assert rank_diffs.keys() == set(KINDS)
        # fp32 lands near 3e-7; 1e-5 still catches subtle errors (e.g. llama3 RoPE scaling left out: 5e-5)
        assert max(rank_diffs.values()) < 1e-5, rank_diffs


def test_round_trip_te_names():
    hf = tiny_hf("qwen3")
    cfg = llm_config_from_hf(hf.config)
    shards = [hf_to_megatron(hf, cfg, tp_rank=r, tp_size=2, fused_norms=True) for r in range(2)]
    assert not any(k.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight")) for k in shards[0])
    back = megatron_to_hf(shards, cfg)
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items() if k != "lm_head.weight")

"""The Megatron decoder: spec choice, FP8 guard, training modes, LoRA (zero init, TP=2 == TP=1), loss."""

import pytest
import torch

from nemo_jstip.modules.llm import LLMConfig, resolve_layer_spec, te_available, transformer_config
from nemo_jstip.parallel.dist import spawn

# vocab 256 pads to 256 at TP=1 and TP=2, so both sizes draw the same initial weights from the same seed
TINY = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
            vocab_size=250, make_vocab_size_divisible_by=128, layer_spec="local", lora_rank=4)
B, S = 2, 8


def batch(model):
    """Drawn on the CPU (the same numbers everywhere), placed where ``model`` lives (CPU, or its GPU)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, TINY["vocab_size"], (B, S), generator=g)
    labels = torch.randint(0, TINY["vocab_size"], (B, S), generator=g)
    labels[:, :3] = -100  # e.g. speech positions: never targets
    dev = next(model.parameters()).device
    return ids.to(dev), torch.arange(S, device=dev).expand(B, S), labels.to(dev)


@pytest.mark.skipif(te_available(), reason="Transformer Engine is installed")
def test_te_requested_without_te_is_a_clear_error():
    assert resolve_layer_spec("auto") == "local"
    with pytest.raises(RuntimeError, match="Transformer Engine"):
        resolve_layer_spec("te")
    with pytest.raises(RuntimeError, match="fp8"):
        transformer_config(LLMConfig(**{**TINY, "fp8": "e4m3"}))
    with pytest.raises(RuntimeError, match="fp8"):
        transformer_config(LLMConfig(**{**TINY, "layer_spec": "auto", "fp8": "hybrid"}))


def test_swiglu_is_megatrons_glu():
    """The local spec's activation module: Megatron's unfused ``silu(gate) * up``, values and gradients exact."""
    from nemo_jstip.modules.llm import SwiGLU

    x = torch.randn(5, 3, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 3, 8, dtype=torch.float64)
    gate, up = x.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    (dx_ref,) = torch.autograd.grad(ref, x, grad)
    out = SwiGLU()(x)
    (dx,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(out, ref) and torch.equal(dx, dx_ref)


def test_config_validation():
    with pytest.raises(ValueError, match="train_mode"):
        LLMConfig(train_mode="partial")
    with pytest.raises(ValueError, match="lora_targets"):
        LLMConfig(lora_targets=["q_proj"])


def build_and_step(mode: str) -> dict:
    """Rank body: build at TP=1, check requires_grad per mode, run forward + backward through decoder_input."""
    from nemo_jstip.modules.llm import build_llm, token_loss
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel()
    cfg = LLMConfig(**TINY, train_mode=mode)
    model = build_llm(cfg)
    ids, pos, labels = batch(model)
    emb = model.embedding(ids, pos).detach().requires_grad_()  # [s, b, h]: what the speech splice feeds
    logits = model(None, pos, None, decoder_input=emb)
    loss = token_loss(logits, labels, cfg.vocab_size)
    loss.sum().backward()
    params = dict(model.named_parameters())
    return dict(
        types={type(m).__name__ for m in model.modules()},
        devices={str(t.device) for t in [*model.parameters(), *model.buffers()]},
        logits_shape=tuple(logits.shape),
        zero_loss_where_ignored=bool((loss[:, :3] == 0).all() and (loss[:, 3:] > 0).all()),
        trainable={n for n, p in params.items() if p.requires_grad},
        with_grad={n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0},
        all_params=set(params),
        input_grad=emb.grad is not None and emb.grad.abs().sum().item() > 0,
    )


@pytest.mark.parametrize("mode", ["frozen", "full", "lora"])
def test_build_modes_forward_backward(mode):
    (r,) = spawn(build_and_step, 1, mode)
    assert {"GPTModel", "SDPADotProductAttention", "RMSNorm", "SwiGLU"} <= r["types"]  # the local spec (+ SDPA)
    assert len(r["devices"]) == 1  # one device for the whole model (on a GPU the torch norms included)
    assert r["logits_shape"] == (B, S, 256) and r["zero_loss_where_ignored"] and r["input_grad"]
    lora = {n for n in r["all_params"] if n.endswith((".lora_a", ".lora_b"))}
    if mode == "frozen":
        assert not r["trainable"] and not r["with_grad"] and not lora
    elif mode == "full":
        assert r["trainable"] == r["all_params"] and not lora
        assert {"LocalColumnParallelLinear", "LocalRowParallelLinear"} <= r["types"]  # F.linear at TP=1
        assert r["with_grad"] == r["all_params"] - {"embedding.word_embeddings.weight"}  # decoder_input bypasses it
    else:
        assert len(lora) == 2 * 4 * TINY["num_layers"] and r["trainable"] == lora
        assert {"LoRALocalColumnParallelLinear", "LoRALocalRowParallelLinear"} <= r["types"]
        # B starts at zero: only B gets a gradient on the first step (A's gradient goes through B)
        assert r["with_grad"] == {n for n in lora if n.endswith("lora_b")}


def lora_zero_init() -> float:
    """Rank body: a fresh LoRA model computes exactly what its base weights compute without adapters."""
    from nemo_jstip.modules.llm import build_llm
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel()
    lora = build_llm(LLMConfig(**TINY, train_mode="lora"))
    base = build_llm(LLMConfig(**TINY, train_mode="frozen"))
    base.load_state_dict({k: v for k, v in lora.state_dict().items() if "lora_" not in k})
    ids, pos, _ = batch(lora)
    with torch.no_grad():
        return (lora(ids, pos, None) - base(ids, pos, None)).abs().max().item()


def test_lora_zero_init_leaves_output_unchanged():
    assert spawn(lora_zero_init, 1) == [0.0]


# ------------------------------------------------------------------ TP=2 == TP=1 (same weights, same LoRA)
def _rank_slice(name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """This rank's part of a LoRA factor given in its TP=1 layout."""
    column = ".linear_qkv." in name or ".linear_fc1." in name
    if column and name.endswith("lora_b"):
        if ".linear_fc1." in name:  # [gate; up] -> [gate shard; up shard]
            return torch.cat([half.chunk(tp)[rank] for half in full.chunk(2)])
        return full.chunk(tp)[rank]
    if not column and name.endswith("lora_a"):
        return full.chunk(tp, dim=1)[rank]
    return full  # replicated factors


def _gather(name: str, parts: list) -> torch.Tensor:
    column = ".linear_qkv." in name or ".linear_fc1." in name
    if column and name.endswith("lora_b"):
        if ".linear_fc1." in name:
            halves = [p.chunk(2) for p in parts]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        return torch.cat(parts)
    if not column and name.endswith("lora_a"):
        return torch.cat(parts, dim=1)
    return parts[0]


def tp_step(tp: int, mode: str, lora_full: dict | None, sequence_parallel: bool = False):
    """Rank body: one forward/backward at this TP; returns loss, input grad and trainable grads (this rank's; under
    sequence parallelism those of parameters marked ``sequence_parallel`` summed over TP, as Megatron's
    ``finalize_model_grads`` sums them)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region

    from nemo_jstip.modules.llm import build_llm, labelled_token_loss, token_loss
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(tp=tp, sequence_parallel=sequence_parallel)
    cfg = LLMConfig(**TINY, train_mode=mode)
    model = build_llm(cfg)
    rank = ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_a", "lora_b")):
                if lora_full is None:  # TP=1 draws the adapters (B non-zero, so they change the output)
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(_rank_slice(name, lora_full[name], rank, tp))
    ids, pos, labels = batch(model)
    emb = model.embedding(ids, pos)  # [L, B, H]; under SP this rank's [L / TP, B, H]
    if sequence_parallel:
        emb = gather_from_sequence_parallel_region(emb)
    emb = emb.detach().requires_grad_()
    decoder_input = scatter_to_sequence_parallel_region(emb) if sequence_parallel else emb
    def labelled():  # what JSTIPModel runs: the output layer on the labelled positions only (SP: a count per rank)
        return model(None, pos, None, decoder_input=decoder_input, labels=labels,
                     output_processor=labelled_token_loss, output_processor_context=cfg.vocab_size)

    if tp == 1:  # the reference: logits at every position, then the loss
        loss = token_loss(model(None, pos, None, decoder_input=decoder_input), labels, cfg.vocab_size)
        with torch.no_grad():
            assert torch.equal(loss, labelled())
    else:
        loss = labelled()
    loss.sum().backward()
    lora_now = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None and getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(grads[n], group=ps.get_tensor_model_parallel_group())
    return loss.detach(), emb.grad, grads, lora_now


@pytest.mark.parametrize("mode", ["frozen", "full", "lora", "lora-sp", "full-sp"])
def test_tp2_matches_tp1(mode):
    """TP=2 gives the TP=1 loss, input gradient and parameter gradients; ``-sp``: with sequence parallelism. TP=2
    computes the loss on the labelled positions only (``labelled_token_loss``), TP=1 from the logits everywhere."""
    sp = mode.endswith("-sp")
    mode = mode.removesuffix("-sp")
    loss1, dx1, grads1, lora_full = spawn(tp_step, 1, 1, mode, None)[0]
    ranks = spawn(tp_step, 2, 2, mode, lora_full or None, sp)
    for loss2, dx2, grads2, _ in ranks:
        torch.testing.assert_close(loss2, loss1, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(dx2, dx1, atol=1e-6, rtol=1e-5)
    if mode == "lora":
        assert any(v.abs().sum() > 0 for v in grads1.values())
        for name, g1 in grads1.items():
            torch.testing.assert_close(_gather(name, [r[2][name] for r in ranks]), g1, atol=1e-6, rtol=1e-5)
    if mode == "full":  # replicated parameters get the same gradient on both ranks
        for name in ("decoder.final_layernorm.weight", "decoder.layers.0.input_layernorm.weight"):
            torch.testing.assert_close(ranks[0][2][name], grads1[name], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(ranks[1][2][name], grads1[name], atol=1e-6, rtol=1e-5)


def bf16_dropout_step() -> dict:
    """Rank body (TP=2): bf16 parameters, every dropout on (attention, hidden, LoRA), one training step."""
    from nemo_jstip.modules.llm import build_llm, token_loss
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(tp=2)
    cfg = LLMConfig(**{**TINY, "params_dtype": "bfloat16", "train_mode": "lora", "lora_dropout": 0.1,
                       "attention_dropout": 0.1, "hidden_dropout": 0.1})
    model = build_llm(cfg)
    ids, pos, labels = batch(model)
    logits = model(ids, pos, None)
    loss = token_loss(logits, labels, cfg.vocab_size)
    loss.sum().backward()
    return dict(dtypes={p.dtype for p in model.parameters()}, logits=logits.dtype, loss=loss.sum().item(),
                lora_grads=all(p.grad is not None for n, p in model.named_parameters() if n.endswith("lora_b")))


def test_bf16_with_dropout_tp2():
    for r in spawn(bf16_dropout_step, 2):
        assert r["dtypes"] == {torch.bfloat16} and r["logits"] == torch.bfloat16 and r["lora_grads"]
        assert torch.isfinite(torch.tensor(r["loss"]))


def sdpa_vs_megatron() -> float:
    """Rank body: the SDPA core attention against Megatron's own DotProductAttention code, GQA, causal, no mask."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from nemo_jstip.modules.llm import build_llm
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel()
    model = build_llm(LLMConfig(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                                num_query_groups=2, vocab_size=100, layer_spec="local"))
    core = model.decoder.layers[0].self_attention.core_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, 3, h, 8, generator=g).to(next(model.parameters()).device) for h in (8, 2, 2))  # [s, b, heads, d]
    assert type(core).__name__ == "SDPADotProductAttention"
    return (core(q, k, v, None) - DotProductAttention.forward(core, q, k, v, None)).abs().max().item()


def test_sdpa_core_attention_equals_megatrons():
    (diff,) = spawn(sdpa_vs_megatron, 1)
    assert diff < 1e-5


def test_gpt_model_deprecation_line_is_dropped():
    """Only megatron-core's per-build "GPTModel IS DEPRECATED" line (docs/training.md says why GPTModel); others pass."""
    import logging

    import megatron.core.models.gpt.gpt_model as gpt_model

    logger = logging.getLogger(gpt_model.__name__)
    assert gpt_model.logger is logger

    def record(msg):
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, (), None)

    assert not logger.filter(record("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes"))
    assert logger.filter(record("some other warning"))

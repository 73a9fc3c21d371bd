"""HF Llama-family models <-> megatron-core ``GPTModel``: configs (``llm_section``, ``hf_config``) and weights, for
any tensor-parallel size.

Covers ``LlamaForCausalLM`` (Llama 2/3, SmolLM2 with tied embeddings), ``Qwen2ForCausalLM`` (q/k/v bias)
and ``Qwen3ForCausalLM`` (q/k RMSNorm). Megatron's layouts, per TP rank r of T:

- ``linear_qkv``: per query group g, rows ``[q heads of g; k_g; v_g]``; rank r holds groups
  ``[r*G/T, (r+1)*G/T)`` (groups are contiguous, so this is a plain split of the fused matrix);
- ``linear_fc1``: ``[gate shard r; up shard r]`` (SwiGLU chunks its output in two: act(gate) * up);
- ``linear_proj``/``linear_fc2``: split by input columns; norms replicated;
- embedding/output layer: vocab padded to a multiple of ``make_vocab_size_divisible_by * T`` with zero rows,
  then split by rows.

The pre-attention/pre-MLP norms are ``input_layernorm``/``pre_mlp_layernorm`` in the local spec and fused
into ``linear_qkv.layer_norm_weight``/``linear_fc1.layer_norm_weight`` in the TE spec; ``load_hf_weights``
reads the model's own keys to pick the names. HF and Megatron both rotate halves for RoPE (HF's converted
checkpoints), so q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from nemo_jstip.modules.llm import LLMConfig, padded_vocab_size

SUPPORTED = ("llama", "qwen2", "qwen3")
# LLMConfig fields a HF config fixes (the weights' shapes and the function they compute): given beside
# ``init_from_hf`` they must agree with it. vocab_size may be larger (JSTIP's added tokens get rows of their own).
HF_FIXED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
            "vocab_size", "rotary_base", "rope_scaling", "rope_scaling_factor", "norm_eps", "add_qkv_bias",
            "qk_layernorm", "tie_embeddings")
HF_DEFAULTS = ("max_sequence_length", "attention_dropout", "hidden_dropout")  # the HF config's unless given
# local-spec norm -> the TE spec's name for it (fused into the next linear)
_FUSED_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _fused_name(key: str) -> str:
    for local, fused in _FUSED_NORMS.items():
        if key.endswith(local):
            return key[: -len(local)] + fused
    return key


def llm_config_from_hf(hf_config, **overrides) -> LLMConfig:
    """``LLMConfig`` matching a HF ``LlamaConfig``/``Qwen2Config``/``Qwen3Config``; ``overrides`` win."""
    c, kind = hf_config, hf_config.model_type
    if kind not in SUPPORTED:
        raise NotImplementedError(
            f"HF model_type {kind!r} ({', '.join(getattr(c, 'architectures', None) or ['?'])}) has no weight mapping "
            f"onto megatron-core's GPTModel here: supported are {', '.join(SUPPORTED)}")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"hidden_act={c.hidden_act}: only SwiGLU (silu) is supported")
    if getattr(c, "mlp_bias", False) or (kind != "qwen2" and getattr(c, "attention_bias", False)):
        raise NotImplementedError("attention_bias/mlp_bias (bias on o_proj/MLP) is not supported")
    if getattr(c, "use_sliding_window", False):
        raise NotImplementedError("sliding-window attention is not supported")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
    rope.update(getattr(c, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = {}
    if rope_type == "llama3":
        megatron_fixed = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
        if any(float(rope.get(k, v)) != v for k, v in megatron_fixed.items()):
            raise NotImplementedError(f"llama3 rope scaling other than {megatron_fixed}: {rope}")
        scaling = dict(rope_scaling=True, rope_scaling_factor=float(rope["factor"]))
    elif rope_type != "default":
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported")
    heads = c.num_attention_heads
    fields = dict(
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(c, "num_key_value_heads", None) or heads,
        kv_channels=getattr(c, "head_dim", None) or c.hidden_size // heads,
        vocab_size=c.vocab_size,
        max_sequence_length=c.max_position_embeddings,
        rotary_base=float(rope["rope_theta"]),
        norm_eps=c.rms_norm_eps,
        add_qkv_bias=kind == "qwen2",
        qk_layernorm=kind == "qwen3",
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        attention_dropout=float(getattr(c, "attention_dropout", 0.0)),
        hidden_dropout=0.0,
        **scaling,
    )
    return LLMConfig(**{**fields, **overrides})


def read_hf_config(folder: str | Path) -> transformers.PretrainedConfig:
    """A local HF model folder's ``config.json`` (transformers' own classes only: no remote code)."""
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (a HF model folder holds config.json, *.safetensors and "
                                f"the tokenizer files)")
    return transformers.AutoConfig.from_pretrained(str(folder))


def llm_section(section: Mapping) -> dict:
    """The ``llm`` config section as the model builds it. With ``init_from_hf``, the folder's config.json gives the
    fields of ``HF_FIXED`` and ``HF_DEFAULTS``; keys given (not null) beside it override ``HF_DEFAULTS`` and must
    agree with ``HF_FIXED``. Without it, ``section`` as it is."""
    section, folder = dict(section), section.get("init_from_hf")
    if not folder:
        return section
    derived = dataclasses.asdict(llm_config_from_hf(read_hf_config(folder)))
    given = {k: v for k, v in section.items() if v is not None}
    if not derived["rope_scaling"]:
        derived["rope_scaling_factor"] = given.get("rope_scaling_factor", derived["rope_scaling_factor"])  # unused
    clashes = [f"llm.{k}={given[k]!r}, its config.json gives {derived[k]!r}" for k in HF_FIXED
               if k in given and given[k] != derived[k] and not (k == "vocab_size" and given[k] > derived[k])]
    if clashes:
        raise ValueError(f"llm.init_from_hf={folder} defines the LLM's shape; drop (or set null) the keys that "
                         f"differ: " + "; ".join(clashes))
    return {**{k: derived[k] for k in HF_FIXED + HF_DEFAULTS}, **given}


def hf_config(cfg: LLMConfig, **extra) -> transformers.PretrainedConfig:
    """The HF config of ``cfg``'s architecture (the inverse of ``llm_config_from_hf``): Qwen3 with q/k norms, Qwen2
    with q/k/v biases, Llama otherwise. ``max_position_embeddings`` is the trained ``max_sequence_length``."""
    kind = "qwen3" if cfg.qk_layernorm else "qwen2" if cfg.add_qkv_bias else "llama"
    if cfg.qk_layernorm and cfg.add_qkv_bias:
        raise NotImplementedError("qk_layernorm with add_qkv_bias matches no supported HF family")
    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling:
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    heads = cfg.num_attention_heads
    return cls[kind](
        architectures=[arch[kind]], vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=heads,
        num_key_value_heads=cfg.num_query_groups or heads, head_dim=cfg.kv_channels or cfg.hidden_size // heads,
        max_position_embeddings=cfg.max_sequence_length,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope,
        attention_dropout=cfg.attention_dropout, hidden_act="silu", **extra)


def read_hf_weights(folder: str) -> dict[str, torch.Tensor]:
    """A local HF model folder's weights, from its ``*.safetensors`` files only (no pickles: safe to read)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (save the HF model with safe_serialization)")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _hf_state(hf) -> Mapping[str, torch.Tensor]:
    return hf.state_dict() if isinstance(hf, torch.nn.Module) else hf


def _groups(cfg: LLMConfig) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    return groups, heads // groups, cfg.kv_channels or cfg.hidden_size // heads


def hf_to_megatron(
    hf,
    cfg: LLMConfig,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    layers: Iterable[tuple[int, int]] | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    fused_norms: bool = False,
) -> dict[str, torch.Tensor]:
    """This TP rank's Megatron state dict from a HF model or state dict.

    ``layers``: (local index in this stage, global HF layer index) pairs; all layers by default.
    ``fused_norms``: TE spec naming (norms inside ``linear_qkv``/``linear_fc1``).
    """
    sd = _hf_state(hf)
    groups, q_per_group, head_dim = _groups(cfg)
    if groups % tp_size or cfg.ffn_hidden_size % tp_size:
        raise ValueError(f"TP={tp_size} must divide num_query_groups={groups} and ffn_hidden_size")
    layers = list(layers) if layers is not None else [(i, i) for i in range(cfg.num_layers)]

    def shard(t, dim):
        return t.chunk(tp_size, dim=dim)[tp_rank].contiguous()

    def vocab(t):
        rows = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp_size)
        padded = t.new_zeros(rows, t.shape[1])
        padded[: t.shape[0]] = t
        return shard(padded, 0)

    def qkv(q, k, v):  # [heads*d, ...] each -> per group [q heads; k; v], then this rank's groups
        tail = q.shape[1:]
        fused = torch.cat(
            [q.reshape(groups, q_per_group * head_dim, *tail), k.reshape(groups, head_dim, *tail),
             v.reshape(groups, head_dim, *tail)],
            dim=1,
        )
        return shard(fused, 0).reshape(-1, *tail)

    out = {}
    if pre_process:
        out["embedding.word_embeddings.weight"] = vocab(sd["model.embed_tokens.weight"])
    for local, g in layers:
        src, mg = f"model.layers.{g}.", f"decoder.layers.{local}."
        attn, mlp = f"{mg}self_attention.", f"{mg}mlp."
        out[f"{mg}input_layernorm.weight"] = sd[f"{src}input_layernorm.weight"]
        out[f"{attn}linear_qkv.weight"] = qkv(*(sd[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"))
        if cfg.add_qkv_bias:
            out[f"{attn}linear_qkv.bias"] = qkv(*(sd[f"{src}self_attn.{p}_proj.bias"] for p in "qkv"))
        if cfg.qk_layernorm:
            out[f"{attn}q_layernorm.weight"] = sd[f"{src}self_attn.q_norm.weight"]
            out[f"{attn}k_layernorm.weight"] = sd[f"{src}self_attn.k_norm.weight"]
        out[f"{attn}linear_proj.weight"] = shard(sd[f"{src}self_attn.o_proj.weight"], 1)
        out[f"{mg}pre_mlp_layernorm.weight"] = sd[f"{src}post_attention_layernorm.weight"]
        gate, up = sd[f"{src}mlp.gate_proj.weight"], sd[f"{src}mlp.up_proj.weight"]
        out[f"{mlp}linear_fc1.weight"] = torch.cat([shard(gate, 0), shard(up, 0)])
        out[f"{mlp}linear_fc2.weight"] = shard(sd[f"{src}mlp.down_proj.weight"], 1)
    if post_process:
        out["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
        if not (cfg.tie_embeddings and pre_process):  # tied on one stage: the output layer has no weight
            head = sd["model.embed_tokens.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
            out["output_layer.weight"] = vocab(head)
    return {_fused_name(k): v for k, v in out.items()} if fused_norms else out


def load_hf_weights(model: torch.nn.Module, hf, cfg: LLMConfig) -> None:
    """Fill a built ``GPTModel`` (this rank's TP shard and pipeline stage) with HF weights.

    Keys the import does not produce may only be ``_extra_state`` entries and LoRA factors (which keep
    their initialisation); anything else missing or unexpected is an error.
    """
    from megatron.core import parallel_state as ps

    own = model.state_dict()
    layers = [(i, layer.layer_number - 1) for i, layer in enumerate(model.decoder.layers)]
    sd = hf_to_megatron(
        hf, cfg,
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        layers=layers, pre_process=model.pre_process, post_process=model.post_process,
    )
    # per norm, the name this model uses (TE fuses them, but LoRA's TE spec keeps the adapted ones apart)
    sd = {k if k in own else _fused_name(k): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(("_extra_state", ".lora_a", ".lora_b"))]
    if missing or unexpected:
        raise KeyError(f"HF import: missing {missing[:8]}, unexpected {unexpected[:8]}")


def megatron_to_hf(shards: list[Mapping[str, torch.Tensor]], cfg: LLMConfig) -> dict[str, torch.Tensor]:
    """HF state dict from the per-TP-rank state dicts of a whole (one pipeline stage) Megatron model.

    LoRA factors are not merged: merge or drop them first. Tied models get no ``lm_head.weight``.
    """
    groups, q_per_group, head_dim = _groups(cfg)
    first = shards[0]

    def norm(key):  # local-spec or TE-spec name
        return first[key] if key in first else first[_fused_name(key)]

    def cat(key, dim):
        return torch.cat([s[key] for s in shards], dim=dim)

    out = {"model.embed_tokens.weight": cat("embedding.word_embeddings.weight", 0)[: cfg.vocab_size]}
    for i in range(cfg.num_layers):
        mg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn, mlp = f"{mg}self_attention.", f"{mg}mlp."
        out[f"{hf}input_layernorm.weight"] = norm(f"{mg}input_layernorm.weight")
        for kind in ("weight", "bias") if cfg.add_qkv_bias else ("weight",):
            fused_qkv = cat(f"{attn}linear_qkv.{kind}", 0)
            tail = fused_qkv.shape[1:]
            q, k, v = fused_qkv.reshape(groups, (q_per_group + 2) * head_dim, *tail).split(
                [q_per_group * head_dim, head_dim, head_dim], dim=1
            )
            for name, t in zip("qkv", (q, k, v)):
                out[f"{hf}self_attn.{name}_proj.{kind}"] = t.reshape(-1, *tail)
        if cfg.qk_layernorm:
            out[f"{hf}self_attn.q_norm.weight"] = first[f"{attn}q_layernorm.weight"]
            out[f"{hf}self_attn.k_norm.weight"] = first[f"{attn}k_layernorm.weight"]
        out[f"{hf}self_attn.o_proj.weight"] = cat(f"{attn}linear_proj.weight", 1)
        out[f"{hf}post_attention_layernorm.weight"] = norm(f"{mg}pre_mlp_layernorm.weight")
        gate_up = [s[f"{mlp}linear_fc1.weight"].chunk(2) for s in shards]
        out[f"{hf}mlp.gate_proj.weight"] = torch.cat([g for g, _ in gate_up])
        out[f"{hf}mlp.up_proj.weight"] = torch.cat([u for _, u in gate_up])
        out[f"{hf}mlp.down_proj.weight"] = cat(f"{mlp}linear_fc2.weight", 1)
    out["model.norm.weight"] = first["decoder.final_layernorm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = cat("output_layer.weight", 0)[: cfg.vocab_size]
    return out

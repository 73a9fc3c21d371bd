"""The decoder LLM: megatron-core ``GPTModel`` for Llama-family models, its layer spec, FP8, and LoRA.

``LLMConfig`` is the YAML ``llm:`` section, one key per field. ``build_llm`` picks the layer spec
(``te`` = Transformer Engine, required for FP8; ``local`` = megatron-core's own modules, the CPU path;
``auto`` = TE when it imports), builds this pipeline stage's ``GPTModel`` and sets the training mode:

- ``frozen``: no LLM parameter trains (the speech side does);
- ``full``: every LLM parameter trains;
- ``lora``: only low-rank adapters on ``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2`` train.

LoRA is a layer type in the spec (``LoRA<base>`` subclasses of the parallel linears), so base parameter names
are unchanged (HF import and checkpoints of the base model work as they are) and the adapters are exact
under tensor parallelism: a column-parallel layer keeps A whole (replicated) and splits B by output rows
like its weight; a row-parallel layer splits A by input columns like its weight and keeps B whole. PEFT's
own Megatron LoRA (``LoraConfig(megatron_config=...)``) does not run with peft 0.21.2 + megatron-core 0.19
(KeyErrors during injection, and Megatron linears return ``(out, bias)`` tuples it does not expect).

Loss: ``token_loss`` is megatron's ``vocab_parallel_cross_entropy`` on the vocab-sharded logits (torch's fused
``cross_entropy`` when the vocabulary is not split), with the padded vocab rows left out and ignored labels zeroed.
``GPTModel(labels=...)`` computes the same per-token loss but lets padded vocab entries (logit 0) into the softmax
and has no ignore index. ``labelled_token_loss`` is GPTModel's ``output_processor`` for training: the output layer
and the loss run on the labelled positions only (a JSTIP sequence's speech frames and prompts have no labels), so
no ``[L, B, V]`` logits exist.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import weakref
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F

from nemo_jstip.parallel import cpu
from nemo_jstip.parallel.dist import compute_device


class _GPTModelDeprecation(logging.Filter):
    """megatron-core 0.19 logs "GPTModel IS DEPRECATED ... use HybridModel" for every model built. This package
    builds GPTModel on purpose (docs/training.md, "GPTModel, not HybridModel"): that one message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("GPTModel IS DEPRECATED")


logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(_GPTModelDeprecation())

LayerSpec = Literal["te", "local", "auto"]
TrainMode = Literal["frozen", "full", "lora"]
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")  # megatron-core 0.19's, less "custom"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LLMConfig:
    """A Llama-family decoder (Llama 2/3, SmolLM2, Qwen2/2.5, Qwen3): RMSNorm, SwiGLU, RoPE, GQA."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA key/value heads; None = num_attention_heads (MHA)
    kv_channels: Optional[int] = None  # head dim; None = hidden_size // num_attention_heads
    vocab_size: int = 256  # the tokenizer's; the model pads it to make_vocab_size_divisible_by * TP
    make_vocab_size_divisible_by: int = 128
    max_sequence_length: int = 2048
    rotary_base: float = 10000.0
    rope_scaling: bool = False  # Llama 3.1-style (low/high freq factors 1/4, original context 8192)
    rope_scaling_factor: float = 8.0
    normalization: str = "RMSNorm"
    norm_eps: float = 1e-5
    swiglu: bool = True
    add_qkv_bias: bool = False  # Qwen2
    qk_layernorm: bool = False  # Qwen3
    tie_embeddings: bool = False  # SmolLM2, small Qwen: output layer = input embedding
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    init_method_std: float = 0.02
    layer_spec: str = "auto"  # te | local | auto (TE when it imports)
    fp8: Optional[str] = None  # null | e4m3 | hybrid; needs TE
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise
    params_dtype: str = "float32"  # float32 | bfloat16 | float16
    train_mode: str = "frozen"  # frozen | full | lora
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):  # plain str fields (OmegaConf has no Literal), checked here
        self.lora_targets = tuple(self.lora_targets)
        if self.train_mode not in ("frozen", "full", "lora"):
            raise ValueError(f"train_mode must be frozen|full|lora, got {self.train_mode!r}")
        if self.layer_spec not in ("te", "local", "auto"):
            raise ValueError(f"layer_spec must be te|local|auto, got {self.layer_spec!r}")
        if self.fp8 not in (None, "e4m3", "hybrid") or self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"fp8 must be null|e4m3|hybrid and fp8_recipe one of {FP8_RECIPES}")
        if set(self.lora_targets) - set(LORA_TARGETS):
            raise ValueError(f"lora_targets must be among {LORA_TARGETS}, got {self.lora_targets}")
        if self.params_dtype not in _DTYPES:
            raise ValueError(f"params_dtype must be one of {sorted(_DTYPES)}, got {self.params_dtype!r}")


@functools.cache
def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - TE without CUDA fails with OSError/RuntimeError, not only ImportError
        return False
    return True


def resolve_layer_spec(name: LayerSpec) -> Literal["te", "local"]:
    if name == "auto":
        return "te" if te_available() else "local"
    if name == "te" and not te_available():
        raise RuntimeError(
            "llm.layer_spec=te needs Transformer Engine, which does not import here (it needs CUDA; NGC images "
            "ship it). Use layer_spec=local or auto."
        )
    if name not in ("te", "local"):
        raise ValueError(f"layer_spec must be te|local|auto, got {name!r}")
    return name


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron's padding: a multiple of ``divisible_by * tp`` so every TP rank holds an equal vocab slice."""
    multiple = divisible_by * tp
    return math.ceil(vocab_size / multiple) * multiple


def transformer_config(cfg: LLMConfig, **overrides):
    """megatron ``TransformerConfig`` for ``cfg`` with the current parallel layout (sizes from ``parallel_state``,
    sequence parallelism as ``init_parallel`` recorded it)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_jstip.parallel.layout import ParallelLayout

    spec = resolve_layer_spec(cfg.layer_spec)
    if cfg.fp8 is not None and spec != "te":
        raise RuntimeError(f"llm.fp8={cfg.fp8} needs the TE layer spec (Transformer Engine); this build uses {spec}")
    dtype = _DTYPES[cfg.params_dtype]
    fused = spec == "te" and torch.cuda.is_available()  # megatron's fusions need TE/apex kernels and CUDA
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=cfg.swiglu,
        activation_func=F.silu if cfg.swiglu else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        attention_dropout=cfg.attention_dropout,
        hidden_dropout=cfg.hidden_dropout,
        init_method_std=cfg.init_method_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
        sequence_parallel=ParallelLayout.current().sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
        gradient_accumulation_fusion=False,  # needs Megatron DDP's main_grad and a fused wgrad kernel
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        apply_rope_fusion=fused,
        bias_activation_fusion=fused and cfg.swiglu,
        # Megatron's hook for an activation module (named for TE's): the local spec's SwiGLU, see layer_spec
        use_te_activation_func=spec == "local" and cfg.swiglu,
    )
    if cfg.fp8 is not None:
        kwargs.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(cfg: LLMConfig):
    """The ``TransformerLayer`` spec: TE or local modules, LoRA linears in ``lora`` mode."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if resolve_layer_spec(cfg.layer_spec) == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization=cfg.normalization)
        attn, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.keywords["submodules"]
        attn.core_attention = _sdpa_attention_class()
        column, row = _local_linear_classes()
        attn.linear_qkv, attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2 = column, row, column, row
        if cfg.swiglu:  # MLP calls it when the config sets use_te_activation_func (transformer_config)
            mlp.activation_func = SwiGLU
        spec = _with_torch_norms(spec)
    if cfg.train_mode == "lora":
        spec = _lora_layer_spec(spec, cfg)
    return spec


class TorchNorm:
    """The local spec's norm: Megatron's ``WrappedTorchNorm`` (torch ``LayerNorm`` / ``RMSNorm``), which refuses
    sequence parallelism, made to run under it. With SP each TP rank normalises only its L / TP positions, so each
    rank's gradient of the (replicated) norm weights covers only its positions: the parameters are marked
    ``sequence_parallel`` and Megatron's ``finalize_model_grads`` sums their gradients over TP, as it does for
    TE's and apex's norms, which mark themselves. Without SP it builds exactly what ``WrappedTorchNorm`` builds."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization {config.normalization!r} under sequence parallelism: use one of "
                             f"{sorted(norms)}")
        norm = norms[config.normalization](hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm


def _with_torch_norms(spec):
    """The local layer spec with every ``WrappedTorchNorm`` (input, pre-MLP, q/k norms) replaced by ``TorchNorm``."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def swap(sub, *names):
        return dataclasses.replace(sub, **{n: TorchNorm for n in names if getattr(sub, n, None) is WrappedTorchNorm})

    sub = spec.submodules
    attn = dataclasses.replace(sub.self_attention,
                               submodules=swap(sub.self_attention.submodules, "q_layernorm", "k_layernorm"))
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        swap(sub, "input_layernorm", "pre_mlp_layernorm"), self_attention=attn))


def block_spec(cfg: LLMConfig, config, vp_stage: int | None = None):
    """This pipeline stage's decoder spec: ``layer_spec`` for each of its layers, and with the local spec its own
    final norm (``TorchNorm``; Megatron would pick ``WrappedTorchNorm`` for a bare layer spec without TE or apex)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec = layer_spec(cfg)
    if resolve_layer_spec(cfg.layer_spec) == "te":
        return spec  # Megatron's block: TE's final norm
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=TorchNorm)


class _SwiGLUFunction(torch.autograd.Function):
    """``silu(a) * b`` for ``x = [a | b]`` (the fused FC1 output): the backward writes both halves' gradients into one
    buffer, where autograd would build them apart and concatenate (the chunk's backward); same saved memory."""

    @staticmethod
    def forward(ctx, x):
        a, b = x.chunk(2, dim=-1)
        act = F.silu(a)
        ctx.save_for_backward(x, act)
        return act * b

    @staticmethod
    def backward(ctx, grad):
        x, act = ctx.saved_tensors
        a, b = x.chunk(2, dim=-1)
        dx = torch.empty_like(x)
        da, db = dx.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * b, a, grad_input=da)
        torch.mul(grad, act, out=db)
        return dx


class SwiGLU(torch.nn.Module):
    """The local spec's MLP activation (Megatron's ``MLPSubmodules.activation_func``): the gated SiLU of the fused
    ``[gate | up]`` FC1 output, exactly what Megatron's unfused ``glu`` computes, without the concatenation in the
    backward."""

    def __init__(self, config=None):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwiGLUFunction.apply(x)


@functools.cache
def _local_linear_classes() -> tuple[type, type]:
    """The local spec's ``ColumnParallelLinear`` / ``RowParallelLinear`` with ``F.linear`` as the matrix multiply
    when the layer's tensor-parallel group has one rank. Megatron's autograd Function around it is there for what
    tensor parallelism and fused kernels add (the async input-gradient all-reduce, sequence-parallel gathers, weight
    gradients accumulated into ``main_grad``), none of which exists at TP=1 without the fusion, and its Python shows
    in the backward of a small model's step (benchmarks/bench_salm.py). Same parameters, state dict and gradients; at
    TP > 1 they are Megatron's."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    class TorchMatmul:
        def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, **kwargs):
            if self.tp_group.size() == 1 and not gradient_accumulation_fusion:
                return F.linear(input, weight, bias)
            return super()._forward_impl(input, weight, bias=bias,
                                         gradient_accumulation_fusion=gradient_accumulation_fusion, **kwargs)

    class LocalColumnParallelLinear(TorchMatmul, ColumnParallelLinear):
        pass

    class LocalRowParallelLinear(TorchMatmul, RowParallelLinear):
        pass

    return LocalColumnParallelLinear, LocalRowParallelLinear


_SDPA_MASKS: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Attention mask of a packed batch, ``[B, 1, L, L]`` bool, True = masked (Megatron's convention): each
    position sees the earlier positions of its own example (``segment_ids`` [B, L]; -1 marks padding, which sees
    only itself, so that no row is fully masked). RoPE is relative, so positions need not restart per example:
    within an example the attention is the same as alone. The local spec's SDPA core attention takes this mask on
    its fused path."""
    L = segment_ids.shape[1]
    position = torch.arange(L, device=segment_ids.device)
    seg = torch.where(segment_ids >= 0, segment_ids, -1 - position)  # each padding position its own segment
    causal = position[:, None] >= position[None, :]
    mask = ~((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
    _SDPA_MASKS[id(mask)] = mask
    return mask


@functools.cache
def _sdpa_attention_class() -> type:
    """Megatron's local core attention with PyTorch's fused SDPA kernel on the plain causal path (training, and
    prefill without padding) and with a packed batch's ``block_causal_mask``; padding masks, KV-cache decoding and
    the rarer options keep Megatron's own code. Same math, without the per-layer mask build, the expanded K/V heads
    and the unfused softmax (the local spec's main cost next to TE and to HF models: benchmarks/bench_salm.py)."""
    from contextlib import nullcontext

    from megatron.core import tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class SDPADotProductAttention(DotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            c = self.config
            block = attention_mask is not None and _SDPA_MASKS.get(id(attention_mask)) is attention_mask
            if ((attention_mask is not None and not block)
                    or (attn_mask_type or self.attn_mask_type) != AttnMaskType.causal
                    or query.shape[0] != key.shape[0] or attention_bias is not None or packed_seq_params is not None
                    or self.softmax_offset is not None or c.window_size is not None or c.apply_query_key_layer_scaling):
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                       packed_seq_params)
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, heads, d] -> [b, heads, s, d]
            p = self.attention_dropout.p if self.training else 0.0
            # attention dropout differs per TP rank, as in Megatron (its RNG tracker's model-parallel stream)
            with tensor_parallel.get_cuda_rng_tracker().fork() if p and not c.sequence_parallel else nullcontext():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask if block else None,
                                                     dropout_p=p, is_causal=not block, scale=self.softmax_scale,
                                                     enable_gqa=k.shape[1] != q.shape[1])
            return out.permute(2, 0, 1, 3).flatten(2)  # [s, b, heads * d]

    return SDPADotProductAttention


def build_llm(cfg: LLMConfig, *, pre_process: bool | None = None, post_process: bool | None = None,
              vp_stage: int | None = None, config=None):
    """This pipeline stage's ``GPTModel`` with ``cfg.train_mode`` applied. Needs ``parallel.dist.init_parallel``."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    cpu.apply()
    config = config or transformer_config(cfg)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(cfg, config, vp_stage),
        vocab_size=padded_vocab_size(
            cfg.vocab_size, cfg.make_vocab_size_divisible_by, config.tensor_model_parallel_size
        ),
        max_sequence_length=cfg.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
        rope_scaling=cfg.rope_scaling,
        rope_scaling_factor=cfg.rope_scaling_factor,
        vp_stage=vp_stage,
    )
    # Megatron builds its linears on the GPU when there is one, but the local spec's torch norms on the default device
    # (the CPU) and in fp32 whatever params_dtype says: one device and one dtype for the whole stage.
    model.to(compute_device())
    for p in model.parameters():
        if p.dtype != config.params_dtype:
            p.data = p.data.to(config.params_dtype)
    set_train_mode(model, cfg.train_mode)
    return model


def set_train_mode(model: torch.nn.Module, mode: TrainMode) -> None:
    """``requires_grad`` per mode: nothing (frozen), everything (full), or only the LoRA factors (lora)."""
    if mode not in ("frozen", "full", "lora"):
        raise ValueError(f"train_mode must be frozen|full|lora, got {mode!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "full" or (mode == "lora" and _is_lora_param(name)))
    if mode == "lora" and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("train_mode=lora but the model has no LoRA layers (build it with this config)")


def _is_lora_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")


# ---------------------------------------------------------------------------------------------- loss, logits
def token_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None,
               ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross entropy from vocab-sharded logits ``[..., V_pad / TP]`` and labels ``[...]``.

    Entries past ``vocab_size`` (Megatron's padding) are masked out of the softmax; positions whose label is
    ``ignore_index`` (or any negative id) get loss 0. Like Megatron's kernel, this may overwrite fp32
    ``logits`` in place (it reuses their memory for the softmax): do not read them afterwards.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    ignored = labels < 0
    if ps.get_tensor_model_parallel_world_size() == 1:  # the whole vocabulary here: one fused kernel
        flat = logits[..., :vocab_size]
        target = labels.masked_fill(ignored, ignore_index).reshape(-1)
        loss = F.cross_entropy(flat.reshape(-1, flat.shape[-1]), target, reduction="none", ignore_index=ignore_index)
        return loss.view(labels.shape)
    if vocab_size is not None:
        local = logits.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * local
        n_valid = min(max(vocab_size - start, 0), local)
        if n_valid < local:
            pad = torch.arange(local, device=logits.device) >= n_valid
            logits = logits.masked_fill(pad, float("-inf"))
    loss = vocab_parallel_cross_entropy(logits, labels.masked_fill(ignored, 0))
    return loss.masked_fill(ignored, 0.0)


def labelled_token_loss(*, hidden_states: torch.Tensor, output_layer, output_weight, labels: torch.Tensor,
                        context: int, scale_logits, **_) -> torch.Tensor:
    """``GPTModel(output_processor=...)`` for training: the per-token loss ``[B, L]`` (0 where unlabelled) from the
    final hidden states ``[L, B, H]``, through the output layer on the labelled positions only. ``context`` is the
    real vocabulary size.

    Under sequence parallelism each TP rank holds ``L / TP`` positions and the output layer all-gathers its input
    along the first dimension, so every rank passes the same number of rows: its own labelled positions, padded
    with unlabelled ones up to the largest count of any rank (labels are whole on every rank: no communication).
    Costs one host read of that count per microbatch."""
    from megatron.core.utils import get_pg_rank, get_pg_size

    tp = get_pg_size(output_layer.tp_group) if output_layer.sequence_parallel else 1
    rank = get_pg_rank(output_layer.tp_group) if tp > 1 else 0
    B, L = labels.shape
    lab = labels.T.reshape(tp, L // tp * B)  # each rank's positions, flattened as its hidden states [L / TP, B]
    keep = lab >= 0
    n = max(int(keep.sum(1).max()), 1)  # an idle batch (no labels) still passes one row: no empty collectives
    pick = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n]  # labelled first, then padding
    x = hidden_states.flatten(0, 1).index_select(0, pick[rank]).unsqueeze(1)  # [n, 1, H]
    logits, _ = output_layer(x, weight=output_weight)  # [TP * n, 1, V / TP] under SP (rank order), else [n, 1, ...]
    loss = token_loss(scale_logits(logits).squeeze(1).float(), lab.gather(1, pick).flatten(), context)
    where = (pick + torch.arange(tp, device=pick.device)[:, None] * lab.shape[1]).flatten()  # in [L * B]
    return loss.new_zeros(L * B).index_put((where,), loss).view(L, B).T


def gather_logits(logits: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Full logits from vocab-sharded ones (all TP ranks), cut to the real vocabulary."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if ps.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits if vocab_size is None else logits[..., :vocab_size]


# ---------------------------------------------------------------------------------------------- LoRA
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's GPT weights with every LoRA adapter folded into its base weight (``W + scale * B @ A``, exact on
    each TP shard: a column-parallel shard holds B's matching rows and all of A, a row-parallel one A's matching
    columns and all of B) and the factors and TE ``_extra_state`` left out: what a base model of this shape loads."""
    lora = {name: m for name, m in model.named_modules() if hasattr(m, "lora_scale")}
    out = {}
    for key, value in model.state_dict().items():
        module, last = key.rsplit(".", 1)
        if last in ("lora_a", "lora_b", "_extra_state"):
            continue
        if last == "weight" and module in lora:
            m = lora[module]
            value = value + (m.lora_scale * (m.lora_b.float() @ m.lora_a.float())).to(value.dtype)
        out[key] = value.detach()
    return out


def _lora_layer_spec(spec, cfg: LLMConfig):
    """Swap the target linears of a ``TransformerLayer`` spec for their LoRA subclasses.

    TE fuses the pre-attention/pre-MLP norm into ``linear_qkv``/``linear_fc1``; an adapter must see the
    normalised input, so with TE those targets are unfused (TE norm + ``TEColumnParallelLinear``) and the
    norm's checkpoint key is mapped back to the fused name (as megatron's local spec does). This TE path is
    written against megatron-core 0.19's TE spec but only runs where TE does (not on this CPU machine).
    """
    sub = spec.submodules
    attn, mlp = sub.self_attention.submodules, sub.mlp.keywords["submodules"]  # mlp: partial(MLP.as_mlp_submodule)
    keys_map = dict(sub.sharded_state_dict_keys_map or {})
    layer_updates = {}

    def lora(base, parallel, glu=False):
        return functools.partial(_lora_class(base, parallel), lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                 lora_dropout=cfg.lora_dropout, lora_glu=glu)

    def unfuse(base, norm_field, fused_prefix):
        if not getattr(base, "__name__", "").startswith("TELayerNorm"):
            return base
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        te = TESpecProvider()  # the norm megatron's TE MoE layers use unfused
        layer_updates[norm_field] = te.layer_norm(rms_norm=cfg.normalization == "RMSNorm", has_residual=True)
        keys_map[f"{norm_field}."] = f"{fused_prefix}.layer_norm_"
        return te.column_parallel_linear()

    targets = set(cfg.lora_targets)
    attn_updates, mlp_updates = {}, {}
    if "linear_qkv" in targets:
        base = unfuse(attn.linear_qkv, "input_layernorm", "self_attention.linear_qkv")
        attn_updates["linear_qkv"] = lora(base, "column")
    if "linear_proj" in targets:
        attn_updates["linear_proj"] = lora(attn.linear_proj, "row")
    if "linear_fc1" in targets:
        base = unfuse(mlp.linear_fc1, "pre_mlp_layernorm", "mlp.linear_fc1")
        mlp_updates["linear_fc1"] = lora(base, "column", glu=cfg.swiglu)
    if "linear_fc2" in targets:
        mlp_updates["linear_fc2"] = lora(mlp.linear_fc2, "row")
    self_attention = dataclasses.replace(
        sub.self_attention, submodules=dataclasses.replace(attn, **attn_updates)
    )
    mlp_spec = functools.partial(sub.mlp.func, *sub.mlp.args,
                                 **{**sub.mlp.keywords, "submodules": dataclasses.replace(mlp, **mlp_updates)})
    submodules = dataclasses.replace(
        sub, self_attention=self_attention, mlp=mlp_spec, sharded_state_dict_keys_map=keys_map, **layer_updates
    )
    return dataclasses.replace(spec, submodules=submodules)


@functools.cache
def _lora_class(base: type, parallel: Literal["column", "row"]) -> type:
    """``base`` (a Megatron/TE column- or row-parallel linear) plus ``scale * B(A(x))``, TP-exact."""
    from megatron.core import tensor_parallel as tpl
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.utils import get_tensor_model_parallel_group_if_none, make_tp_sharded_tensor_for_checkpoint

    split_name, split_axis = ("lora_b", 0) if parallel == "column" else ("lora_a", 1)

    class LoRALinear(base):
        def __init__(self, input_size, output_size, *, lora_rank: int, lora_alpha: float,
                     lora_dropout: float = 0.0, lora_glu: bool = False, **kwargs):
            super().__init__(input_size, output_size, **kwargs)
            assert not kwargs.get("gather_output", False), "LoRA on a column-parallel linear that gathers its output"
            assert kwargs.get("input_is_parallel", True), "LoRA on a row-parallel linear with a whole input"
            config = kwargs["config"]
            self.lora_group = get_tensor_model_parallel_group_if_none(kwargs.get("tp_group"))
            tp, rank = (1, 0) if self.lora_group is None else (self.lora_group.size(), self.lora_group.rank())
            self.lora_scale = lora_alpha / lora_rank
            self.lora_glu = lora_glu  # linear_fc1 of a SwiGLU MLP: B's rows are [gate shard; up shard]
            self.lora_dropout = torch.nn.Dropout(lora_dropout) if lora_dropout > 0 else torch.nn.Identity()
            # A is drawn whole from the CPU generator (identical on all TP ranks), then split: the same adapter at
            # any TP size. B starts at zero, so a fresh adapter leaves the model's output unchanged.
            a = torch.empty(lora_rank, input_size)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            like = dict(device=compute_device(), dtype=config.params_dtype)
            if parallel == "column":  # A whole, B split by output rows like the weight
                self.lora_a = torch.nn.Parameter(a.to(**like))
                self.lora_b = torch.nn.Parameter(torch.zeros(output_size // tp, lora_rank, **like))
            else:  # A split by input columns like the weight, B whole
                self.lora_a = torch.nn.Parameter(a.chunk(tp, dim=1)[rank].contiguous().to(**like))
                self.lora_b = torch.nn.Parameter(torch.zeros(output_size, lora_rank, **like))
            set_tensor_model_parallel_attributes(getattr(self, split_name), True, split_axis, 1)
            # Under sequence parallelism each rank's copy of the whole factor sees only its tokens; Megatron's
            # finalize_model_grads all-reduces the grads of parameters marked like this (as it does for norms).
            whole = self.lora_a if parallel == "column" else self.lora_b
            whole.sequence_parallel = config.sequence_parallel

        def forward(self, x, *args, **kwargs):
            out, bias = super().forward(x, *args, **kwargs)
            return out + self._lora(x.to(self.lora_a.dtype)).to(out.dtype), bias

        def _lora(self, x):
            group = self.lora_group
            if parallel == "column":  # x whole (or split by sequence): h whole, then this rank's output rows
                h = F.linear(self.lora_dropout(x), self.lora_a)
                if self.sequence_parallel:  # the base linear's flag (generation turns it off, modules/generate.py)
                    h = tpl.gather_from_sequence_parallel_region(h, group=group)
                else:  # identity forward; backward sums dh over ranks, so A's grad is whole
                    h = tpl.copy_to_tensor_model_parallel_region(h, group=group)
                return F.linear(h, self.lora_b) * self.lora_scale
            with tpl.get_cuda_rng_tracker().fork():  # x is split by features: dropout per TP rank
                x = self.lora_dropout(x)
            h = F.linear(x, self.lora_a)  # partial sums over this rank's input features
            if self.sequence_parallel:
                h = tpl.reduce_scatter_to_sequence_parallel_region(h, group=group)
            else:
                h = tpl.reduce_from_tensor_model_parallel_region(h, group=group)
            return F.linear(h, self.lora_b) * self.lora_scale

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            """The base's entries, with the split LoRA factor marked split (the base would mark it replicated)."""
            sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            dp_cp_group = (metadata or {}).get("dp_cp_group")
            groups = dict(tp_group=self.lora_group, dp_cp_group=dp_cp_group) if dp_cp_group is not None else {}
            key = f"{prefix}{split_name}"
            sd[key] = make_tp_sharded_tensor_for_checkpoint(
                getattr(self, split_name), key, split_axis, prepend_offsets=sharded_offsets, **groups
            )
            if self.lora_glu:  # saved as separate gate and up halves, so a checkpoint reshards across TP sizes
                sd[key] = apply_swiglu_sharded_factory(
                    sd[key], sharded_offsets, tp_group=self.lora_group, dp_group=dp_cp_group
                )
            return sd

    LoRALinear.__name__ = LoRALinear.__qualname__ = f"LoRA{base.__name__}"
    return LoRALinear

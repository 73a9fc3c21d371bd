"""Batched greedy decoding with a KV cache for ``JSTIPStage`` (pipeline size 1, any tensor-parallel size).

``greedy_generate(stage, batch, max_new_tokens, eos_id, pad_id)`` takes a PROMPT-mode batch
(``DatasetConfig(prompt=True)``: prompts LEFT-padded to a common length ``L``, ``attention_mask`` True on real
tokens) and returns the generated ids ``[B, T]`` (``T <= max_new_tokens``; a row's EOS is kept, ``pad_id``
follows it). All TP ranks call it with the same batch and get the same tokens.

How it runs (megatron-core 0.19, ``StaticInferenceContext``, ``InferenceMode`` as Megatron's static engine):

* Prefill: ``stage.embed(batch)`` (speech frames spliced in at the placeholders) goes through
  ``GPTModel.forward(decoder_input=..., inference_context=ctx)`` once. Each attention layer writes its keys and
  values into the context's cache, slots ``[0, L)``; only the last position's logits are materialised
  (``materialize_only_last_token_logits``) and gathered over TP (``runtime_gather_output``), so every rank
  takes the same argmax over the real vocabulary (Megatron's padded vocab entries are cut off).
* Decode: one step per new token, feeding only that token's embedding (``[1, B, H]``); the layer appends
  its key/value at slot ``L + t`` (``ctx.sequence_len_offset``) and attends over the cache ``[0, L + t]``.
* Masks (Megatron convention: bool, True = masked out, ``[B, 1, Sq, Sk]``): the prefill mask is causal OR
  "key is left padding", with the diagonal always open so padded query rows are never fully masked (their
  outputs are unused; only real keys reach real queries). Each decode step masks the padded key slots; the
  slots written during decoding are always visible. A finished row keeps feeding EOS, whose outputs nobody
  reads (``pad_id`` is only written to the output, never embedded). With no padding at all no mask is passed
  and Megatron uses its own causal / no-mask path. Transformer Engine attention masks by Megatron's mask type
  (causal in prefill, no_mask in decode) rather than by a passed mask, so padded batches need the local spec
  (checked: a TE model raises on a padded batch; the TE path is not exercised on the CPU).
* RoPE: in static inference ``GPTModel`` ignores ``position_ids``; rotary positions are cache slots (prefill
  query/key at slot s get angle s; the decode query at ``L + t`` gets ``L + t`` and the cached keys are rotated
  with their slots at every step, as they are stored unrotated). Left padding shifts all of a row's real tokens
  by the same ``L - prompt_len``, and RoPE attention scores depend only on position differences, so each row
  decodes as it would alone (up to float rounding); the batch's ``position_ids`` are therefore not needed.

Every rank of the model-parallel group must call it with the same batch (TP collectives run in every step).
NeMo's ``ConformerEncoder`` also all-reduces over the WORLD group in each forward unless the encoder config sets
``sync_max_audio_length: false``; with it on, ranks that decode different numbers of speech batches (data
parallel, or only some ranks decoding) wait for each other forever.

* Sequence parallelism: a decode step feeds one position, which cannot be split over TP ranks. As Megatron's
  own inference does for dense models (``set_model_to_sequence_parallel(model, False)`` in its text generation
  controller), generation runs with SP off: every module's ``sequence_parallel`` / ``scatter_to_sequence_parallel``
  / ``reduce_scatter_embeddings`` flag and ``config.sequence_parallel`` are False while it runs and restored after,
  so the layers all-reduce whole sequences instead (the same function, the same weights).

Not supported: pipeline parallelism (raise), context parallelism (raise), beam search.
"""

from __future__ import annotations

import contextlib

import torch

_SP_FLAGS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")

__all__ = ["greedy_generate", "decode_text"]


def _check_stage(stage, padded: bool) -> None:
    gpt = stage.gpt
    if not (gpt.pre_process and gpt.post_process):
        raise NotImplementedError("greedy_generate needs the whole model on one stage (pipeline size 1)")
    cfg = gpt.config
    if cfg.context_parallel_size > 1:
        raise NotImplementedError("greedy_generate does not support context parallelism")
    if padded:
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        others = {type(layer.self_attention.core_attention).__name__ for layer in gpt.decoder.layers
                  if not isinstance(layer.self_attention.core_attention, DotProductAttention)}
        if others:
            raise NotImplementedError(
                f"left-padded prompts need an explicit attention mask, which {sorted(others)} does not apply "
                "(it masks by Megatron's causal/no_mask type); use llm.layer_spec=local, or prompts of one length"
            )


def _prompt_mask(batch: dict) -> torch.Tensor:
    """``[B, L]`` bool, True on real prompt tokens; checks the prompts are left-padded."""
    ids = batch["input_ids"]
    B, L = ids.shape
    mask = batch.get("attention_mask")
    if mask is None:
        lens = batch.get("prompt_lens", batch.get("seq_lens"))
        if lens is not None and bool((lens < L).any()):
            raise ValueError("padded prompts without an attention_mask: build them with DatasetConfig(prompt=True)")
        return torch.ones(B, L, dtype=torch.bool, device=ids.device)
    mask = mask.to(device=ids.device, dtype=torch.bool)
    # left padding: every row ends with a real token and has no padding after its first real token
    if (L and not bool(mask[:, -1].all())) or bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError("prompts must be LEFT-padded (DatasetConfig(prompt=True)): attention_mask has a gap "
                         "or padding at the end")
    return mask


@contextlib.contextmanager
def sequence_parallel_off(model: torch.nn.Module):
    """``model`` (a ``GPTModel`` or a stage around one) without sequence parallelism while the block runs: the
    flags Megatron's modules read at run time set to False, then restored to what they were."""
    saved = [(m, name, getattr(m, name)) for m in model.modules() for name in _SP_FLAGS
             if isinstance(getattr(m, name, None), bool) and getattr(m, name)]
    configs = {id(m.config): m.config for m in model.modules()
               if getattr(getattr(m, "config", None), "sequence_parallel", False)}
    for m, name, _ in saved:
        setattr(m, name, False)
    for c in configs.values():
        c.sequence_parallel = False
    try:
        yield model
    finally:
        for m, name, value in saved:
            setattr(m, name, value)
        for c in configs.values():
            c.sequence_parallel = True


@torch.no_grad()
def greedy_generate(stage, batch: dict, max_new_tokens: int, eos_id: int, pad_id: int, *,
                    return_scores: bool = False):
    """Greedy continuation of left-padded prompts with a KV cache: ``LongTensor [B, T]``, ``T <= max_new_tokens``.

    ``batch``: a PROMPT-mode batch on the model's device (``input_ids``, ``audio_item``, ``audio_frame``,
    ``audio``/``audio_lens`` for speech, ``attention_mask``). Row ``b`` holds the tokens generated after its
    prompt; after its EOS (kept) come ``pad_id``. Decoding stops when every row has emitted EOS, or after
    ``max_new_tokens``. ``return_scores``: also return the chosen tokens' logits ``[B, T]`` (float32; 0 after EOS).
    """
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.utils import InferenceMode

    ids = batch["input_ids"]
    B, L = ids.shape
    device = ids.device
    real = _prompt_mask(batch)
    padded = not bool(real.all())
    _check_stage(stage, padded)
    out = torch.full((B, max(max_new_tokens, 0)), pad_id, dtype=torch.long, device=device)
    scores = torch.zeros(out.shape, dtype=torch.float32, device=device)
    if max_new_tokens <= 0 or B == 0:
        return (out, scores) if return_scores else out

    gpt, vocab = stage.gpt, stage.vocab_size
    total = L + max_new_tokens
    ctx = StaticInferenceContext(max_batch_size=B, max_sequence_length=total)
    # key slots a query may see: the real prompt tokens, then every generated slot
    key_ok = torch.ones(B, total, dtype=torch.bool, device=device)
    key_ok[:, :L] = real
    if padded:
        causal = torch.ones(L, L, dtype=torch.bool, device=device).triu_(1)
        prefill_mask = causal[None, None] | ~real[:, None, None, :]
        prefill_mask.diagonal(dim1=-2, dim2=-1).fill_(False)  # padded queries see themselves: no empty row
    else:
        prefill_mask = None  # Megatron's own causal mask
    step_batch = {"input_ids": None, "audio_item": torch.full((B, 1), -1, dtype=torch.long, device=device),
                  "audio": None}
    done = torch.zeros(B, dtype=torch.bool, device=device)

    modes = {m: m.training for m in stage.modules()}
    stage.eval()  # no dropout; Megatron's KV-cache path is written for eval mode
    try:
        with InferenceMode.active(), sequence_parallel_off(stage):
            logits = gpt(None, None, prefill_mask, decoder_input=stage.embed(batch), inference_context=ctx,
                         runtime_gather_output=True)  # [B, 1, V_pad]: last position only, gathered over TP
            ctx.sequence_len_offset += L
            ctx.enable_decode_mode()
            steps = 0
            for t in range(max_new_tokens):
                best, token = logits[:, -1, :vocab].float().max(dim=-1)
                token = token.masked_fill(done, pad_id)
                out[:, t] = token
                scores[:, t] = best.masked_fill(done, 0.0)
                done |= token == eos_id
                steps = t + 1
                if steps == max_new_tokens or bool(done.all()):
                    break
                # finished rows feed EOS (always a valid id, unlike an arbitrary pad_id); nothing reads their outputs
                step_batch["input_ids"] = token.masked_fill(done, eos_id)[:, None]
                mask = ~key_ok[:, None, None, : L + t + 1] if padded else None
                logits = gpt(None, None, mask, decoder_input=stage.embed(step_batch), inference_context=ctx,
                             runtime_gather_output=True)
                ctx.sequence_len_offset += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
    out, scores = out[:, :steps], scores[:, :steps]
    return (out, scores) if return_scores else out


def decode_text(tokenizer, ids) -> list[str]:
    """Generated ids ``[B, T]`` (tensor or lists) -> text per row: cut at the first EOS, special tokens dropped."""
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(r) for r in ids]
    eos = tokenizer.eos_token_id
    if eos is not None:
        rows = [r[: r.index(eos)] if eos in r else r for r in rows]
    return [s.strip() for s in tokenizer.batch_decode(rows, skip_special_tokens=True)]

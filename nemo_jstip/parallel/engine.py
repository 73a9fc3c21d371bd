"""How one training step runs under Megatron: the engine around a model stage.

The model (``models/jstip_model.py``) says what the network is: a pipeline stage ``stage(batch)`` that returns
hidden states, or on the last stage the per-token loss ``[B, L]`` whose positions ``batch["loss_mask"]`` selects.
The engine says how it trains:

* wrapping: Megatron ``DistributedDataParallel`` (gradients reduced into contiguous buffers; reduce-scattered
  instead of all-reduced with the distributed optimizer);
* the optimizer: the torch optimizer NeMo builds from ``model.optim`` (param groups, LR schedule and all) inside
  Megatron's wrapper: ``FP32Optimizer`` / ``Float16OptimizerWithFloat16Params`` (fp32 main weights for bf16/fp16
  parameters) or, with ``use_distributed_optimizer``, ``DistributedOptimizer`` (main weights and Adam state
  sharded over the data-parallel ranks: ~12 bytes per parameter less on each extra rank);
* global-norm clipping (``max_grad_norm``) on DDP's contiguous fp32 gradient buffers, before the wrapper's step:
  Megatron's norm (the same gradients counted, the same groups reduced over) on a few spans per buffer instead of
  a Python loop over every parameter, twice (norm, then scale), per step;
* the schedule: Megatron's forward-backward over ``num_microbatches`` batches (1F1B with PP), with the per-token
  loss summed over microbatches and normalised over all data- and context-parallel ranks
  (``calculate_per_token_loss``);
* gradient reduction beyond Megatron's: parameters marked ``partial_grad_over_tp`` (the speech perception when
  each TP rank encodes only its share of the clips, or under sequence parallelism) are replicated over TP but
  their gradients on each rank cover only its share, so they are summed over TP after Megatron's
  ``finalize_model_grads`` (which does the same for its own ``sequence_parallel`` parameters);
* the sequence-length check (a multiple of TP with sequence parallelism, of 2 x CP with context parallelism),
  the context-parallel split of every sequence tensor, and an idle batch for a rank whose batches were all
  dropped as bad input (it still joins every collective);
* the loss and token count reported on every rank (broadcast from the last stage).

On the CPU the same code runs through the shims in ``parallel/cpu.py`` (active only without CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps

from nemo_jstip.parallel.dist import compute_device
from nemo_jstip.parallel.layout import ParallelLayout

SEQUENCE_KEYS = ("input_ids", "labels", "loss_mask", "audio_item", "audio_frame", "position_ids")


@dataclass
class EngineConfig:
    """Training-engine options (``model.optim.use_distributed_optimizer``, ``model.max_grad_norm``, ...)."""

    use_distributed_optimizer: bool = False
    max_grad_norm: float | None = None  # global-norm clipping; None or 0: off
    overlap_grad_reduce: bool = False


def adam_state(optimizer: torch.optim.Optimizer, config=None) -> None:
    """Create torch Adam/AdamW state for every parameter that has none (checkpoint loading fills it in place)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p].update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                                          exp_avg_sq=torch.zeros_like(p))


class MegatronEngine:
    """Trains one model stage under Megatron parallelism (see the module docstring)."""

    def __init__(self, stage: torch.nn.Module, layout: ParallelLayout, cfg: EngineConfig, pad_token_id: int = 0):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads

        self.stage, self.layout, self.cfg, self.pad_token_id = stage, layout, cfg, pad_token_id
        self.ddp = DistributedDataParallel(
            stage.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True,  # clipping scales the buffers in place
                                          overlap_grad_reduce=cfg.overlap_grad_reduce,
                                          use_distributed_optimizer=cfg.use_distributed_optimizer),
            stage,
        )
        self._partial_over_tp = [p for p in stage.parameters() if getattr(p, "partial_grad_over_tp", False)]

        def finalize(*args, **kwargs):
            finalize_model_grads(*args, **kwargs)
            self._sum_partial_grads_over_tp()

        stage.config.finalize_model_grads_func = finalize
        stage.config.no_sync_func = self.ddp.no_sync
        self.optimizer = None  # Megatron's optimizer wrapper, from wrap_optimizer
        self._norm_spans = self._grad_norm_spans()

    def _sum_partial_grads_over_tp(self) -> None:
        """Sum the gradients of the ``partial_grad_over_tp`` parameters over TP, in one collective (as Megatron's
        ``_allreduce_non_tensor_model_parallel_grads``: after the DP reduction; the DP shards of a distributed
        optimizer sit at the same buffer offsets on every TP rank)."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.main_grad for p in self._partial_over_tp if getattr(p, "main_grad", None) is not None]
        if not grads or ps.get_tensor_model_parallel_world_size() == 1:
            return
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, group=ps.get_tensor_model_parallel_group())
        for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(summed)

    def _grad_norm_spans(self, row: int = 4096) -> list[torch.Tensor]:
        """The parts of the gradient buffers that the global gradient norm counts on this rank, by Megatron's rule
        (``MegatronOptimizer.get_grads_for_grad_norm``): the gradients reduced here (the whole buffer; with the
        distributed optimizer this rank's DP shard of each bucket), less those another rank counts (a parameter
        replicated over TP on TP rank 0 only, a pipeline-shared embedding on one stage). Buffer padding is zero, so
        counted parameters that follow each other make one span: one per buffer at TP=PP=1. Each span is viewed as
        rows of ``row`` elements (and a shorter last row), whose norms are taken apart: one fp32 norm over
        millions of elements loses ~1e-4 relative on the CPU, over rows ~1e-7."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        spans = []
        for buf in self.ddp.buffers + self.ddp.expert_parallel_buffers:
            runs = []  # [start, end) of consecutive counted parameters, in buffer order
            for p, (start, end, _) in sorted(buf.param_index_map.items(), key=lambda item: item[1][0]):
                if not (param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)):
                    runs.append(None)
                elif runs and runs[-1] is not None:
                    runs[-1][1] = end
                else:
                    runs.append([start, end])
            owned = []
            for b in buf.buckets:
                lo, hi = b.offset, b.offset + b.grad_data.numel()
                if self.cfg.use_distributed_optimizer:  # Megatron's shard_buffer: equal shards of each bucket
                    g = self.ddp.param_to_bucket_group[b.params_list[0]]
                    n, r = g.intra_distributed_optimizer_instance_size, g.intra_distributed_optimizer_instance_rank
                    lo, hi = lo + r * (hi - lo) // n, lo + (r + 1) * (hi - lo) // n
                owned.append((lo, hi))
            for run in filter(None, runs):
                for lo, hi in owned:
                    lo, hi = max(run[0], lo), min(run[1], hi)
                    whole = lo + (hi - lo) // row * row
                    if whole > lo:
                        spans.append(buf.grad_data[lo:whole].view(-1, row))
                    if hi > whole:
                        spans.append(buf.grad_data[whole:hi].view(1, -1))
        return spans

    @torch.no_grad()
    def grad_norm(self) -> float:
        """The global L2 norm of the gradients in the buffers (after ``forward_backward``), over the optimizer's
        grad-stats group (model-parallel ranks; every rank with the distributed optimizer), as Megatron's
        ``get_grad_norm_fp32`` computes it."""
        sq = torch.zeros((), dtype=torch.float32, device=compute_device())
        if self._norm_spans:
            rows = [torch.linalg.vector_norm(s, dim=1, dtype=torch.float32) for s in self._norm_spans]
            sq = torch.cat(rows).square().sum()
        torch.distributed.all_reduce(sq, group=self.optimizer.get_grad_stats_parallel_group())
        return sq.sqrt().item()

    @torch.no_grad()
    def clip_grads(self, max_norm: float) -> float:
        """Scale the gradients so that their global norm is at most ``max_norm`` (Megatron's coefficient,
        ``max_norm / (norm + 1e-6)`` when below 1); returns the norm before clipping. A non-finite norm raises
        before any weight changes."""
        norm = self.grad_norm()
        if not math.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {norm}: inf/nan in the gradients, optimizer step not taken")
        coeff = max_norm / (norm + 1.0e-6)
        if coeff < 1.0:
            for buf in self.ddp.buffers + self.ddp.expert_parallel_buffers:
                buf.grad_data.mul_(coeff)
        return norm

    def describe(self) -> str:
        """The one log line of what is in effect."""
        return self.layout.describe(distributed_optimizer=self.cfg.use_distributed_optimizer)

    # ------------------------------------------------------------------ optimizer
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer):
        """Put NeMo's torch optimizer (built over the stage's parameters) inside Megatron's optimizer wrapper.
        The torch optimizer stays the one Lightning and the LR scheduler hold: its param groups keep their
        hyper-parameters (the distributed optimizer swaps their parameters for this rank's fp32 shards)."""
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
        from megatron.core.optimizer.optimizer import FP32Optimizer, Float16OptimizerWithFloat16Params

        dtype = self.stage.config.params_dtype
        config = OptimizerConfig(
            lr=optimizer.param_groups[0]["lr"], clip_grad=0.0,  # the engine clips (clip_grads)
            bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
            use_distributed_optimizer=self.cfg.use_distributed_optimizer,
        )
        if self.cfg.use_distributed_optimizer:
            self.optimizer = DistributedOptimizer(
                optimizer, config, None, adam_state, [self.ddp], {0: self.ddp.buffers},
                ps.get_data_parallel_group(with_context_parallel=True),
                None, 0, 0,  # no gloo side group: needed only by checkpoint formats that gather over DP
            )
        elif dtype != torch.float32:
            self.optimizer = Float16OptimizerWithFloat16Params(optimizer, config, None, adam_state)
        else:
            self.optimizer = FP32Optimizer(optimizer, config, adam_state)
        return self.optimizer

    def optimizer_sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        """The optimizer state as Megatron sharded state. The plain wrappers map it onto the model's sharded
        tensors: any TP/PP/DP loads it. The distributed optimizer saves each rank's flat shard with no exchange
        (``dp_reshardable``): it loads at any DP size, at the TP/PP it was saved at (megatron-core 0.19's
        model-space format for it fails: ``ShardedTensor.flattened_range is not supported``; its
        ``fully_reshardable`` one gathers each model-parallel shard's whole state over DP while saving)."""
        metadata = {"distrib_optim_sharding_type": "dp_reshardable"} if self.cfg.use_distributed_optimizer else None
        if is_loading:  # the state the checkpoint is loaded into (before the first step there is none)
            adam_state(self.optimizer.optimizer)
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)

    @torch.no_grad()  # fp32 main-weight shards of the distributed optimizer are views of the parameters
    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
        # Without TE/apex Adam, megatron-core 0.19's distributed optimizer keeps torch Adam's step count in the
        # param groups; on load it gives every parameter one shared step tensor (which foreach AdamW would then
        # advance once per parameter) and overwrites it with the not-yet-loaded placeholder. The group's count
        # is the checkpoint's: give each parameter its own copy of it.
        inner = self.optimizer.optimizer
        for group in inner.param_groups:
            if "step" in group:
                for p in group["params"]:
                    on_device = group.get("fused") or group.get("capturable")  # torch keeps those steps there
                    inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32,
                                                          device=p.device if on_device else None)

    # ------------------------------------------------------------------ steps
    def train_step(self, batches: list[dict]) -> dict:
        """One update from ``batches`` (this rank's microbatches, on the device): loss, tokens, pre-clip grad norm."""
        if self.optimizer is None:
            raise RuntimeError("MegatronEngine.train_step before wrap_optimizer (model.setup_optimization)")
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        stats = self.forward_backward(batches, forward_only=False)
        stats["grad_norm"] = self.clip_grads(self.cfg.max_grad_norm) if self.cfg.max_grad_norm else None
        ok, _, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("optimizer step skipped: inf/nan in the gradients")
        self._average_buffers()
        return stats

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> dict:
        return self.forward_backward(batches, forward_only=True)

    def forward_backward(self, batches: list[dict], forward_only: bool) -> dict:
        """Megatron's schedule over ``batches``; gradients land in ``param.main_grad`` (reduced over DP).
        Returns the token-weighted loss and the token count over all microbatches and DP/CP ranks, on every rank."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(data_iter, model):
            batch = split_for_context_parallel(next(data_iter))
            out = model(batch)

            def loss_func(loss):
                mask = batch["loss_mask"]
                total = (loss * mask).sum()
                n = mask.sum().to(torch.int)
                return total, n, {"loss": torch.stack([total.detach(), n.float()])}

            return out, loss_func

        # a rank whose batches were all dropped as bad input still joins the collectives, contributing nothing
        batches = [b for b in batches if b["input_ids"].shape[0] > 0] or [self.idle_batch()]
        multiple = self.layout.sequence_multiple
        if bad := sorted({b["input_ids"].shape[1] for b in batches if b["input_ids"].shape[1] % multiple}):
            raise ValueError(f"sequence length(s) {bad} not a multiple of {multiple} ({self.layout.describe()}): "
                             "set the dataset's pad_to_multiple (JSTIPModel's loaders derive it)")
        reports = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(batches),
            model=self.stage if forward_only else self.ddp,
            num_microbatches=len(batches),
            seq_length=max(b["input_ids"].shape[1] for b in batches),
            micro_batch_size=max(b["input_ids"].shape[0] for b in batches),
            forward_only=forward_only,
        )
        total = torch.zeros(2)
        for r in reports:  # last pipeline stage only
            total += r["loss"].detach().float().cpu()
        total = total.to(compute_device())
        if ps.get_pipeline_model_parallel_world_size() > 1:  # every stage reports the loss
            torch.distributed.broadcast(total, ps.get_pipeline_model_parallel_last_rank(),
                                        ps.get_pipeline_model_parallel_group())
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        return {"loss": (total[0] / total[1].clamp(min=1)).item(), "tokens": int(total[1].item())}

    def idle_batch(self) -> dict:
        """One row of padding with no loss and no audio; its length suits sequence/context-parallel splitting."""
        n = 2 * self.layout.tp * self.layout.cp * 8
        ids = torch.full((1, n), self.pad_token_id, dtype=torch.long, device=compute_device())
        none = torch.full_like(ids, -1)
        return {"input_ids": ids, "labels": torch.full_like(ids, -100), "loss_mask": torch.zeros(1, n, device=ids.device),
                "audio_item": none, "audio_frame": none, "audio": None}

    def _average_buffers(self) -> None:
        """Keep floating-point buffers (the encoder's BatchNorm statistics) identical on all data-parallel ranks
        (Megatron DDP reduces gradients only), so every replica evaluates and saves the same model."""
        bufs = [b for b in self.stage.buffers() if b.is_floating_point()]
        if self.layout.dp == 1 or not bufs:
            return
        flat = torch.cat([b.reshape(-1).float() for b in bufs])  # one collective per step, not one per buffer
        torch.distributed.all_reduce(flat, group=ps.get_data_parallel_group())
        flat.div_(self.layout.dp)
        for b, part in zip(bufs, flat.split([b.numel() for b in bufs])):
            b.copy_(part.view_as(b))


def split_for_context_parallel(batch: dict) -> dict:
    """With context parallelism, this rank's two zigzag chunks of every sequence tensor (Megatron's load-balanced
    split, the one its rotary embedding expects). The splice is per position, so each chunk's placeholders take
    their frames from the full encoder output: every CP rank encodes the whole audio."""
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return batch
    from megatron.core.utils import get_batch_on_this_cp_rank

    seq = {k: batch[k] for k in SEQUENCE_KEYS if batch.get(k) is not None}
    L, n = batch["input_ids"].shape[1], 2 * cp
    if L % n:
        raise ValueError(f"sequence length {L} is not a multiple of 2 x CP = {n}: set the dataset's pad_to_multiple")
    split = get_batch_on_this_cp_rank(seq | {"cu_seqlens": None}, False, ps.get_context_parallel_group())
    return batch | {k: split[k] for k in seq}

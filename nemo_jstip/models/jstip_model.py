"""JSTIPModel: speech encoder + adapter + Megatron GPT, trained on JSTIP's interleaved sequences.

Data flows one way: the dataset lays out each sequence (placeholders for speech frames, labels) in the DataLoader
workers; the first pipeline stage encodes the audio once, splices the frames into the token embeddings with one
gather (``frames[audio_item[m], audio_frame[m]]``) and hands them to the GPT as ``decoder_input``; the last stage
returns the per-token cross-entropy. Training runs Megatron's own pipeline schedule over ``num_microbatches``
loader batches per step, with per-token loss normalisation over all microbatches and data-parallel ranks
(``calculate_per_token_loss``), and Megatron's DistributedDataParallel for gradient reduction.

Modules are built in ``configure_model`` (Lightning calls it once the strategy has set up Megatron's parallel
state); without a trainer they are built at once in a single-process parallel state.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from nemo.core.classes import ModelPT
from nemo.core.classes.common import ALLOWED_TARGET_PREFIXES
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import AutoTokenizer

from nemo_jstip.checkpoint import JSTIPSaveRestoreConnector, load_nemo_weights
from nemo_jstip.data.examples import add_special_tokens
from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.interleave import InterleaveConfig
from nemo_jstip.modules.llm import LLMConfig, build_llm, token_loss
from nemo_jstip.modules.perception import SpeechPerception
from nemo_jstip.parallel.dist import compute_device, init_parallel

if "nemo_jstip." not in ALLOWED_TARGET_PREFIXES:  # NeMo instantiates only allow-listed `_target_`s
    ALLOWED_TARGET_PREFIXES.append("nemo_jstip.")
_TOKENIZER_FILES = {"tokenizer_json": "tokenizer.json", "tokenizer_config": "tokenizer_config.json"}


class JSTIPStage(torch.nn.Module):
    """One pipeline stage: the speech perception (first stage only) and this stage's GPT layers."""

    def __init__(self, perception: SpeechPerception | None, gpt: torch.nn.Module, vocab_size: int):
        super().__init__()
        self.perception, self.gpt, self.vocab_size = perception, gpt, vocab_size
        self.config, self.model_type = gpt.config, gpt.model_type  # what Megatron's schedules read
        # what finalize_model_grads reads with PP > 1 (embedding-grad all-reduce between the first and last stage)
        self.pre_process, self.post_process = gpt.pre_process, gpt.post_process
        self.share_embeddings_and_output_weights = gpt.share_embeddings_and_output_weights

    def set_input_tensor(self, tensor) -> None:
        self.gpt.set_input_tensor(tensor)

    def shared_embedding_or_output_weight(self):
        return self.gpt.shared_embedding_or_output_weight()

    def embed(self, batch: dict) -> torch.Tensor:
        """Token embeddings with the encoder frames spliced in at the placeholders: [L, B, H] (SP-scattered)."""
        emb = self.gpt.embedding.word_embeddings(batch["input_ids"])  # [B, L, H]
        item = batch["audio_item"]
        if batch.get("audio") is not None and batch["audio"].shape[0] > 0:
            frames, frame_lens = self.perception(batch["audio"], batch["audio_lens"])
            m = item >= 0
            spliced = frames[item[m], batch["audio_frame"][m]].to(emb.dtype)
            emb = emb.index_put(torch.nonzero(m, as_tuple=True), spliced)
        emb = emb.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    def forward(self, batch: dict) -> torch.Tensor:
        """Last stage: per-token loss [B, L]; other stages: hidden states for the next stage."""
        decoder_input = self.embed(batch) if self.gpt.pre_process else None
        out = self.gpt(
            input_ids=None, position_ids=batch.get("position_ids"), attention_mask=None, decoder_input=decoder_input
        )
        if not self.gpt.post_process:
            return out
        return token_loss(out.float(), batch["labels"], self.vocab_size)


class JSTIPModel(ModelPT):
    """The JSTIP speech-LLM as a NeMo model (config sections: tokenizer, perception, llm, interleave, optim, data)."""

    def __init__(self, cfg: DictConfig, trainer: Trainer | None = None):
        with open_dict(cfg):  # loaders need the data-parallel rank: built in setup(), not by ModelPT.__init__
            for key in ("train_ds", "validation_ds", "test_ds"):
                if cfg.get(key) is not None:
                    cfg[key]["defer_setup"] = True
        super().__init__(cfg=cfg, trainer=trainer)
        self.stage: JSTIPStage | None = None
        self.automatic_optimization = False
        self.tokenizer = self._load_tokenizer()
        self.interleave_cfg = InterleaveConfig(**OmegaConf.to_container(self.cfg.get("interleave") or OmegaConf.create()))
        add_special_tokens(self.tokenizer, self.interleave_cfg)
        llm = OmegaConf.to_container(self.cfg.llm, resolve=True)
        self.init_from_hf = llm.pop("init_from_hf", None)  # a local HF folder (safetensors) with the LLM's weights
        llm["vocab_size"] = max(llm.get("vocab_size") or 0, len(self.tokenizer))
        self.llm_cfg = LLMConfig(**llm)
        self.frame_spec = FrameSpec.from_config(self.cfg.perception)
        self._ddp = None
        self._resume_rng = None
        self._save_restore_connector = JSTIPSaveRestoreConnector()
        self.init_from_nemo = self.cfg.get("init_from_nemo")  # weights to start from (e.g. a fine-tuning stage)
        if trainer is None:
            self.configure_model()

    # ------------------------------------------------------------------ construction
    def _load_tokenizer(self):
        """The LLM's HF tokenizer; its two files travel inside the .nemo as artifacts."""
        tok = self.cfg.tokenizer
        with tempfile.TemporaryDirectory(prefix="jstip_tokenizer_") as folder:  # the files may come from two places
            for key, name in _TOKENIZER_FILES.items():
                if not tok.get(key):
                    with open_dict(self.cfg):
                        tok[key] = str(Path(tok.path) / name)
                shutil.copy(self.register_artifact(f"tokenizer.{key}", tok[key]), Path(folder) / name)
            return AutoTokenizer.from_pretrained(folder)

    def configure_model(self) -> None:
        if self.stage is not None:
            return
        if not ps.model_parallel_is_initialized():
            init_parallel(seed=self.cfg.get("seed", 1234))
        first = ps.is_pipeline_first_stage()
        perception = SpeechPerception(self.cfg.perception) if first else None
        gpt = build_llm(self.llm_cfg, config=self._transformer_config())
        # Megatron builds the GPT on the current GPU; the perception joins it, with or without a Trainer
        self.stage = JSTIPStage(perception, gpt, self.llm_cfg.vocab_size).to(compute_device())
        self._init_weights()

    def _init_weights(self) -> None:
        """Pretrained parts from the config: the LLM from HF weights, the encoder from a NeMo ASR .nemo, then
        (overriding both) a whole JSTIP .nemo, e.g. for a fine-tuning stage (restore_from clears all three)."""
        if self.init_from_hf:
            from nemo_jstip.modules.hf_import import load_hf_weights, read_hf_weights

            load_hf_weights(self.stage.gpt, read_hf_weights(self.init_from_hf), self.llm_cfg)
        asr_nemo = self.cfg.perception.get("init_from_nemo")
        if asr_nemo and self.stage.perception is not None:
            self.stage.perception.load_encoder_from_nemo(asr_nemo)
        if self.init_from_nemo:
            load_nemo_weights(self, self.init_from_nemo)

    def sharded_state_dict(self, prefix: str = "") -> dict:
        """Megatron's layout-independent view of the weights (what the .nemo stores): the GPT's own, plus the
        perception's tensors marked replicated over TP and DP."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = self.stage.gpt.sharded_state_dict(prefix=f"{prefix}stage.gpt.")
        if self.stage.perception is not None:
            sd.update(make_sharded_tensors_for_checkpoint(self.stage.perception.state_dict(keep_vars=True),
                                                          f"{prefix}stage.perception."))
        return sd

    def _transformer_config(self):
        from nemo_jstip.modules.llm import transformer_config

        # token budgets give every microbatch its own shape; the pipeline p2p then exchanges shapes first
        return transformer_config(
            self.llm_cfg, calculate_per_token_loss=True, variable_seq_lengths=True, moe_token_dispatcher_type="alltoall"
        )

    @property
    def ddp(self):
        """The stage wrapped in Megatron DDP (built on first use in training; kept out of the state dict)."""
        if self._ddp is None:
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
            from megatron.core.distributed import finalize_model_grads

            ddp = DistributedDataParallel(
                self.stage.config,
                DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
                self.stage,
            )
            self.stage.config.finalize_model_grads_func = finalize_model_grads
            self.stage.config.no_sync_func = ddp.no_sync
            self.__dict__["_ddp"] = ddp  # not a submodule: same parameters, no duplicate state-dict keys
        return self._ddp

    # ------------------------------------------------------------------ training
    def _forward_backward(self, batches: list[dict], forward_only: bool) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(data_iter, model):
            batch = _on_this_cp_rank(next(data_iter))
            out = model(batch)

            def loss_func(loss):
                mask = batch["loss_mask"]
                total = (loss * mask).sum()
                n = mask.sum().to(torch.int)
                return total, n, {"loss": torch.stack([total.detach(), n.float()])}

            return out, loss_func

        # a rank whose batches were all dropped as bad input still joins the collectives, contributing nothing
        batches = [b for b in batches if b["input_ids"].shape[0] > 0] or [self._idle_batch()]
        model = self.ddp if not forward_only else self.stage
        seq = max(b["input_ids"].shape[1] for b in batches)
        mbs = max(b["input_ids"].shape[0] for b in batches)
        reports = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(batches),
            model=model,
            num_microbatches=len(batches),
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )
        total = torch.zeros(2)
        for r in reports:  # last pipeline stage only
            total += r["loss"].detach().float().cpu()
        if ps.get_pipeline_model_parallel_world_size() > 1:  # every stage reports the loss
            total = total.to(compute_device())
            torch.distributed.broadcast(total, ps.get_pipeline_model_parallel_last_rank(), ps.get_pipeline_model_parallel_group())
        total = total.to(compute_device())  # the tokens of all data- and context-parallel ranks
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        return {"loss": (total[0] / total[1].clamp(min=1)).item(), "tokens": int(total[1].item())}

    def _idle_batch(self) -> dict:
        """One row of padding with no loss and no audio; its length suits sequence/context-parallel splitting."""
        c = self.stage.config
        n = 2 * c.tensor_model_parallel_size * c.context_parallel_size * 8
        ids = torch.full((1, n), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        none = torch.full_like(ids, -1)
        batch = {"input_ids": ids, "labels": torch.full_like(ids, -100), "loss_mask": torch.zeros(1, n),
                 "audio_item": none, "audio_frame": none, "audio": None}
        return self._to_device(batch)

    def _microbatches(self, dataloader_iter) -> list[dict]:
        batches = []
        for _ in range(self.cfg.get("num_microbatches", 1)):
            try:
                batch, _, _ = next(dataloader_iter)
            except StopIteration:
                break
            batches.append(batch)
        return batches

    def _to_device(self, batch: dict) -> dict:
        dev = compute_device()
        return {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def training_step(self, dataloader_iter):
        if self._resume_rng is not None:
            self._restore_rng()
        raw = self._microbatches(dataloader_iter)
        if not raw:
            return None
        batches = [self._to_device(b) for b in raw]
        opt = self.optimizers()
        stats = self.optimizer_step(batches, opt, self.cfg.get("max_grad_norm"))
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        sampler = getattr(self.trainer.train_dataloader, "sampler", None) if self.trainer else None
        if hasattr(sampler, "mark_consumed"):
            for b in raw:
                sampler.mark_consumed(b["position"])
        if stats["tokens"]:  # else every rank's batches were dropped as bad input (counted by the dataset)
            self.log("train_loss", stats["loss"], prog_bar=True, batch_size=1)
        self.log("train_tokens", float(stats["tokens"]), batch_size=1)
        if stats["grad_norm"] is not None:
            self.log("grad_norm", stats["grad_norm"], batch_size=1)
        self.log("lr", opt.param_groups[0]["lr"], batch_size=1)
        perception = self.stage.perception
        if perception is not None and perception.cache_limit:
            seen = perception.cache_stats["hits"] + perception.cache_stats["misses"]
            self.log("encoder_cache_hit_rate", perception.cache_stats["hits"] / max(seen, 1), batch_size=1)
        return torch.tensor(stats["loss"])

    def optimizer_step(self, batches: list[dict], optimizer, max_grad_norm: float | None = None) -> dict:
        """One update from ``batches`` (microbatches on the device): schedule, Megatron DDP reduction, global-norm
        clipping, ``optimizer.step()``. Returns loss, tokens and the pre-clip grad norm."""
        self.ddp.zero_grad_buffer()
        optimizer.zero_grad(set_to_none=True)
        stats = self._forward_backward(batches, forward_only=False)
        params = [p for p in self.stage.parameters() if p.requires_grad]
        for p in params:  # Megatron DDP accumulates (and all-reduces) into main_grad
            p.grad = p.main_grad.to(p.dtype) if p.main_grad.dtype != p.dtype else p.main_grad
        stats["grad_norm"] = clip_grad_norm(params, max_grad_norm) if max_grad_norm else None
        optimizer.step()
        self._average_buffers()
        return stats

    def _average_buffers(self) -> None:
        """Keep the encoder's BatchNorm running statistics identical on all data-parallel ranks (Megatron DDP
        reduces gradients only), so every replica evaluates and saves the same model."""
        group = ps.get_data_parallel_group()
        if ps.get_data_parallel_world_size() == 1 or self.stage.perception is None:
            return
        for buf in self.stage.perception.buffers():
            if buf.is_floating_point():
                torch.distributed.all_reduce(buf, group=group)
                buf.div_(ps.get_data_parallel_world_size())

    def loss(self, batches: list[dict]) -> dict:
        """Token-weighted loss over batches without updating anything (all stages, all ranks call it)."""
        with torch.no_grad():
            return self._forward_backward([self._to_device(b) for b in batches], forward_only=True)

    def validation_step(self, batch, batch_idx):
        stats = self.loss([batch])  # every rank, even with an empty batch: the loss is all-reduced
        if stats["tokens"] == 0:
            return None
        self.log("val_loss", stats["loss"], prog_bar=True, batch_size=max(stats["tokens"], 1))
        return stats["loss"]

    def setup_optimizer_param_groups(self):
        """NeMo's ``optim_param_groups`` with dotted module paths, e.g. ``{stage.perception: {lr: 5e-3}}`` to let the
        speech side learn faster than a pretrained LLM. A module that is None on this pipeline stage is skipped."""
        groups, grouped = [], set()
        for path, extra in (self.cfg.get("optim_param_groups") or {}).items():
            module = self
            for name in path.split("."):
                if not hasattr(module, name):
                    raise ValueError(f"optim_param_groups: the model has no module {path!r}")
                module = getattr(module, name)
            if module is not None:
                params = list(module.parameters())
                grouped |= {id(p) for p in params}
                groups.append({"params": params, **OmegaConf.to_container(extra, resolve=True)})
        rest = [p for p in self.parameters() if id(p) not in grouped]
        self._optimizer_param_groups = [{"params": rest}, *groups]

    # ------------------------------------------------------------------ data
    def _dataloader(self, cfg):
        from nemo_jstip.data.nemo_types import build_dataloader

        cfg = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "defer_setup"}
        # the data must interleave as the model's tokenizer was set up to (special tokens): one source of truth
        model_interleave = OmegaConf.to_container(self.cfg.get("interleave") or OmegaConf.create(), resolve=True)
        if cfg.setdefault("interleave", model_interleave) != model_interleave:
            raise ValueError(f"data interleave {cfg['interleave']} differs from model.interleave {model_interleave}: "
                             "drop the data section's own (it follows model.interleave)")
        return build_dataloader(cfg, self.tokenizer, self.frame_spec, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())

    def setup_training_data(self, cfg):
        self._train_dl = self._dataloader(cfg)

    def setup_validation_data(self, cfg):
        self._validation_dl = self._dataloader(cfg)

    def setup(self, stage: str | None = None):
        # data needs the data-parallel rank: build loaders once the strategy has set up Megatron's groups
        if stage == "fit" and self.cfg.get("train_ds") is not None and self._train_dl is None:
            self.setup_training_data(self.cfg.train_ds)
        if stage in ("fit", "validate") and self.cfg.get("validation_ds") is not None and self._validation_dl is None:
            self.setup_validation_data(self.cfg.validation_ds)

    # ------------------------------------------------------------------ checkpoints
    def save_to(self, save_path: str):
        """Write a .nemo; all ranks call it (each writes its shards; see nemo_jstip/checkpoint.py)."""
        return self._save_restore_connector.save_to(self, str(save_path))

    @classmethod
    def restore_from(cls, restore_path: str, *args, save_restore_connector=None, **kwargs):
        """Load a .nemo at the current TP/PP layout (initialise it first, e.g. ``parallel.dist.init_parallel``)."""
        return super().restore_from(
            restore_path, *args, save_restore_connector=save_restore_connector or JSTIPSaveRestoreConnector(), **kwargs
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Resume state beyond Lightning's: this rank's RNGs and the training sampler's consumed position."""
        sampler = getattr(self._train_dl, "sampler", None)
        checkpoint["jstip"] = {
            "rng": {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
            "sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("jstip")
        if state is None:
            return
        if state["sampler"] is not None:
            self._train_dl.sampler.load_state_dict(state["sampler"])
        # Lightning saves mid-batch, before counting the batch for its logging step: resumed logs would run one
        # step behind. One optimizer step per batch here, so the count is the global step.
        loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict")
        if loop is not None:
            loop["_batches_that_stepped"] = checkpoint["global_step"]
        # applied at the next training step: creating the DataLoader iterator (after this hook) draws from the RNG
        self._resume_rng = state["rng"]

    def _restore_rng(self) -> None:
        rng, self._resume_rng = self._resume_rng, None
        torch.set_rng_state(rng["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

    @classmethod
    def list_available_models(cls):
        return []


_SEQUENCE_KEYS = ("input_ids", "labels", "loss_mask", "audio_item", "audio_frame", "position_ids")


def _on_this_cp_rank(batch: dict) -> dict:
    """With context parallelism, this rank's two zigzag chunks of every sequence tensor (Megatron's load-balanced
    split, the one its rotary embedding expects). The splice is per position, so each chunk's placeholders take
    their frames from the full encoder output: every CP rank encodes the whole audio."""
    if ps.get_context_parallel_world_size() == 1:
        return batch
    from megatron.core.utils import get_batch_on_this_cp_rank

    seq = {k: batch[k] for k in _SEQUENCE_KEYS if batch.get(k) is not None}
    L, n = batch["input_ids"].shape[1], 2 * ps.get_context_parallel_world_size()
    if L % n:
        raise ValueError(f"sequence length {L} is not a multiple of 2 x CP = {n}: set the dataset's pad_to_multiple")
    split = get_batch_on_this_cp_rank(seq | {"cu_seqlens": None}, False, ps.get_context_parallel_group())
    return batch | {k: split[k] for k in seq}


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global grad-norm clipping across TP shards and PP stages (Megatron's own version needs CUDA). Each parameter
    counts once: TP-replicated ones on TP rank 0 only, a tied output layer (``shared``) on the first stage only."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    grads = [p.grad for p in params if p.grad is not None]
    counted = [p.grad for p in params if p.grad is not None and param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)]
    device = grads[0].device if grads else None
    local = torch.nn.utils.get_total_norm(counted) if counted else torch.zeros((), device=device)  # foreach kernels
    sq = (local.float() ** 2).reshape(1).to(device)
    torch.distributed.all_reduce(sq, group=ps.get_model_parallel_group())
    norm = math.sqrt(sq.item())
    if norm > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm

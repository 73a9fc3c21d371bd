"""JSTIPModel: speech encoder + adapter + Megatron GPT, trained on JSTIP's interleaved sequences.

Data flows one way: the dataset lays out each sequence (placeholders for speech frames, labels) in the DataLoader
workers; the first pipeline stage encodes the audio once, splices the frames into the token embeddings with one
gather (``frames[audio_item[m], audio_frame[m]]``) and hands them to the GPT as ``decoder_input``; the last stage
returns the per-token cross-entropy. How a step runs under Megatron (DDP, the optimizer wrapper, the schedule
over ``num_microbatches`` loader batches, loss reduction) is the engine's: ``parallel/engine.py``.

Modules are built in ``configure_model`` (Lightning calls it once the strategy has set up Megatron's parallel
state); without a trainer they are built at once in a single-process parallel state.

Pretrained parts define themselves: ``llm.init_from_hf`` gives the LLM's shape and the tokenizer,
``perception.init_from_nemo`` the preprocessor and encoder; the config the model keeps (and saves) holds what they
gave, so a restored model needs neither file.
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
from nemo.utils import logging
from nemo.utils.app_state import AppState
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import AutoTokenizer

from nemo_jstip.checkpoint import (
    JSTIPSaveRestoreConnector,
    NemoCheckpointError,
    load_nemo_weights,
    load_restored_weights,
    vetted_nemo,
    vetted_restore_under_way,
)
from nemo_jstip.data.examples import add_special_tokens
from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.health import DataHealth
from nemo_jstip.data.interleave import InterleaveConfig
from nemo_jstip.modules.hf_import import llm_section, load_hf_weights, read_hf_weights
from nemo_jstip.modules.llm import (LLMConfig, block_causal_mask, build_llm, labelled_token_loss,
                                    resolve_layer_spec, transformer_config)
from nemo_jstip.modules.perception import SpeechPerception
from nemo_jstip.parallel.dist import compute_device, init_parallel
from nemo_jstip.parallel.engine import EngineConfig, MegatronEngine
from nemo_jstip.parallel.layout import ParallelLayout

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
        if perception is not None and self.config.tensor_model_parallel_size > 1 and (
                perception.split_over_tp or self.config.sequence_parallel):
            # each TP rank's gradient of the (replicated) perception covers only its clips (split_over_tp) or the
            # frames spliced into its positions (SP): the engine sums them over TP (parallel/engine.py)
            for p in perception.parameters():
                p.partial_grad_over_tp = True

    def set_input_tensor(self, tensor) -> None:
        self.gpt.set_input_tensor(tensor)

    def shared_embedding_or_output_weight(self):
        return self.gpt.shared_embedding_or_output_weight()

    def embed(self, batch: dict) -> torch.Tensor:
        """Token embeddings with the encoder frames spliced in at the placeholders: [L, B, H], or under sequence
        parallelism this TP rank's positions [L / TP, B, H]. There Megatron's embedding reduce-scatters its vocab
        shards straight into position shards, and the splice fills only the positions this rank holds (the frames
        of all clips are on every TP rank)."""
        words = self.gpt.embedding.word_embeddings
        emb = words(batch["input_ids"])  # [B, L, H], or [L / TP, B, H] when it reduce-scatters
        item, frame = batch["audio_item"], batch.get("audio_frame")
        scattered = words.reduce_scatter_embeddings  # read per call: generation turns SP off (modules/generate.py)
        if scattered:
            tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
            item, frame = (t.chunk(tp, dim=1)[rank] if t is not None else None for t in (item, frame))
        else:
            emb = emb.transpose(0, 1)
        if batch.get("audio") is not None and batch["audio"].shape[0] > 0:
            # under SP each rank's frame gradients cover only its positions: the perception's gather sums them
            frames, _ = self.perception(batch["audio"], batch["audio_lens"], partial_grads=self.config.sequence_parallel)
            m = item.T >= 0  # [positions, B], as emb
            spliced = frames[item.T[m], frame.T[m]].to(emb.dtype)
            emb = emb.index_put(torch.nonzero(m, as_tuple=True), spliced)
        emb = emb.contiguous()
        if self.config.sequence_parallel and not scattered:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    def forward(self, batch: dict) -> torch.Tensor:
        """Last stage: per-token loss [B, L]; other stages: hidden states for the next stage."""
        decoder_input = self.embed(batch) if self.gpt.pre_process else None
        segments = batch.get("segment_ids")  # a packed batch: attention stays within each example
        return self.gpt(input_ids=None, position_ids=batch.get("position_ids"), decoder_input=decoder_input,
                        attention_mask=None if segments is None else block_causal_mask(segments),
                        labels=batch["labels"], output_processor=labelled_token_loss,
                        output_processor_context=self.vocab_size)


class JSTIPModel(ModelPT):
    """The JSTIP speech-LLM as a NeMo model (config sections: tokenizer, perception, llm, interleave, optim, data)."""

    def __init__(self, cfg: DictConfig, trainer: Trainer | None = None):
        self._weights_restored = False
        if self._is_model_being_restored() and not vetted_restore_under_way():
            # NeMo's generic loader (ModelPT.restore_from) with the file's unchecked config: read the file again,
            # through the vetted reader (nemo_jstip/checkpoint.py)
            path = AppState().model_restore_path
            if not path:
                raise NemoCheckpointError("restoring a JSTIPModel without AppState().model_restore_path: use "
                                          "ModelPT.restore_from or JSTIPModel.restore_from")
            try:
                with vetted_nemo(path, type(self)) as (folder, cfg):
                    self._build(cfg, trainer)
                    load_restored_weights(self, folder, path)
            except BaseException:
                # NeMo's connector resets its "being restored" state only after a successful load: left set, every
                # NeMo model built later in this process would take itself for a restore (and skip its data setup)
                self._set_model_restore_state(is_being_restored=False)
                raise
            self._weights_restored = True  # what NeMo loads next is the empty model_weights.ckpt
            return
        self._build(cfg, trainer)

    def _build(self, cfg: DictConfig, trainer: Trainer | None) -> None:
        with open_dict(cfg):  # loaders need the data-parallel rank: built in setup(), not by ModelPT.__init__
            for key in ("train_ds", "validation_ds", "test_ds"):
                if cfg.get(key) is not None:
                    cfg[key]["defer_setup"] = True
            self._derive_pretrained(cfg)
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
        self._engine = None
        self.use_distributed_optimizer = bool((self.cfg.get("optim") or {}).get("use_distributed_optimizer", False))
        self._resume_rng = None
        self._save_restore_connector = JSTIPSaveRestoreConnector()
        self.init_from_nemo = self.cfg.get("init_from_nemo")  # weights to start from (e.g. a fine-tuning stage)
        if trainer is None:
            self.configure_model()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _derive_pretrained(cfg: DictConfig) -> None:
        """Fill ``cfg`` (open) with what the pretrained files define: the LLM section from ``llm.init_from_hf``
        (and the tokenizer from that folder unless ``tokenizer.path`` names one), the preprocessor and encoder
        from ``perception.init_from_nemo``; the adapter's ``output_size`` defaults to the LLM's hidden size."""
        cfg.llm = llm_section(OmegaConf.to_container(cfg.llm, resolve=True))
        tokenizer = OmegaConf.to_container(cfg.tokenizer) if cfg.get("tokenizer") is not None else {}
        if cfg.llm.get("init_from_hf") and not tokenizer.get("path"):
            cfg.tokenizer = {**tokenizer, "path": cfg.llm.init_from_hf}
        perception = SpeechPerception.resolve_config(cfg.perception)
        if perception.adapter.get("output_size") is None:
            perception.adapter.output_size = cfg.llm.hidden_size
        cfg.perception = perception

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
        # token budgets give every microbatch its own shape; the pipeline p2p then exchanges shapes first
        return transformer_config(
            self.llm_cfg, calculate_per_token_loss=True, variable_seq_lengths=True, moe_token_dispatcher_type="alltoall"
        )

    @property
    def layout(self) -> ParallelLayout:
        """The parallel layout in effect: the strategy's, else the one ``init_parallel`` set up."""
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        return getattr(strategy, "layout", None) or ParallelLayout.current()

    @property
    def engine(self) -> MegatronEngine:
        """The Megatron training engine around the stage (built on first use; see parallel/engine.py)."""
        if self._engine is None:
            cfg = EngineConfig(use_distributed_optimizer=self.use_distributed_optimizer,
                               max_grad_norm=self.cfg.get("max_grad_norm"))
            with torch.enable_grad():  # Megatron's DDP hooks each parameter's grad accumulator: not under no_grad
                engine = MegatronEngine(self.stage, self.layout, cfg, self.tokenizer.pad_token_id or 0)
            logging.info(engine.describe())
            self.__dict__["_engine"] = engine  # not a submodule: same parameters, no duplicate state-dict keys
        return self._engine

    def setup_optimization(self, optim_config=None, optim_kwargs=None):
        """NeMo's optimizer and LR scheduler from ``model.optim``, the optimizer then wrapped by the engine
        (``use_distributed_optimizer`` is the engine's key, not the torch optimizer's)."""
        optim_config = optim_config if optim_config is not None else self.cfg.get("optim")
        if optim_config is not None and "use_distributed_optimizer" in optim_config:
            optim_config = OmegaConf.create(OmegaConf.to_container(optim_config, resolve=True))
            with open_dict(optim_config):
                distributed = bool(optim_config.pop("use_distributed_optimizer"))
            if self._engine is not None and self._engine.cfg.use_distributed_optimizer != distributed:
                if self._engine.optimizer is not None:
                    raise ValueError("use_distributed_optimizer cannot change once the optimizer exists")
                self.__dict__["_engine"] = None  # rewrapped below: DDP's buffers depend on it
            self.use_distributed_optimizer = distributed
        out = super().setup_optimization(optim_config, optim_kwargs)
        if self._optimizer is not None:
            self.engine.wrap_optimizer(self._optimizer)
        return out

    # ------------------------------------------------------------------ training
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
        # through Lightning's optimizer, so that it counts the step; the strategy runs the closure (the engine's step)
        stats = self.optimizers().step(closure=lambda: self.engine.train_step(batches))
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        sampler = getattr(self.trainer.train_dataloader, "sampler", None) if self.trainer else None
        if hasattr(sampler, "mark_consumed"):
            for b in raw:
                sampler.mark_consumed(b["position"])
        if self.trainer is not None:  # drops and fallbacks summed over the run and the DP replicas (data/health.py)
            health = self.__dict__.setdefault("_data_health", DataHealth(self.trainer.log_every_n_steps))
            for b in raw:
                health.update(b)
            self.log_dict(health.report(self.trainer.global_step, sampler), batch_size=1)
        if stats["tokens"]:  # else every rank's batches were dropped as bad input (counted by the dataset)
            self.log("train_loss", stats["loss"], prog_bar=True, batch_size=1)
        self.log("train_tokens", float(stats["tokens"]), batch_size=1)
        if stats["grad_norm"] is not None:
            self.log("grad_norm", stats["grad_norm"], batch_size=1)
        self.log("lr", self._optimizer.param_groups[0]["lr"], batch_size=1)
        perception = self.stage.perception
        if perception is not None and perception.cache_limit:
            seen = perception.cache_stats["hits"] + perception.cache_stats["misses"]
            self.log("encoder_cache_hit_rate", perception.cache_stats["hits"] / max(seen, 1), batch_size=1)
        return torch.tensor(stats["loss"])

    def loss(self, batches: list[dict]) -> dict:
        """Token-weighted loss over batches without updating anything (all stages, all ranks call it)."""
        return self.engine.evaluate([self._to_device(b) for b in batches])

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
                params = [p for p in module.parameters() if p.requires_grad]  # frozen ones have no gradient buffer
                grouped |= {id(p) for p in params}
                groups.append({"params": params, **OmegaConf.to_container(extra, resolve=True)})
        rest = [p for p in self.parameters() if id(p) not in grouped and p.requires_grad]
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
        # sequence/context parallelism split every sequence: its length must divide (the engine checks it again)
        dataset = cfg["dataset"] = dict(cfg.get("dataset") or {})
        asked, needed = int(dataset.get("pad_to_multiple", 1)), self.layout.sequence_multiple
        dataset["pad_to_multiple"] = math.lcm(asked, needed)
        if (cfg.get("sampler") or {}).get("pack"):
            if self.layout.cp > 1 or resolve_layer_spec(self.cfg.llm.get("layer_spec", "auto")) == "te":
                raise ValueError("sampler.pack runs on the local layer spec without context parallelism (a "
                                 "block-causal mask); this model has llm.layer_spec="
                                 f"{self.cfg.llm.get('layer_spec', 'auto')}, {self.layout.describe()}")
        if dataset["pad_to_multiple"] != asked:
            logging.info(f"dataset.pad_to_multiple {asked} -> {dataset['pad_to_multiple']} (a multiple of {needed}: "
                         f"{self.layout.describe()})")
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
        connector = self._save_restore_connector  # NeMo's generic restore leaves its own connector here
        if not isinstance(connector, JSTIPSaveRestoreConnector):
            connector = self._save_restore_connector = JSTIPSaveRestoreConnector()
        return connector.save_to(self, str(save_path))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As torch's; the empty ``model_weights.ckpt`` NeMo's generic restore loads after ``__init__`` has loaded
        the .nemo's ``model_weights/`` changes nothing."""
        if self._weights_restored and not state_dict:
            self._weights_restored = False
            return torch.nn.modules.module._IncompatibleKeys([], [])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

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


    def transcribe(self, audio, batch_size: int = 4, max_new_tokens: int = 256) -> list:
        """Greedy transcripts of audio files (any rate; multi-channel downmixed) or a Lhotse CutSet, in input order:
        ``Transcription`` objects with ``text``, and ``error`` for an input that could not be read
        (``nemo_jstip.transcribe``)."""
        from nemo_jstip.transcribe import transcribe

        return transcribe(self, audio, batch_size=batch_size, max_new_tokens=max_new_tokens)

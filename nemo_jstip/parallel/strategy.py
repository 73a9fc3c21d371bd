"""A Lightning strategy for Megatron-core tensor/pipeline/context/data parallelism (NeMo 3.0 ships none).

Lightning launches and sets up processes as for DDP; the strategy then builds the run's :class:`ParallelLayout`
(Megatron's groups) and leaves the model unwrapped: the model's engine (``parallel/engine.py``) trains the stage
through Megatron's schedules, DDP and optimizer, so Lightning must neither wrap it in torch DDP nor broadcast rank
0's weights (tensor-parallel ranks hold different shards).

Training checkpoints are folders of shards (``parallel/checkpoint.py``): each rank writes its own part of the
weights and optimizer state, and a checkpoint resumes at any TP/PP/DP layout. They are restored after the
optimizer exists (``restore_checkpoint_after_setup``), straight into the model and the engine's optimizer.
"""

from __future__ import annotations

import inspect
import os
import shutil

import torch
from lightning.pytorch.strategies import DDPStrategy

from nemo_jstip.parallel import checkpoint as ckpt
from nemo_jstip.parallel import cpu
from nemo_jstip.parallel.layout import ParallelLayout


class MegatronStrategy(DDPStrategy):
    strategy_name = "jstip_megatron"

    def __init__(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                 context_parallel_size: int = 1, sequence_parallel: bool = False, seed: int = 1234,
                 process_group_backend: str | None = None):
        super().__init__(process_group_backend=process_group_backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        self.tp, self.pp, self.cp, self.seed = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size, seed
        self.sequence_parallel = bool(sequence_parallel)
        if self.sequence_parallel:  # refused now, not after the processes have started
            ParallelLayout(tp=self.tp, pp=self.pp, cp=self.cp, sequence_parallel=True)
        self.layout: ParallelLayout | None = None

    @classmethod
    def from_config(cls, cfg) -> "MegatronStrategy":
        """From the YAML ``strategy`` section; an unknown key is an error naming it (a typo must not train
        another layout)."""
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        cfg = dict(cfg or {})
        if unknown := sorted(set(cfg) - known):
            raise ValueError(f"strategy: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**cfg)

    def setup_environment(self) -> None:
        cpu.apply()  # no-op with CUDA
        super().setup_environment()  # torch.distributed process group (gloo on the CPU, nccl on GPUs)
        self.layout = ParallelLayout.for_world(torch.distributed.get_world_size(), self.tp, self.pp, self.cp,
                                               sequence_parallel=self.sequence_parallel)
        self.layout.initialize(self.seed)

    def setup(self, trainer) -> None:
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == "fit":
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def configure_ddp(self) -> None:  # Megatron DDP lives in the engine
        pass

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        """Data-parallel rank and size: all TP/PP/CP ranks of one replica read the same batches."""
        from megatron.core import parallel_state as ps

        return {"num_replicas": ps.get_data_parallel_world_size(), "rank": ps.get_data_parallel_rank()}

    def reduce(self, tensor, group=None, reduce_op="mean"):
        """Reduce over the data-parallel group by default (model-parallel ranks hold the same metrics)."""
        from megatron.core import parallel_state as ps

        return super().reduce(tensor, group=group or ps.get_data_parallel_group(), reduce_op=reduce_op)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        """The closure is the engine's whole step (schedule, reduction, Megatron's optimizer): run it, nothing else."""
        return closure()

    # ------------------------------------------------------------------ checkpoints
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the optimizer must exist: its sharded state is loaded in place

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # done in load_checkpoint

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        jstip = checkpoint.pop("jstip", None) or {}
        checkpoint.pop("state_dict", None)  # saved sharded instead
        checkpoint.pop("optimizer_states", None)
        ckpt.save_training(filepath, self.lightning_module, {**checkpoint, "sampler": jstip.get("sampler")},
                           {"rng": jstip.get("rng")})

    def load_checkpoint(self, checkpoint_path) -> dict:
        state, rank_state = ckpt.load_training(checkpoint_path, self.lightning_module)
        state["jstip"] = {"rng": rank_state["rng"], "sampler": state.pop("sampler")}
        return state

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        pass  # loaded in load_checkpoint

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            folder = ckpt.checkpoint_dir(filepath)
            shutil.rmtree(folder, ignore_errors=True)
            if os.path.isfile(filepath):
                os.remove(filepath)

    # No teardown of Megatron's groups: the model stays usable after fit (save_to, test, generate).


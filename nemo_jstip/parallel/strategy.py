"""A Lightning strategy for Megatron-core tensor/pipeline/context/data parallelism (NeMo 3.0 ships none).

Lightning launches and sets up processes as for DDP; this strategy then initialises Megatron's parallel state
and leaves the model unwrapped: the model trains its Megatron stage through Megatron's pipeline schedules and
Megatron's DistributedDataParallel itself (see models/jstip_model.py), so Lightning must neither wrap it in
torch DDP nor broadcast rank 0's weights (tensor-parallel ranks hold different shards).

Training checkpoints (for exact resume) stay one file that Lightning, NeMo's exp_manager and its checkpoint
callback handle as usual: rank 0 gathers each model-parallel rank's weights and optimizer state (from data-parallel
rank 0 only: the replicas are identical) and each rank's own resume state (RNG, sampler), and writes atomically.
Such a checkpoint resumes at the same TP/PP/DP layout; the .nemo (nemo_jstip/checkpoint.py) is the format that
changes layout.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import DDPStrategy
from megatron.core import parallel_state as ps

from nemo_jstip.parallel import cpu
from nemo_jstip.parallel.dist import init_parallel


class MegatronStrategy(DDPStrategy):
    strategy_name = "jstip_megatron"

    def __init__(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        context_parallel_size: int = 1,
        seed: int = 1234,
        **kwargs: Any,
    ):
        kwargs.setdefault("process_group_backend", "nccl" if torch.cuda.is_available() else "gloo")
        super().__init__(**kwargs)
        self.tp, self.pp, self.cp, self.seed = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size, seed

    def setup_environment(self) -> None:
        cpu.apply()  # no-op with CUDA
        super().setup_environment()  # torch.distributed process group (gloo on the CPU, nccl on GPUs)
        world = torch.distributed.get_world_size()
        if world % (self.tp * self.pp * self.cp):
            raise ValueError(f"world size {world} is not divisible by TP={self.tp} x PP={self.pp} x CP={self.cp}")
        init_parallel(self.tp, self.pp, cp=self.cp, seed=self.seed)

    def setup(self, trainer) -> None:
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == "fit":
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def configure_ddp(self) -> None:  # Megatron DDP lives inside the model
        pass

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        """Data-parallel rank and size: all TP/PP/CP ranks of one replica read the same batches."""
        return {"num_replicas": ps.get_data_parallel_world_size(), "rank": ps.get_data_parallel_rank()}

    def reduce(self, tensor, group=None, reduce_op="mean"):
        """Reduce over the data-parallel group by default (model-parallel ranks hold the same metrics)."""
        return super().reduce(tensor, group=group or ps.get_data_parallel_group(), reduce_op=reduce_op)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        mine = {"jstip": checkpoint.pop("jstip", None)}
        if ps.get_data_parallel_rank() == 0:
            mine |= {k: checkpoint.pop(k) for k in _SHARDED if k in checkpoint}
        ranks = [None] * torch.distributed.get_world_size() if self.is_global_zero else None
        # on the CPU: gathered GPU tensors would all land on rank 0's device
        torch.distributed.gather_object(move_data_to_device(mine, "cpu"), ranks, dst=0)
        checkpoint["ranks"], checkpoint["layout"] = ranks, _layout()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path)
        if "ranks" not in checkpoint:
            return checkpoint
        if checkpoint["layout"] != _layout():
            raise ValueError(
                f"{checkpoint_path} was saved at {checkpoint['layout']} and resumes only at that layout (now "
                f"{_layout()}); to change layout, save a .nemo and start from it (model.init_from_nemo)"
            )
        ranks = checkpoint.pop("ranks")
        checkpoint |= ranks[ps.get_data_parallel_src_rank()]  # this replica's model-parallel shard
        checkpoint["jstip"] = ranks[torch.distributed.get_rank()]["jstip"]
        return checkpoint

    # No teardown of Megatron's groups: the model stays usable after fit (save_to, test, generate).


_SHARDED = ("state_dict", "optimizer_states")  # differ between model-parallel ranks


def _layout() -> dict[str, int]:
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}

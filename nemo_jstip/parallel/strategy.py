"""A Lightning strategy for Megatron-core tensor/pipeline/context/data parallelism (NeMo 3.0 ships none).

Lightning launches and sets up processes as for DDP; this strategy then initialises Megatron's parallel state
and leaves the model unwrapped: the model trains its Megatron stage through Megatron's pipeline schedules and
Megatron's DistributedDataParallel itself (see models/jstip_model.py), so Lightning must neither wrap it in
torch DDP nor broadcast rank 0's weights (tensor-parallel ranks hold different shards).
"""

from __future__ import annotations

from typing import Any

import torch
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

    # No teardown of Megatron's groups: the model stays usable after fit (save_to, test, generate).

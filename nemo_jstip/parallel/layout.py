"""The parallel layout of a run: one explicit object that the strategy builds and every other part reads.

``ParallelLayout`` holds the sizes (TP, PP, CP and the DP that the world size leaves), checks them up front and
builds Megatron's process groups; :meth:`ParallelLayout.current` reads back the layout in effect (scripts and
tests that initialise Megatron with ``parallel.dist.init_parallel``). The groups themselves come from Megatron's
``parallel_state``, the registry its modules read; whether sequence parallelism is on is not a group, so
``init_parallel`` records it here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps


_sequence_parallel = False  # set by parallel.dist.init_parallel with the groups


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False  # Megatron's sequence parallelism (strategy.sequence_parallel; TP >= 2)

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "dp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel layout: {name}={getattr(self, name)} must be >= 1")
        if self.sequence_parallel and self.tp < 2:
            raise ValueError(f"sequence_parallel=True needs tensor_model_parallel_size >= 2 (Megatron splits the "
                             f"sequence over the TP ranks), got TP={self.tp}")

    @property
    def sequence_multiple(self) -> int:
        """What every sequence length must be a multiple of: TP with sequence parallelism (each TP rank holds
        L / TP positions), times 2 x CP with context parallelism (Megatron's zigzag chunks)."""
        return (self.tp if self.sequence_parallel else 1) * (2 * self.cp if self.cp > 1 else 1)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @classmethod
    def for_world(cls, world_size: int, tp: int = 1, pp: int = 1, cp: int = 1,
                  sequence_parallel: bool = False) -> "ParallelLayout":
        """The layout of ``world_size`` ranks at this TP x PP x CP: DP is what is left."""
        if world_size % (tp * pp * cp):
            raise ValueError(f"world size {world_size} is not divisible by TP={tp} x PP={pp} x CP={cp}")
        return cls(tp=tp, pp=pp, cp=cp, dp=world_size // (tp * pp * cp), sequence_parallel=sequence_parallel)

    @classmethod
    def current(cls) -> "ParallelLayout":
        """The layout Megatron's parallel state was initialised with (``init_parallel``)."""
        return cls(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                   cp=ps.get_context_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
                   sequence_parallel=_sequence_parallel)

    def initialize(self, seed: int) -> None:
        """Build Megatron's groups for this layout (torch.distributed must hold ``world_size`` ranks) and seed."""
        from nemo_jstip.parallel.dist import init_parallel

        world = torch.distributed.get_world_size()
        if world != self.world_size:
            raise ValueError(f"{self.describe()} needs {self.world_size} ranks, the job has {world}")
        init_parallel(self.tp, self.pp, cp=self.cp, seed=seed, sequence_parallel=self.sequence_parallel)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self, **extra) -> str:
        """``parallel layout: tp=1 pp=1 cp=1 dp=2 sequence_parallel=False ...`` (``extra`` appended as key=value)."""
        items = {**self.as_dict(), **extra}
        return "parallel layout: " + " ".join(f"{k}={v}" for k, v in items.items())

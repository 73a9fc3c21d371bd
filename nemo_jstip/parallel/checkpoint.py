"""Training checkpoints: one directory each, every rank writing only its own shards; they reshard on resume.

Layout (NeMo's convention for distributed checkpoints: Lightning's ``NAME.ckpt`` path becomes the folder ``NAME``)::

    NAME/
      weights/            megatron dist_checkpointing (torch_dist): model weights and optimizer state in model
                          space (global layer numbers, unsharded shapes), so any TP/PP/DP layout loads them
      trainer.pt          rank 0: Lightning's state (loops, LR schedulers, callbacks), the layout it was saved at,
                          the training sampler's position (global over DP ranks)
      rank_00003.pt       each rank: its RNG states and parallel coordinates

A save is staged in ``.NAME.partial/`` and renamed into place by rank 0 after every rank has finished, so a
killed save never leaves a ``NAME/`` that looks complete (NeMo's ``-unfinished`` markers say the same to its resume
logic). On load, a folder without ``trainer.pt`` or ``weights/.metadata`` is refused with its path.

What each rank holds while saving: its own shards (dist_checkpointing writes replicated tensors from one replica
only), its RNG states, and on rank 0 Lightning's small state. Nothing is gathered.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from nemo.utils import logging

from nemo_jstip.parallel.layout import ParallelLayout

WEIGHTS, TRAINER = "weights", "trainer.pt"


class CheckpointError(ValueError):
    """A training checkpoint that is incomplete or does not fit this run."""


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The folder of a Lightning checkpoint path (``x.ckpt`` -> ``x``)."""
    path = Path(path)
    return path.with_suffix("") if path.suffix == ".ckpt" else path


def coordinates() -> dict[str, int]:
    return {"tp": ps.get_tensor_model_parallel_rank(), "pp": ps.get_pipeline_model_parallel_rank(),
            "cp": ps.get_context_parallel_rank(), "dp": ps.get_data_parallel_rank()}


def save_shards(sharded_state: dict, folder: str | Path) -> None:
    """All ranks: write this rank's shards of ``sharded_state`` into a fresh ``folder`` (a shared filesystem)."""
    folder = Path(folder)
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded_state, str(folder))
    torch.distributed.barrier()


def save(path, sharded_state: dict, trainer_state: dict, rank_state: dict) -> Path:
    """All ranks: write a checkpoint folder (see the module docstring); returns it."""
    final = checkpoint_dir(path)
    staging = final.with_name(f".{final.name}.partial")
    rank = torch.distributed.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # a killed save's leftovers (rank files of another layout)
    save_shards(sharded_state, staging / WEIGHTS)
    torch.save({"coordinates": coordinates(), **rank_state}, staging / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(trainer_state, staging / TRAINER)
    torch.distributed.barrier()
    if rank == 0:
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(staging, final)  # atomic: NAME/ is complete or absent
        shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return final


def sharded_training_state(model, is_loading: bool = False) -> dict:
    """The model's weights and, once it exists, the engine's optimizer state, as Megatron sharded state."""
    sharded = {"model": model.sharded_state_dict()}
    if model.engine.optimizer is not None:
        sharded["optimizer"] = model.engine.optimizer_sharded_state_dict(sharded["model"], is_loading=is_loading)
    return sharded


def save_training(path, model, trainer_state: dict, rank_state: dict) -> Path:
    """All ranks: a checkpoint of ``model`` (weights + optimizer) with ``trainer_state`` (rank 0's) and
    ``rank_state`` (each rank's); the layout it was saved at is recorded."""
    trainer_state = {**trainer_state, "layout": ParallelLayout.current().as_dict(),
                     "distributed_optimizer": model.engine.cfg.use_distributed_optimizer}
    return save(path, sharded_training_state(model), trainer_state, rank_state)


def load_training(path, model) -> tuple[dict, dict]:
    """All ranks: load weights and optimizer state into ``model`` at the current layout (resharding as needed);
    returns (trainer state, this rank's state)."""
    state = load_trainer_state(path)
    saved, distributed = state.pop("layout"), state.pop("distributed_optimizer")
    # sequence parallelism shards no weight and no state: the sizes alone say whether this is a reshard
    saved = {**saved, "sequence_parallel": False}
    now = {**ParallelLayout.current().as_dict(), "sequence_parallel": False}
    if model.engine.optimizer is not None and distributed != model.engine.cfg.use_distributed_optimizer:
        raise CheckpointError(f"{checkpoint_dir(path)}: saved with use_distributed_optimizer={distributed}, this run "
                              f"has {model.engine.cfg.use_distributed_optimizer}; their optimizer states differ")
    if distributed and any(saved[k] != now[k] for k in ("tp", "pp", "cp")):
        raise CheckpointError(f"{checkpoint_dir(path)}: the distributed optimizer's state resumes at any DP size but "
                              f"only at the TP/PP/CP it was saved at ({ParallelLayout(**saved).describe()})")
    if saved != now:
        logging.info(f"resuming {checkpoint_dir(path)} saved at {ParallelLayout(**saved).describe()} "
                     f"(now {ParallelLayout.current().describe()}): resharding")
    loaded = load_sharded(path, sharded_training_state(model, is_loading=True))
    model.load_state_dict(loaded["model"], strict=True)
    if "optimizer" in loaded:
        model.engine.load_optimizer_state(loaded["optimizer"])
    return state, load_rank_state(path, saved)


def is_checkpoint(path) -> bool:
    folder = checkpoint_dir(path)
    return (folder / TRAINER).is_file() and (folder / WEIGHTS / ".metadata").is_file()


def load_trainer_state(path) -> dict:
    folder = checkpoint_dir(path)
    if not is_checkpoint(folder):
        raise CheckpointError(f"{folder}: not a complete training checkpoint (no {TRAINER} or {WEIGHTS}/.metadata)")
    return torch.load(folder / TRAINER, map_location="cpu", weights_only=False)  # our own run's file


def load_sharded(path, sharded_state: dict) -> dict:
    """Fill ``sharded_state`` (this rank's shards at the current layout) from the checkpoint."""
    return dist_checkpointing.load(sharded_state, str(checkpoint_dir(path) / WEIGHTS))


def load_rank_state(path, saved_layout: dict) -> dict:
    """This rank's own file at the same layout; otherwise the file of the rank with the same DP and PP rank where
    those exist (else 0) and TP = CP rank 0: RNG streams do not map exactly across layouts."""
    folder = checkpoint_dir(path)
    me, now = coordinates(), {**ParallelLayout.current().as_dict(), "sequence_parallel": False}
    saved_layout = {**saved_layout, "sequence_parallel": False}
    if saved_layout == now:
        rank = torch.distributed.get_rank()
    else:  # Megatron's default rank order (tp-cp-ep-dp-pp), at the saved sizes
        dp = me["dp"] if me["dp"] < saved_layout["dp"] else 0
        pp = me["pp"] if me["pp"] < saved_layout["pp"] else 0
        rank = saved_layout["tp"] * saved_layout["cp"] * (dp + saved_layout["dp"] * pp)
    state = torch.load(folder / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=False)
    if saved_layout == now and state["coordinates"] != me:
        raise CheckpointError(f"{folder}: rank {rank}'s file has coordinates {state['coordinates']}, this rank {me}")
    return state

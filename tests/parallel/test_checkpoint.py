"""Sharded training checkpoints on real gloo processes: saved at TP2 x PP2 after one step, resumed at TP1 and TP2
(weights and Adam state resharded), the next steps' losses equal an uninterrupted single-process run's; the
distributed optimizer's sharded state resumes at another DP size; incomplete checkpoints are refused."""

import shutil

import pytest
import torch

from nemo_jstip.parallel.dist import spawn
from tests.models.test_parallel import LR, _build

STEPS_AFTER = 2


def train(setup_path, folder, tp: int, pp: int, phase: str, distributed_optimizer: bool = False,
          split_batches: bool = False) -> dict:
    """Rank body. ``ref``: 1 + STEPS_AFTER steps; ``save``: 1 step, then a checkpoint in ``folder``; ``load``: resume
    from ``folder``, then STEPS_AFTER steps. Returns the losses and this rank's checkpointing RSS figures."""
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf

    from nemo_jstip.parallel import checkpoint as ckpt

    model, batches = _build(setup_path, tp, pp)
    if split_batches:
        batches = batches[ps.get_data_parallel_rank() :: ps.get_data_parallel_world_size()]
    model.setup_optimization(OmegaConf.create({"name": "adamw", "lr": LR, "weight_decay": 0.01,
                                               "use_distributed_optimizer": distributed_optimizer}))
    losses = []
    if phase in ("ref", "save"):
        losses.append(model.engine.train_step(batches)["loss"])
    if phase == "save":
        ckpt.save_training(folder, model, {"step": 1}, {"rng": torch.get_rng_state()})
        return {"losses": losses}
    if phase == "load":
        state, rank = ckpt.load_training(folder, model)
        assert state["step"] == 1 and rank["rng"].dtype == torch.uint8
    for _ in range(STEPS_AFTER):
        losses.append(model.engine.train_step(batches)["loss"])
    return {"losses": losses}


def test_tp2_pp2_checkpoint_resumes_at_tp1_and_tp2(parallel_setup, tmp_path):
    (ref,) = spawn(train, 1, parallel_setup, None, 1, 1, "ref", timeout_s=120)
    saved = spawn(train, 4, parallel_setup, str(tmp_path / "step1"), 2, 2, "save", timeout_s=180)
    assert all(r["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-5) for r in saved)
    folder = tmp_path / "step1"
    assert (folder / "trainer.pt").is_file() and len(list(folder.glob("rank_*.pt"))) == 4
    assert not list(tmp_path.glob(".*"))  # staging folder renamed into place
    for tp in (1, 2):
        for r in spawn(train, tp, parallel_setup, str(folder), tp, 1, "load", timeout_s=120):
            assert r["losses"] == pytest.approx(ref["losses"][1:], rel=1e-5, abs=1e-5), tp


def test_distributed_optimizer_checkpoint_resumes_at_another_dp_size(parallel_setup, tmp_path):
    """DP=2 with the distributed optimizer (Adam state sharded over DP, saved shard by shard) resumes at DP=1 and
    at DP=2, continuing as the uninterrupted single-process run on both batches."""
    (ref,) = spawn(train, 1, parallel_setup, None, 1, 1, "ref", timeout_s=120)
    spawn(train, 2, parallel_setup, str(tmp_path / "c"), 1, 1, "save", distributed_optimizer=True,
          split_batches=True, timeout_s=120)
    (one,) = spawn(train, 1, parallel_setup, str(tmp_path / "c"), 1, 1, "load", distributed_optimizer=True,
                   timeout_s=120)
    assert one["losses"] == pytest.approx(ref["losses"][1:], rel=1e-5, abs=1e-5)
    two = spawn(train, 2, parallel_setup, str(tmp_path / "c"), 1, 1, "load", distributed_optimizer=True,
                split_batches=True, timeout_s=120)
    assert all(r["losses"] == pytest.approx(ref["losses"][1:], rel=1e-5, abs=1e-5) for r in two)
    with pytest.raises(RuntimeError, match="CheckpointError: .*saved with use_distributed_optimizer=True"):
        spawn(train, 1, parallel_setup, str(tmp_path / "c"), 1, 1, "load", timeout_s=120)
    with pytest.raises(RuntimeError, match="CheckpointError: .*only at the TP/PP/CP it was saved at"):
        spawn(train, 2, parallel_setup, str(tmp_path / "c"), 2, 1, "load", distributed_optimizer=True, timeout_s=120)


def test_incomplete_checkpoint_is_refused(tmp_path):
    from nemo_jstip.parallel import checkpoint as ckpt

    (tmp_path / "half" / "weights").mkdir(parents=True)
    (tmp_path / "half" / "trainer.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="half: not a complete training checkpoint"):
        ckpt.load_trainer_state(tmp_path / "half.ckpt")
    shutil.rmtree(tmp_path / "half")
    assert not ckpt.is_checkpoint(tmp_path / "half")

"""JSTIPModel pieces that need no parallel layout: optimizer parameter groups."""

import torch

from nemo_jstip.parallel.dist import spawn


def optimizer_groups(setup_path) -> list[tuple[float, int]]:
    """Rank body: (lr, parameter count) of each optimizer group with the speech side at its own learning rate."""
    from omegaconf import OmegaConf

    from nemo_jstip.models.jstip_model import JSTIPModel

    cfg = OmegaConf.create(torch.load(setup_path, weights_only=False)["cfg"])
    cfg.optim = {"name": "adamw", "lr": 1e-3}
    cfg.optim_param_groups = {"stage.perception": {"lr": 5e-3}}
    model = JSTIPModel(cfg)
    model.setup_optimization(cfg.optim)
    groups = [(g["lr"], sum(p.numel() for p in g["params"])) for g in model._optimizer.param_groups]
    total = sum(p.numel() for p in model.parameters())
    return groups, total, sum(p.numel() for p in model.stage.perception.parameters())


def test_speech_side_gets_its_own_learning_rate(parallel_setup):
    (groups, total, speech), = spawn(optimizer_groups, 1, parallel_setup)
    assert groups == [(1e-3, total - speech), (5e-3, speech)]

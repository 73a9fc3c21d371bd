"""JSTIPModel pieces that need no parallel layout: optimizer parameter groups, the engine built on first use."""

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


def loss_first_under_no_grad(setup_path) -> tuple[float, float]:
    """Rank body: the first use of the model is a loss under ``torch.no_grad`` (the engine is built there), then
    a training step."""
    from omegaconf import OmegaConf

    from nemo_jstip.models.jstip_model import JSTIPModel

    data = torch.load(setup_path, weights_only=False)
    model = JSTIPModel(OmegaConf.create(data["cfg"]))
    with torch.no_grad():
        before = model.loss(data["batches"])["loss"]
    model.setup_optimization(OmegaConf.create({"name": "adamw", "lr": 1e-3}))
    return before, model.engine.train_step(data["batches"])["loss"]


def test_loss_under_no_grad_before_training(parallel_setup):
    (before, trained), = spawn(loss_first_under_no_grad, 1, parallel_setup)
    assert before == trained > 0  # the training step's forward saw the same weights

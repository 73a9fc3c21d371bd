"""Train a JSTIP speech-LLM: hydra config -> Lightning Trainer (Megatron strategy) -> JSTIPModel -> fit.

    python examples/jstip_train.py --config-name jstip_tiny [model.llm.train_mode=lora trainer.max_steps=500 ...]
"""
from lightning.pytorch import Trainer
from nemo.core.config import hydra_runner
from nemo.utils.exp_manager import exp_manager
from omegaconf import OmegaConf

from nemo_jstip import JSTIPModel
from nemo_jstip.parallel.strategy import MegatronStrategy


@hydra_runner(config_path="../conf", config_name="jstip_tiny")
def main(cfg):
    trainer = Trainer(**cfg.trainer, strategy=MegatronStrategy.from_config(cfg.strategy))
    exp_manager(trainer, cfg.get("exp_manager"))
    model = JSTIPModel(cfg.model, trainer=trainer)
    trainer.fit(model)
    if cfg.get("model_out"):
        model.save_to(cfg.model_out)  # rank 0 writes; see docs/training.md


if __name__ == "__main__":
    main()

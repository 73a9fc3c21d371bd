"""nemo_jstip: joint speech-text interleaved pretraining (JSTIP) for speech-LLMs, as a NeMo plugin."""

__version__ = "0.1.0"


def __getattr__(name):  # JSTIPModel imports NeMo and megatron-core (~10 s): only when asked for
    if name == "JSTIPModel":
        from nemo_jstip.models.jstip_model import JSTIPModel

        return JSTIPModel
    raise AttributeError(name)
